"""SEMU for diffusion models (diffusers): the shared noise pieces and DDPM class forgetting.

DDPM (class-conditional `UNet2DModel` + `DDPMScheduler`), as the official DDPM code does:

    unet, scheduler = pretrained_digits_ddpm(cache_dir)            # or your own model
    semu_model, report, metrics = unlearn_ddpm(unet, scheduler, forget_loader, forget_class=3, steps=300,
                                               num_classes=DIGITS_NUM_CLASSES)  # its last embedding row: null
    images = sample(semu_model, scheduler, [3] * 16, num_inference_steps=50, generator=g)

- gradient pass (`diffusion_loss`): the standard eps-prediction MSE on the forget images at random timesteps;
- conv layers get one rank per input channel (conv_rank="per_channel"), attention projections their own gamma
  (`attention_gamma`, default 1.0) through `SEMUConfig.gamma_overrides`;
- attention projections (diffusers' nn.Linear to_q/to_k/to_v/to_out.0) take the official UNet's layout by default
  (`attention_layout="per_column"`): the official q/k/v/proj_out are 1x1 convs, split per input channel, so each
  input column gets its own rank-1 adapter, about C trainable entries per C x C projection
  (`SEMUConfig.per_column_modules`); `attention_layout="matrix"` adapts each as one matrix (up to C^2 entries);
- training R (`ddpm_forget_loss`, Adam lr 1e-3): MSE(eps(x_t, c_forget), eps(x_t, c_other).detach()) with c_other a
  random class other than the forgotten ones, drawn per sample, plus alpha * the standard loss on a remain batch when
  a remain loader is given (summed in the same step, as the official `semu_unlearn_retrain`).

Stable-Diffusion-style concept removal builds on these pieces in semu_fast.workflows.stable_diffusion.

Batches are (x0, labels) tuples with x0 in the model's range ([-1, 1] for the digits model). Every random draw
(noise, timesteps, other classes) comes from a seeded torch.Generator.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .._checks import check_choice, check_number, check_positive_int
from .._utils import eval_mode, model_device, split_batch
from ..config import SEMUConfig
from ..layers import select_layers
from ..model import SEMUModel, base_model
from ..report import SEMUReport
from ..training import unlearn
from ._cache import load_or_train
from .digits import DIGITS_NULL_CLASS, DIGITS_NUM_CLASSES, digits_scheduler, digits_unet, load_digits_split

# Attention projections of diffusers' UNets: "...attentions.0.to_q" (UNet2DModel's Attention) and
# "...transformer_blocks.0.attn1.to_q" / "...attn2.to_out.0" (UNet2DConditionModel).
ATTENTION_PATTERN = r"(attn\d*|attentions\.\d+)\.to_(q|k|v|out\.0)$"
# "per_column": the official DDPM UNet's layout for its 1x1-conv attention; "matrix": one SVD per projection.
ATTENTION_LAYOUTS = ("per_column", "matrix")
DIGITS_TRAIN_STEPS = 1200


# --- shared pieces ----------------------------------------------------------------------------------------------

def predict_noise(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, **conditioning) -> torch.Tensor:
    """The model's noise prediction (diffusers UNets return an output object; plain modules a tensor)."""
    out = model(x_t, t, **conditioning)
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


