"""Unlearning quality on the bundled digits (issue 5's goals): SEMU forgets each class in turn, for several seeds,
data-free and with a share of the retain set; prints mean, std and worst UA, RA, TA and MIA per setting.

    python benchmarks/quality/digits.py [--seeds 0,1,2] [--classes 0-9] [--retain-fractions 0,0.1] [--json F]"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import semu_fast as sf  # noqa: E402
from common import Table, device_name, parser as make_parser  # noqa: E402
from semu_fast.workflows import classification as C  # noqa: E402

GOALS = {0.0: {"UA": 99, "RA": 90}, 0.1: {"UA": 99, "RA": 95, "TA": 95}}


def _ints(text):
    if "-" in text:
        low, high = map(int, text.split("-"))
        return list(range(low, high + 1))
    return [int(t) for t in text.split(",")]


def main(argv=None):
    parser = make_parser(__doc__, repeats=None)
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    parser.add_argument("--classes", type=_ints, default=list(range(10)))
    parser.add_argument("--retain-fractions", default="0,0.1")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.classes, args.retain_fractions, args.epochs = [0], [0], "0", 1
    torch.set_num_threads(1)
    device = torch.device(args.device)
    runs_table = Table(f"SEMU on digits, every run ({device_name(device)})", args.json)
    summary = Table(f"SEMU on digits: mean +- std (worst) over seeds x classes ({device_name(device)})", args.json)
    for fraction in map(float, args.retain_fractions.split(",")):
        runs = []
        for seed in args.seeds:
            task = C.load_task("digits", seed=seed)
            model = C.original_model(task, cache_dir=args.cache_dir, seed=seed).to(device)
            for cls in args.classes:
                split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), cls, None,
                                       fraction, seed)
                _, _, out = C.run(task, model, split, config=sf.SEMUConfig(gamma=args.gamma, seed=seed),
                                  semu_settings={"optimizer": "adam", "lr": args.lr, "epochs": args.epochs},
                                  methods=(), seed=seed, progress=False)
                runs.append(runs_table.add({"retain fraction": fraction, "seed": seed, "class": cls,
                                            "original TA": out["metrics"]["original"]["TA"],
                                            **{k: out["metrics"]["semu"][k] for k in ("UA", "RA", "TA", "MIA",
                                                                                       "trainable_share")}}))
        row = {"retain fraction": fraction, "runs": len(runs)}
        for key in ("UA", "RA", "TA", "MIA", "trainable_share", "original TA"):
            values = [r[key] for r in runs]
            row[key] = f"{statistics.mean(values):.2f} +- {statistics.pstdev(values):.2f} (worst {min(values):.1f})"
        goals = GOALS.get(fraction, {})
        row["goals"] = ", ".join(f"{k} >= {v}: {'met' if statistics.mean(r[k] for r in runs) >= v else 'MISSED'}"
                                 for k, v in goals.items())
        summary.add(row)
    runs_table.close()
    summary.close()


if __name__ == "__main__":
    main()
