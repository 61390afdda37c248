"""SEMU for Stable-Diffusion-style concept removal (diffusers `UNet2DConditionModel` + a CLIP-style text encoder and
tokenizer, loaded from a local folder).

    unet, text_encoder, tokenizer, scheduler = load_sd("path/to/local/sd")
    semu_model, report, metrics = unlearn_sd(unet, scheduler, text_encoder, tokenizer, ["a photo of a cat"],
                                             ["a photo"], preset="xattn")

`unlearn_sd` pulls the noise prediction under the forget prompt towards the (detached) prediction under an anchor
prompt. The gradient pass uses the official SD loss, -MSE(noise, (1 + g) eps(x_t, prompt) - g eps(x_t, "")), on
latents of the concept (given, e.g. real images through `sd_images.encode_images`, or sampled from the frozen model
with the forget prompt). Presets choose the layers: "xattn" (every cross-attention projection, attn2.to_q/k/v/out),
"xattn-kv" (attn2.to_k and attn2.to_v) or "all". With retain prompts and retain_weight w > 0, each step adds
w x the plain denoising loss on retain latents (the official --retrain, w = 0.1). Batches are (latents,
prompt_index); every random draw (noise, timesteps, anchors, retain batches) comes from a seeded torch.Generator.

sf.preset("official-sd") gives the official run's settings (SD/train-scripts/svd_unlearning_diffusers.py);
`class_prompts` builds its prompts ("an image of a <class>", the pseudo prompt of class (c + 1) mod 10 for "rl" or a
random other class for "rl++"). Two things of the official loop are not reproduced (see the README): every step
there takes the forget loader's first batch again (a fresh iterator of an unshuffled loader), and with diffusers
versions whose LMS scheduler keeps a step index, scale_model_input reuses the first sample's sigma for every later
sample until the next set_timesteps; here every sample is noised at its own timestep, as the loss intends.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .._checks import check_choice, check_number, check_positive_int
from .._utils import default_device, eval_mode, model_device, split_batch
from ..config import SEMUConfig
from ..model import SEMUModel
from ..report import SEMUReport
from ..training import check_unlearn_arguments, unlearn
from .diffusion import (add_noise, base_model, check_epsilon_prediction, ddpm_config, guided_ddim, predict_noise,
                        sample_size)

SD_PRESETS = {
    "xattn": (r"attn2\.to_(q|k|v|out\.0)$",),   # every cross-attention projection
    "xattn-kv": (r"attn2\.to_(k|v)$",),          # the projections of the text embedding only
    "all": None,                                 # every Linear and Conv2d of the UNet
}


# The official SD run's Imagenette classes, in label order (SD/train-scripts/svd_unlearning_diffusers.py).
IMAGENETTE_CLASSES = ("tench", "english springer", "cassette player", "chain saw", "church", "french horn",
                      "garbage truck", "gas pump", "golf ball", "parachute")
PSEUDO_RULES = ("rl", "rl++")


def class_prompts(forget_class: int, class_names: Sequence[str] = IMAGENETTE_CLASSES, *, rule: str = "rl",
                  template: str = "an image of a {}", retain: bool = False) -> dict:
    """The official SD run's prompts for forgetting class `forget_class` of `class_names`, as keyword arguments of
    unlearn_sd: forget_prompts (the class's prompt), anchor_prompts (rule "rl": the prompt of class (c + 1) mod C,
    the official pseudo prompt; "rl++": one prompt per class with c replaced by c + 1, of which unlearn_sd draws one
    per sample uniformly, so c + 1 comes twice as often, as the official draw) and, with retain=True,
    retain_prompts (every other class, for the --retrain variant: give them with retain latents and
    retain_weight=0.1; a retain latent of class c' has retain_prompt_index c' - (c' > c), its position in this
    list)."""
    check_choice("rule", rule, PSEUDO_RULES)
    names = list(class_names)
    if not isinstance(forget_class, int) or not 0 <= forget_class < len(names):
        raise ValueError(f"forget_class must be an int in [0, {len(names)}), got {forget_class!r}")
    prompts = [template.format(name) for name in names]
    nxt = (forget_class + 1) % len(names)
    anchors = [prompts[nxt]] if rule == "rl" else [prompts[nxt if c == forget_class else c] for c in range(len(names))]
    out = {"forget_prompts": [prompts[forget_class]], "anchor_prompts": anchors}
    if retain:
        out["retain_prompts"] = [p for c, p in enumerate(prompts) if c != forget_class]
    return out


def sd_target_modules(preset: str):
    """The target_modules patterns of a preset ("xattn", "xattn-kv", "all"); None for "all"."""
    if preset not in SD_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, SD_PRESETS))}, got {preset!r}")
    return SD_PRESETS[preset]


def sd_config(preset: str = "xattn", gamma: float = 0.95, attention_gamma: Optional[float] = None, *, seed: int = 0,
              **overrides) -> SEMUConfig:
    """SEMUConfig for SD: the preset's layers, per-channel conv ranks; attention_gamma (None: same as gamma, as the
    official SD scripts end up using) for the attention projections: DDPM's settings on the preset's layers, except
    that each attention projection is adapted as one matrix (SD's projections are nn.Linear in the official code
    too, not the DDPM UNet's 1x1 convs). A target_modules among the overrides replaces the preset's layers."""
    overrides.setdefault("attention_layout", "matrix")
    overrides.setdefault("target_modules", sd_target_modules(preset))
    return ddpm_config(gamma, attention_gamma, seed=seed, **overrides)


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(len(prompts), L, D) last hidden states of the text encoder, prompts padded to the tokenizer's max length."""
    max_length = tokenizer.model_max_length
    if not max_length or max_length > 10_000:  # tokenizers without a limit report a huge number
        max_length = text_encoder.config.max_position_embeddings
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(model_device(text_encoder)))[0].float()


