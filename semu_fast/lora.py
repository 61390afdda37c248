"""Export SEMU's Linear adapters as a standard LoRA (a peft adapter folder), so any LoRA runtime can apply them.

A SEMU Linear delta U R Vh (U: out x k, R: k x k, Vh: k x in) is a LoRA of rank k with lora_A = Vh (k x in),
lora_B = U R (out x k) and scaling lora_alpha / r = 1 (for transformers' Conv1D layers too, with peft's
fan_in_fan_out). SEMU picks k per layer, so the folder sets r and lora_alpha to
the most common rank and gives every layer its own r (and alpha = r) in peft's rank_pattern / alpha_pattern.
The LoRA applies to the original base model (the delta is relative to the unadapted weights, whether or not the
SEMU adapters are merged). A conv adapter has one R per input channel (dW[:, n] = U[n] R[n] Vh[n]): that is not a
product B A of two matrices, so it has no LoRA form and is refused (or skipped with skip_conv=True); the same holds
for a per-column Linear adapter (the official DDPM's 1x1-conv attention layout).

Two layouts:
- export_lora (peft): adapter_config.json and adapter_model.safetensors with peft's key names
  base_model.model.<module>.lora_A.weight / lora_B.weight; load with peft.PeftModel.from_pretrained(base, folder).
- export_diffusers_lora (diffusers): pytorch_lora_weights.safetensors with keys <prefix>.<module>.lora_A.weight /
  lora_B.weight (prefix "unet" for a pipeline's UNet); load with a pipeline's load_lora_weights(folder) or
  unet.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors", prefix="unet"). diffusers reads
  each layer's rank from the shapes and, with no alphas saved, uses alpha = r, so the scaling is 1 here too.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import serialization
from ._utils import atomic_write
from .adapters import SEMUColumnLinear, SEMUConv1D, SEMUConv2d, SEMULinear
from .model import SEMUModel, check_finite_adapters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers looks for in a folder
PREFIX = "base_model.model."  # PeftModel -> LoraModel (.base_model) -> the wrapped model (.model)


def lora_factors(semu_model: SEMUModel, skip_conv: bool = False,
                 dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (lora_A (k, in), lora_B (out, k))} on the CPU in `dtype`, with lora_B @ lora_A == U R Vh.
    Raises ValueError for a conv adapter unless skip_conv (then it is skipped with a warning)."""
    if not isinstance(semu_model, SEMUModel):
        raise TypeError(f"semu_model must be a SEMUModel, got {type(semu_model).__name__}")
    semu_model._attached("export the adapters as LoRA")
    adapters = semu_model.adapters
    check_finite_adapters(adapters, "export the adapters as LoRA")
    conv = [name for name, a in adapters.items() if isinstance(a, (SEMUConv2d, SEMUColumnLinear))]
    if conv and not skip_conv:
        raise ValueError(f"conv and per-column adapters have no LoRA form (their delta has one R per input channel, "
                         f"not a product B A): {', '.join(conv)}; pass skip_conv=True to export the Linear ones only")
    if conv:
        warnings.warn(f"skipping {len(conv)} conv adapter(s) with no LoRA form: {', '.join(conv)}")
    factors = {}
    with torch.no_grad():
        for name, adapter in adapters.items():
            if not isinstance(adapter, SEMULinear):
                continue
            # U R in float32, the product SEMU's own delta_weight and merge start from (in float64 when exported so)
            compute = torch.promote_types(torch.promote_types(torch.float32, adapter.R.dtype), dtype)
            lora_B = (adapter.U.to(compute) @ adapter.R.to(compute)).to("cpu", dtype).contiguous()
            lora_A = adapter.Vh.to(compute).to("cpu", dtype).contiguous()
            factors[name] = (lora_A, lora_B)
    if not factors:
        raise ValueError("semu_model has no Linear adapter to export as LoRA")
    return factors


def _pattern_key(keys, name: str) -> str:
    """peft's get_pattern_key: the first key that matches `name` as a dotted suffix (re.match, `(.*\\.)?(key)$`),
    else `name` itself (peft then looks it up as it is)."""
    return next((key for key in keys if re.match(rf"(.*\.)?({key})$", name)), name)


