"""What a run leaves in its folder. Every workflow: adapters/ (sf.load_adapters) and metrics.json, strict JSON
written atomically. A classification run also: run.json (the scenario, per-epoch histories, SEMU's per-layer
report), report.md and the plots, with metrics.json as method -> UA, RA, TA, MIA (and its other SalUn features
MIA_*), trainable_share, seconds [, avg_gap]; `render` rebuilds report.md and the plots from the two JSON files. A
diffusion run also keeps samples.safetensors (images from the same seeds before and after, one row per class or
prompt), from which `render` draws samples_before.png / samples_after.png and its report.md.

Every run also lists what it wrote in .semu_fast_files.json (`record_run`): a later run into the same folder removes
what the earlier one listed and it did not write, so a folder never holds one run's results beside another's
(only names a semu-fast run listed are ever removed)."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Optional

from .._utils import atomic_write
from ..report import format_share
from . import plots

log = logging.getLogger("semu_fast")

COLUMNS = (("UA", "UA"), ("RA", "RA"), ("TA", "TA"), ("MIA", "MIA"), ("avg_gap", "Avg. Gap"),
           ("trainable_share", "trainable %"), ("seconds", "seconds"))
FIGURES = {"accuracy_per_epoch.png": plots.accuracy_per_epoch, "spectra.png": plots.spectra,
           "trainable_share.png": plots.trainable_share}


MIA_COLUMNS = (("MIA_correctness", "correctness"), ("MIA", "confidence"), ("MIA_entropy", "entropy"),
               ("MIA_m_entropy", "m_entropy"), ("MIA_prob", "prob"))


def _columns(metrics: dict, columns=COLUMNS):
    return [(key, title) for key, title in columns if any(key in m for m in metrics.values())]


def format_table(metrics: dict) -> str:
    """Fixed-width text: one row per method, percentages with 2 decimals."""
    columns = _columns(metrics)
    rows = [f"{'method':10s}" + "".join(f"{title:>12s}" for _, title in columns)]
    for method, values in metrics.items():
        rows.append(f"{method:10s}" + "".join(f"{values[key]:12.2f}" if key in values else f"{'':>12s}"
                                              for key, _ in columns))
    return "\n".join(rows)


def markdown_table(metrics: dict, columns=COLUMNS) -> str:
    columns = _columns(metrics, columns)
    lines = ["| method | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for method, values in metrics.items():
        cells = [f"{values[key]:.2f}" if key in values else "" for key, _ in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report_md(metrics: dict, run: dict, figures: list[str]) -> str:
    scenario = run.get("scenario", {})
    semu = run.get("semu_report", {})
    lines = ["# SEMU unlearning report", "",
             "Scenario: " + ", ".join(f"{k} = {v}" for k, v in scenario.items()), "",
             "Metrics in percent, as SalUn computes them: UA = 100 - forget accuracy, RA = retain accuracy, "
             "TA = test accuracy (the forgotten class removed for class-wise forgetting), MIA = MIA-efficacy (share "
             "of forget samples an SVC on confidence calls non-members). Avg. Gap: mean |difference| to Retrain "
             "over those four. Trainable %: share of all weights the method trains.", "",
             markdown_table(metrics), ""]
    if any("MIA_entropy" in m for m in metrics.values()):
        lines += ["## MIA-efficacy on each of SalUn's features", "",
                  "The SVC above reads the true label's confidence; SalUn also fits it on correctness, entropy, "
                  "its m_entropy and the whole softmax (metrics.MIA_FEATURES).", "",
                  markdown_table(metrics, MIA_COLUMNS), ""]
    if semu.get("layers"):
        lines += ["## SEMU per layer", "", *layers_table(semu["layers"])]
        lines += ["", f"Trainable: {semu.get('trainable_params', 0)} of {semu.get('total_params', 0)} parameters "
                      f"({semu.get('trainable_share', 0):.3f}%).", ""]
    for name in figures:
        lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    return "\n".join(lines)


def _finite(value):
    """Strict JSON has no Infinity or NaN (a perplexity may overflow): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, payload) -> None:
    """Strict JSON (inf and nan as null), written atomically."""
    text = json.dumps(_finite(payload), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path):
    """The JSON in `path`; a damaged file is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def layers(report) -> list:
    """One object per adapted layer: its kind, shape, rank k, gamma and captured variance."""
    return [{"name": layer.name, "kind": layer.kind, "shape": list(layer.shape), "k": layer.k, "gamma": layer.gamma,
             "captured_variance": layer.captured_variance, "trainable_params": layer.trainable_params}
            for layer in report.layers]


def layers_table(entries: list) -> list[str]:
    """The markdown table of SEMU's layers (dicts as `layers` writes them), one row per layer."""
    lines = ["| layer | kind | shape | gamma | k | captured variance | trainable |", "|---|---|---|---|---|---|---|"]
    return lines + [f"| {e['name']} | {e.get('kind', '')} | {tuple(e['shape'])} | {e['gamma']:g} | {e['k']} | "
                    f"{format_share(e['captured_variance'])} | {e['trainable_params']} |" for e in entries]


DIFFUSION_COMMANDS = ("unlearn-ddpm", "unlearn-sd")  # their folders render with _render_diffusion


