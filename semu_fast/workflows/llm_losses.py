"""Forget and retain objectives for SEMU on causal LMs: each a callable (model, batch, generator) -> scalar tensor,
sf.unlearn's train_loss_fn / retain_loss_fn, with the published hyper-parameters as defaults.

    npo = make_loss("npo", beta=0.2)                   # FORGET_LOSSES: name -> factory taking the overrides
    kl = make_retain_loss("kl")                        # RETAIN_LOSSES
    semu_model, report, metrics = unlearn_llm(model, forget, retain, forget_loss=npo, retain_loss=kl)

Forget objectives (nll(x) is the summed token NLL of a sequence's labelled tokens, so log p(y|x) = -nll; |y| the
number of labelled tokens; the mean runs over the batch's sequences; definitions and defaults checked against
locuslab/open-unlearning's src/trainer/unlearn and configs/trainer):
    "ascent"    -mean token NLL (gradient ascent).
    "random"    NLL towards a random token != the true one at every labelled position (SEMU's random labels).
    "graddiff"  weight * -mean token NLL, and it trains on retain data (its retain term, NLL by default): gradient
                difference. open-unlearning: gamma = alpha = 1.
    "npo"       weight * -2/beta * logsigmoid(-beta * (log p - log p_ref)) on sequence log-likelihood sums;
                beta = 0.1 (open-unlearning's NPO config, NPO paper's TOFU setting). Equals 2/beta * log 2 while the
                model is the reference.
    "simnpo"    weight * -2/beta * logsigmoid(beta * (nll / |y| - delta)): length-normalised, no reference;
                beta = 4.5, delta = 0, weight = 0.125 (open-unlearning's SimNPO config, after SimNPO's TOFU config,
                where delta is "gamma" and weight "npo_coeff").
    "idkdpo"    ("idk" too) DPO with the batch's "I don't know" answers (batch["alternate"], see llm_data) as the
                preferred and the true answers as the rejected ones: weight * -2/beta * logsigmoid(beta *
                ((log p_w - log p_w_ref) - (log p_l - log p_l_ref))); beta = 0.1 (open-unlearning's DPO config,
                TOFU's IdkDPO).
    "idknll"    weight * mean token NLL of the "I don't know" answers (TOFU's IDK fine-tuning).
    "rmu"       representation misdirection (WMDP's RMU): the output hidden states of decoder layer `layer` on
                forget tokens are pulled (mean squared error) towards steering_coeff * u, u a fixed random unit
                vector (uniform in [0, 1)^d, normalised, seeded by `seed`), and its retain term keeps them at the
                reference's on retain tokens, times alpha. layer = 7, steering_coeff = 6.5, alpha = 1200 (the WMDP
                paper's Zephyr-7B run; open-unlearning's RMU config uses 2 and 1 and says to tune both per model).
Retain objectives:
    "nll"  weight * mean token NLL; "kl"  weight * KL(ref || model) of the next-token distributions, averaged over
    labelled positions (open-unlearning's KL retain term, there averaged over all positions); "rmu"  RMU's
    retain term. A forget objective's own retain term (its retain_loss() method: NLL times alpha = 1, or RMU's) is
    the one unlearn_llm trains when retain_loss is not given; a retain loss named instead keeps alpha as its weight.
The sequence-level losses (NPO, SimNPO, IdkDPO) leave a sequence with no labelled token out of their mean, where
open-unlearning keeps it (as NPO's constant 2/beta log 2; SimNPO's NaN).

unlearn_llm's default retain_mode "interleave" (sf.unlearn's) takes forget and retain batches as separate optimizer
steps, so weight and alpha scale each step's gradient (with Adam that barely matters: it is nearly scale-free; with
SGD they act like learning rates). retain_mode="paired" (PairedLoss) and SEMUTrainer take open-unlearning's step,
one on weight * forget + alpha * retain, where alpha sets the balance.

The reference model is the model itself with its adapters disabled (`model.disable_adapters()`, SEMUModel's):
no copy of the weights. Its outputs are computed without grad and in eval mode, and cached per batch: the cache
is keyed by the batch object's identity (a reference to the batch is kept, so its id cannot be reused) and holds
up to `cache_bytes` of tensors, counting the batches it keeps alive (default 1 GiB per loss object; values on
the model's device); batches past that are recomputed at every step. Besides the batch, NPO keeps 4 bytes a
sequence, IdkDPO 8, RMU's retain term (B, T, hidden) float32 and KL (labelled tokens, vocabulary) float32 a batch.
It pays off with a list of batches read every epoch (unlearn_llm's); a loader that yields new dicts never hits it.
The cache assumes the batches and the base weights stay as they are while the loss object is used; clear_cache()
empties it, and it empties itself when used with another model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import weakref
from collections.abc import Callable
from typing import ClassVar, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_number
from .._utils import model_device
from ..model import SEMUModel, base_model
from .llm_data import IGNORE_INDEX, Batch, check_batch

LossFn = Callable[[nn.Module, Batch, torch.Generator], torch.Tensor]
DEFAULT_CACHE_BYTES = 1 << 30


# ---- token log-likelihoods ---------------------------------------------------------------------------------------

def _inputs(model: nn.Module, batch: Batch):
    check_batch(batch)
    device = model_device(model)
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    return input_ids, (mask.to(device) if mask is not None else None)


def _takes_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(base_model(model).forward).parameters


def _forward(model: nn.Module, input_ids: torch.Tensor, mask):
    """model(...) without a cache. With an attention mask, position ids count the kept tokens (cumsum(mask) - 1,
    0 on padding), as transformers' generate passes them, wherever the model's forward takes position_ids: an
    absolute-position model (GPT-2) otherwise gives a left-padded row's tokens the positions of its pads, and
    scores it differently from the same row padded on the right."""
    kwargs = {"attention_mask": mask, "use_cache": False}
    if mask is not None and _takes_position_ids(model):
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return model(input_ids=input_ids, **kwargs)


def _labels(batch: Batch, input_ids: torch.Tensor, mask) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        return input_ids if mask is None else input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return labels.to(input_ids.device)


def _logits_and_targets(model: nn.Module, batch: Batch):
    """Float32 logits of positions 0..T-2, (B, T-1, V), and their targets (labels shifted left), (B, T-1).

    A target whose predicting position is padding (attention_mask 0) is ignored (-100): in a left-padded batch the
    first real token of a row would otherwise be scored as predicted from a pad token. Right-padded batches (as
    llm_data makes them) are unchanged: their padded positions carry no label. Positions follow the mask (_forward),
    so a row scores the same padded on either side."""
    input_ids, mask = _inputs(model, batch)
    logits = _forward(model, input_ids, mask).logits
    targets = _labels(batch, input_ids, mask)[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(mask[:, :-1] == 0, IGNORE_INDEX)
    return logits[:, :-1].float(), targets


def _nll_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    logits, targets = _logits_and_targets(model, batch)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def _no_labels(what: str = "the batch"):
    return ValueError(f"{what} has no labelled position to predict (every label is -100)")


def nll_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the batch's labelled positions: SEMU's gradient-pass loss
    (loss_fn) for LLMs."""
    total, count = _nll_sum(model, batch)
    if count == 0:
        raise _no_labels()
    return total / count