def _config(semu_model: SEMUModel, ranks: dict[str, int], base_model_name_or_path, task_type) -> dict:
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank (the largest of equals)
    # Every layer's own entry, longest names first: peft takes the first key that matches a name as a dotted suffix,
    # so a name such as "0" must come after "1.0", whose module it would otherwise also match.
    special = dict(sorted(ranks.items(), key=lambda item: (-item[0].count("."), -len(item[0]), item[0])))
    targets = sorted(ranks)
    # peft targets a module whose name is a target or ends with "." + a target: exclude any other such module.
    adapter_parts = {f"{name}.{child}" for name in ranks for child, _ in
                     semu_model.model.get_submodule(name).named_modules() if child}
    exclude = sorted(name for name, _ in semu_model.model.named_modules()
                     if name and name not in ranks and name not in adapter_parts
                     and any(name.endswith("." + t) for t in targets))
    for name, k in ranks.items():
        if any(name == e or name.endswith("." + e) for e in exclude):
            raise ValueError(f"module {name!r} cannot be addressed unambiguously by peft's target_modules (its name "
                             f"is a dotted suffix of a module without an adapter)")
        key = _pattern_key(special, name)
        if key != name:
            raise ValueError(f"module {name!r} cannot be addressed unambiguously by peft's rank_pattern: peft reads "
                             f"its keys as regular expressions matching a dotted suffix, and {key!r} matches it first")
    # peft takes transformers' Conv1D (weight stored (in, out)) with fan_in_fan_out, one setting for all targets.
    conv1d = {name for name, a in semu_model.adapters.items() if name in ranks and isinstance(a, SEMUConv1D)}
    if conv1d and conv1d != set(ranks):
        raise ValueError(f"peft's LoRA config has one fan_in_fan_out for every target, but these adapters mix "
                         f"Conv1D layers ({', '.join(sorted(conv1d)[:3])}) with Linear ones: export them in two "
                         f"folders (target_modules/exclude_modules when preparing)")
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": r, "rank_pattern": special, "alpha_pattern": dict(special),
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": bool(conv1d),
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    if exclude:
        config["exclude_modules"] = exclude
    return config


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _check_folder(folder: Path) -> None:
    if folder.is_file():
        raise ValueError(f"{folder} is a file: a LoRA is written as a folder (give a folder path)")


def _save_factors(factors: dict, folder: Path, file_name: str, key_prefix: str) -> None:
    """<key_prefix><module>.lora_A.weight / .lora_B.weight in a safetensors file, written atomically."""
    tensors = {}
    for name, (lora_A, lora_B) in factors.items():
        tensors[f"{key_prefix}{name}.lora_A.weight"] = lora_A
        tensors[f"{key_prefix}{name}.lora_B.weight"] = lora_B
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / file_name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def export_lora(semu_model: SEMUModel, path, base_model_name_or_path: Optional[str] = None, *,
                skip_conv: bool = False, dtype: torch.dtype = torch.float32,
                task_type: Optional[str] = None) -> dict:
    """Write semu_model's Linear adapters as a peft LoRA adapter folder `path` (created if needed); returns the
    adapter config written. base_model_name_or_path: recorded as given (peft uses it to find the base model).
    dtype: of the saved factors. task_type: peft's, e.g. "CAUSAL_LM" (None: a plain PeftModel)."""
    _check_dtype(dtype)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        base_model_name_or_path = str(base_model_name_or_path)
    factors = lora_factors(semu_model, skip_conv, dtype)
    config = _config(semu_model, {name: A.shape[0] for name, (A, _) in factors.items()}, base_model_name_or_path,
                     task_type)
    folder = Path(path)
    _check_folder(folder)
    if serialization.saved_format(folder) in (serialization.FORMAT, serialization.OLD_FORMAT):
        raise ValueError(f"{folder / CONFIG_NAME} is a SEMU adapter folder's config (sf.save_adapters), which a "
                         f"LoRA's config would replace: export the LoRA into another folder")
    _save_factors(factors, folder, WEIGHTS_NAME, PREFIX)
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return config


def export_diffusers_lora(semu_model: SEMUModel, path, prefix: Optional[str] = "unet", *, skip_conv: bool = False,
                          dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Write semu_model's Linear adapters as a diffusers LoRA folder `path` (pytorch_lora_weights.safetensors);
    returns {module name: rank}. prefix: the pipeline component the model is ("unet", "transformer"; None: no
    prefix, for model.load_lora_adapter(folder, weight_name=..., prefix=None)."""
    _check_dtype(dtype)
    if prefix is not None and (not isinstance(prefix, str) or not prefix or prefix.endswith(".")):
        raise ValueError(f"prefix must be a component name such as 'unet' (or None), got {prefix!r}")
    _check_folder(Path(path))
    factors = lora_factors(semu_model, skip_conv, dtype)
    _save_factors(factors, Path(path), DIFFUSERS_WEIGHTS_NAME, f"{prefix}." if prefix else "")
    return {name: lora_A.shape[0] for name, (lora_A, _) in factors.items()}