def _num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def draw_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, antithetic: bool = True):
    """n timesteps in [0, T): uniform, or antithetic pairs (t, T - 1 - t) as the official DDPM code draws them."""
    if not antithetic:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    t = torch.randint(0, num_train_timesteps, (n // 2 + 1,), generator=generator)
    return torch.cat([t, num_train_timesteps - 1 - t])[:n]


def add_noise(scheduler, x0: torch.Tensor, generator: torch.Generator, antithetic: bool):
    """(x_t, noise, t): noise and t drawn from `generator` (on the CPU, so runs agree across devices)."""
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    t = draw_timesteps(x0.shape[0], _num_train_timesteps(scheduler), generator, antithetic).to(x0.device)
    return scheduler.add_noise(x0, noise, t), noise, t


# --- DDPM: class forgetting -------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum")  # "sum": squared error summed over each sample's pixels, mean over the batch (official)
TARGETS = ("random", "next")


def _squared_error(prediction: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return F.mse_loss(prediction, target)
    return (prediction - target).square().flatten(1).sum(1).mean()


def class_noise(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, *,
                guidance: float = 0.0, null_class: Optional[int] = None, cond_dropout: float = 0.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The class-conditional noise prediction, as the official DDPM model forms it: with cond_dropout p, each
    sample's label becomes null_class with probability p (drawn from `generator`); with guidance w,
    (1 + w) eps(x_t, c) - w eps(x_t, null_class)."""
    if cond_dropout > 0:
        drop = (torch.rand(labels.shape, generator=generator) < cond_dropout).to(labels.device)
        labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    eps = predict_noise(model, x_t, t, class_labels=labels)
    if guidance:
        eps_null = predict_noise(model, x_t, t, class_labels=torch.full_like(labels, null_class))
        eps = (1 + guidance) * eps - guidance * eps_null
    return eps


def eps_mse_loss(model: nn.Module, scheduler, batch, generator: torch.Generator, antithetic: bool = True, *,
                 reduction: str = "mean", **conditioning):
    """The standard DDPM loss on an (x0, labels) batch: MSE(eps(x_t, labels), noise), x_t = add_noise(x0, noise, t);
    reduction "mean" (over every element) or "sum" (over each sample's pixels, then the batch mean: the official
    code's); conditioning: class_noise's guidance / null_class / cond_dropout.
    Draws, in order: noise (randn of x0's shape), the timesteps, then cond_dropout's draws."""
    x0, labels = split_batch(batch, "the diffusion loss")
    device = model_device(model)
    x0, labels = x0.to(device), labels.to(device)
    x_t, noise, t = add_noise(scheduler, x0, generator, antithetic)
    return _squared_error(class_noise(model, x_t, t, labels, generator=generator, **conditioning), noise, reduction)


def diffusion_loss(scheduler, *, seed: int = 0, antithetic: bool = True, reduction: str = "mean",
                   guidance: float = 0.0, null_class: Optional[int] = None,
                   forget_classes: Optional[Sequence[int]] = None):
    """loss_fn(model, batch) for sf.prepare: the eps-prediction loss on forget batches (x0, labels), with the
    noise and timesteps of each call drawn from its own generator seeded with `seed`; guidance w predicts with
    (1 + w) eps_c - w eps_null, as the official gradient pass does (w = 2). forget_classes: refuse batches with
    other labels."""
    check_choice("reduction", reduction, REDUCTIONS)
    generator = torch.Generator().manual_seed(seed)
    allowed = None if forget_classes is None else torch.tensor(list(forget_classes))

    def loss_fn(model, batch):
        if allowed is not None:
            _check_forget_labels(split_batch(batch, "the DDPM gradient pass")[1], allowed)
        return eps_mse_loss(model, scheduler, batch, generator, antithetic, reduction=reduction,
                            guidance=guidance, null_class=null_class)

    return loss_fn


def _other_classes(labels: torch.Tensor, forget_classes: Sequence[int], num_classes: int,
                   generator: torch.Generator) -> torch.Tensor:
    allowed = torch.tensor([c for c in range(num_classes) if c not in set(forget_classes)], dtype=torch.long)
    if len(allowed) == 0:
        raise ValueError(f"no class left to steer to: forget_classes {list(forget_classes)} cover all {num_classes}")
    return allowed[torch.randint(0, len(allowed), labels.shape, generator=generator)]


def class_list(name: str, classes, num_classes: int) -> list[int]:
    """One class or a non-empty sequence of them (ints, numpy or 0-d tensor integers) as a list of ints in
    [0, num_classes); anything else is refused naming `name`."""
    def one(c):
        if isinstance(c, torch.Tensor) and c.dim() == 0 and not c.is_floating_point() and c.dtype != torch.bool:
            c = c.item()
        return int(c) if isinstance(c, numbers.Integral) and not isinstance(c, bool) else None

    single = one(classes)
    try:
        found = [single] if single is not None else [one(c) for c in classes]
    except TypeError:
        found = []
    if not found or any(c is None or not 0 <= c < num_classes for c in found):
        raise ValueError(f"{name} must be a class in [0, {num_classes}) or a non-empty list of them, got "
                         f"{classes!r}")
    return found


def _check_forget_labels(labels: torch.Tensor, forget_classes: torch.Tensor) -> None:
    """Labels outside forget_classes (a CPU tensor) are refused; labels already on an accelerator are not checked
    (it would cost a device sync every step)."""
    if labels.device != forget_classes.device:
        return
    strays = labels[~torch.isin(labels, forget_classes)]
    if len(strays):
        raise ValueError(f"a forget batch holds labels {sorted(set(strays.tolist()))[:5]} outside the forgotten "
                         f"class(es) {forget_classes.tolist()}: forget_loader must yield samples of those classes "
                         f"only")


def ddpm_forget_loss(scheduler, forget_classes: Union[int, Sequence[int]], num_classes: int, *,
                     alpha: float = 1.0, antithetic: bool = True, target: str = "random", cond_dropout: float = 0.0,
                     null_class: Optional[int] = None, remain_reduction: str = "mean"):
    """train_loss_fn(model, batch, generator) for sf.unlearn: MSE(eps(x_t, c_forget), eps(x_t, c_other).detach()),
    c_forget the batch's labels; c_other per sample uniform over the classes not forgotten (target "random") or
    (c + 1) mod num_classes (target "next": the official rl's fixed class). cond_dropout p: each forward's labels
    become null_class with probability p, as the official model trains. A batch of four tensors (x_f, c_f, x_r,
    c_r) adds alpha * the standard loss on the remain part, reduced by remain_reduction ("sum" is the official).

    Draws, in order: noise, timesteps, other classes (target "random"), the dropout of both forwards; then the
    remain batch's noise, timesteps and dropout."""
    check_choice("target", target, TARGETS)
    check_choice("remain_reduction", remain_reduction, REDUCTIONS)
    forget_classes = class_list("forget_classes", forget_classes, num_classes)
    check_number("alpha", alpha, positive=False)
    dropout = {"cond_dropout": cond_dropout, "null_class": null_class}
    allowed = torch.tensor(forget_classes)

    def loss_fn(model, batch, generator):
        x0, labels = split_batch(batch, "the DDPM forget loss")
        _check_forget_labels(labels, allowed)  # before moving them: no device sync
        device = model_device(model)
        x0, labels = x0.to(device), labels.to(device)
        x_t, _, t = add_noise(scheduler, x0, generator, antithetic)
        other = (_other_classes(labels, forget_classes, num_classes, generator).to(device) if target == "random"
                 else (labels + 1) % num_classes)
        eps_forget = class_noise(model, x_t, t, labels, generator=generator, **dropout)
        with torch.no_grad():
            eps_other = class_noise(model, x_t, t, other, generator=generator, **dropout)
        loss = F.mse_loss(eps_forget, eps_other)
        if len(batch) >= 4:
            loss = loss + alpha * eps_mse_loss(model, scheduler, batch[2:4], generator, antithetic,
                                               reduction=remain_reduction, **dropout)
        return loss

    return loss_fn


class _WithRemain:
    """The forget batches, each extended with the next remain batch (x_f, c_f, x_r, c_r); the remain loader is
    cycled and continues where it stopped, so every epoch sees fresh remain data."""

    def __init__(self, forget: Iterable, remain: Iterable):
        self.forget, self.remain = forget, remain
        self._it = None

    def __len__(self):
        return len(self.forget)

    def data_parts(self) -> tuple:
        """The loaders combined (a checkpoint's data digest reads them)."""
        return self.forget, self.remain

    def _next_remain(self):
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.remain)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise ValueError("remain_loader yielded no batches")

    def __iter__(self):
        for batch in self.forget:
            x_r, c_r = split_batch(self._next_remain(), "remain_loader")
            yield (*split_batch(batch, "forget_loader"), x_r, c_r)


def ddpm_config(gamma: float = 0.95, attention_gamma: Optional[float] = 1.0, *, seed: int = 0,
                attention_layout: str = "per_column", **overrides) -> SEMUConfig:
    """The official DDPM SEMU settings: per-channel conv ranks, attention projections at attention_gamma
    (None: the same gamma as every other layer) in attention_layout ("per_column": one rank-1 adapter per input
    column, as the official 1x1-conv attention; "matrix": one adapter per projection)."""
    check_choice("attention_layout", attention_layout, ATTENTION_LAYOUTS)
    overrides.setdefault("conv_rank", "per_channel")
    if attention_layout == "per_column":
        overrides.setdefault("per_column_modules", (ATTENTION_PATTERN,))
    gamma_overrides = dict(overrides.pop("gamma_overrides", {}) or {})
    if attention_gamma is not None:
        gamma_overrides.setdefault(ATTENTION_PATTERN, attention_gamma)
    return SEMUConfig(gamma=gamma, gamma_overrides=gamma_overrides, seed=seed, **overrides)


def unlearn_ddpm(unet: nn.Module, scheduler, forget_loader: Iterable, forget_class: Union[int, Sequence[int]],
                 remain_loader: Optional[Iterable] = None, *, num_classes: Optional[int] = None, alpha: float = 1.0,
                 gamma: float = 0.95, attention_gamma: Optional[float] = 1.0,
                 attention_layout: str = "per_column", lr: float = 1e-3,
                 steps: Optional[int] = None, epochs: Optional[int] = None, seed: int = 0, progress: bool = True,
                 antithetic: bool = True, config: Optional[SEMUConfig] = None, semu_options: Optional[dict] = None,
                 guidance: float = 0.0, target: str = "random", cond_dropout: float = 0.0, reduction: str = "mean",
                 **unlearn_kwargs) -> tuple[SEMUModel, SEMUReport, dict]:
    """SEMU class forgetting for a class-conditional diffusers UNet2DModel (changed in place). Returns (SEMUModel,
    report, metrics) with metrics: trainable_params, trainable_share (%), trainable_split (report.trainable_split:
    conv / attention / other), final_loss (the last epoch's mean).

    forget_loader: (x0, labels) batches of the classes to forget, x0 in the model's range. remain_loader: batches of
    the other classes; when given, each step adds alpha * their standard loss. num_classes: the real classes
    (default unet.config.num_class_embeds; pass it when the embedding has an extra null-class row). Training length:
    `steps` optimizer steps (passes over forget_loader, the last one cut short, as the official loop cycles its
    loader) or `epochs` passes; neither means the official 1000 steps. attention_layout: "per_column" (default, the
    official UNet's 1x1-conv attention) or "matrix" (see ddpm_config). config: a full SEMUConfig instead of
    gamma/attention_gamma/attention_layout/seed; semu_options: other SEMUConfig fields for ddpm_config (e.g.
    rank_rule, min_rank, grad_clip).

    The official run's choices (sf.preset("official-ddpm")): guidance w, the gradient pass predicts with
    (1 + w) eps_c - w eps_null; target "next", R trains towards the fixed class (c + 1) mod num_classes instead of a
    random other class; cond_dropout p, every training forward drops labels to the null class with probability p;
    reduction "sum", the gradient-pass and remain losses sum each sample's squared error over its pixels (the
    official loss) instead of averaging. The null class is the last class-embedding row, so guidance and
    cond_dropout need num_class_embeds > num_classes. **unlearn_kwargs go to sf.unlearn (e.g. max_grad_norm; the
    SEMUConfig's grad_clip goes in semu_options)."""
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if "max_steps" in unlearn_kwargs:
        raise ValueError("give steps (the training length unlearn_ddpm passes to sf.unlearn as max_steps), not "
                         "max_steps")
    if steps is not None:
        check_positive_int("steps", steps)
    check_epsilon_prediction(scheduler)
    embeds = getattr(getattr(base_model(unet), "config", None), "num_class_embeds", None) or 0
    if num_classes is None:
        if not embeds:
            raise ValueError("num_classes is needed: the UNet has no num_class_embeds (is it class-conditional?)")
        num_classes = embeds
    if embeds and num_classes > embeds:
        raise ValueError(f"num_classes={num_classes} exceeds the UNet's class embedding (num_class_embeds="
                         f"{embeds})")
    forget = class_list("forget_class", forget_class, num_classes)
    if config is not None and semu_options:
        raise ValueError("give config or semu_options, not both (semu_options extend the config built from gamma)")
    config = config if config is not None else ddpm_config(gamma, attention_gamma, seed=seed,
                                                           attention_layout=attention_layout, **(semu_options or {}))
    check_choice("target", target, TARGETS)
    check_choice("reduction", reduction, REDUCTIONS)
    null_class = None
    check_number("guidance", guidance, positive=False)
    if check_number("cond_dropout", cond_dropout, positive=False) >= 1:
        raise ValueError(f"cond_dropout must be a probability below 1, got {cond_dropout!r}")
    if guidance or cond_dropout:
        if embeds <= num_classes:
            raise ValueError(f"guidance and cond_dropout need a null class (a class-embedding row past the "
                             f"{num_classes} real classes), but the UNet has num_class_embeds={embeds}")
        null_class = embeds - 1
    chosen = select_layers(base_model(unet), dataclasses.replace(config, gamma_overrides={}))
    if not any(matches_attention(name) for name in chosen):
        # no attention layer adapted (none in the UNet, or target_modules leaves them out): the library's own
        # attention override and layout have nothing to act on
        columns = tuple(p for p in config.per_column_modules or () if p != ATTENTION_PATTERN)
        config = dataclasses.replace(config, gamma_overrides={p: g for p, g in config.gamma_overrides.items()
                                                              if p != ATTENTION_PATTERN},
                                     per_column_modules=columns or None)
    max_steps = None
    if epochs is None:
        try:
            batches = len(forget_loader)
        except TypeError:
            raise ValueError("forget_loader has no len(): pass epochs instead of steps") from None
        max_steps = 1000 if steps is None else steps
        epochs = max(1, math.ceil(max_steps / max(batches, 1)))
    loader = forget_loader if remain_loader is None else _WithRemain(forget_loader, remain_loader)
    semu_model, report = unlearn(unet, loader, None, config,
                                 loss_fn=diffusion_loss(scheduler, seed=config.seed, antithetic=antithetic,
                                                        reduction=reduction, guidance=guidance,
                                                        null_class=null_class, forget_classes=forget),
                                 train_loss_fn=ddpm_forget_loss(scheduler, forget, num_classes, alpha=alpha,
                                                                antithetic=antithetic, target=target,
                                                                cond_dropout=cond_dropout, null_class=null_class,
                                                                remain_reduction=reduction),
                                 optimizer="adam", lr=lr, epochs=epochs, max_steps=max_steps, weight_decay=0.0,
                                 select_best=False, progress=progress, **unlearn_kwargs)
    history = report.training.get("history") or [{}]
    metrics = {"trainable_params": report.trainable_params, "trainable_share": report.trainable_share,
               "trainable_split": report.trainable_split(ATTENTION_PATTERN), "final_loss": history[-1].get("loss")}
    return semu_model, report, metrics


def merged(model: nn.Module):
    """A SEMUModel's adapters merged inside the block (SEMUModel.merged); nothing for a plain model."""
    return model.merged() if isinstance(model, SEMUModel) else contextlib.nullcontext()


def sample_size(model: nn.Module) -> tuple:
    cfg = base_model(model).config
    return tuple(cfg.sample_size) if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2


@torch.no_grad()
def check_epsilon_prediction(scheduler) -> None:
    """SEMU's diffusion losses regress the noise: a scheduler of another parametrization (SD 2.x-768's
    "v_prediction", "sample") would give them the wrong target without an error."""
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if kind != "epsilon":
        raise ValueError(f"the scheduler's prediction_type is {kind!r}: SEMU's diffusion losses train noise "
                         f"('epsilon') prediction only")


def guided_ddim(unet: nn.Module, scheduler, x: torch.Tensor, num_inference_steps: int, cond: dict,
                uncond: Optional[dict] = None, guidance_scale: float = 1.0, eta: float = 0.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDIM from the noise x (diffusers DDIMScheduler built from `scheduler`'s config: the same betas) with
    classifier-free guidance eps_u + s (eps_c - eps_u); cond / uncond: the conditioning keyword arguments of the
    UNet (e.g. class_labels, encoder_hidden_states), uncond needed when guidance_scale != 1. eta > 0 draws its
    noise from `generator` on the CPU. The UNet runs in eval mode (restored) with SEMU adapters merged."""
    from diffusers import DDIMScheduler

    check_positive_int("num_inference_steps", num_inference_steps)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    device, n = x.device, len(x)
    with eval_mode(unet), merged(unet):
        for t in ddim.timesteps:
            tt = t.to(device).expand(n)
            if guidance_scale != 1.0:
                both = {key: torch.cat([cond[key], uncond[key]]) for key in cond}
                eps_c, eps_u = predict_noise(unet, torch.cat([x, x]), torch.cat([tt, tt]), **both).chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                eps = predict_noise(unet, x, tt, **cond)
            noise = torch.randn(x.shape, generator=generator).to(device) if eta > 0 else None
            x = ddim.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    return x


@torch.no_grad()
def sample(unet: nn.Module, scheduler, class_labels, num_inference_steps: int = 50,
           generator: Optional[torch.Generator] = None, *, guidance_scale: float = 1.0,
           null_class: Optional[int] = None, eta: float = 0.0, batch_size: int = 512) -> torch.Tensor:
    """Images from a class-conditional UNet2DModel (or its SEMUModel) with DDIM (guided_ddim): num_inference_steps
    evenly spaced steps; eta=0 is deterministic DDIM, eta=1 with num_inference_steps = the training steps is
    ancestral DDPM sampling. Returns x0 in the model's range, shape (len(class_labels), C, H, W).

    guidance_scale: classifier-free guidance eps_null + s (eps_class - eps_null); 1.0 = none. null_class: the
    class-embedding row for "no class" (default: the last one). The initial noise (and eta's noise) comes from
    `generator` on the CPU."""
    cfg = base_model(unet).config
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    rows = int(cfg.num_class_embeds or 0)
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < rows):
        raise ValueError(f"class_labels must be in [0, {rows}) (the UNet's class-embedding rows), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    if guidance_scale != 1.0 and null_class is None:
        null_class = rows - 1
    device = model_device(base_model(unet))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for chunk in labels.split(batch_size):
        x = torch.randn((len(chunk), cfg.in_channels, *sample_size(unet)), generator=generator).to(device)
        c = chunk.to(device)
        x = guided_ddim(unet, scheduler, x, num_inference_steps, {"class_labels": c},
                        {"class_labels": torch.full_like(c, null_class)} if null_class is not None else None,
                        guidance_scale, eta, generator)
        out.append(x.cpu())
    return torch.cat(out) if out else torch.empty(0)


# --- the digits DDPM --------------------------------------------------------------------------------------------

def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2.0 - 1.0


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def train_ddpm(unet: nn.Module, scheduler, loader: Iterable, steps: int, *, lr: float = 2e-3, seed: int = 0,
               p_uncond: float = 0.1, null_class: Optional[int] = None, ema_decay: float = 0.995,
               progress: bool = False) -> nn.Module:
    """Train `unet` (in place) with the standard loss for `steps` Adam steps (cosine-decayed lr, grad clip 1.0);
    labels are replaced by null_class with probability p_uncond (for classifier-free guidance); the EMA of the
    weights is copied in at the end. Returns unet in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step in tqdm(range(steps), desc="train DDPM", disable=not progress):
        x0, labels = next(batches)
        if null_class is not None and p_uncond > 0:
            drop = torch.rand(labels.shape, generator=generator) < p_uncond
            labels = torch.where(drop, torch.full_like(labels, null_class), labels)
        loss = eps_mse_loss(unet, scheduler, (x0, labels), generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
    unet.load_state_dict(ema.state_dict())
    return unet.eval()


def digits_loaders(seed: int = 0, forget_class: Optional[int] = None, batch_size: int = 64):
    """Shuffled loaders of the digits train split in [-1, 1]: (all,) or, with forget_class, (forget, remain)."""
    (x, y), _ = load_digits_split(seed)
    x = to_model_range(x)

    def make(mask, offset):
        return DataLoader(TensorDataset(x[mask], y[mask]), batch_size=batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed + offset))

    if forget_class is None:
        return (make(torch.ones_like(y, dtype=torch.bool), 0),)
    return make(y == forget_class, 1), make(y != forget_class, 2)


def pretrained_digits_ddpm(cache_dir=None, seed: int = 0, train_steps: int = DIGITS_TRAIN_STEPS,
                           progress: bool = False, device=None):
    """(unet, scheduler): the digits UNet trained on the digits train split (batch 128, `train_steps` steps, class
    dropout 0.1) on `device` (default: the CPU), cached as cache_dir/digits-ddpm-seed{seed}-steps{train_steps}.pt
    when cache_dir is given."""
    scheduler = digits_scheduler()
    path = Path(cache_dir) / f"digits-ddpm-seed{seed}-steps{train_steps}.pt" if cache_dir is not None else None

    def build():
        torch.manual_seed(seed)  # the initial weights, drawn on the CPU whatever the device
        unet = digits_unet()
        return unet if device is None else unet.to(device)

    def train():
        (loader,) = digits_loaders(seed, batch_size=128)
        return train_ddpm(build(), scheduler, loader, train_steps, seed=seed, null_class=DIGITS_NULL_CLASS,
                          progress=progress)

    return load_or_train(path, build, train, "digits DDPM"), scheduler


@torch.no_grad()
def classifier_metrics(unet: nn.Module, scheduler, classifier: nn.Module, forget_classes: Union[int, Sequence[int]],
                       *, num_classes: int = DIGITS_NUM_CLASSES, samples_per_class: int = 50,
                       num_inference_steps: int = 50, guidance_scale: float = 1.0, seed: int = 0) -> dict:
    """Sample samples_per_class images of every class (same seed, same noise for every model) and label them with
    `classifier` (inputs in [0, 1]). Returns percentages: forget_class_rate (samples of the forgotten classes that
    the classifier labels as their class), other_accuracy (accuracy on the other classes' samples) and per class."""
    forget_classes = class_list("forget_classes", forget_classes, num_classes)
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    images = sample(unet, scheduler, labels, num_inference_steps, torch.Generator().manual_seed(seed),
                    guidance_scale=guidance_scale)
    with eval_mode(classifier):
        predicted = classifier(to_unit_range(images).to(model_device(classifier))).argmax(-1).cpu()
    correct = predicted == labels
    correct_per_class = {c: int(correct[labels == c].sum()) for c in range(num_classes)}
    return {**forgetting_rates(correct_per_class, samples_per_class, forget_classes),
            "per_class_accuracy": {c: 100.0 * n / samples_per_class for c, n in correct_per_class.items()},
            "per_class_correct": correct_per_class, "samples_per_class": samples_per_class,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}


def forgetting_rates(correct_per_class: dict, samples_per_class: int,
                     forget_classes: Union[int, Sequence[int]]) -> dict:
    """classifier_metrics' forget_class_rate and other_accuracy (percent) from correct samples per class (equal
    samples per class), so one sampling of a model serves every choice of forgotten classes."""
    forget_classes = set(class_list("forget_classes", forget_classes, len(correct_per_class)))

    def percent(classes):  # exact counts (a float32 mean makes 5 of 50 read 10.0000001%)
        return 100.0 * sum(correct_per_class[c] for c in classes) / max(samples_per_class * len(classes), 1)

    return {"forget_class_rate": percent(forget_classes),
            "other_accuracy": percent([c for c in correct_per_class if c not in forget_classes])}


def adapted_layer_names(model: nn.Module, config: SEMUConfig) -> list[str]:
    """The layers `config` selects in `model` (as sf.prepare would), without touching it."""
    return list(select_layers(base_model(model), config))


def matches_attention(name: str) -> bool:
    return re.search(ATTENTION_PATTERN, name) is not None
