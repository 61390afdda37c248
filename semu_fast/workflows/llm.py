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
    "auto"      (the default) idkdpo when the forget batches carry "I don't know" alternates, else npo;
    "rmu"       representation misdirection of one decoder layer's hidden states;
    or make_loss(name, **hyper_parameters), or any callable (model, batch, generator) -> scalar.
The reference model of NPO, IdkDPO, KL and RMU is the model itself with its adapters disabled (no copy).
Retain data, when given, trains (retain_mode "interleave": each retain batch an optimizer step of its own between the
forget ones; "paired": one step on forget + retain loss per forget batch, as open-unlearning) on the retain objective
("nll", "kl" or "rmu"; default: the forget objective's own retain term, else NLL) and guards the choice of the epoch to
keep (see unlearn_llm's select_best); train_on_retain=False keeps it out of training and, unless select_best=True, out
of that choice (SEMU's data-free setting: its perplexity is only reported).

Every default of unlearn_llm and of `semu-fast unlearn-llm` is in DEFAULTS below (one place to change them).
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .._checks import check_choice
from .._utils import eval_mode, model_device
from ..config import SEMUConfig
from ..distributed import resolve as resolve_group
from ..layers import select_layers
from ..model import SEMUModel
from ..report import SEMUReport
from ..training import check_training_args, unlearn
from . import results
from .llm_data import (IDK_ANSWERS, IGNORE_INDEX, Batch, check_batch, check_batches, check_context,  # noqa: F401
                       context_length, load_records, make_batches, make_qa_batches, make_record_batches, save_records)
from .llm_losses import (FORGET_LOSSES, RETAIN_LOSSES, PairedLoss, RetainKL, RetainNLL,  # noqa: F401
                         _logits_and_targets, _nll_sum, ascent_loss, make_loss, make_retain_loss, nll_loss,
                         random_token_loss, retain_nll_loss, sequence_nll)


# ---- defaults ----------------------------------------------------------------------------------------------------

ALL_LINEAR = "all-linear"  # target_modules: every Linear / Conv1D but the output head (llm_config)
AUTO_LOSS = "auto"  # forget_loss: idkdpo or npo, as the forget data allows (auto_forget_loss)


@dataclasses.dataclass(frozen=True)
class LLMDefaults:
    """The defaults of unlearn_llm and `semu-fast unlearn-llm` (which reads them from DEFAULTS), in one place.

    Chosen to forget selectively rather than to forget most, and calibrated on the offline TOFU-style benchmark
    (benchmarks/quality/llm_fictitious.py; no trained LLM is available offline, so check them on your model):
    every Linear but the output head, gamma 0.95, Adam lr 1e-2 on R and about 180 optimizer steps on the forget
    set (epochs None: enough passes for forget_steps, at least min_epochs). The forget loss ("auto"): IdkDPO on
    question/answer batches with "I don't know" alternates (the most selective loss there: the held-out retain
    facts fell 11-13%, against 23-32% with NPO), NPO (bounded, the TOFU / open-unlearning standard) on anything
    else; either trains with the retain NLL whenever retain data is given (open-unlearning's beta 0.1 and alpha 1,
    not its schedule: retain_mode "interleave", the one calibrated here, makes every retain batch an optimizer step of
    its own, so with retain data an epoch takes len(forget) + len(retain) steps, a whole pass over the retain set;
    "paired" takes open-unlearning's step, forget + retain loss on a retain batch drawn per forget batch, len(forget)
    steps an epoch). The epoch kept is the one with the highest forget NLL among those whose retain perplexity rose
    by at most 10% (an epoch that broke the model is never kept; R = 0, the original model, is the fallback); scoring
    an epoch costs a forward pass over the forget batches and the guard batches (eval_batches, else the whole retain
    set)."""
    target_modules: tuple = (ALL_LINEAR,)
    gamma: float = 0.95
    forget_loss: str = AUTO_LOSS
    optimizer: str = "adam"
    lr: float = 1e-2
    epochs: Optional[int] = None
    forget_steps: int = 180
    min_epochs: int = 5
    criterion: str = "forget_nll"
    retain_tolerance: float = 0.1
    retain_mode: str = "interleave"
    max_length: int = 256
    batch_size: int = 8

    def epochs_for(self, forget_batches: int) -> int:
        """The number of passes over `forget_batches` batches: `epochs` when set, else enough for forget_steps
        optimizer steps on the forget set, at least min_epochs."""
        if self.epochs is not None:
            return self.epochs
        return max(self.min_epochs, math.ceil(self.forget_steps / max(1, forget_batches)))


DEFAULTS = LLMDefaults()
# Selection criteria (higher is better): the forget set's token-weighted mean NLL, or minus its mean per-sequence
# answer probability exp(-mean NLL of the answer) (TOFU's "answer prob").
CRITERIA = ("forget_nll", "forget_prob")
# How retain data trains: "interleave" (sf.unlearn's: every forget and every retain batch its own optimizer step) or
# "paired" (open-unlearning's: one step on forget + retain loss, a retain batch drawn per forget batch).
RETAIN_MODES = ("interleave", "paired")


# ---- loading -----------------------------------------------------------------------------------------------------

def check_model_folder(path) -> Path:
    """The folder of a saved transformers model (FileNotFoundError naming what is missing otherwise)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {folder} is not a folder; give the local folder of a transformers model "
                                f"(nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: no config.json in {folder}: not a transformers model folder")
    return folder


def load_causal_lm(path, dtype: Union[str, torch.dtype, None] = "auto", device=None):
    """(model, tokenizer) from a local folder written by save_pretrained: AutoModelForCausalLM and AutoTokenizer
    with local_files_only=True (never the network). dtype: "auto" (the saved one), a torch dtype or None
    (transformers' default); device: where to put the model (None: stays on the CPU). The model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_model_folder(path)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:  # first: it is the cheaper one to find missing
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OSError(f"path: no tokenizer could be loaded from {folder}; save the model's tokenizer there with "
                      f"tokenizer.save_pretrained ({str(err).strip().splitlines()[0]})") from None
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
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
    return check_batches(name, batches)  # a list: read several times (gradient pass, every epoch, perplexities)


def llm_config(model: nn.Module, target_modules, gamma: float, seed: int) -> SEMUConfig:
    """The SEMUConfig of an LLM run. target_modules: one or more regular expressions searched in module names (each
    must match a layer SEMU adapts), or "all-linear" (peft's shorthand): every nn.Linear / Conv1D but the output
    head (model.get_output_embeddings(), often tied to the input embeddings), whatever the architecture names them.
    SEMUConfig checks the patterns, select_layers that they match."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not isinstance(target_modules, Iterable) or not (target_modules := tuple(target_modules)):
        raise ValueError(f"target_modules must be {ALL_LINEAR!r} or one or more name patterns, got "
                         f"{target_modules!r}")
    if ALL_LINEAR not in target_modules:
        return SEMUConfig(gamma=gamma, target_modules=target_modules, seed=seed)
    if len(target_modules) > 1:
        raise ValueError(f"target_modules: {ALL_LINEAR!r} selects every layer already; give it alone, got "
                         f"{target_modules!r}")
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    exclude = tuple(f"^{re.escape(name)}$" for name, module in model.named_modules() if module is head and name)
    return SEMUConfig(gamma=gamma, target_modules=None, exclude_modules=exclude or None, seed=seed)


def auto_forget_loss(has_alternate: bool) -> str:
    """The forget loss "auto" stands for: idkdpo when the forget data carries "I don't know" alternates (the most
    selective loss on the fictitious-people benchmark), else npo."""
    return "idkdpo" if has_alternate else "npo"


def resolve_objectives(forget_loss, retain_loss, seed: int = 0,
                       has_alternate: bool = False) -> tuple[Callable, Callable, str]:
    """(forget objective, retain objective, "forget_loss=..." for error messages) from names, objects or callables:
    the forget objective by make_loss (RMU's control vector seeded by `seed`; "auto" by auto_forget_loss(
    has_alternate)), the retain one by make_retain_loss, or, when retain_loss is None, the forget objective's own
    retain term (NLL times alpha for most, RMU's for "rmu"), else NLL. A retain loss given by name keeps the forget
    objective's alpha as its weight, as open-unlearning scales whichever retain loss it uses ("kl" after
    make_loss("npo", alpha=2) weighs 2)."""
    if isinstance(forget_loss, str) and forget_loss == AUTO_LOSS:
        forget_loss = auto_forget_loss(has_alternate)
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
    elif isinstance(retain_loss, str) and isinstance(own, RetainNLL) and retain_loss == RetainKL.name:
        retain_loss_fn = make_retain_loss(retain_loss, weight=own.weight)
    else:
        retain_loss_fn = make_retain_loss(retain_loss)
    return train_loss_fn, retain_loss_fn, what


def _training_losses(forget_loss, retain_loss, train_on_retain, forget_batches, retain_batches, seed):
    """(train_loss_fn, retain_loss_fn, train_on_retain) for unlearn_llm, every combination checked first."""
    without_alternate = [i for i, batch in enumerate(forget_batches) if not isinstance(batch.get("alternate"), dict)]
    train_loss_fn, retain_loss_fn, what = resolve_objectives(forget_loss, retain_loss, seed, not without_alternate)
    needs_retain = bool(getattr(train_loss_fn, "needs_retain", False))
    if train_on_retain is None:
        train_on_retain = retain_batches is not None or needs_retain or retain_loss is not None
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
    if getattr(train_loss_fn, "needs_alternate", False) and without_alternate:
        raise ValueError(f"{what} needs alternate answers: forget_batches[{without_alternate[0]}] has no 'alternate' "
                         f"batch (build the forget batches with make_qa_batches(..., alternate=True))")
    return train_loss_fn, retain_loss_fn, train_on_retain


def check_objectives_fit(model: nn.Module, *objectives) -> None:
    """Each objective's check_model (RMU's layer exists, say) before the gradient pass, not at the first step."""
    for objective in objectives:
        check = getattr(objective, "check_model", None)
        if callable(check):
            check(model)


# ---- choosing the epoch to keep ----------------------------------------------------------------------------------

@torch.no_grad()
def mean_answer_prob(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean over sequences of exp(-mean NLL of the labelled tokens): TOFU's answer probability for question/answer
    batches (eval mode, no grad; sequences without a labelled token are left out)."""
    probs = []
    with eval_mode(model):
        for batch in batches:
            nll, count = sequence_nll(model, batch)
            rows = count > 0
            probs.append(torch.exp(-nll[rows].double() / count[rows]).cpu())
    probs = torch.cat(probs) if probs else torch.empty(0)
    if probs.numel() == 0:
        raise ValueError("batches hold no labelled position to predict")
    return float(probs.mean())


def _check_selection(select_best, criterion, retain_tolerance, guard_batches, automatic: bool) -> bool:
    """select_best resolved (None: `automatic`), every setting checked; guard_batches: the data that would guard
    the retain side."""
    if not (callable(criterion) or criterion in CRITERIA):
        raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))} or a callable (model) -> float "
                         f"(higher is better), got {criterion!r}")
    if isinstance(retain_tolerance, bool) or not isinstance(retain_tolerance, (int, float)) \
            or math.isnan(retain_tolerance) or retain_tolerance < 0:
        raise ValueError(f"retain_tolerance must be a number >= 0 (the share by which the retain perplexity may rise; "
                         f"inf: no limit), got {retain_tolerance!r}")
    if select_best is None:
        return automatic
    if not isinstance(select_best, bool):
        raise ValueError(f"select_best must be True, False or None (automatic), got {select_best!r}")
    if select_best and guard_batches is None:
        raise ValueError("select_best=True needs retain_batches or eval_batches: without data to keep, the epoch "
                         "that scores best on the forget set is the one that broke the model most")
    return select_best