def sequence_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, count), each (B,): the float32 sum of each sequence's next-token NLL over its labelled positions
    (-log p(answer | prompt) for question/answer batches), and how many positions that is (int64)."""
    logits, targets = _logits_and_targets(model, batch)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


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
        raise _no_labels()
    return F.cross_entropy(logits.flatten(0, 1), random_targets.flatten(), ignore_index=IGNORE_INDEX)


# ---- the reference model and its cache ---------------------------------------------------------------------------

@contextlib.contextmanager
def reference(model: nn.Module, what: str = "this loss"):
    """The reference model inside the block: `model` with its adapters disabled, in eval mode (every module's own
    flag given back afterwards), without grad. TypeError unless model is a SEMUModel."""
    if not isinstance(model, SEMUModel):  # transformers models have a disable_adapters of their own (peft's)
        raise TypeError(f"{what} compares with the reference model, which is the model with its adapters disabled: "
                        f"model must be a SEMUModel (sf.prepare / sf.unlearn give one), got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), model.disable_adapters():
            model.eval()
            yield model
    finally:
        for module, mode in modes:
            module.training = mode


def _nbytes(value) -> int:
    """Bytes of the tensors in a tensor, a tuple / list of them or a (nested) batch dict."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = value.values()
    return sum(_nbytes(v) for v in value if isinstance(v, (torch.Tensor, dict, tuple, list)))


