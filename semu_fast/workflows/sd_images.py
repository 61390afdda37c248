"""Pixels <-> latents for Stable-Diffusion-style models: image folders to tensors, a diffusers AutoencoderKL's
encoder and decoder, and a latent preview for runs without a VAE.

    images = load_images("photos/", size=512)        # (N, 3, 512, 512) in [-1, 1]
    latents = encode_images(vae, images)             # (N, 4, 64, 64), scaled by the VAE's scaling_factor
    pixels = decode_latents(vae, latents)            # (N, 3, 512, 512) in [0, 1]

The official SD code encodes real images with the posterior's mode times 0.18215 (SD 1.x's scaling factor) and
prepares them with Resize(size, bicubic) + CenterCrop(size) + Normalize(0.5, 0.5); these functions do the same, the
scaling factor read from the VAE's config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .._utils import model_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def vae_scale_factor(vae: nn.Module) -> int:
    """How many pixels one latent spans per side: 2 ** (number of encoder levels - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_images(folder, size: int) -> torch.Tensor:
    """The PNG/JPG images of `folder` (sorted by name) as (N, 3, size, size) float32 in [-1, 1]: RGB, shorter side
    resized to `size` (bicubic), centre-cropped, normalised by 0.5 / 0.5: the official SD data pipeline's
    torchvision transforms."""
    from PIL import Image
    from torchvision import transforms

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    prepare = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(size), transforms.ToTensor(),
                                  transforms.Normalize([0.5], [0.5])])
    out = []
    for path in files:
        with Image.open(path) as image:
            out.append(prepare(image.convert("RGB")))
    return torch.stack(out)


def _scaling(vae: nn.Module) -> tuple[float, float]:
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None)  # SD 1.x/2.x have none; SD3-style VAEs shift before scaling
    return float(cfg.scaling_factor), float(shift or 0.0)


@torch.no_grad()
def encode_images(vae: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Latents (N, C, h, w) float32 on the CPU of images (N, 3, H, W) in [-1, 1]: the posterior's mode (the official
    encoder takes the mode, not a sample, so the latents are deterministic), scaled by vae.config.scaling_factor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, H, W) in [-1, 1], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if images.numel() and (images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3):
        raise ValueError(f"images must lie in [-1, 1], got values in [{images.min():.3g}, {images.max():.3g}]")
    scale, shift = _scaling(vae)
    device, dtype = model_device(vae), next(vae.parameters()).dtype
    out = [(vae.encode(chunk.to(device, dtype)).latent_dist.mode().float() - shift) * scale
           for chunk in images.split(batch_size)]
    return torch.cat(out).cpu()


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images (N, 3, H, W) float32 in [0, 1] on the CPU from latents scaled as encode_images scales them."""
    scale, shift = _scaling(vae)
    device, dtype = model_device(vae), next(vae.parameters()).dtype
    out = [vae.decode((chunk.to(device, dtype) / scale) + shift).sample.float()
           for chunk in latents.split(batch_size)]
    return ((torch.cat(out).cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def latent_preview(latents: torch.Tensor, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first 3 channels of latents (N, C, h, w) as images in [0, 1], each channel mapped by the min and max of
    `reference` (default: the latents themselves), so previews of two runs drawn with one reference compare."""
    reference = latents if reference is None else reference
    pick = [min(c, latents.shape[1] - 1) for c in range(3)]  # fewer than 3 channels: repeat the last
    x, ref = latents[:, pick].float(), reference[:, pick].float()
    lo = ref.amin(dim=(0, 2, 3), keepdim=True)
    hi = ref.amax(dim=(0, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)


def latents_to_images(latents: torch.Tensor, vae: Optional[nn.Module] = None,
                      reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Images in [0, 1] to look at: decoded by `vae` when given, else latent_preview against `reference`."""
    return decode_latents(vae, latents) if vae is not None else latent_preview(latents, reference)