def _rows(embeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return embeds.to(index.device)[index]


def sd_gradient_loss(scheduler, forget_embeds: torch.Tensor, uncond_embeds: torch.Tensor, *,
                     guidance_scale: float = 7.5, seed: int = 0):
    """loss_fn(model, batch) for sf.prepare on (latents, prompt_index) batches, the official SD gradient loss:
    -MSE(noise, (1 + g) eps(x_t, forget prompt) - g eps(x_t, "")), g = guidance_scale (0: the plain prediction).
    Noise and uniform timesteps are drawn from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(model, batch):
        x0, index = split_batch(batch, "the SD gradient loss")
        device = model_device(model)
        x0, index = x0.to(device), index.to(device)
        x_t, noise, t = add_noise(scheduler, x0, generator, antithetic=False)
        pred = predict_noise(model, x_t, t, encoder_hidden_states=_rows(forget_embeds, index))
        if guidance_scale:
            uncond = uncond_embeds.to(device).expand(len(x0), *uncond_embeds.shape[-2:])
            unconditional = predict_noise(model, x_t, t, encoder_hidden_states=uncond)
            pred = (1 + guidance_scale) * pred - guidance_scale * unconditional
        return -F.mse_loss(pred, noise)

    return loss_fn


def _anchor_index(index: torch.Tensor, num_forget: int, num_anchor: int, generator: torch.Generator):
    """Anchor for each sample: the paired one (as many anchors as forget prompts), the only one, or a random one."""
    if num_anchor == num_forget:
        return index
    if num_anchor == 1:
        return torch.zeros_like(index)
    return torch.randint(0, num_anchor, index.shape, generator=generator).to(index.device)


def denoising_error(model: nn.Module, scheduler, x0: torch.Tensor, embeds: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """The plain conditional denoising loss MSE(eps(x_t, embeds), noise) (mean over every element, no guidance: the
    official remain loss); x0 (N, C, h, w) and embeds (N, L, D) on the model's device. Draws noise, then uniform
    timesteps."""
    x_t, noise, t = add_noise(scheduler, x0, generator, antithetic=False)
    return F.mse_loss(predict_noise(model, x_t, t, encoder_hidden_states=embeds), noise)


def sd_forget_loss(scheduler, forget_embeds: torch.Tensor, anchor_embeds: torch.Tensor, *,
                   retain_latents: Optional[torch.Tensor] = None, retain_embeds: Optional[torch.Tensor] = None,
                   retain_index: Optional[torch.Tensor] = None, retain_weight: float = 0.0,
                   retain_batch_size: int = 8):
    """train_loss_fn(model, batch, generator) on (latents, prompt_index) batches: MSE(eps(x_t, forget prompt),
    eps(x_t, anchor prompt).detach()). Anchors: paired by index when there are as many as forget prompts, else the
    single one, else drawn at random per sample. With retain_weight w > 0, adds w x denoising_error on
    retain_batch_size retain latents (retain_embeds[retain_index] their prompts), drawn without replacement afresh
    each step, as the official loop takes the first batch of a fresh shuffled remain loader.
    Draws, in order: noise, uniform timesteps, (random anchors); then the retain batch's permutation, noise and
    timesteps."""
    num_forget, num_anchor = len(forget_embeds), len(anchor_embeds)
    use_retain = retain_weight > 0 and retain_latents is not None

    def loss_fn(model, batch, generator):
        x0, index = split_batch(batch, "the SD forget loss")
        device = model_device(model)
        x0, index = x0.to(device), index.to(device)
        x_t, _, t = add_noise(scheduler, x0, generator, antithetic=False)
        anchor = _anchor_index(index, num_forget, num_anchor, generator)
        eps_forget = predict_noise(model, x_t, t, encoder_hidden_states=_rows(forget_embeds, index))
        with torch.no_grad():
            eps_anchor = predict_noise(model, x_t, t, encoder_hidden_states=_rows(anchor_embeds, anchor))
        loss = F.mse_loss(eps_forget, eps_anchor)
        if use_retain:
            pick = torch.randperm(len(retain_latents), generator=generator)[:retain_batch_size]
            loss = loss + retain_weight * denoising_error(model, scheduler, retain_latents[pick].to(device),
                                                          _rows(retain_embeds, retain_index[pick].to(device)),
                                                          generator)
        return loss

    return loss_fn


@torch.no_grad()
def sample_sd_latents(unet: nn.Module, scheduler, cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor,
                      num_inference_steps: int = 20, guidance_scale: float = 7.5,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Latents x0 (one per row of cond_embeds) from a UNet2DConditionModel with DDIM (eta 0) and classifier-free
    guidance eps_u + s (eps_c - eps_u); initial noise from `generator` on the CPU."""
    base = base_model(unet)
    device = model_device(base)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = len(cond_embeds)
    x = torch.randn((n, base.config.in_channels, *sample_size(unet)), generator=generator).to(device)
    uncond = uncond_embeds.to(device).expand(n, *uncond_embeds.shape[-2:])
    return guided_ddim(unet, scheduler, x, num_inference_steps, {"encoder_hidden_states": cond_embeds.to(device)},
                       {"encoder_hidden_states": uncond}, guidance_scale)


@torch.no_grad()
def sample_prompts(unet: nn.Module, scheduler, text_encoder: nn.Module, tokenizer, prompts: Sequence[str],
                   per_prompt: int = 2, num_inference_steps: int = 4, guidance_scale: float = 7.5,
                   seed: int = 0) -> torch.Tensor:
    """Latents (len(prompts) * per_prompt, C, h, w) on the CPU, per_prompt consecutive ones per prompt, with DDIM
    from noise drawn from `seed`: the same seed gives the same starting noise to the model before and after."""
    embeds = encode_prompts(text_encoder, tokenizer, list(prompts)).repeat_interleave(per_prompt, dim=0)
    uncond = encode_prompts(text_encoder, tokenizer, [""])
    return sample_sd_latents(unet, scheduler, embeds, uncond, num_inference_steps, guidance_scale,
                             torch.Generator().manual_seed(seed)).cpu()


@torch.no_grad()
def sd_predictions(unet: nn.Module, scheduler, latents: torch.Tensor, embeds: torch.Tensor, index: torch.Tensor,
                   seed: int = 1) -> torch.Tensor:
    """eps(x_t, embeds[index]) at noise and timesteps drawn from `seed` (the same x_t for every call with that seed
    and latents): used to compare predictions before and after unlearning."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(unet)
    x0 = latents.to(device)
    x_t, _, t = add_noise(scheduler, x0, generator, antithetic=False)
    with eval_mode(unet):
        return predict_noise(unet, x_t, t, encoder_hidden_states=_rows(embeds, index.to(device))).float().cpu()


def _sd_gaps(unet, scheduler, latents, forget_embeds, anchor_embeds, index, anchor, seed):
    eps_f = sd_predictions(unet, scheduler, latents, forget_embeds, index, seed)
    eps_a = sd_predictions(unet, scheduler, latents, anchor_embeds, anchor, seed)
    return eps_f, eps_a


def _prompt_index(name: str, index, num_latents: int, num_prompts: int, latents_name: str) -> torch.Tensor:
    """Which prompt each latent shows: `index` checked, or cycling over the prompts."""
    if index is None:
        return torch.arange(num_latents) % num_prompts
    index = torch.as_tensor(index, dtype=torch.long)
    if index.shape != (num_latents,):
        raise ValueError(f"{name} has {index.numel()} entries for {num_latents} {latents_name}")
    if index.numel() and (index.min() < 0 or index.max() >= num_prompts):
        raise ValueError(f"{name} must index its prompts (0..{num_prompts - 1}), got values in "
                         f"[{int(index.min())}, {int(index.max())}]")
    return index


def _check_latents(name: str, latents, shape: tuple) -> None:
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != shape \
            or not latents.is_floating_point() or len(latents) == 0:
        raise ValueError(f"{name} must be a non-empty float tensor (N, {', '.join(map(str, shape))}) matching the "
                         f"UNet, got {getattr(latents, 'shape', type(latents).__name__)}")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{name} holds NaN or Inf")


def _check_sd_inputs(unet, forget_prompts, anchor_prompts, retain_prompts, latents, retain_latents, retain_weight,
                     batch_size, gradient_guidance) -> None:
    """Every check on unlearn_sd's inputs that needs no forward pass, before anything is computed or changed."""
    if not forget_prompts:
        raise ValueError("forget_prompts is empty: name at least one prompt of the concept to remove")
    if not anchor_prompts:
        raise ValueError("anchor_prompts is empty: give at least one (\"\" is the unconditional anchor)")
    check_number("gradient_guidance", gradient_guidance, positive=False)
    check_positive_int("batch_size", batch_size)
    weight = check_number("retain_weight", retain_weight, positive=False)
    if weight > 0 and not retain_prompts:
        raise ValueError(f"retain_weight={retain_weight!r} needs retain_prompts (the prompts of the data to keep)")
    if retain_prompts and weight == 0:
        raise ValueError("retain_prompts are given but retain_weight is 0, so they would be ignored: set "
                         "retain_weight > 0 (the official --retrain uses 0.1)")
    if retain_latents is not None and not retain_prompts:
        raise ValueError("retain_latents are given without retain_prompts: name the prompt of each")
    cfg = base_model(unet).config
    shape = (int(cfg.in_channels), *sample_size(unet)) if latents is None else tuple(latents.shape[1:])
    if latents is not None:
        _check_latents("latents", latents, (int(cfg.in_channels), *shape[1:]))
    if retain_latents is not None:
        _check_latents("retain_latents", retain_latents, shape)


def unlearn_sd(unet: nn.Module, scheduler, text_encoder: nn.Module, tokenizer, forget_prompts: Sequence[str],
               anchor_prompts: Sequence[str] = ("",), *, latents: Optional[torch.Tensor] = None,
               latent_prompt_index: Optional[torch.Tensor] = None, num_latents: int = 16, sample_steps: int = 20,
               sample_guidance: float = 7.5, retain_prompts: Sequence[str] = (),
               retain_latents: Optional[torch.Tensor] = None, retain_prompt_index: Optional[torch.Tensor] = None,
               retain_weight: float = 0.0, preset: str = "xattn", gamma: float = 0.95,
               attention_gamma: Optional[float] = None, gradient_guidance: float = 7.5, lr: float = 1e-5,
               epochs: int = 5, batch_size: int = 8, shuffle: bool = True, seed: int = 0, progress: bool = True,
               config: Optional[SEMUConfig] = None, semu_options: Optional[dict] = None,
               **unlearn_kwargs) -> tuple[SEMUModel, SEMUReport, dict]:
    """SEMU concept removal on a diffusers UNet2DConditionModel (changed in place). Returns (SEMUModel, report,
    metrics).

    The forget data are latents of the concept: `latents` (N, C, h, w) with latent_prompt_index (which forget prompt
    each one shows; default cycling over the prompts), e.g. real images through sd_images.encode_images, or
    num_latents sampled here from the frozen UNet under the forget prompts (sample_steps DDIM steps, guidance
    sample_guidance). The gradient pass is sd_gradient_loss (guidance gradient_guidance); R is trained with
    sd_forget_loss (Adam, lr, epochs passes of batch_size; shuffle=False keeps the latents' order, as the official
    forget loader). retain_weight w > 0 (default 0: off) adds w x the plain denoising loss on retain data each step:
    retain_latents with retain_prompt_index into retain_prompts (default cycling), or num_latents sampled under the
    retain prompts; a batch of batch_size of them per step. config: a full SEMUConfig instead of preset / gamma /
    attention_gamma / seed; semu_options: other SEMUConfig fields for sd_config (e.g. projection, rank_rule).
    Every input is checked before anything is computed.

    metrics: on the same latents at fixed fresh noise and timesteps, forget_anchor_gap_before/after =
    MSE(eps(forget prompt), eps(anchor prompt)), anchor_drift = MSE of the anchor prediction after vs before and
    forget_shift = MSE of the forget prediction after vs before (with retain data: retain_drift, the same for the
    retain prompts on the retain latents); plus the trainable parameter count."""
    forget_prompts, anchor_prompts, retain_prompts = ([p] if isinstance(p, str) else list(p)  # one prompt, or many
                                                      for p in (forget_prompts, anchor_prompts, retain_prompts))
    _check_sd_inputs(unet, forget_prompts, anchor_prompts, retain_prompts, latents, retain_latents, retain_weight,
                     batch_size, gradient_guidance)
    check_epsilon_prediction(scheduler)
    check_positive_int("sample_steps", sample_steps)
    if latents is None or (retain_prompts and retain_latents is None):
        check_positive_int("num_latents", num_latents)
    if config is not None and semu_options:
        raise ValueError("give config or semu_options, not both (semu_options extend the config built from preset)")
    config = config if config is not None else sd_config(preset, gamma, attention_gamma, seed=seed,
                                                         **(semu_options or {}))
    check_number("sample_guidance", sample_guidance, positive=False)
    fixed = {"config": config, "loss_fn": None, "train_loss_fn": None, "optimizer": "adam", "lr": lr,
             "epochs": epochs, "weight_decay": 0.0, "select_best": False, "progress": progress}
    check_unlearn_arguments("unlearn_sd", fixed, unlearn_kwargs)
    index = _prompt_index("latent_prompt_index", latent_prompt_index,
                          num_latents if latents is None else len(latents), len(forget_prompts), "latents")
    if retain_prompts:
        retain_index = _prompt_index("retain_prompt_index", retain_prompt_index,
                                     num_latents if retain_latents is None else len(retain_latents),
                                     len(retain_prompts), "retain latents")
    forget_embeds = encode_prompts(text_encoder, tokenizer, forget_prompts)
    anchor_embeds = encode_prompts(text_encoder, tokenizer, anchor_prompts)
    uncond_embeds = encode_prompts(text_encoder, tokenizer, [""])
    if latents is None:
        latents = sample_sd_latents(unet, scheduler, forget_embeds[index], uncond_embeds, sample_steps,
                                    sample_guidance, torch.Generator().manual_seed(seed)).cpu()
    retain = {}
    if retain_prompts:
        retain_embeds = encode_prompts(text_encoder, tokenizer, retain_prompts)
        if retain_latents is None:  # another seed: not the forget latents' starting noise
            retain_latents = sample_sd_latents(unet, scheduler, retain_embeds[retain_index], uncond_embeds,
                                               sample_steps, sample_guidance,
                                               torch.Generator().manual_seed(seed + 1)).cpu()
        retain = {"retain_latents": retain_latents.float().cpu(), "retain_embeds": retain_embeds,
                  "retain_index": retain_index, "retain_weight": float(retain_weight),
                  "retain_batch_size": batch_size}
        retain_before = sd_predictions(unet, scheduler, retain_latents, retain_embeds, retain_index, seed + 1)
    anchor = _anchor_index(index, len(forget_prompts), len(anchor_prompts), torch.Generator().manual_seed(seed))
    before_f, before_a = _sd_gaps(unet, scheduler, latents, forget_embeds, anchor_embeds, index, anchor, seed + 1)
    loader = DataLoader(TensorDataset(latents.float().cpu(), index), batch_size=batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(seed) if shuffle else None)
    fixed.update(loss_fn=sd_gradient_loss(scheduler, forget_embeds, uncond_embeds, guidance_scale=gradient_guidance,
                                          seed=config.seed),
                 train_loss_fn=sd_forget_loss(scheduler, forget_embeds, anchor_embeds, **retain))
    semu_model, report = unlearn(unet, loader, None, **fixed, **unlearn_kwargs)
    after_f, after_a = _sd_gaps(semu_model, scheduler, latents, forget_embeds, anchor_embeds, index, anchor, seed + 1)
    metrics = {"forget_anchor_gap_before": F.mse_loss(before_f, before_a).item(),
               "forget_anchor_gap_after": F.mse_loss(after_f, after_a).item(),
               "anchor_drift": F.mse_loss(after_a, before_a).item(),
               "forget_shift": F.mse_loss(after_f, before_f).item(),
               "trainable_params": report.trainable_params, "trainable_share": report.trainable_share,
               "num_latents": len(latents),
               "adapted_layers": [layer.name for layer in report.layers if layer.k > 0]}
    if retain:
        retain_after = sd_predictions(semu_model, scheduler, retain_latents, retain_embeds, retain_index, seed + 1)
        metrics.update(retain_drift=F.mse_loss(retain_after, retain_before).item(),
                       num_retain_latents=len(retain_latents))
    return semu_model, report, metrics


SD_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")  # what load_sd reads of a model folder


def load_sd(path, device: Optional[str] = None, *, with_vae: bool = False):
    """(unet, text_encoder, tokenizer, scheduler) from a local Stable-Diffusion-style folder with unet/,
    text_encoder/ and tokenizer/ subfolders (scheduler/ optional: its betas are used in a DDPMScheduler, with
    clip_sample False unless its config sets it; without it, SD 1.x's scaled-linear 0.00085..0.012 over 1000
    steps). with_vae: a fifth entry, the AutoencoderKL of vae/ (eval, frozen), or None when the folder has no vae/.
    Nothing is downloaded; float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(path)
    missing = [name for name in ("unet", "text_encoder", "tokenizer") if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} lacks the subfolder(s) {', '.join(missing)} (expected unet/, "
                                f"text_encoder/ and tokenizer/, as a diffusers pipeline saves them)")
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).float()
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True).float()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    # Without clip_sample=False, DDPM/DDIM steps clip the predicted latents to [-1, 1] (DDPMScheduler's default),
    # which SD's latents far exceed: a scheduler config that does not say otherwise gets False.
    if (path / "scheduler").is_dir():
        config = DDPMScheduler.load_config(path / "scheduler", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True,
                                                  **({} if "clip_sample" in config else {"clip_sample": False}))
    else:  # SD 1.x's schedule
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    device = device or default_device()
    unet.to(device).eval()
    text_encoder.to(device).eval().requires_grad_(False)
    if not with_vae:
        return unet, text_encoder, tokenizer, scheduler
    vae = None
    if (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).float()
        vae.to(device).eval().requires_grad_(False)
    return unet, text_encoder, tokenizer, scheduler, vae
