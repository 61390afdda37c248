"""SEMU on transformers causal language models: texts to batches, token NLL and perplexity, and `unlearn_llm`.

    model, tokenizer = load_causal_lm("path/to/local/model")
    forget = make_batches(tokenizer, forget_texts, max_length=256, batch_size=8)
    semu_model, report, metrics = unlearn_llm(model, forget, retain_batches=make_batches(tokenizer, retain_texts))

Models load from a local folder only (`local_files_only=True`): nothing is ever downloaded. A batch is a dict of
(B, T) tensors: input_ids, attention_mask and labels (a copy of input_ids with -100 on padding); the model predicts
token t+1 from tokens <= t, so a text of n tokens holds n - 1 predictions.

SEMU's LLM recipe here follows its classification one: the gradient pass takes the forget set's NLL (the "true
label" loss), then only the k x k cores R train, on a forget loss:
    "ascent": -NLL (gradient ascent, the usual LLM-unlearning baseline the TOFU/MUSE benchmarks start from);
    "random": NLL towards a random token != the true one at every predicted position (SEMU's random-label loss,
        per token: bounded, unlike ascent);
    or any callable (model, batch, generator) -> scalar.
Retain data is data-free by default, as SEMU's: its perplexity is reported before and after; with
train_on_retain=True its NLL joins training too, interleaved with the forget batches (gradient difference).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import eval_mode, model_device
from ..config import SEMUConfig
from ..layers import select_layers
from ..model import SEMUModel
from ..report import SEMUReport
from ..training import check_training_args, unlearn

IGNORE_INDEX = -100  # label of a position that predicts nothing (padding), as transformers and F.cross_entropy use
FORGET_LOSSES = ("ascent", "random")
Batch = dict


# ---- loading and batching ----------------------------------------------------------------------------------------

def load_causal_lm(path, dtype: Union[str, torch.dtype, None] = "auto", device=None):
    """(model, tokenizer) from a local folder written by save_pretrained: AutoModelForCausalLM and AutoTokenizer
    with local_files_only=True (never the network). dtype: "auto" (the saved one), a torch dtype or None
    (transformers' default); device: where to put the model (None: stays on the CPU). The model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {folder} is not a folder; give the local folder of a transformers model "
                                f"(nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: no config.json in {folder}: not a transformers model folder")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _check_texts(texts) -> list:
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"texts[{i}] must be a non-blank string, got {text!r:.60}")
    return texts


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def make_batches(tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 8) -> list[Batch]:
    """Tokenise `texts` (truncated to max_length tokens, special tokens as the tokenizer adds them) into batches of
    batch_size, right-padded: {"input_ids", "attention_mask", "labels"}, each (B, T) int64, labels -100 on padding.

    The tokenizer is not changed (padding is done here, so a tokenizer without a pad token works). Texts that give
    fewer than 2 tokens predict nothing: they are skipped with a warning; if all are, ValueError."""
    texts = _check_texts(texts)
    _check_positive_int("max_length", max_length, 2)
    _check_positive_int("batch_size", batch_size)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    kept = [ids for ids in encoded if len(ids) >= 2]
    if not kept:
        raise ValueError("texts: every text gives fewer than 2 tokens, so there is nothing to predict")
    if len(kept) < len(encoded):
        warnings.warn(f"texts: {len(encoded) - len(kept)} of {len(encoded)} texts give fewer than 2 tokens and "
                      f"were skipped (nothing to predict)")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    batches = []
    for start in range(0, len(kept), batch_size):
        chunk = kept[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


# ---- losses and perplexity ---------------------------------------------------------------------------------------

def _check_batch(batch) -> None:
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor) \
            or batch["input_ids"].dim() != 2:
        raise TypeError(f"an LLM batch must be a dict with a (B, T) input_ids tensor (see make_batches), got "
                        f"{type(batch).__name__}")


def _logits_and_targets(model: nn.Module, batch: Batch):
    """Float32 logits of positions 0..T-2, (B, T-1, V), and their targets (labels shifted left), (B, T-1)."""
    _check_batch(batch)
    device = model_device(model)
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return logits[:, :-1].float(), labels.to(device)[:, 1:]


def _nll_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    logits, targets = _logits_and_targets(model, batch)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def nll_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the batch's labelled positions: SEMU's gradient-pass loss
    (loss_fn) for LLMs."""
    total, count = _nll_sum(model, batch)
    if count == 0:
        raise ValueError("the batch has no labelled position to predict (every label is -100)")
    return total / count


def retain_nll_loss(model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """nll_loss with sf.unlearn's train-loss signature: keeps the model on retain data."""
    return nll_loss(model, batch)