def _score(criterion, model: nn.Module, forget_batches) -> float:
    if criterion == "forget_nll":
        return mean_nll(model, forget_batches)
    if criterion == "forget_prob":
        return -mean_answer_prob(model, forget_batches)
    value = criterion(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"criterion must return a finite number (higher is better), got {value!r}")
    return float(value)


class _KeepBest:
    """sf.unlearn's on_epoch: scores every epoch (the criterion on the forget batches, the NLL of the guard batches)
    and keeps a copy of the R of the best epoch whose guard NLL stays within nll_before + log(1 + tolerance);
    epoch 0 (R = 0, the original model) is the candidate to beat. restore() writes the kept R back."""

    def __init__(self, criterion, forget_batches, guard_batches, guard_before: float, tolerance: float,
                 score_before: float, select: bool, user_on_epoch):
        self.criterion, self.forget_batches, self.guard_batches = criterion, forget_batches, guard_batches
        self.limit = guard_before + math.log1p(tolerance) if guard_batches is not None else math.inf
        self.select, self.user_on_epoch = select, user_on_epoch
        self.best_epoch, self.best_score, self.best_state = 0, score_before, None
        self.feasible = 0

    def __call__(self, epoch: int, semu_model) -> dict:
        entry = {}
        if self.select:
            entry["score"] = _score(self.criterion, semu_model, self.forget_batches)
            if self.guard_batches is not None:
                entry["guard_nll"] = mean_nll(semu_model, self.guard_batches)
                entry["within_tolerance"] = entry["guard_nll"] <= self.limit
            feasible = entry.get("within_tolerance", True)
            self.feasible += feasible
            if feasible and entry["score"] > self.best_score:  # ties keep the earlier epoch (less drift)
                self.best_epoch, self.best_score = epoch, entry["score"]
                self.best_state = [p.detach().clone() for p in semu_model.trainable_parameters()]
        if self.user_on_epoch is not None:
            entry.update(self.user_on_epoch(epoch, semu_model) or {})
        return entry

    @torch.no_grad()
    def restore(self, semu_model) -> None:
        params = semu_model.trainable_parameters()
        if self.best_state is None:  # epoch 0: the zero-initialised R, the original model
            for param in params:
                param.zero_()
            if self.feasible == 0:
                warnings.warn("select_best: no epoch kept the retain perplexity within retain_tolerance, so R is back "
                              "at zero (the original model); lower lr, or raise retain_tolerance")
            else:
                warnings.warn("select_best: no epoch improved the criterion on the forget set, so R is back at zero "
                              "(the original model); raise lr or epochs")
            return
        for param, saved in zip(params, self.best_state):
            param.copy_(saved)


