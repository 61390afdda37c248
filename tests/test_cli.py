import json
import shutil
import subprocess
import sys

import pytest
import torch


def run_cli(*args, cwd=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "semu_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_main_job_runs_end_to_end_and_writes_the_report(tmp_path):
    """`semu-fast unlearn` as the README runs it (no flags but a cache and quiet), in a fresh folder."""
    out = run_cli("unlearn", "--quiet", "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "semu_fast_out"
    table = json.loads((folder / "metrics.json").read_text())
    assert list(table) == ["original", "semu", "ga", "rl", "retrain"]  # FT needs retain data: skipped
    for values in table.values():
        assert {"UA", "RA", "TA", "MIA", "trainable_share", "seconds", "avg_gap"} <= set(values)
    assert table["original"]["UA"] < 5 and table["original"]["TA"] > 98
    assert table["semu"]["UA"] > 90 and table["semu"]["RA"] > 85 and 0 < table["semu"]["trainable_share"] < 5
    for name in ("report.md", "run.json", "accuracy_per_epoch.png", "spectra.png", "trainable_share.png",
                 "adapters/adapter_config.json"):
        assert (folder / name).exists(), name
    assert len(list((folder / "adapters").glob("adapters-*.safetensors"))) == 1
    assert "Avg. Gap" in out.stdout and "retrain" in out.stdout
    assert list((tmp_path / "cache").glob("digits-digits-cnn-seed0.pt"))
    scenario = json.loads((folder / "run.json").read_text())["scenario"]
    assert scenario["original_model"] == str(tmp_path / "cache" / "digits-digits-cnn-seed0.pt")
    assert len(scenario["original_sha256"]) == 16
    assert scenario["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device's default

    # eval reads the saved adapters back onto the cached model and gets SEMU's numbers again
    ev = run_cli("eval", "--quiet", "--cache-dir", tmp_path / "cache", "--adapters", folder / "adapters",
                 "--json", tmp_path / "eval.json")
    assert ev.returncode == 0, ev.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for key in ("UA", "RA", "TA", "MIA"):
        assert evaluated["semu"][key] == pytest.approx(table["semu"][key], abs=1e-9)
        assert evaluated["original"][key] == pytest.approx(table["original"][key], abs=1e-9)

    # adapters met with another original model (here: seed 1's, a changed copy of seed 0's) name the flags to fix
    state = torch.load(tmp_path / "cache" / "digits-digits-cnn-seed0.pt")
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()},
               tmp_path / "cache" / "digits-digits-cnn-seed1.pt")
    other = run_cli("eval", "--quiet", "--cache-dir", tmp_path / "cache", "--adapters", folder / "adapters",
                    "--seed", "1")
    assert other.returncode == 2 and "made for another scenario" in other.stderr  # run.json sits next to them
    assert "give --seed 0 (here 1)" in other.stderr
    wrong_class = run_cli("eval", "--quiet", "--cache-dir", tmp_path / "cache", "--adapters", folder / "adapters",
                          "--forget-class", "3")
    assert wrong_class.returncode == 2 and "give --forget-class 0 (here 3)" in wrong_class.stderr
    other_split = run_cli("eval", "--quiet", "--cache-dir", tmp_path / "cache", "--adapters", folder / "adapters",
                          "--preset", "official", "--seed", "0")
    assert other_split.returncode == 2 and "argument --seed: the official split" in other_split.stderr
    shutil.copytree(folder / "adapters", tmp_path / "moved")  # without run.json: the base weights tell
    other = run_cli("eval", "--quiet", "--cache-dir", tmp_path / "cache", "--adapters", tmp_path / "moved",
                    "--seed", "1")
    assert other.returncode == 2 and "made for another original model" in other.stderr
    assert "--checkpoint its run.json's original_model" in other.stderr

    # report rebuilds report.md and the plots from the JSON files
    (folder / "report.md").unlink()
    rep = run_cli("report", folder)
    assert rep.returncode == 0, rep.stderr
    assert "| semu |" in (folder / "report.md").read_text()


def test_unlearn_with_retain_data_random_forgetting_and_an_image_folder(tmp_path):
    from test_classification import make_image_folder

    root = make_image_folder(tmp_path / "imgs", classes=3, per_class=8, size=8)
    out = run_cli("unlearn", "--quiet", "--dataset", "imagefolder", "--data", root, "--image-size", "8",
                  "--arch", "resnet18-cifar", "--train-epochs", "1", "--num-forget", "4", "--retain-fraction", "0.5",
                  "--epochs", "1", "--baselines", "ft", "--retrain", "--cache-dir", tmp_path / "cache",
                  "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    table = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(table) == ["original", "semu", "ft", "retrain"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["scenario"]["forget_samples"] == 4 and run["scenario"]["forget_class"] is None
    assert run["scenario"]["stop_at_test_accuracy"] is True  # on by default for random forgetting


@pytest.mark.parametrize("args, message", [
    (("unlearn", "--forget-class", "12"), "--forget-class"),
    (("unlearn", "--retain-fraction", "1.5"), "--retain-fraction"),
    (("unlearn", "--baselines", "ft,salun"), "--baselines"),
    (("unlearn", "--dataset", "cifar10"), "--data"),
    (("unlearn", "--dataset", "cifar10", "--data", "/nonexistent"), "no cifar10 there"),
    (("report", "/nonexistent"), "not a results folder of semu-fast unlearn, unlearn-ddpm or unlearn-sd"),
    (("unlearn", "--num-forget", "100000"), "argument --num-forget: must be in [1, "),
    (("unlearn", "--arch", "notamodel"), "argument --arch: must be 'digits-cnn'"),
    (("unlearn", "--arch", "resnet18"), "arch 'resnet18' takes 3-channel images, the data has 1 channel(s)"),
    (("unlearn", "--device", "cuda:7"), "argument --device: cuda:7: no such CUDA device here"),
    (("eval", "--device", "cuda:7"), "argument --device: cuda:7: no such CUDA device here"),
    (("unlearn-ddpm", "--device", "cuda:7"), "argument --device: cuda:7: no such CUDA device here"),
    (("unlearn", "--stop-at-test-accuracy", "--baselines", "none", "--no-retrain"),
     "stop_at_test_accuracy is for random forgetting"),
    (("unlearn", "--retrain-checkpoint", "/nonexistent.pt"), "argument --retrain-checkpoint: /nonexistent.pt is not"),
    (("unlearn", "--retrain-checkpoint", __file__, "--no-retrain"), "which --no-retrain leaves out"),
    (("unlearn", "--data", "/tmp"), "argument --data: the bundled digits task reads neither"),
    (("eval", "--image-size", "64"), "argument --image-size: the bundled digits task reads neither"),
    (("eval", "--adapters", "/dev/null"), "argument --adapters: /dev/null is not a folder"),
    (("eval", "--json", "/nonexistent/m.json"), "argument --json: the folder /nonexistent does not exist"),
    (("report", "/dev/null"), "argument folder: /dev/null is not a folder"),
])
def test_bad_flags_are_rejected_with_the_flag_named(args, message):
    out = run_cli(*args, timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_library_errors_name_the_flag_only_when_they_say_what_it_must_be():
    import argparse

    from semu_fast.cli._common import library_error

    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--num-forget")
    parser.add_argument("--layers")
    messages = []
    parser.error = messages.append  # argparse's would exit
    library_error(parser, ValueError("num_forget must be in [1, 9], got 12"))
    library_error(parser, ValueError("layers 'a' and 'b' share one weight tensor"))
    library_error(parser, ValueError("arch must be one of x"))  # not a flag of this parser
    assert messages == ["argument --num-forget: must be in [1, 9], got 12",
                        "layers 'a' and 'b' share one weight tensor", "arch must be one of x"]


def test_console_script_is_installed():
    exe = shutil.which("semu-fast")
    if exe is None:
        pytest.skip("semu-fast is not on PATH (package not installed with pip)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "unlearn" in out.stdout


@pytest.mark.parametrize("argv, flags, dests, expected, kept", [
    (["unlearn-sd", "--preset", "official", "--model", "m", "--forget-prompt", "cat", "--layers", "xattn"],
     {"preset": "layers", "lr": "lr"}, {"preset": "layers"}, {"preset": "xattn"}, None),
    (["unlearn-ddpm", "--preset", "official", "--alpha", "1"], {"alpha": "alpha", "steps": "steps"}, {},
     {"alpha": 1.0}, "steps"),
    (["unlearn", "--preset", "official", "--epochs", "15"], {"epochs": "epochs", "lr": "lr"}, {}, {"epochs": 15},
     "lr"),
])
def test_a_flag_given_with_its_default_value_still_overrides_the_official_preset(argv, flags, dests, expected, kept):
    import semu_fast as sf
    from semu_fast.cli import build_parser
    from semu_fast.cli._common import preset_options

    args = build_parser().parse_args(argv)
    assert not {"func", "parser", "seed"} & args.given  # set by the parser, not the command line
    name = {"unlearn-sd": "official-sd", "unlearn-ddpm": "official-ddpm", "unlearn": "official-classification"}
    options = preset_options(name[argv[0]], args, {k: getattr(args, dest) for k, dest in flags.items()}, dests)
    official = sf.preset(name[argv[0]])
    assert all(options[k] == v != official[k] for k, v in expected.items())  # each one the preset sets otherwise
    if kept is not None:  # a flag not given keeps the preset's value, not the command's default
        assert options[kept] == official[kept] != getattr(args, flags[kept])


@pytest.mark.parametrize("command", ["unlearn", "eval", "unlearn-llm", "unlearn-ddpm", "unlearn-sd"])
def test_device_defaults_to_cuda_when_there_is_one_and_takes_auto(command):
    from semu_fast.cli import build_parser

    required = {"unlearn-llm": ["--model", "m", "--forget-texts", "f"],
                "unlearn-sd": ["--model", "m", "--forget-prompt", "cat"]}.get(command, [])
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert build_parser().parse_args([command, *required]).device == here
    assert build_parser().parse_args([command, *required, "--device", "auto"]).device == here
    assert build_parser().parse_args([command, *required, "--device", "cpu"]).device == "cpu"


def test_recorded_settings_leave_out_flags_the_official_preset_overrode():
    """A run's recorded settings (and report.md's Settings line) hold the values it ran with: a flag the official
    preset overrode (alpha, the preset's 0 over the flag's default 1) is left out, the run's semu_settings say it."""
    from semu_fast.cli import build_parser
    from semu_fast.cli._common import preset_options, settings

    args = build_parser().parse_args(["unlearn-ddpm", "--preset", "official", "--gamma", "0.9"])
    flags = {"alpha": args.alpha, "gamma": args.gamma, "lr": args.lr, "steps": args.steps}
    options = preset_options("official-ddpm", args, flags, seed=args.seed)
    recorded = settings(args, options, flags)
    assert options["alpha"] == 0.0 and "alpha" not in recorded and "steps" not in recorded  # the preset's values
    assert recorded["gamma"] == 0.9 == options["gamma"]  # given on the command line: used, and recorded
    assert settings(args)["alpha"] == 1.0  # without the options: every flag as parsed
