"""The report's figures (matplotlib, Agg: no display needed): accuracy per epoch of each method, each layer's
explained-variance curve with the chosen k, and the trainable share per layer."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_per_epoch(history: dict, path: Path) -> bool:
    """Forget and retain accuracy after each epoch, one colour per method; False when no method has any."""
    runs = {m: h for m, h in history.items() if any("forget_acc" in e for e in h)}
    if not runs:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (method, entries) in enumerate(runs.items()):
        color = f"C{i}"
        epochs = [e["epoch"] for e in entries]
        ax.plot(epochs, [e.get("forget_acc") for e in entries], "-o", color=color, label=f"{method} forget")
        if any("retain_acc" in e for e in entries):
            ax.plot(epochs, [e.get("retain_acc") for e in entries], "--s", color=color, label=f"{method} retain")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(-2, 102), title="Accuracy per epoch")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def spectra(semu_report: dict, path: Path) -> bool:
    """Share of each layer's projected-gradient variance explained by its leading singular directions, with a
    mark at the chosen k and a line at gamma; False when the report holds no spectra (e.g. loaded adapters)."""
    layers = [layer for layer in semu_report.get("layers", []) if layer.get("singular_values") and layer["k"] > 0]
    if not layers:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, layer in enumerate(layers):
        total = layer["total_energy"] or 1.0
        curve, running = [], 0.0
        for s in layer["singular_values"]:
            running += s * s
            curve.append(running / total)
        ranks = range(1, len(curve) + 1)
        ax.plot(ranks, curve, color=f"C{i % 10}", label=f"{layer['name']} (k={layer['k']})")
        k = min(layer["k"], len(curve))
        ax.plot([k], [curve[k - 1]], "o", color=f"C{i % 10}")
    gammas = sorted({layer["gamma"] for layer in layers})
    for gamma in gammas:
        ax.axhline(gamma, color="gray", linestyle=":", linewidth=1)
    longest = max(len(layer["singular_values"]) for layer in layers)
    ax.set(xscale="log" if longest > 32 else "linear", xlabel="rank", ylabel="explained variance", ylim=(0, 1.02),
           title=f"Gradient spectra (gamma {', '.join(f'{g:g}' for g in gammas)}; dots: chosen k)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def trainable_share(semu_report: dict, path: Path) -> bool:
    """Trainable parameters of each adapter as a percentage of its layer's weights."""
    layers = [layer for layer in semu_report.get("layers", [])]
    if not layers:
        return False
    plt = _pyplot()
    shares = []
    for layer in layers:
        numel = 1
        for size in layer["shape"]:
            numel *= size
        shares.append(100.0 * layer["trainable_params"] / numel)
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.3 * len(layers)))
    ax.barh([layer["name"] for layer in layers], shares, color="C0")
    ax.invert_yaxis()
    ax.set(xlabel="trainable share of the layer's weights (%)",
           title=f"SEMU trainable share: {semu_report.get('trainable_share', 0):.3f}% of all weights")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