class ReferenceCache:
    """The reference's values per batch (see the module docstring for the policy): keyed by the batch object's
    identity, up to max_bytes in all (the values and the batches they keep alive); a batch that does not fit is
    recomputed at every call. It serves a list of batches read every epoch (as unlearn_llm's); a loader that yields
    new dicts at every pass never hits it."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.clear()

    def clear(self) -> None:
        self._entries: dict[int, tuple] = {}
        self._bytes = 0
        self._owner = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, model: nn.Module, batch: Batch, compute: Callable, what: str):
        """compute() run on the reference (see `reference`), or its cached value for this batch."""
        if self._owner is None or self._owner() is not model:
            self.clear()
            self._owner = weakref.ref(model)
        entry = self._entries.get(id(batch))
        if entry is not None and entry[0] is batch:
            return entry[1]
        with reference(model, what):
            value = compute()
        size = _nbytes(value) + _nbytes(batch)  # the entry keeps the batch alive too
        if self._bytes + size <= self.max_bytes:
            self._entries[id(batch)] = (batch, value)
            self._bytes += size
        return value


# ---- objectives: shared pieces -----------------------------------------------------------------------------------

class _Objective:
    """Base of the objectives: a name, whether they need retain data or alternate answers, and the cache."""
    name: ClassVar[str] = ""
    needs_retain: ClassVar[bool] = False  # defined with a retain term: unlearn_llm needs retain data
    needs_alternate: ClassVar[bool] = False  # reads batch["alternate"] (llm_data.make_qa_batches(alternate=True))
    numbers: ClassVar[tuple] = ()  # fields checked as finite positive numbers
    non_negative: ClassVar[tuple] = ()  # fields checked as finite non-negative numbers

    def __post_init__(self):
        for field in self.numbers:
            check_number(f"{self.name}: {field}", getattr(self, field))
        for field in self.non_negative:
            check_number(f"{self.name}: {field}", getattr(self, field), positive=False)
        cache_bytes = getattr(self, "cache_bytes", 0)
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"{self.name}: cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self._cache = ReferenceCache(cache_bytes)

    def check_model(self, model: nn.Module) -> None:
        """ValueError now when the objective cannot run on `model` (not at the first step, after the gradient
        pass); nothing to check by default."""

    def clear_cache(self) -> None:
        self._cache.clear()

    def _reference(self, model, batch, compute):
        return self._cache.get(model, batch, compute, self.name)


class _WithRetainNLL(_Objective):
    def retain_loss(self) -> "RetainNLL":
        """The retain term open-unlearning trains this objective with: NLL times alpha."""
        return RetainNLL(weight=self.alpha)


def _alternate(batch: Batch, owner: str) -> Batch:
    alternate = batch.get("alternate") if isinstance(batch, dict) else None
    if alternate is None:
        raise ValueError(f"{owner} needs batch['alternate'] (the same questions with \"I don't know\" answers): build "
                         f"the forget batches with llm_data.make_qa_batches(..., alternate=True)")
    try:
        check_batch(alternate)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: batch['alternate']: {err}") from None
    return alternate


def _labelled_rows(count: torch.Tensor, owner: str) -> torch.Tensor:
    rows = count > 0
    if not rows.any():
        raise _no_labels(f"{owner}: the batch")
    return rows


def _npo_term(log_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """-2/beta * logsigmoid(beta * log_ratio), elementwise: the DPO/NPO loss of a log-likelihood-ratio margin."""
    return -2.0 / beta * F.logsigmoid(beta * log_ratio)


# ---- forget objectives -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GradDiff(_WithRetainNLL):
    """Gradient difference: weight * -NLL on forget batches, and its retain term (NLL times alpha) on retain
    batches, which it needs. open-unlearning's GradDiff: gamma (our weight) = alpha = 1."""
    weight: float = 1.0
    alpha: float = 1.0
    name: ClassVar[str] = "graddiff"
    needs_retain: ClassVar[bool] = True
    numbers: ClassVar[tuple] = ("weight", "alpha")

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return -self.weight * nll_loss(model, batch)