def unlearn_llm(model: nn.Module, forget_batches, retain_batches=None, *,
                target_modules: Union[str, Sequence[str]] = DEFAULTS.target_modules, gamma: float = DEFAULTS.gamma,
                forget_loss: Union[str, Callable] = DEFAULTS.forget_loss,
                retain_loss: Union[str, Callable, None] = None,
                train_on_retain: Optional[bool] = None, retain_mode: str = DEFAULTS.retain_mode,
                optimizer: str = DEFAULTS.optimizer, lr: float = DEFAULTS.lr,
                epochs: Optional[int] = DEFAULTS.epochs, eval_batches=None, select_best: Optional[bool] = None,
                criterion: Union[str, Callable] = DEFAULTS.criterion,
                retain_tolerance: float = DEFAULTS.retain_tolerance, on_epoch=None, seed: int = 0,
                progress: bool = True) -> tuple[SEMUModel, SEMUReport, dict]:
    """SEMU on a causal LM: gradients of the forget NLL, SVD per targeted Linear layer (explained variance gamma),
    then train only R on `forget_loss` for `epochs` passes. Returns (semu_model, report, metrics). Defaults: DEFAULTS.

    forget_batches / retain_batches: lists of batches (make_batches, make_qa_batches, make_record_batches).
    target_modules: "all-linear" (the default: every nn.Linear / transformers Conv1D but the output head) or regular
    expressions searched in module names, each of which must match a layer SEMU adapts (see llm_config).
    forget_loss: "auto" (idkdpo when every forget batch has "I don't know" alternates, else npo) or a FORGET_LOSSES
    name ("ascent", "random", "graddiff", "npo", "simnpo", "idkdpo" / "idk", "idknll", "rmu"; see the module
    docstring and llm_losses for definitions and defaults), make_loss(name, **overrides), or a callable (model,
    batch, generator) -> scalar. retain_loss: "nll", "kl", "rmu", make_retain_loss(...) or a
    callable; None: the forget objective's own retain term (NLL for most, RMU's for "rmu"), else NLL.
    train_on_retain: None (automatic) trains on retain data whenever retain_batches are given; False only reports them:
    they neither train nor, unless select_best=True, pick the epoch kept (SEMU's data-free setting; refused for
    objectives defined with a retain term, graddiff and rmu, and with a retain_loss). retain_mode (when retain data
    trains): "interleave" (the default) gives every forget batch and every retain batch an optimizer step of its own, so
    an epoch is len(forget_batches) + len(retain_batches) steps; "paired" (open-unlearning's) takes one step per forget
    batch on forget loss + retain loss, the retain batch drawn at random (seeded by seed) from retain_batches
    (llm_losses.PairedLoss), so an epoch is len(forget_batches) steps. optimizer "adam" or "sgd" (no weight decay), lr:
    as sf.unlearn; epochs: passes over the forget batches (None: DEFAULTS.epochs_for(the number of forget batches),
    about DEFAULTS.forget_steps optimizer steps on the forget set). seed: SEMU's randomized SVD, the random tokens,
    RMU's control vector and the dropout of the model (the global RNG is restored afterwards).

    Which epoch's R is kept: with select_best (None: on when eval_batches are given, or retain_batches that train; off
    with train_on_retain=False and no eval_batches, so the last epoch is kept) every epoch is scored and the R of the
    best one is restored at the end. The best is the highest `criterion` among the epochs whose guard NLL (over
    eval_batches, else retain_batches) stays within log(1 + retain_tolerance) of the original model's, i.e. whose guard
    perplexity rose by at most that share (default 10%); epoch 0, R = 0 (the original model), is the one to beat, so an
    epoch that broke the model is never kept (a warning says so when R falls back to zero). criterion: "forget_nll" (the
    forget set's token-weighted mean NLL), "forget_prob" (the lowest mean answer probability exp(-mean answer NLL) per
    sequence) or a callable (model) -> float, higher is better, called on the original model before training and on the
    SEMUModel after each epoch. eval_batches: held-out batches of data to keep (never trained on, e.g. a slice of the
    retain set) that guard the selection and are reported before and after. on_epoch(epoch, semu_model) -> dict or None:
    your own callback after each epoch (after the scoring); what it returns joins that epoch's entry in
    report.training["history"], as the score, guard_nll and within_tolerance of the selection do. Stopping early is not
    offered: every epoch runs.

    metrics: forget_nll/ppl_before/after (and retain_* with retain_batches, eval_* with eval_batches; over labelled
    tokens, so the answers of question/answer batches), best_epoch (with select_best; 0: R = 0 was kept),
    trainable_params, trainable_share (%), epochs (the passes run). The model is changed in place only by
    installing adapters: semu_model.unload() gives it back bit for bit.

    It runs in one process: under a torch.distributed group of several processes it is refused (use sf.unlearn with
    a DistributedSampler, whose gradient pass and training of R run data-parallel)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    group = resolve_group(None)
    if group is not None:  # sf.unlearn would go data-parallel; the epochs, the keep-best and the metrics are per rank
        raise RuntimeError(f"unlearn_llm runs in one process, and torch.distributed is initialised with {group.size} "
                           f"processes: its epoch count, best-epoch selection and metrics would be each rank's own, "
                           f"so the ranks would end with different R or hang. For several processes use sf.unlearn on "
                           f"a DataLoader with a DistributedSampler over the forget set (loss_fn=llm_losses.nll_loss, "
                           f"train_loss_fn=llm_losses.make_loss(...)); else call unlearn_llm without a process group")
    forget_batches = _check_batches("forget_batches", forget_batches, required=True)
    retain_batches = _check_batches("retain_batches", retain_batches, required=False)
    eval_batches = _check_batches("eval_batches", eval_batches, required=False)
    for name, batches in (("forget_batches", forget_batches), ("retain_batches", retain_batches),
                          ("eval_batches", eval_batches)):
        check_context(model, max((b["input_ids"].shape[1] for b in batches or ()), default=0), name)
    config = llm_config(model, target_modules, gamma, seed)
    select_layers(model, config)  # fails (or warns of tied weights) now, not after the perplexities
    train_loss_fn, retain_loss_fn, train_on_retain = _training_losses(forget_loss, retain_loss, train_on_retain,
                                                                      forget_batches, retain_batches, seed)
    check_objectives_fit(model, train_loss_fn, retain_loss_fn)
    check_choice("retain_mode", retain_mode, RETAIN_MODES)
    if retain_mode == "paired" and not train_on_retain:
        raise ValueError("retain_mode='paired' pairs each forget batch with a retain batch it trains on: it needs "
                         "retain_batches, and train_on_retain not False")
    step_loss_fn, trained_retain = train_loss_fn, retain_batches if train_on_retain else None
    if retain_mode == "paired":  # one step per forget batch, on forget + retain: sf.unlearn sees no retain data
        step_loss_fn, trained_retain = PairedLoss(train_loss_fn, retain_loss_fn, retain_batches), None
    if epochs is None:
        epochs = DEFAULTS.epochs_for(len(forget_batches))
    check_training_args(optimizer, lr, epochs, 0.9, 0.0)
    guard_batches = eval_batches if eval_batches is not None else retain_batches
    # data-free (retain data not trained on): by default the retain data only reports, and picks no epoch either
    automatic = (guard_batches if train_on_retain else eval_batches) is not None
    select_best = _check_selection(select_best, criterion, retain_tolerance, guard_batches, automatic)
    if on_epoch is not None and not callable(on_epoch):
        raise ValueError(f"on_epoch must be a callable (epoch, semu_model) -> dict or None, got {on_epoch!r}")

    metrics = {"forget_nll_before": mean_nll(model, forget_batches)}
    for name, batches in (("retain", retain_batches), ("eval", eval_batches)):
        if batches is not None:
            metrics[f"{name}_nll_before"] = mean_nll(model, batches)
    score_before = 0.0
    if select_best:
        score_before = metrics["forget_nll_before"] if criterion == "forget_nll" else _score(criterion, model,
                                                                                             forget_batches)
    guard_before = metrics["eval_nll_before" if eval_batches is not None else "retain_nll_before"] \
        if select_best else math.nan
    keep = _KeepBest(criterion, forget_batches, guard_batches, guard_before, retain_tolerance, score_before,
                     select_best, on_epoch)
    # manual_seed reseeds every CUDA device: restore all that the model uses
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        semu_model, report = unlearn(model, forget_batches, trained_retain, config,
                                     loss_fn=nll_loss, train_loss_fn=step_loss_fn, retain_loss_fn=retain_loss_fn,
                                     optimizer=optimizer, lr=lr, epochs=epochs, weight_decay=0.0, select_best=False,
                                     progress=progress, on_epoch=keep if (select_best or on_epoch) else None)
    if select_best and semu_model.trainable_parameters():
        keep.restore(semu_model)
        report.training["best_epoch"] = keep.best_epoch
        report.training["selection"] = {"criterion": criterion if isinstance(criterion, str) else "callable",
                                        "retain_tolerance": retain_tolerance,
                                        "guard": "eval_batches" if eval_batches is not None else "retain_batches"}
        metrics["best_epoch"] = keep.best_epoch
    metrics["forget_nll_after"] = mean_nll(semu_model, forget_batches)
    for name, batches in (("retain", retain_batches), ("eval", eval_batches)):
        if batches is not None:
            metrics[f"{name}_nll_after"] = mean_nll(semu_model, batches)
    for key in [k for k in metrics if "_nll_" in k]:
        metrics[key.replace("_nll_", "_ppl_")] = _exp(metrics[key])
    metrics.update(trainable_params=report.trainable_params, trainable_share=report.trainable_share, epochs=epochs)
    report.training.update(select_best=bool(select_best), train_on_retain=bool(train_on_retain),
                           retain_loss=None if not train_on_retain else _objective_name(retain_loss_fn),
                           retain_mode=retain_mode if train_on_retain else None)
    return semu_model, report, metrics


def _objective_name(fn) -> str:
    """How a run record names a loss: its registry name, else the function's or "callable"."""
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or "callable"