def ascent_loss(model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """-NLL on the forget batch: gradient ascent on its likelihood."""
    return -nll_loss(model, batch)


def random_token_loss(model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """NLL towards a token drawn uniformly among those != the true next token at every labelled position:
    SEMU's random-label loss, per token."""
    logits, targets = _logits_and_targets(model, batch)
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"random tokens need a vocabulary of at least 2, the model outputs {vocab}")
    shift = torch.randint(1, vocab, targets.shape, generator=generator).to(targets.device)
    labelled = targets != IGNORE_INDEX
    random_targets = torch.where(labelled, (targets + shift) % vocab, targets)
    if not labelled.any():
        raise ValueError("the batch has no labelled position to predict (every label is -100)")
    return F.cross_entropy(logits.flatten(0, 1), random_targets.flatten(), ignore_index=IGNORE_INDEX)


_FORGET_LOSS_FNS = {"ascent": ascent_loss, "random": random_token_loss}


@torch.no_grad()
def mean_nll(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Token-weighted mean next-token NLL (nats) over all batches, in eval mode (the mode is restored)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            batch_total, batch_count = _nll_sum(model, batch)
            total += float(batch_total)
            count += batch_count
    if count == 0:
        raise ValueError("batches hold no labelled position to predict")
    return total / count


def perplexity(model: nn.Module, batches: Iterable[Batch]) -> float:
    """exp of the token-weighted mean NLL over all batches (eval mode, no grad); inf when that overflows."""
    return _exp(mean_nll(model, batches))


def _exp(nll: float) -> float:
    """exp(nll), inf where float64 overflows (nll above ~709)."""
    return math.exp(nll) if nll < 709.0 else math.inf


# ---- unlearning --------------------------------------------------------------------------------------------------

def _check_batches(name: str, batches, required: bool) -> Optional[list]:
    if batches is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(batches, dict) or not isinstance(batches, Iterable):
        raise ValueError(f"{name} must be a list of batches (dicts from make_batches), got {type(batches).__name__}")
    batches = list(batches)  # read several times: gradient pass, every epoch, perplexities
    if not batches:
        raise ValueError(f"{name} is empty: give at least one batch")
    for i, batch in enumerate(batches):
        try:
            _check_batch(batch)
        except TypeError as err:
            raise ValueError(f"{name}[{i}]: {err}") from None
    return batches


def _check_targets(target_modules) -> tuple:
    """One or more patterns (SEMUConfig checks each is a valid regular expression, select_layers that it matches)."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not isinstance(target_modules, Iterable) or not (target_modules := tuple(target_modules)):
        raise ValueError(f"target_modules must be one or more name patterns, got {target_modules!r}")
    return target_modules


def unlearn_llm(model: nn.Module, forget_batches, retain_batches=None, *,
                target_modules: Union[str, Sequence[str]] = ("mlp.down_proj",), gamma: float = 0.9,
                forget_loss: Union[str, Callable] = "ascent", train_on_retain: bool = False,
                optimizer: str = "adam", lr: float = 1e-4, epochs: int = 3, seed: int = 0,
                progress: bool = True) -> tuple[SEMUModel, SEMUReport, dict]:
    """SEMU on a causal LM: gradients of the forget NLL, SVD per targeted Linear layer (explained variance gamma),
    then train only R on `forget_loss` for `epochs` passes. Returns (semu_model, report, metrics).

    forget_batches / retain_batches: lists of make_batches dicts. target_modules: regular expressions searched in
    module names; each must match a layer SEMU adapts (nn.Linear, or transformers' Conv1D; default: every MLP down
    projection). forget_loss: "ascent",
    "random" or a callable (model, batch, generator) -> scalar (see the module docstring). train_on_retain: also
    train on the retain NLL (needs retain_batches); otherwise retain data is only evaluated. optimizer "adam" or
    "sgd" (no weight decay), lr, epochs: as sf.unlearn. seed: SEMU's randomized SVD, the random tokens and the
    dropout of the model (the global RNG is restored afterwards).

    metrics: forget_nll/ppl_before/after (and retain_* with retain_batches), trainable_params, trainable_share (%).
    The model is changed in place only by installing adapters: semu_model.unload() gives it back bit for bit."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    forget_batches = _check_batches("forget_batches", forget_batches, required=True)
    retain_batches = _check_batches("retain_batches", retain_batches, required=False)
    target_modules = _check_targets(target_modules)
    config = SEMUConfig(gamma=gamma, target_modules=target_modules, seed=seed)
    select_layers(model, config)  # fails (or warns of tied weights) now, not after the perplexities
    if callable(forget_loss):
        train_loss_fn = forget_loss
    elif forget_loss in _FORGET_LOSS_FNS:
        train_loss_fn = _FORGET_LOSS_FNS[forget_loss]
    else:
        raise ValueError(f"forget_loss must be one of {', '.join(map(repr, FORGET_LOSSES))} or a callable "
                         f"(model, batch, generator) -> scalar, got {forget_loss!r}")
    if train_on_retain and retain_batches is None:
        raise ValueError("train_on_retain=True needs retain_batches")
    check_training_args(optimizer, lr, epochs, 0.9, 0.0)

    metrics = {"forget_nll_before": mean_nll(model, forget_batches)}
    if retain_batches is not None:
        metrics["retain_nll_before"] = mean_nll(model, retain_batches)
    device = model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        semu_model, report = unlearn(model, forget_batches, retain_batches if train_on_retain else None, config,
                                     loss_fn=nll_loss, train_loss_fn=train_loss_fn, retain_loss_fn=retain_nll_loss,
                                     optimizer=optimizer, lr=lr, epochs=epochs, weight_decay=0.0, select_best=False,
                                     progress=progress)
    metrics["forget_nll_after"] = mean_nll(semu_model, forget_batches)
    if retain_batches is not None:
        metrics["retain_nll_after"] = mean_nll(semu_model, retain_batches)
    for key in list(metrics):
        metrics[key.replace("_nll_", "_ppl_")] = _exp(metrics[key])
    metrics.update(trainable_params=report.trainable_params, trainable_share=report.trainable_share)
    return semu_model, report, metrics
