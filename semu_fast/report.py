"""What SEMU did to a model: per layer shape, rank, captured variance and trainable parameters; totals; timings."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class LayerReport:
    name: str
    kind: str                      # "linear", "conv1d" (transformers' Conv1D), "column_linear" (per column) or "conv2d"
    shape: tuple
    gamma: float
    k: int                         # size of R (conv, per column: the max over input channels); 0 = no adapter
    captured_variance: Optional[float]  # share of ||G_perp||^2 inside the kept subspace(s); 1.0 for a zero gradient;
    #                                    None where unknown (adapters imported from an official checkpoint)
    trainable_params: int
    ranks: Optional[list] = None   # conv, per column: each input channel's (column's) own k
    note: str = ""                 # e.g. why no adapter was installed
    singular_values: Optional[list] = None  # the leading ones, up to k (conv: root of the energy over channels)
    total_energy: Optional[float] = None    # ||G_perp||^2: with singular_values, the explained-variance curve


@dataclass
class SEMUReport:
    layers: list = field(default_factory=list)
    total_params: int = 0          # every parameter of the model before adapters
    timings: dict = field(default_factory=dict)   # seconds per phase
    training: dict = field(default_factory=dict)  # filled by sf.unlearn: history, best epoch
    skipped: dict = field(default_factory=dict)   # {layer: why SEMU could not adapt it}
    gradient_passes: int = 1                      # forget passes (more than one under max_accumulator_bytes)

    @property
    def trainable_params(self) -> int:
        return sum(layer.trainable_params for layer in self.layers)

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a percentage of all the model's parameters."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def trainable_split(self, attention: str) -> dict[str, dict]:
        """Trainable parameters by part of the model: "attention" (the layers whose name the regular expression
        `attention` matches, re.search), "conv" (the other Conv2d layers) and "other" (the rest). Each part:
        {"trainable_params": count, "trainable_share": count as a percentage of all the model's parameters}; the
        shares add up to trainable_share."""
        try:
            pattern = re.compile(attention)
        except (re.error, TypeError) as err:
            raise ValueError(f"attention must be a regular expression, got {attention!r} ({err})") from None
        counts = {"conv": 0, "attention": 0, "other": 0}
        for layer in self.layers:
            part = "attention" if pattern.search(layer.name) else "conv" if layer.kind == "conv2d" else "other"
            counts[part] += layer.trainable_params
        return {part: {"trainable_params": n, "trainable_share": 100.0 * n / max(self.total_params, 1)}
                for part, n in counts.items()}

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers], "total_params": self.total_params,
                "trainable_params": self.trainable_params, "trainable_share": self.trainable_share,
                "timings": dict(self.timings), "training": dict(self.training), "skipped": dict(self.skipped),
                "gradient_passes": self.gradient_passes}

    @classmethod
    def from_dict(cls, saved: dict) -> "SEMUReport":
        """The report to_dict wrote (the derived totals are recomputed)."""
        return cls(layers=[LayerReport(**{**entry, "shape": tuple(entry["shape"])})
                           for entry in saved.get("layers", [])],
                   total_params=saved.get("total_params", 0), timings=dict(saved.get("timings", {})),
                   training=dict(saved.get("training", {})), skipped=dict(saved.get("skipped", {})),
                   gradient_passes=saved.get("gradient_passes", 1))

    def __str__(self) -> str:
        rows = [f"{'layer':32s} {'kind':13s} {'shape':22s} {'gamma':>5s} {'k':>5s} {'captured':>8s} {'trainable':>10s}"]
        for layer in self.layers:
            rows.append(f"{layer.name[:32]:32s} {layer.kind:13s} {str(tuple(layer.shape)):22s} {layer.gamma:5.2f} "
                        f"{layer.k:5d} {format_share(layer.captured_variance):>8s} {layer.trainable_params:10d}"
                        + (f"  ({layer.note})" if layer.note else ""))
        rows.append(f"trainable: {self.trainable_params} of {self.total_params} parameters "
                    f"({self.trainable_share:.3f}%)")
        for reason in sorted(set(self.skipped.values())):
            names = [name for name, why in self.skipped.items() if why == reason]
            rows.append(f"skipped {len(names)} layer(s) ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): "
                        f"{reason}")
        if self.timings:
            rows.append("timings: " + ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items()))
        return "\n".join(rows)


def format_share(value: Optional[float]) -> str:
    """A captured-variance share for a table: 4 decimals, or "n/a" where it is unknown."""
    return "n/a" if value is None else f"{value:.4f}"