# ---- evaluation data and the run's report ------------------------------------------------------------------------

def qa_split(records, options: bool = False) -> dict:
    """llm_eval.evaluate_llm's split ({"questions", "answers"}, and "paraphrased_answers" / "perturbed_answers" when
    every record has "paraphrased_answer" / "perturbed_answer") from question/answer records; from text records
    ({"text"}) the texts as answers to empty questions (evaluate them with framing="raw"). options: TOFU's
    real-authors / world-facts records, whose "perturbed_answer" (a string or a list) holds the wrong options and
    is required."""
    from .llm_data import check_records

    records, kind = check_records(records)
    if options and (kind == "text" or not all("perturbed_answer" in r for r in records)):
        raise ValueError('needs question/answer records with "perturbed_answer" (the wrong options) in every one')
    if kind == "text":
        return {"questions": [""] * len(records), "answers": [r["text"] for r in records]}
    split = {"questions": [r["question"] for r in records], "answers": [r["answer"] for r in records]}
    has_both = [("paraphrased_answer" in r and "perturbed_answer" in r) for r in records]
    truth_ratio = not options and all(has_both)
    if not options and any(has_both) and not truth_ratio:
        warnings.warn(f"{has_both.count(False)} of {len(records)} records lack 'paraphrased_answer' or "
                      f"'perturbed_answer' (record {has_both.index(False)} first), so the truth ratio (and forget "
                      f"quality) is left out for all of them")
    if truth_ratio:
        split["paraphrased_answers"] = [r["paraphrased_answer"] for r in records]
    if options or truth_ratio:
        split["perturbed_answers"] = [[p] if isinstance(p, str) else list(p)
                                      for p in (r["perturbed_answer"] for r in records)]
    return split


