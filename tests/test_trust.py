"""Nothing half-done, nothing silently wrong, nothing lost (issue 14): one test per root cause found by trying the
public API as a tester would. Every failure must leave the user's model bit for bit as it came in."""
import copy
import json
import os
import random
import signal
import time
import warnings

import pytest
import torch
import torch.nn as nn

import semu_fast as sf
import semu_fast.adapters  # noqa: F401  (sf.adapters)
from helpers import assert_same_state, forget_batches, small_cnn, snapshot


def _flags(model):
    return [(p.requires_grad, p.grad) for p in model.parameters()]


def _assert_untouched(model, state, flags, modes):
    assert_same_state(model, state)
    assert all(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear))
               for m in model)
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


# --- 1. unlearn is transactional ------------------------------------------------------------------------------------

def _raise(exc):
    def hook(epoch, model):
        raise exc
    return hook


@pytest.mark.parametrize("what, kwargs, error", [
    ("a retain batch with labels out of range", {"retain_loader": [(torch.randn(4, 3, 6, 6), torch.full((4,), 9))]},
     IndexError),
    ("a training loss that is not a scalar", {"train_loss_fn": lambda m, b, g: m(b[0])}, TypeError),
    ("on_epoch raising", {"on_epoch": _raise(RuntimeError("boom"))}, RuntimeError),
    ("Ctrl-C inside the run", {"on_epoch": _raise(KeyboardInterrupt())}, KeyboardInterrupt),
    ("the statistics moving under norm_mode='train', then an error",
     {"config": sf.SEMUConfig(norm_mode="train"), "on_epoch": _raise(RuntimeError("late"))}, RuntimeError),
])
def test_an_error_after_prepare_gives_the_model_back_exactly(what, kwargs, error):
    model = small_cnn()
    model[0].bias.grad = torch.ones_like(model[0].bias)  # a gradient the user had: it must survive
    model.eval()
    state, flags, modes = snapshot(model), _flags(model), [m.training for m in model.modules()]
    with pytest.raises(error):
        sf.unlearn(model, forget_batches(), epochs=2, progress=False, **kwargs)
    _assert_untouched(model, state, flags, modes)
    sf.prepare(model, forget_batches())  # and it can be used again at once (no "call unload() first")


def test_a_checkpoint_dir_that_is_a_file_fails_before_the_model_changes(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    model = small_cnn()
    state = snapshot(model)
    with pytest.raises(ValueError, match="checkpoint_dir .* is not a folder"):
        sf.unlearn(model, forget_batches(), checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert_same_state(model, state)


# --- 2. no silent NaN, no degenerate success ------------------------------------------------------------------------

def test_a_nan_loss_stops_training_naming_the_step():
    model = small_cnn()
    state = snapshot(model)
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        sf.unlearn(model, forget_batches(), train_loss_fn=lambda m, b, g: m(b[0]).sum() * float("nan"),
                   progress=False)
    assert_same_state(model, state)


def test_an_exploding_R_stops_training():
    def loss(model, batch, generator):  # finite at R = 0, but one SGD step of lr 1e30 sends R to -inf
        return sum(p.sum() for p in model.trainable_parameters()) * 1e30

    with pytest.raises(FloatingPointError, match="R holds NaN or Inf after epoch 1"):
        sf.unlearn(small_cnn(), forget_batches()[:1], train_loss_fn=loss, optimizer="sgd", lr=1e30, momentum=0.0,
                   epochs=1, progress=False)


def test_loaders_that_cannot_serve_every_epoch_are_refused_up_front():
    model = small_cnn()
    state = snapshot(model)
    with pytest.raises(ValueError, match="forget_loader is a one-shot iterator"):
        sf.unlearn(model, iter(forget_batches()), epochs=2, progress=False)
    with pytest.raises(ValueError, match="retain_loader is empty"):
        sf.unlearn(model, forget_batches(), retain_loader=[], progress=False)
    assert_same_state(model, state)


def test_nothing_to_train_is_a_warning_not_a_silent_success():
    model = small_cnn()
    zero = lambda m, b: m(b[0]).sum() * 0.0  # noqa: E731  every gradient is zero: every layer gets k = 0
    with pytest.warns(UserWarning, match="nothing to train"):
        sm, report = sf.unlearn(model, forget_batches(), loss_fn=zero, progress=False)
    assert "nothing to train" in report.training["note"]


# --- 3. shared weights ----------------------------------------------------------------------------------------------

def test_two_adapted_layers_on_one_weight_are_refused_with_advice():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # tied (as gate_proj/up_proj can be)
    model = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(6, 3))
    state = snapshot(model)
    with pytest.raises(ValueError, match=r"layers '0' and '2' share one weight tensor.*exclude_modules=\['\^2\$'\]"):
        sf.prepare(model, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))])
    assert_same_state(model, state)
    sm = sf.prepare(model, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))],
                    config=sf.SEMUConfig(exclude_modules=["^2$"]))
    sm.merge_adapters()
    sm.unmerge_adapters()
    assert_same_state(sm.unload(), state)