@dataclasses.dataclass
class NPO(_WithRetainNLL):
    """Negative preference optimization: weight * mean over sequences of -2/beta * logsigmoid(-beta *
    (log p - log p_ref)), log p the summed log-likelihood of the labelled tokens; p_ref the model with its adapters
    disabled (cached, see the module docstring). Bounded below by 0; 2/beta * log 2 at the reference."""
    beta: float = 0.1
    weight: float = 1.0
    alpha: float = 1.0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    name: ClassVar[str] = "npo"
    numbers: ClassVar[tuple] = ("beta", "weight", "alpha")

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        nll, count = sequence_nll(model, batch)
        nll_ref = self._reference(model, batch, lambda: sequence_nll(model, batch)[0])
        rows = _labelled_rows(count, self.name)
        # log p - log p_ref = nll_ref - nll
        return self.weight * _npo_term(nll - nll_ref, self.beta)[rows].mean()


@dataclasses.dataclass
class SimNPO(_WithRetainNLL):
    """SimNPO: weight * mean over sequences of -2/beta * logsigmoid(beta * (nll / |y| - delta)), the
    length-normalised NLL and no reference model (open-unlearning's form, where delta sits inside the beta)."""
    beta: float = 4.5
    delta: float = 0.0
    weight: float = 0.125
    alpha: float = 1.0
    name: ClassVar[str] = "simnpo"
    numbers: ClassVar[tuple] = ("beta", "weight", "alpha")
    non_negative: ClassVar[tuple] = ("delta",)

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        nll, count = sequence_nll(model, batch)
        rows = _labelled_rows(count, self.name)
        mean_nll = nll[rows] / count[rows]
        return self.weight * _npo_term(mean_nll - self.delta, self.beta).mean()


@dataclasses.dataclass
class IdkDPO(_WithRetainNLL):
    """DPO towards "I don't know": batch["alternate"] (the same questions with refusals) is preferred, the batch's
    true answers rejected. weight * mean of -2/beta * logsigmoid(beta * ((log p_w - log p_w_ref) -
    (log p_l - log p_l_ref))); both reference terms cached per batch."""
    beta: float = 0.1
    weight: float = 1.0
    alpha: float = 1.0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    name: ClassVar[str] = "idkdpo"
    needs_alternate: ClassVar[bool] = True
    numbers: ClassVar[tuple] = ("beta", "weight", "alpha")

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        alternate = _alternate(batch, self.name)
        if alternate["input_ids"].shape[0] != batch["input_ids"].shape[0]:
            raise ValueError(f"{self.name}: batch['alternate'] holds {alternate['input_ids'].shape[0]} rows, the "
                             f"batch {batch['input_ids'].shape[0]}: they must pair row for row")
        nll_w, count_w = sequence_nll(model, alternate)
        nll_l, count_l = sequence_nll(model, batch)
        ref_w, ref_l = self._reference(model, batch, lambda: (sequence_nll(model, alternate)[0],
                                                              sequence_nll(model, batch)[0]))
        rows = _labelled_rows(count_w, self.name) & _labelled_rows(count_l, self.name)
        margin = (ref_w - nll_w) - (ref_l - nll_l)
        return self.weight * _npo_term(margin, self.beta)[rows].mean()


@dataclasses.dataclass
class IdkNLL(_WithRetainNLL):
    """weight * mean token NLL of batch["alternate"], the "I don't know" answers: fine-tune towards refusing."""
    weight: float = 1.0
    alpha: float = 1.0
    name: ClassVar[str] = "idknll"
    needs_alternate: ClassVar[bool] = True
    numbers: ClassVar[tuple] = ("weight", "alpha")

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self.weight * nll_loss(model, _alternate(batch, self.name))


# ---- RMU ---------------------------------------------------------------------------------------------------------

