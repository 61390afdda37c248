"""Small random models and forget data shared by the pipeline tests, and the loader of the benchmark scripts."""
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn as nn


def small_cnn(seed=0, dtype=torch.float32, num_classes=5):
    """Conv 3x3 + BatchNorm, conv 1x1, Linear head: every layer kind SEMU touches, and a norm with statistics."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, num_classes),
    ).to(dtype)


def forget_batches(seed=0, n=48, batch=16, num_classes=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=gen).to(dtype)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def snapshot(model):
    """Every parameter and buffer, cloned: to prove a model is bit-for-bit untouched."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, saved):
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), f"{key} changed"


def load_benchmark(relative_path: str):
    """A script under benchmarks/ as a module (its `common` import resolved), for tests of its parts."""
    path = Path(__file__).parents[1] / "benchmarks" / relative_path
    benchmarks = str(Path(__file__).parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class KillingLoader(torch.utils.data.DataLoader):
    """A DataLoader that raises KeyboardInterrupt once `budget` batches have been drawn from it: a run killed at a
    chosen point, for the resume tests."""

    def __init__(self, *args, budget=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget, self.drawn = budget, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.drawn += 1
            if self.budget is not None and self.drawn > self.budget:
                raise KeyboardInterrupt("simulated kill")
            yield batch
