"""Shared benchmark helpers: timing (median of repeats, synchronised on GPU), the device's name, result rows."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def parser(description: str, repeats: int = 5) -> argparse.ArgumentParser:
    """The options every benchmark takes: --device (default: CUDA when present), --repeats, --json."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def backend(op: str, device: torch.device) -> str:
    """The backend that serves semu_fast op `op` on this device."""
    import semu_fast as sf

    return sf.backends()[op]["CUDA" if device.type == "cuda" else "CPU"]["chosen"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def timeit(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
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


def emit(rows: list[dict], title: str, json_path=None) -> None:
    """Print rows as a table and optionally write them as JSON."""
    print(f"\n## {title}")
    if rows:
        keys = list(rows[0])
        print(" | ".join(keys))
        for row in rows:
            print(" | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=2)