def decoder_layer(model: nn.Module, layer: Union[int, str]) -> tuple[str, nn.Module]:
    """(name, module) of a decoder layer: `layer` is an index into the model's stack of blocks (the longest
    nn.ModuleList of one module type, e.g. model.layers of a Llama, transformer.h of a GPT-2) or a module name
    (as in the original model, without SEMUModel's "model." prefix)."""
    base = base_model(model)
    if isinstance(layer, str):
        try:
            return layer, base.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"rmu: layer={layer!r} names no module of the model") from None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"rmu: layer must be an int (index of a decoder layer) or a module name, got {layer!r}")
    stacks = [(name, m) for name, m in base.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    if not stacks:
        raise ValueError("rmu: the model has no stack of decoder layers (an nn.ModuleList of blocks); give layer as "
                         "a module name")
    name, stack = max(stacks, key=lambda s: len(s[1]))
    if not -len(stack) <= layer < len(stack):
        raise ValueError(f"rmu: layer={layer} is out of range: the model's decoder layers are {name}.0 to "
                         f"{name}.{len(stack) - 1}")
    index = layer % len(stack)
    return f"{name}.{index}", stack[index]


def hidden_states(model: nn.Module, batch: Batch, layer: Union[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, mask): the float32 output hidden states of decoder layer `layer` (see decoder_layer), (B, T, d), through
    a forward hook over one forward of the model, and the (B, T) bool mask of the positions RMU counts: labels
    != -100 (all but padding for text batches, the answer for question/answer batches)."""
    _, module = decoder_layer(model, layer)
    input_ids, mask = _inputs(model, batch)
    captured = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = module.register_forward_hook(hook)
    try:
        _forward(model, input_ids, mask)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"rmu: layer {layer!r} ran {len(captured)} times in one forward; give a layer that runs "
                           f"once")
    return captured[0].float(), _labels(batch, input_ids, mask) != IGNORE_INDEX


def activation_loss(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's masked MSE: for each sequence, the mean over its masked positions of the mean over features of
    (h - target)^2, then the mean over sequences with a masked position. h, target: (B, T, d); mask: (B, T)."""
    per_token = (h - target).pow(2).mean(-1)
    weights = mask.to(per_token.device, per_token.dtype)  # h is on its layer's device, the mask on the inputs'

    count = weights.sum(-1)
    rows = count > 0
    if not rows.any():
        raise _no_labels("rmu: the batch")
    return ((per_token * weights).sum(-1)[rows] / count[rows]).mean()


@dataclasses.dataclass
class RMU(_Objective):
    """Representation misdirection: activation_loss between decoder layer `layer`'s hidden states on forget tokens
    and steering_coeff * u (u: uniform [0, 1)^d normalised, from torch.Generator().manual_seed(seed), as WMDP and
    open-unlearning draw it). Needs retain data: its retain term (retain_loss()) keeps that layer's hidden states at
    the reference model's on retain tokens, times alpha. Adapters after `layer` get no gradient from it."""
    layer: Union[int, str] = 7
    steering_coeff: float = 6.5
    alpha: float = 1200.0
    seed: int = 0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    name: ClassVar[str] = "rmu"
    needs_retain: ClassVar[bool] = True
    numbers: ClassVar[tuple] = ("steering_coeff", "alpha")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"rmu: seed must be an int, got {self.seed!r}")
        self._control = None

    def control_vector(self, dim: int) -> torch.Tensor:
        """steering_coeff * u, (dim,) float32 on the CPU, drawn once."""
        if self._control is None or self._control.numel() != dim:
            u = torch.rand(dim, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
            self._control = (u / u.norm() * self.steering_coeff).float()
        return self._control

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        h, mask = hidden_states(model, batch, self.layer)
        if torch.is_grad_enabled() and not h.requires_grad:
            raise ValueError(f"rmu: the hidden states of layer {decoder_layer(model, self.layer)[0]!r} depend on no "
                             f"trained parameter: adapt layers at or before it (target_modules); with gradient "
                             f"checkpointing, use use_reentrant=False")
        target = self.control_vector(h.shape[-1]).to(h.device)
        return activation_loss(h, target.expand_as(h), mask)

    def retain_loss(self) -> "RMURetain":
        return RMURetain(layer=self.layer, alpha=self.alpha, cache_bytes=self.cache_bytes)

    def check_model(self, model: nn.Module) -> None:
        decoder_layer(model, self.layer)


# ---- retain objectives -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RetainNLL(_Objective):
    """weight * mean token NLL on the retain batch."""
    weight: float = 1.0
    name: ClassVar[str] = "nll"
    numbers: ClassVar[tuple] = ("weight",)

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self.weight * nll_loss(model, batch)


@dataclasses.dataclass
class RetainKL(_Objective):
    """weight * KL(p_ref || p_model) of the next-token distributions, averaged over the batch's labelled positions;
    the reference's log-probabilities of those positions are cached per batch (see the module docstring)."""
    weight: float = 1.0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    name: ClassVar[str] = "kl"
    numbers: ClassVar[tuple] = ("weight",)

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        def log_probs():
            logits, targets = _logits_and_targets(model, batch)
            return F.log_softmax(logits[targets != IGNORE_INDEX], dim=-1)

        log_q = log_probs()
        if log_q.shape[0] == 0:
            raise _no_labels(f"{self.name}: the batch")
        log_p = self._reference(model, batch, log_probs)
        return self.weight * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


@dataclasses.dataclass
class RMURetain(_Objective):
    """RMU's retain term: alpha * activation_loss between decoder layer `layer`'s hidden states and the reference
    model's (cached per batch) on the retain batch's labelled tokens. 0 while the model is the reference."""
    layer: Union[int, str] = 7
    alpha: float = 1200.0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    name: ClassVar[str] = "rmu"
    numbers: ClassVar[tuple] = ("alpha",)

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        h, mask = hidden_states(model, batch, self.layer)
        h_ref = self._reference(model, batch, lambda: hidden_states(model, batch, self.layer)[0])
        return self.alpha * activation_loss(h, h_ref, mask)

    def check_model(self, model: nn.Module) -> None:
        decoder_layer(model, self.layer)


# ---- forget and retain in one step -------------------------------------------------------------------------------

class PairedLoss:
    """open-unlearning's step: forget objective on the forget batch + retain objective on a retain batch drawn
    uniformly at random (from the step's generator) among `retain_batches`, one optimizer step on their sum (each
    objective carries its own weight / alpha). unlearn_llm(retain_mode="paired") trains with it; it draws whole
    retain batches where open-unlearning draws one retain example per forget example."""

    def __init__(self, forget_loss: LossFn, retain_loss: LossFn, retain_batches):
        if isinstance(retain_batches, dict) or not isinstance(retain_batches, (list, tuple)) or not retain_batches:
            raise ValueError(f"retain_batches must be a non-empty list of batches, got "
                             f"{type(retain_batches).__name__}")
        self.forget_loss, self.retain_loss, self.retain_batches = forget_loss, retain_loss, retain_batches

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        # the run's generator: the pairing is reproducible with its seed
        index = int(torch.randint(len(self.retain_batches), (1,), generator=generator))
        forget = self.forget_loss(model, batch, generator)
        return forget + self.retain_loss(model, self.retain_batches[index], generator)


# ---- registry ----------------------------------------------------------------------------------------------------

def _plain(fn: LossFn) -> Callable[..., LossFn]:
    def factory(**overrides):
        if overrides:
            raise TypeError(f"unexpected keyword argument {next(iter(overrides))!r}")
        return fn
    factory.__doc__ = fn.__doc__
    return factory


# name -> factory(**hyper-parameters) -> loss; "idk" is IdkDPO (TOFU's "I don't know" preference objective).
FORGET_LOSSES: dict[str, Callable[..., LossFn]] = {
    "ascent": _plain(ascent_loss), "random": _plain(random_token_loss), "graddiff": GradDiff, "npo": NPO,
    "simnpo": SimNPO, "idk": IdkDPO, "idkdpo": IdkDPO, "idknll": IdkNLL, "rmu": RMU}
RETAIN_LOSSES: dict[str, Callable[..., LossFn]] = {"nll": RetainNLL, "kl": RetainKL, "rmu": RMURetain}


def _hyper_parameters(factory) -> list:
    if dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory) if f.init]
    return []


