"""The DDPM quality benchmark (benchmarks/quality/ddpm_digits.py): the original DDPM's rates for every forgotten
class come from one set of samples, and its --quick path runs end to end."""
import json
import math

import pytest

from helpers import load_benchmark

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("quality/ddpm_digits.py")


def test_rates_for_another_class_come_from_the_per_class_counts(bench):
    metrics = {"forget_class_rate": 100.0, "other_accuracy": 40.0, "per_class_accuracy": {0: 100.0, 1: 60.0, 2: 20.0},
               "per_class_correct": {0: 5, 1: 3, 2: 1}, "samples_per_class": 5}
    moved = bench.for_class(metrics, 2)
    assert moved["forget_class_rate"] == 20.0 and moved["other_accuracy"] == 80.0
    assert moved["per_class_accuracy"] == metrics["per_class_accuracy"] and moved["samples_per_class"] == 5
    assert metrics["forget_class_rate"] == 100.0  # the original's entry is left as it was


def test_quick_run_writes_one_row_per_class(bench, tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--forget-class", "2", "5", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["tables"][0]["rows"]
    assert [row["class"] for row in rows] == [2, 5]
    for row in rows:
        for key in ("forget_class_rate_before", "forget_class_rate_after", "other_accuracy_before",
                    "other_accuracy_after"):
            assert math.isfinite(row[key]) and 0.0 <= row[key] <= 100.0, key
        assert row["other_accuracy_drop"] == pytest.approx(row["other_accuracy_before"] - row["other_accuracy_after"])