def write_run(out: Path, semu_model, report, metrics: dict, run_settings: dict, command: str) -> list:
    """out/adapters (sf.load_adapters) and out/metrics.json (the command, settings, metrics, per-layer ranks,
    training history, timings); returns the names written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    semu_model.save_adapters(out / "adapters")
    write_json(out / "metrics.json", {"command": command, "settings": run_settings, "metrics": metrics,
                                      "layers": layers(report), "training": report.training,
                                      "timings": report.timings})
    return ["metrics.json", "adapters/"]


SAMPLES = "samples.safetensors"


def write_samples(out, before, after, rows: list) -> None:
    """Keep a diffusion run's images (N, C, H, W) in [0, 1] from the same seeds before and after, one row per entry
    of `rows` (class or prompt), for render."""
    from safetensors.torch import save_file

    atomic_write(Path(out) / SAMPLES, lambda p: save_file(
        {"before": before.float().contiguous(), "after": after.float().contiguous()}, str(p),
        metadata={"rows": json.dumps([str(r) for r in rows])}))


def _render_diffusion(out: Path, run: dict, samples: bool) -> list[str]:
    """report.md (and the sample grids) of a diffusion run from its metrics.json's contents, `run`."""
    from safetensors import safe_open

    images, rows = {}, []
    if samples:  # none with --grid-samples 0
        with safe_open(str(out / SAMPLES), framework="pt") as f:
            rows = json.loads(f.metadata()["rows"])
            images = {key: f.get_tensor(key) for key in ("before", "after")}
    figures = [f"samples_{key}.png" for key, value in images.items()
               if plots.image_grid(value, rows, out / f"samples_{key}.png", f"{key} SEMU (same seeds)")]
    metrics = run.get("metrics", {})
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines = ["# SEMU diffusion unlearning report", "",
             "Settings: " + ", ".join(f"{k} = {v}" for k, v in run.get("settings", {}).items()), "",
             *(["SEMU settings as run: " + ", ".join(f"{k} = {v}" for k, v in metrics["semu_settings"].items()), ""]
               if metrics.get("semu_settings") else []),
             "| metric | value |", "|---|---|",
             *(f"| {k} | {v if isinstance(v, int) else f'{v:.4g}'} |" for k, v in scalars.items()), ""]
    split = metrics.get("trainable_split")
    if split:
        lines += ["Trainable share (%): " + ", ".join(f"{part} {value['trainable_share']:.4f}"
                                                   for part, value in split.items()), ""]
    lines += [f"![{name}]({name})" for name in figures] + [""]
    if run.get("layers"):
        lines += ["## SEMU per layer", "", *layers_table(run["layers"])]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda p: Path(p).write_text(text))
    return ["report.md", *figures]


def render(out, samples: Optional[bool] = None) -> list[str]:
    """Write report.md and the figures in folder `out` from its metrics.json and run.json (a classification run) or
    its metrics.json and samples.safetensors (a diffusion run); returns the files. samples: whether the diffusion
    run wrote sample grids (None: whether the folder holds them; a run that wrote none says False, since an
    earlier run's may still be there)."""
    out = Path(out)
    samples = (out / SAMPLES).is_file() if samples is None else samples
    try:
        metrics = read_json(out / "metrics.json")
        if samples or (isinstance(metrics, dict) and metrics.get("command") in DIFFUSION_COMMANDS):
            return _render_diffusion(out, metrics, samples)
        run = read_json(out / "run.json")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{str(out)!r} is not a results folder of semu-fast unlearn, unlearn-ddpm or "
                                f"unlearn-sd: {err.filename} is missing (unlearn-llm writes its report.md as it "
                                f"runs)") from None
    if not isinstance(metrics, dict) or not isinstance(run, dict):
        raise ValueError(f"{str(out)!r}: its metrics.json and run.json must each hold a JSON object, as semu-fast "
                         f"unlearn writes them")
    figures = [name for name, draw in FIGURES.items() if draw(run, out / name)]
    text = _report_md(metrics, run, figures)
    atomic_write(out / "report.md", lambda p: Path(p).write_text(text))
    return ["report.md", *figures]


def write_classification(out, semu_model, report, result: dict, scenario: dict) -> list[str]:
    """Write everything of a classification run (classification.run's return values) into folder `out`: the
    adapters, metrics.json, run.json, report.md and the plots; returns the names written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    semu_model.save_adapters(out / "adapters")
    write_json(out / "metrics.json", result["metrics"])
    write_json(out / "run.json", {"scenario": scenario, "history": result["history"],
                                  "semu_report": report.to_dict()})
    return ["metrics.json", "run.json", *render(out, samples=False), "adapters/"]  # not an earlier run's samples


MANIFEST = ".semu_fast_files.json"


def _listed(out: Path) -> list[str]:
    """The names the previous run listed in `out` (none when it listed nothing or the list is unreadable)."""
    try:
        names = read_json(out / MANIFEST)
    except (FileNotFoundError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def record_run(out, files: list[str], inputs=()) -> list[str]:
    """After a run wrote `files` into folder `out` (names as the commands print them, folders ending in "/"): remove
    what the previous run there listed and this one did not write (its lora/, unet/, samples, plots or run.json
    would otherwise pass for this run's), then list this run's files. Only plain names inside `out` are removed,
    never one that holds or is one of `inputs` (the paths the run read, e.g. a model folder an earlier run wrote
    there); returns the names removed."""
    out = Path(out)
    inputs = [Path(p).resolve() for p in inputs if p is not None]
    removed = []
    for name in sorted(set(_listed(out)) - set(files)):
        plain = name.rstrip("/")
        path = out / plain
        if "/" in plain or plain in ("", ".", "..") or path.is_symlink() or not path.exists():
            continue  # a hand-edited list never reaches outside the folder
        if any(p == path.resolve() or path.resolve() in p.parents for p in inputs):
            continue  # this run's own input
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    if removed:
        log.warning("removed %s from %s: an earlier run left them and this run does not write them",
                    ", ".join(removed), out)
    write_json(out / MANIFEST, list(files))
    return removed