def report_markdown(metrics: Mapping, report: SEMUReport, run_settings: Mapping) -> str:
    """report.md of an LLM run: every metric measured before and after side by side, the others, the epochs'
    history (with the selection's scores) and SEMU's layers."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return "" if value is None else str(value)

    pairs = [key[:-len("_before")] for key in metrics if key.endswith("_before") and
             f"{key[:-len('_before')]}_after" in metrics]
    paired = {f"{name}_{when}" for name in pairs for when in ("before", "after")}
    lines = ["# SEMU LLM unlearning report", "",
             "Settings: " + ", ".join(f"{k} = {v}" for k, v in run_settings.items() if v is not None), "",
             "NLL: mean next-token negative log-likelihood of the labelled tokens (the answers of question/answer "
             "data), ppl = exp(NLL). The evaluation metrics (answer_prob, truth_ratio, rougeL_recall or _f1, "
             "model_utility, mia_*_auc, forget_quality, privleak) are TOFU's / MUSE's as semu_fast.workflows.llm_eval "
             "computes them.", "", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {cell(metrics[name + '_before'])} | {cell(metrics[name + '_after'])} |" for name in pairs]
    others = [(k, v) for k, v in metrics.items() if k not in paired]
    if others:
        lines += ["", "| | |", "|---|---|"] + [f"| {k} | {cell(v)} |" for k, v in others]
    history = report.training.get("history") or []
    if history:
        keys = [k for k in history[0] if k != "epoch"]
        lines += ["", "## Epochs", "", "| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {h['epoch']} | " + " | ".join(cell(h.get(k)) for k in keys) + " |" for h in history]
        if report.training.get("best_epoch") is not None:
            lines += ["", f"Kept: epoch {report.training['best_epoch']} (0: R = 0, the original model), by "
                          f"{report.training.get('selection', {})}."]
    if report.layers:
        lines += ["", "## SEMU per layer", "", *results.layers_table(results.layers(report))]
        lines += ["", f"Trainable: {report.trainable_params} parameters ({report.trainable_share:.4f}% of the model)."]
    return "\n".join(lines) + "\n"