# --- 4. adapter-file integrity --------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = small_cnn()
    sm, _ = sf.unlearn(model, forget_batches(), epochs=1, progress=False)
    sm.save_adapters(tmp_path / "adapters")
    return tmp_path / "adapters", sm.unload()


def _weights_file(folder):
    return next(folder.glob("adapters-*.safetensors"))


def test_flipped_bytes_in_the_weights_file_are_caught(saved):
    folder, model = saved
    path = _weights_file(folder)
    data = bytearray(path.read_bytes())
    data[-40:] = bytes(b ^ 0xFF for b in data[-40:])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        sf.load_adapters(model, folder)


def test_a_layer_deleted_from_the_config_is_caught(saved):
    folder, model = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["layers"].pop(next(iter(config["layers"])))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not hold exactly the layers"):
        sf.load_adapters(model, folder)


def test_adapters_refuse_other_base_weights_unless_told(saved):
    folder, model = saved
    other = small_cnn(seed=5)  # same shapes, other weights (another seed)
    with pytest.raises(ValueError, match="holds other weights than the ones the adapters were made for"):
        sf.load_adapters(other, folder)
    assert len(sf.load_adapters(other, folder, check_base=False).adapters) > 0


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 2816), (1000, 512), (64, 32, 3, 3)])
def test_the_base_fingerprint_sees_a_change_in_any_row_or_in_every_other_column(shape):
    from semu_fast.serialization import fingerprint, matches_fingerprint

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    saved = fingerprint(weight)
    assert matches_fingerprint(weight.clone(), saved)
    changes = {"every other row": (slice(None, None, 2), slice(None)),
               "every other column": (slice(None), slice(1, None, 2)),
               "one row": (shape[0] // 3, slice(None)), "the last row": (-1, slice(None))}
    for what, index in changes.items():
        other = weight.clone()
        other.reshape(shape[0], -1)[index] += 1e-3
        assert not matches_fingerprint(other, saved), what
    assert not matches_fingerprint(weight.double(), saved)


def test_a_fingerprint_of_the_first_scheme_is_still_checked(saved):
    from semu_fast.serialization import _digest

    folder, model = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    layers = dict(model.named_modules())
    for name, info in config["layers"].items():  # as a folder saved before the spread sample was written it
        flat = layers[name].weight.detach().reshape(-1)
        info["base_fingerprint"] = {**{k: v for k, v in info["base_fingerprint"].items() if k != "spread_sha256"},
                                    "sample_sha256": _digest(flat[::max(1, flat.numel() // 4096)])}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert sf.load_adapters(copy.deepcopy(model), folder).adapters
    with pytest.raises(ValueError, match="holds other weights"):
        sf.load_adapters(small_cnn(seed=5), folder)


def test_nan_and_integer_tensors_in_a_file_are_refused(saved):
    from semu_fast import serialization

    folder, model = saved
    config, tensors = serialization.read_folder(folder)
    name = next(iter(config["layers"]))
    bad = dict(tensors)
    bad[f"{name}.R"] = torch.full_like(tensors[f"{name}.R"], float("nan"))
    serialization.write_folder(folder, bad, {k: v for k, v in config.items()
                                             if k not in ("format", "weights_file", "weights_sha256")})
    with pytest.raises(ValueError, match="NaN or Inf"):
        sf.load_adapters(model, folder)
    bad[f"{name}.R"] = tensors[f"{name}.R"].long()
    serialization.write_folder(folder, bad, {k: v for k, v in config.items()
                                             if k not in ("format", "weights_file", "weights_sha256")})
    with pytest.raises(ValueError, match=r"should be a float tensor of shape .*, got torch.int64"):
        sf.load_adapters(model, folder)


def test_adapters_saved_from_a_compiled_or_data_parallel_model_load_on_the_plain_one(tmp_path):
    model = small_cnn()
    for wrapped in (torch.compile(copy.deepcopy(model)), nn.DataParallel(copy.deepcopy(model))):
        sm = sf.prepare(wrapped, forget_batches())
        assert all(not name.startswith(("_orig_mod.", "module.")) for name in sm.adapters)
        sm.save_adapters(tmp_path / "a")
        assert set(sf.load_adapters(copy.deepcopy(model), tmp_path / "a").adapters) == set(sm.adapters)


# --- 5. a detached SEMUModel refuses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("detach", ["unload", "merge_and_unload"])
def test_a_detached_semu_model_refuses_to_save_or_merge(tmp_path, detach):
    sm = sf.prepare(small_cnn(), forget_batches())
    sm.save_adapters(tmp_path / "good")
    before = _weights_file(tmp_path / "good").read_bytes()
    getattr(sm, detach)()
    for action in (lambda: sm.save_adapters(tmp_path / "good"), sm.merge_adapters, sm.unmerge_adapters,
                   sm.merge_and_unload):
        with pytest.raises(RuntimeError, match=f"detached by {detach}"):
            action()
    assert _weights_file(tmp_path / "good").read_bytes() == before


# --- 6. the folder switches atomically --------------------------------------------------------------------------------

def _save_forever(folder, sets):
    """Child process: save the two adapter sets alternately until killed."""
    from semu_fast import serialization

    i = 0
    while True:
        tensors, config = sets[i % 2]
        serialization.write_folder(folder, tensors, config)
        i += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_random_kills_while_saving_leave_exactly_one_complete_set(tmp_path):
    from semu_fast import serialization

    sets = []
    for seed in (0, 1):
        tensors = {f"l{i}.{p}": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed * 10 + i))
                   for i in range(6) for p in ("R", "U", "Vh")}
        sets.append((tensors, {"layers": {f"l{i}": {"kind": "linear"} for i in range(6)}, "set": seed}))
    folder = tmp_path / "adapters"
    serialization.write_folder(folder, *sets[0])
    rng = random.Random(0)
    for _ in range(12):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _save_forever(folder, sets)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        config, tensors = serialization.read_folder(folder)
        expected = sets[config["set"]][0]
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    serialization.write_folder(folder, *sets[0])  # a later save cleans up what the kills left
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", _weights_file(folder).name]


# --- 7. resume checks everything that defines the run -----------------------------------------------------------------

@pytest.mark.parametrize("change", ["gamma", "target_modules", "weights"])
def test_resume_refuses_a_changed_run(tmp_path, change):
    sf.unlearn(small_cnn(), forget_batches(), epochs=1, checkpoint_dir=tmp_path, progress=False)
    config, model = sf.SEMUConfig(), small_cnn()
    if change == "gamma":
        config = sf.SEMUConfig(gamma=0.5)
    elif change == "target_modules":
        config = sf.SEMUConfig(target_modules=["^0$"])
    else:
        model = small_cnn(seed=3)
    state = snapshot(model)
    with pytest.raises(ValueError, match="written by another run"):
        sf.unlearn(model, forget_batches(), config=config, epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert_same_state(model, state)


# --- 8. clear errors --------------------------------------------------------------------------------------------------

def test_prepare_names_a_missing_loader_and_the_grad_mode():
    model = small_cnn()
    with pytest.raises(TypeError, match="forget_loader must be an iterable of batches .* got NoneType"):
        sf.prepare(model, None)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), pytest.raises(RuntimeError, match="grad mode off"):
            sf.prepare(model, forget_batches())


def test_prepare_names_a_meta_device_model():
    with torch.device("meta"):
        model = small_cnn()
    with pytest.raises(ValueError, match="meta device"):
        sf.prepare(model, forget_batches())


def test_training_with_merged_adapters_says_so():
    def merge(epoch, sm):
        sm.merge_adapters()

    model = small_cnn()
    state = snapshot(model)
    with pytest.raises(RuntimeError, match="while the adapters are merged"):
        sf.unlearn(model, forget_batches(), epochs=2, on_epoch=merge, progress=False)
    assert_same_state(model, state)


# --- 9. gamma_overrides are checked like target_modules ---------------------------------------------------------------

def test_a_gamma_override_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="pattern 'no_such_layer' matches no layer"):
        sf.prepare(small_cnn(), forget_batches(), config=sf.SEMUConfig(gamma_overrides={"no_such_layer": 0.5}))


# --- the first experience ---------------------------------------------------------------------------------------------

def test_adapters_expose_the_base_layers_attributes():
    model = small_cnn()
    sm = sf.prepare(model, forget_batches())
    conv, linear = model[0], model[7]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 8, (3, 3))
    assert (linear.in_features, linear.out_features) == (24, 16)
    assert linear.weight is linear.base_layer.weight and linear.bias is linear.base_layer.bias
    sm.unload()


def test_dropout_stays_as_the_user_left_it_so_prepare_is_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Dropout(0.5), nn.ReLU(), nn.Linear(40, 5)).eval()
    batches = [(torch.randn(16, 30), torch.randint(0, 5, (16,))) for _ in range(2)]
    runs = []
    for _ in range(2):
        sm = sf.prepare(model, batches)
        runs.append({n: a.U.clone() for n, a in sm.adapters.items()})
        sm.unload()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not model[1].training


def test_layers_skipped_by_default_are_listed_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    sm = sf.prepare(model, [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,)))])
    assert sm.report.skipped == {"1": "grouped Conv2d (groups=8) is not supported"}
    assert "skipped 1 layer(s) (1): grouped Conv2d" in str(sm.report)


