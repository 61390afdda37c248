"""SEMUConfig: every choice of the SEMU transform in one dataclass that validates itself on construction."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from ._checks import check_choice, check_gamma, check_number, check_positive_int
from .ops.project import PROJECTIONS
from .ops.svd import GRAM_MAX_GAMMA, METHODS, RANK_RULES, check_min_rank

CONV_RANKS = ("max", "per_channel")
NORM_MODES = ("eval", "train", "eval_all")


def _check_patterns(name: str, value) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{name} must hold regular expressions as strings, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err})") from None
    return patterns


@dataclass(frozen=True)
class SEMUConfig:
    """How SEMU picks layers, projects gradients, chooses ranks and runs its SVDs.

    gamma: share of each gradient's variance (sum of sigma^2) the kept subspace must explain, in (0, 1].
    projection: "orthogonal" (G - <G,W>/||W||^2 W), "official" (divides by ||W||, as the official code), "none".
    rank_rule: "at_least" (smallest k reaching gamma) or "official" (largest k not above gamma, at least 1).
    conv_rank: "max" (one k per conv layer, the max over input channels) or "per_channel".
    target_modules / exclude_modules: regular expressions searched in module names (re.search); None = every
        Linear and Conv2d (and transformers' Conv1D).
    gamma_overrides: {pattern: gamma}; the first pattern found in a layer's name sets its gamma (each pattern must
        match a selected layer).
    svd: "auto" (the path a cost model measured on this device picks: randomized, Gram or exact; conv batches take
        the gram_svd kernel), "exact", "gram", "randomized" (see sf.ops.truncated_svd).
    norm_mode: "eval" keeps norm layers' running statistics untouched (norm layers in eval mode, every other module
        in the mode the model was left in, except RNN layers and layers with transformers' gradient checkpointing
        on, which need training mode: see gradients.set_norm_mode) in the gradient pass and in training; "train"
        puts the whole model in train mode, updating the statistics on the forget data, as the official
        classification code does; "eval_all" puts the whole model in eval mode, dropout off too, as the official
        DDPM/SD gradient passes (model.eval()) do.
    train_norm_mode: the same choice while R trains; None (the default) means norm_mode. The official runs train R
        with the whole model in eval mode (train_norm_mode="eval_all"); the classification run takes its gradients
        in train mode (norm_mode="train").
    grad_clip: clip each forget batch's gradient (its total norm over the targeted layers) to this before it joins
        the sum, as the official DDPM/SD gradient pass does with clip_grad_norm_(1.0); None (default): no clipping.
    seed: seeds every random choice (randomized SVD, random labels); in [0, 2**63).
    max_accumulator_bytes: a budget for the float32 gradient accumulators (None: all layers at once). When the
        targeted layers' gradients exceed it, the forget pass runs once per group of layers that fits (more
        compute, bounded memory).
    per_column_modules: regular expressions (re.search) naming nn.Linear layers that take the official DDPM's layout
        for its 1x1-conv attention: the out x in gradient split into `in` matrices of out x 1, each column its own
        rank-1 (or 0) adapter dW[:, n] = U[n] R[n] Vh[n], R of shape (in, 1, 1): about `in` trainable entries per
        layer. Each pattern must match a selected nn.Linear. None: every Linear takes the one-matrix layout.
    min_rank: the floor of rank_rule="official", 1 (the official classification code, max(1, k)) or 0 (the official
        DDPM/SD code: a layer or channel whose first direction explains more than gamma gets k = 0 and trains
        nothing). rank_rule="at_least" never goes below 1 for a non-zero gradient, so 0 needs "official".
    """

    gamma: float = 0.95
    projection: str = "orthogonal"
    rank_rule: str = "at_least"
    conv_rank: str = "max"
    target_modules: Optional[Sequence[str]] = None
    exclude_modules: Optional[Sequence[str]] = None
    gamma_overrides: dict = field(default_factory=dict)
    svd: str = "auto"
    norm_mode: str = "eval"
    train_norm_mode: Optional[str] = None
    grad_clip: Optional[float] = None
    seed: int = 0
    max_accumulator_bytes: Optional[int] = None
    per_column_modules: Optional[Sequence[str]] = None
    min_rank: int = 1

    def __post_init__(self):
        set_ = object.__setattr__  # frozen dataclass: normalise in place once, here
        set_(self, "gamma", check_gamma("gamma", self.gamma))
        check_choice("projection", self.projection, PROJECTIONS)
        check_choice("rank_rule", self.rank_rule, RANK_RULES)
        check_choice("conv_rank", self.conv_rank, CONV_RANKS)
        check_choice("svd", self.svd, METHODS)
        check_choice("norm_mode", self.norm_mode, NORM_MODES)
        if self.train_norm_mode is not None:
            check_choice("train_norm_mode", self.train_norm_mode, NORM_MODES)
        check_number("grad_clip", self.grad_clip, optional=True)
        set_(self, "target_modules", _check_patterns("target_modules", self.target_modules))
        set_(self, "exclude_modules", _check_patterns("exclude_modules", self.exclude_modules))
        if not isinstance(self.gamma_overrides, dict):
            raise ValueError(f"gamma_overrides must be a dict {{pattern: gamma}}, got {self.gamma_overrides!r}")
        _check_patterns("gamma_overrides", list(self.gamma_overrides))
        set_(self, "gamma_overrides", {p: check_gamma(f"gamma_overrides[{p!r}]", g)
                                       for p, g in self.gamma_overrides.items()})
        too_close = [g for g in (self.gamma, *self.gamma_overrides.values()) if g > GRAM_MAX_GAMMA]
        if self.svd == "gram" and too_close:
            raise ValueError(f"svd='gram' resolves gamma <= {GRAM_MAX_GAMMA} only, got {max(too_close)} (gamma or "
                             f"gamma_overrides); use svd='auto' or 'exact'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        check_positive_int("max_accumulator_bytes", self.max_accumulator_bytes, optional=True)
        set_(self, "per_column_modules", _check_patterns("per_column_modules", self.per_column_modules))
        set_(self, "min_rank", check_min_rank(self.min_rank))
        if self.min_rank == 0 and self.rank_rule != "official":
            raise ValueError(f"min_rank=0 changes nothing with rank_rule={self.rank_rule!r} (it gives every non-zero "
                             f"gradient k >= 1); use rank_rule='official' for the official DDPM/SD ranks without a "
                             f"floor")

    def gamma_for(self, layer_name: str) -> float:
        for pattern, gamma in self.gamma_overrides.items():
            if re.search(pattern, layer_name):
                return gamma
        return self.gamma

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("target_modules", "exclude_modules", "per_column_modules"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SEMUConfig":
        return cls(**data)
