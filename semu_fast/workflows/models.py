"""Classification architectures and checkpoints: the digits CNN, SalUn's CIFAR ResNet-18 (its state dict keys
match SalUn's checkpoints), any torchvision classifier by name, and loading a plain or SalUn checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .digits import digits_cnn

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)  # SalUn's (utils.py)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, as SalUn's models do (buffers "mean" and "std")."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def resnet18_cifar(num_classes: int = 10, mean=CIFAR_MEAN, std=CIFAR_STD) -> nn.Module:
    """SalUn's CIFAR ResNet-18: torchvision's ResNet-18 with a 3x3 stride-1 stem, no max-pool and the input
    normalisation as its first module; its state dict keys match SalUn's checkpoints."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class CifarResNet18(ResNet):
        def __init__(self):
            super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
            self.normalize = Normalize(mean, std)
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()

        def forward(self, x):
            return super().forward(self.normalize(x))

    return CifarResNet18()


def build_model(arch: str, num_classes: int, in_channels: int = 3, dataset: str = "cifar10") -> nn.Module:
    """"digits-cnn", "resnet18-cifar", or any torchvision classification model name (e.g. "resnet50").
    dataset: whose channel statistics resnet18-cifar normalises by (CIFAR-100's for "cifar100", else CIFAR-10's,
    as SalUn's models)."""
    if arch == "digits-cnn":
        if in_channels != 1:
            raise ValueError(f"arch 'digits-cnn' takes 1-channel 8x8 images, the data has {in_channels} channels")
        return digits_cnn(num_classes)
    if arch != "resnet18-cifar":
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"arch must be 'digits-cnn', 'resnet18-cifar' or a torchvision classification model "
                             f"name, got {arch!r}")
    if in_channels != 3:
        raise ValueError(f"arch {arch!r} takes 3-channel images, the data has {in_channels} channel(s) (digits: "
                         f"'digits-cnn')")
    if arch == "resnet18-cifar":
        return resnet18_cifar(num_classes, *((CIFAR100_MEAN, CIFAR100_STD) if dataset == "cifar100" else ()))
    # GoogLeNet and Inception v3 return their auxiliary logits too in train mode: unlearning reads plain logits
    aux = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **aux)


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load a plain state dict or a SalUn checkpoint (a dict with "state_dict", e.g. `*.pth.tar`) into model;
    a DataParallel "module." prefix is stripped. Keys must match exactly (a SalUn model without the normalisation
    buffers keeps this model's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects other than tensors and containers
        raise ValueError(f"checkpoint {str(path)!r} could not be read as tensors only ({err}); re-save its "
                         f"state dict with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    for key in ("normalize.mean", "normalize.std"):
        if key in own and key not in state:
            state[key] = own[key]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    resized = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or resized:  # checked first: a failed load must not leave the model half-written
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, other shapes {[(k, tuple(state[k].shape)) for k in resized[:5]]}")
    model.load_state_dict(state)
    return model.eval()