def test_run_folder_files_follow_the_umask(tmp_path):
    mask = os.umask(0o022)
    try:
        sm = sf.prepare(small_cnn(), forget_batches())
        sm.save_adapters(tmp_path / "a")
    finally:
        os.umask(mask)
    for path in (tmp_path / "a").iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


# --- clear errors from the command line, before any work --------------------------------------------------------------

def _cli_error(argv, capsys) -> str:
    from semu_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_refuses_an_out_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    err = _cli_error(["unlearn", "--out", str(tmp_path / "taken"), "--quiet"], capsys)
    assert "argument --out" in err and "is not a folder" in err


def test_cli_report_names_a_corrupt_metrics_file(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{broken")
    (tmp_path / "run.json").write_text("{}")
    err = _cli_error(["report", str(tmp_path)], capsys)
    assert "metrics.json is not valid JSON" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_names_a_missing_gpu(tmp_path, capsys):
    err = _cli_error(["unlearn-llm", "--model", str(tmp_path), "--forget-texts", str(tmp_path / "f.txt"),
                      "--device", "cuda"], capsys)
    assert "argument --device" in err and "no such CUDA device" in err


def test_cli_rejects_a_seed_torch_cannot_take(capsys):
    err = _cli_error(["unlearn", "--seed", str(2 ** 64)], capsys)
    assert "argument --seed" in err


def test_plots_log_nothing_and_tell_every_layer_apart(tmp_path, caplog):
    import logging

    from semu_fast.workflows import plots

    layers = [{"name": f"layer{i}", "kind": "linear", "shape": [64, 32], "k": 3, "gamma": 0.9,
               "singular_values": [3.0, 2.0, 1.0], "total_energy": 14.0, "trainable_params": 9 * (i % 3)}
              for i in range(14)]
    run = {"semu_report": {"layers": layers, "trainable_share": 0.1}}
    with caplog.at_level(logging.INFO):
        assert plots.trainable_share(run, tmp_path / "t.png") and plots.spectra(run, tmp_path / "s.png")
    assert not [r for r in caplog.records if "categorical units" in r.getMessage()]
    assert len(set(map(str, plots._colors(plots._pyplot(), 14)))) == 14


def test_nan_in_r_is_refused_before_a_merge_save_or_export_writes_anything(tmp_path):
    """R that a custom training loop drove to NaN: merging would write NaN into the base weights (for good with
    merge_and_unload), and saving would replace a good adapter folder with one that load_adapters refuses."""
    from semu_fast import lora, official

    model = small_cnn()
    state = snapshot(model)
    semu_model = sf.prepare(model, forget_batches())
    semu_model.save_adapters(tmp_path / "adapters")
    good = {p.name: p.read_bytes() for p in (tmp_path / "adapters").iterdir()}
    with torch.no_grad():
        semu_model.model[9].R[0, 0] = float("nan")
    for call in (semu_model.merge_adapters, semu_model.merge_and_unload,
                 lambda: semu_model.merged().__enter__(),
                 lambda: semu_model.save_adapters(tmp_path / "adapters"),
                 lambda: lora.export_lora(semu_model, tmp_path / "lora"),
                 lambda: official.official_state_dict(semu_model)):
        with pytest.raises(FloatingPointError, match=r"NaN or Inf in the adapters of 1 layer\(s\) \(9: R\)"):
            call()
    assert not any(a.merged for a in semu_model.adapters.values()) and semu_model._detached_by is None
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapters").iterdir()} == good
    assert not (tmp_path / "lora").exists()
    with pytest.raises(FloatingPointError, match="adapter's R hold NaN"):
        semu_model.model[9].merge()  # the adapter on its own too
    assert_same_state(semu_model.unload(), state)  # the base weights as they came
    sf.load_adapters(model, tmp_path / "adapters")  # the earlier save is intact


def test_a_layer_registered_under_two_names_is_adapted_under_both(tmp_path):
    """One module reachable as `proj` and `out` (an alias): the adapter replaced it under the first name only, so a
    forward through the alias bypassed the adapter (merged and unmerged outputs differed; a model whose forward
    used only the alias trained nothing), and a warning called the alias a tied weight."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(6, 6)
            self.out = self.proj  # the name forward uses for its second call
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.out(torch.relu(self.proj(x))))

    model = Aliased()
    state = snapshot(model)
    batches = [(torch.randn(5, 6), torch.randint(0, 4, (5,))) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "shared with" warning: an alias is the same layer, not a tied weight
        semu_model = sf.prepare(model, batches, config=sf.SEMUConfig(gamma=0.99))
    assert model.proj is model.out and isinstance(model.out, sf.adapters.SEMULinear)
    with torch.no_grad():
        model.proj.R.normal_()
    x = torch.randn(3, 6)
    unmerged = semu_model(x)
    with semu_model.merged():
        torch.testing.assert_close(semu_model(x), unmerged)
    semu_model.save_adapters(tmp_path / "adapters")
    plain = semu_model.unload()
    assert plain.proj is plain.out and type(plain.out) is nn.Linear
    assert_same_state(plain, state)
    loaded = sf.load_adapters(plain, tmp_path / "adapters")
    assert plain.out is plain.proj and isinstance(plain.out, sf.adapters.SEMULinear)
    torch.testing.assert_close(loaded(x), unmerged)
