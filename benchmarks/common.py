"""Shared benchmark helpers: the parser every script takes, timing (median of repeats, synchronised on GPU), the
device's name, and result tables that print each row as it is measured and merge into one JSON file.

    python benchmarks/common.py markdown bench.json    # the JSON's tables as Markdown, ready for RESULTS.md"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch


def parser(description: str, repeats: Optional[int] = 5) -> argparse.ArgumentParser:
    """The options every benchmark takes: --device (default: CUDA when present), --json, --quick, and --repeats for
    the timing ones (repeats=None: a quality sweep, which runs each case once)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--json", default=None, help="merge this run's tables into this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    return p


def backend(op: str, device: torch.device) -> str:
    """The backend that serves semu_fast op `op` on this device."""
    import semu_fast as sf

    return sf.backends()[op]["CUDA" if device.type == "cuda" else "CPU"]["chosen"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_close(what: str, got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Values before timing: a benchmark of a wrong result stops here, with a non-zero exit (compared on the
    tensors' device, in float64)."""
    if got.shape != expected.shape:
        sys.exit(f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}; nothing timed")
    got, expected = got.double(), expected.to(got.device, torch.float64)
    error = float((got - expected).abs().max()) if got.numel() else 0.0
    bound = atol + rtol * float(expected.abs().max()) if expected.numel() else atol
    if not error <= bound:  # NaN fails too
        sys.exit(f"{what}: wrong values (max error {error:.3g} > {bound:.3g}); nothing timed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternate(fns: dict, device: torch.device, repeats: int = 3) -> dict:
    """Median time of each fn() in seconds, the fns interleaved within each repeat so that machine noise (these
    machines drift by 15-20%) hits them all alike."""
    for fn in fns.values():
        fn()  # warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timeit(fn, device, 1, warmup=0))
    return {name: statistics.median(v) for name, v in times.items()}


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Table:
    """Rows of one measurement, printed and merged into the --json file (under the script's name) as each is added:
    a run cut short (a step's timeout kills it) keeps every row it measured."""

    def __init__(self, title: str, json_path=None):
        self.title, self.json_path, self.rows = title, json_path, []
        self.index = None  # this table's place in the JSON file's list, once written

    def add(self, row: dict) -> dict:
        if not self.rows:
            print(f"\n## {self.title}\n" + " | ".join(row), flush=True)
        self.rows.append(row)
        print(" | ".join(_cell(v) for v in row.values()), flush=True)
        self._write()
        return row

    def _write(self) -> None:
        if not self.json_path:
            return
        path = Path(self.json_path)
        data = json.loads(path.read_text()) if path.exists() else {"tables": []}
        entry = {"benchmark": Path(sys.argv[0]).stem, "title": self.title, "rows": self.rows}
        if self.index is None:
            self.index = len(data["tables"])
            data["tables"].append(entry)
        else:
            data["tables"][self.index] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    def close(self) -> None:
        """Every row is written as it is added: nothing is left to do (kept for the `with` form)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def markdown(json_path) -> str:
    """Every table of a merged JSON file as Markdown."""
    out = []
    for table in json.loads(Path(json_path).read_text())["tables"]:
        out += [f"### {table['benchmark']}: {table['title']}", ""]
        if table["rows"]:
            keys = list(table["rows"][0])
            out += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            out += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in table["rows"]]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "markdown":
        sys.exit("usage: python benchmarks/common.py markdown FILE.json")
    print(markdown(sys.argv[2]))