def _make(param: str, registry: dict, loss, overrides: dict) -> LossFn:
    if callable(loss):
        if overrides:
            raise ValueError(f"{param}: hyper-parameters ({', '.join(overrides)}) apply to a loss given by name, not "
                             f"to a callable")
        return loss
    if not isinstance(loss, str) or loss not in registry:
        raise ValueError(f"{param} must be one of {', '.join(map(repr, registry))} or a callable (model, batch, "
                         f"generator) -> scalar, got {loss!r}")
    factory = registry[loss]
    known = _hyper_parameters(factory)
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ValueError(f"{param}={loss!r} has no hyper-parameter {unknown[0]!r}; its hyper-parameters: "
                         f"{', '.join(known) or 'none'}")
    return factory(**overrides)


def make_loss(loss: Union[str, LossFn], **overrides) -> LossFn:
    """The forget objective `loss` (a FORGET_LOSSES name) with its defaults replaced by `overrides`, e.g.
    make_loss("npo", beta=0.2); a callable (model, batch, generator) -> scalar is returned as it is."""
    return _make("forget_loss", FORGET_LOSSES, loss, overrides)


def make_retain_loss(loss: Union[str, LossFn], **overrides) -> LossFn:
    """The retain objective `loss` (a RETAIN_LOSSES name) with `overrides`, e.g. make_retain_loss("kl", weight=2);
    a callable is returned as it is."""
    return _make("retain_loss", RETAIN_LOSSES, loss, overrides)
