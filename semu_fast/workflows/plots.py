"""The report's figures (matplotlib, Agg: no display needed): accuracy per epoch of each method, each layer's
explained-variance curve with the chosen k, and the trainable share per layer. Each takes the run record (run.json:
"history", "semu_report") and returns False when it has nothing to draw."""
from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, ax, path: Path, legend_size: float = 7) -> bool:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _colors(plt, n: int) -> list:
    """n distinct colours (the default cycle repeats after 10)."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = plt.get_cmap("turbo")
    return [cmap(i / (n - 1)) for i in range(n)]


def accuracy_per_epoch(run: dict, path: Path) -> bool:
    """Forget and retain accuracy after each epoch, one colour per method; a star marks the epoch SEMU kept."""
    runs = {m: h for m, h in run.get("history", {}).items() if any("forget_acc" in e for e in h)}
    if not runs:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    kept = run.get("semu_report", {}).get("training", {}).get("best_epoch")
    for color, (method, entries) in zip(_colors(plt, len(runs)), runs.items()):
        epochs = [e["epoch"] for e in entries]
        ax.plot(epochs, [e.get("forget_acc") for e in entries], "-o", color=color, label=f"{method} forget")
        if any("retain_acc" in e for e in entries):
            ax.plot(epochs, [e.get("retain_acc") for e in entries], "--s", color=color, label=f"{method} retain")
        if method == "semu" and kept is not None:
            at = next((e for e in entries if e["epoch"] == kept), None)
            if at is not None:
                ax.plot([kept], [at["forget_acc"]], "*", color="black", markersize=14, label=f"kept (epoch {kept})")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(-2, 102), title="Accuracy per epoch")
    return _save(plt, fig, ax, path)


def spectra(run: dict, path: Path) -> bool:
    """Share of each layer's projected-gradient variance kept at each rank r, a dot at the chosen k and a line at
    gamma. A conv layer's curve (dashed) is the energy kept when every input channel keeps r directions; its k is
    the largest of the channels' own ranks, so its dot can sit above gamma."""
    layers = [layer for layer in run.get("semu_report", {}).get("layers", [])
              if layer.get("singular_values") and layer["k"] > 0]
    if not layers:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for color, layer in zip(_colors(plt, len(layers)), layers):
        total = layer["total_energy"] or 1.0
        curve, running = [], 0.0
        for s in layer["singular_values"]:
            running += s * s
            curve.append(running / total)
        style = "--" if layer["kind"] == "conv2d" else "-"
        ax.plot(range(1, len(curve) + 1), curve, style, color=color, label=f"{layer['name']} (k={layer['k']})")
        k = min(layer["k"], len(curve))
        ax.plot([k], [curve[k - 1]], "o", color=color)
    gammas = sorted({layer["gamma"] for layer in layers})
    for gamma in gammas:
        ax.axhline(gamma, color="gray", linestyle=":", linewidth=1)
    longest = max(len(layer["singular_values"]) for layer in layers)
    ax.set(xscale="log" if longest > 32 else "linear", xlabel="rank r", ylabel="explained variance", ylim=(0, 1.02),
           title=f"Gradient spectra (gamma {', '.join(f'{g:g}' for g in gammas)}; dots: chosen k)")
    return _save(plt, fig, ax, path, legend_size=6)


def trainable_share(run: dict, path: Path) -> bool:
    """Trainable parameters of each adapter as a percentage of its layer's weights (log axis: shares span orders of
    magnitude), each bar labelled with its value; layers left without an adapter (k = 0) in gray."""
    report = run.get("semu_report", {})
    layers = [layer for layer in report.get("layers", [])]
    if not layers:
        return False
    plt = _pyplot()
    shares = [100.0 * layer["trainable_params"] / math.prod(layer["shape"]) for layer in layers]
    fig, ax = plt.subplots(figsize=(6.4, 0.8 + 0.3 * len(layers)))
    positions = list(range(len(layers)))
    floor = min([s for s in shares if s > 0], default=1.0) / 10
    ax.barh(positions, [max(s, floor) for s in shares], color=["C0" if s > 0 else "lightgray" for s in shares])
    for y, share in zip(positions, shares):
        ax.annotate(f"{share:.3g}%", (max(share, floor), y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=6)
    ax.set_yticks(positions, [layer["name"] for layer in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="trainable share of the layer's weights (%)",
           title=f"SEMU trainable share: {report.get('trainable_share', 0):.3f}% of all weights")
    return _save(plt, fig, ax, path)


def image_grid(images, rows: list, path: Path, title: str = "") -> bool:
    """Images (N, C, H, W) in [0, 1], len(rows) rows of N / len(rows) images each, every row labelled."""
    if len(images) == 0 or not rows or len(images) % len(rows):
        return False
    plt = _pyplot()
    cols = len(images) // len(rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.9 * cols + 1.2, 0.9 * len(rows) + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        image = images[i].permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        if i % cols == 0:
            ax.set_ylabel(str(rows[i // cols]), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
