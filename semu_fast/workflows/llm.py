"""SEMU on transformers causal language models: loading, perplexity and `unlearn_llm`.

    model, tokenizer = load_causal_lm("path/to/local/model")
    forget = make_qa_batches(tokenizer, load_records("forget.jsonl"))      # or make_batches(tokenizer, texts)
    retain = make_batches(tokenizer, retain_texts)
    semu_model, report, metrics = unlearn_llm(model, forget, retain, forget_loss="npo", retain_loss="kl")

Models load from a local folder only (`local_files_only=True`): nothing is ever downloaded. The data side lives in
llm_data (re-exported here): a batch is a dict of (B, T) tensors, input_ids, attention_mask and labels (-100 where
nothing is learned: padding, and the prompt of a question/answer pair); the model predicts token t+1 from tokens
<= t. Records come from JSON / JSONL files (load_records), question/answer pairs framed by the tokenizer's chat
template when it has one.

SEMU's LLM recipe here follows its classification one: the gradient pass takes the forget set's NLL (the "true
label" loss), then only the k x k cores R train, on a forget objective from llm_losses (re-exported here):
    "ascent"    -NLL (gradient ascent, the baseline the TOFU / MUSE benchmarks start from);
    "random"    NLL towards a random token != the true one at every predicted position (SEMU's random labels);
    "graddiff"  ascent plus a retain term (gradient difference);
    "npo", "simnpo"     negative preference optimization, with the reference model, or length-normalised without;
    "idkdpo" ("idk"), "idknll"  towards "I don't know" answers (batches from make_qa_batches(..., alternate=True));
    "rmu"       representation misdirection of one decoder layer's hidden states;
    or make_loss(name, **hyper_parameters), or any callable (model, batch, generator) -> scalar.
The reference model of NPO, IdkDPO, KL and RMU is the model itself with its adapters disabled (no copy).
Retain data is data-free by default, as SEMU's: its perplexity is reported before and after. It trains too, on the
retain objective ("nll", "kl" or "rmu"; default: the forget objective's own retain term, else NLL), interleaved
with the forget batches, when train_on_retain=True, when retain_loss is given, or when the forget objective is
defined with a retain term (graddiff, rmu).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .._utils import eval_mode, model_device
from ..config import SEMUConfig
from ..layers import select_layers
from ..model import SEMUModel
from ..report import SEMUReport
from ..training import check_training_args, unlearn
from .llm_data import (IDK_ANSWERS, IGNORE_INDEX, Batch, check_batch, load_records, make_batches,  # noqa: F401
                       make_qa_batches, make_record_batches, save_records)
from .llm_losses import (FORGET_LOSSES, RETAIN_LOSSES, _logits_and_targets, _nll_sum, ascent_loss,  # noqa: F401
                         make_loss, make_retain_loss, nll_loss, random_token_loss, retain_nll_loss, sequence_nll)


# ---- loading -----------------------------------------------------------------------------------------------------

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



# ---- perplexity ------------------------------------------------------------------------------------------------

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
        raise ValueError(f"{name} must be a list of batches (dicts from make_batches or make_qa_batches), got "
                         f"{type(batches).__name__}")
    batches = list(batches)  # read several times: gradient pass, every epoch, perplexities
    if not batches:
        raise ValueError(f"{name} is empty: give at least one batch")
    for i, batch in enumerate(batches):
        try:
            check_batch(batch)
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


def _training_losses(forget_loss, retain_loss, train_on_retain, forget_batches, retain_batches, seed):
    """(train_loss_fn, retain_loss_fn, train_on_retain) for unlearn_llm, every combination checked first."""
    if isinstance(forget_loss, str) and forget_loss == "rmu":  # its control vector follows the run's seed
        train_loss_fn = make_loss(forget_loss, seed=seed)
    else:
        train_loss_fn = make_loss(forget_loss)
    name = forget_loss if isinstance(forget_loss, str) else getattr(train_loss_fn, "name", None)
    what = f"forget_loss={name!r}" if name else "the forget_loss given"
    own = getattr(train_loss_fn, "retain_loss", None)
    own = own() if callable(own) else None  # the forget objective's retain term, with its settings (alpha, layer)
    if retain_loss is None:
        retain_loss_fn = own if own is not None else retain_nll_loss
    elif isinstance(retain_loss, str) and own is not None and getattr(own, "name", None) == retain_loss:
        retain_loss_fn = own
    else:
        retain_loss_fn = make_retain_loss(retain_loss)
    needs_retain = bool(getattr(train_loss_fn, "needs_retain", False))
    if train_on_retain is None:
        train_on_retain = needs_retain or retain_loss is not None
    elif not isinstance(train_on_retain, bool):
        raise ValueError(f"train_on_retain must be True, False or None (automatic), got {train_on_retain!r}")
    elif not train_on_retain and needs_retain:
        raise ValueError(f"{what} is defined with a retain term, so it trains on retain data: train_on_retain=False "
                         f"contradicts it")
    elif not train_on_retain and retain_loss is not None:
        raise ValueError(f"retain_loss={retain_loss!r} is given, but train_on_retain=False never trains on retain "
                         f"data")
    if train_on_retain and retain_batches is None:
        if needs_retain:
            raise ValueError(f"{what} needs retain_batches: it is defined with a retain term")
        if retain_loss is not None:
            raise ValueError(f"retain_loss={retain_loss!r} needs retain_batches")
        raise ValueError("train_on_retain=True needs retain_batches")
    if getattr(train_loss_fn, "needs_alternate", False):
        for i, batch in enumerate(forget_batches):
            if not isinstance(batch.get("alternate"), dict):
                raise ValueError(f"{what} needs alternate answers: forget_batches[{i}] has no 'alternate' batch "
                                 f"(build the forget batches with make_qa_batches(..., alternate=True))")
    return train_loss_fn, retain_loss_fn, train_on_retain


def unlearn_llm(model: nn.Module, forget_batches, retain_batches=None, *,
                target_modules: Union[str, Sequence[str]] = ("mlp.down_proj",), gamma: float = 0.9,
                forget_loss: Union[str, Callable] = "ascent", retain_loss: Union[str, Callable, None] = None,
                train_on_retain: Optional[bool] = None, optimizer: str = "adam", lr: float = 1e-4, epochs: int = 3,
                seed: int = 0, progress: bool = True) -> tuple[SEMUModel, SEMUReport, dict]:
    """SEMU on a causal LM: gradients of the forget NLL, SVD per targeted Linear layer (explained variance gamma),
    then train only R on `forget_loss` for `epochs` passes. Returns (semu_model, report, metrics).

    forget_batches / retain_batches: lists of batches (make_batches, make_qa_batches, make_record_batches).
    target_modules: regular expressions searched in module names; each must match a layer SEMU adapts (nn.Linear,
    or transformers' Conv1D; default: every MLP down projection). forget_loss: a FORGET_LOSSES name ("ascent",
    "random", "graddiff", "npo", "simnpo", "idkdpo" / "idk", "idknll", "rmu"; see the module docstring and
    llm_losses for definitions and defaults), make_loss(name, **overrides), or a callable (model, batch,
    generator) -> scalar. retain_loss: "nll", "kl", "rmu", make_retain_loss(...) or a callable; None: the forget
    objective's own retain term (NLL for most, RMU's for "rmu"), else NLL. train_on_retain: None (automatic) trains
    on retain data when the forget objective needs it (graddiff, rmu) or retain_loss is given; True also does
    (NPO, SimNPO and the IDK objectives as open-unlearning runs them); False only evaluates retain data. Training
    on retain data needs retain_batches. optimizer "adam" or "sgd" (no weight decay), lr, epochs: as sf.unlearn.
    seed: SEMU's randomized SVD, the random tokens, RMU's control vector and the dropout of the model (the global
    RNG is restored afterwards).

    metrics: forget_nll/ppl_before/after (and retain_* with retain_batches; over labelled tokens, so the answers of
    question/answer batches), trainable_params, trainable_share (%). The model is changed in place only by
    installing adapters: semu_model.unload() gives it back bit for bit."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    forget_batches = _check_batches("forget_batches", forget_batches, required=True)
    retain_batches = _check_batches("retain_batches", retain_batches, required=False)
    target_modules = _check_targets(target_modules)
    config = SEMUConfig(gamma=gamma, target_modules=target_modules, seed=seed)
    select_layers(model, config)  # fails (or warns of tied weights) now, not after the perplexities
    train_loss_fn, retain_loss_fn, train_on_retain = _training_losses(forget_loss, retain_loss, train_on_retain,
                                                                      forget_batches, retain_batches, seed)
    check_training_args(optimizer, lr, epochs, 0.9, 0.0)

    metrics = {"forget_nll_before": mean_nll(model, forget_batches)}
    if retain_batches is not None:
        metrics["retain_nll_before"] = mean_nll(model, retain_batches)
    device = model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        semu_model, report = unlearn(model, forget_batches, retain_batches if train_on_retain else None, config,
                                     loss_fn=nll_loss, train_loss_fn=train_loss_fn, retain_loss_fn=retain_loss_fn,
                                     optimizer=optimizer, lr=lr, epochs=epochs, weight_decay=0.0, select_best=False,
                                     progress=progress)
    metrics["forget_nll_after"] = mean_nll(semu_model, forget_batches)
    if retain_batches is not None:
        metrics["retain_nll_after"] = mean_nll(semu_model, retain_batches)
    for key in list(metrics):
        metrics[key.replace("_nll_", "_ppl_")] = _exp(metrics[key])
    metrics.update(trainable_params=report.trainable_params, trainable_share=report.trainable_share)
    return semu_model, report, metrics
