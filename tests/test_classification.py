"""The classification workflow: SalUn's metrics, scenarios, models and checkpoints, baselines, the side-by-side run
and what it writes."""
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import semu_fast as sf
from semu_fast import metrics
from semu_fast.workflows import baselines, classification as C, models, results
from helpers import assert_same_state, small_cnn, snapshot


def toy_task(n_train=120, n_test=60, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, 6, 6, generator=gen)
    y = torch.arange(n_train + n_test) % num_classes
    x += y.view(-1, 1, 1, 1) * 0.5  # learnable: the label shifts the mean
    train, test = TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
    return C.Task("toy", train, test, num_classes, 3, "resnet18-cifar", train_epochs=3, batch_size=32)


def trained_small_cnn(task):
    model = small_cnn()
    baselines.fit(model, DataLoader(task.train_set, batch_size=32, shuffle=True,
                                    generator=torch.Generator().manual_seed(0)), epochs=15, lr=1e-2)
    return model


# --- metrics ------------------------------------------------------------------------------------------------------

def test_mia_efficacy_matches_salun_formula_computed_independently():
    from sklearn.svm import SVC

    task = toy_task()
    model = trained_small_cnn(task)
    x_tr, y_tr = task.train_set.tensors
    x_te, y_te = task.test_set.tensors
    forget = (x_tr[:20], y_tr[:20])
    retain = (x_tr[20:], y_tr[20:])

    def conf(x, y):
        with torch.no_grad():
            return torch.softmax(model.eval()(x).double(), -1)[torch.arange(len(y)), y].numpy()

    members = conf(*retain)[:len(y_te)]  # SalUn: the first len(test) retain samples
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(
        np.concatenate([members, conf(x_te, y_te)]).reshape(-1, 1),
        np.concatenate([np.ones(len(members)), np.zeros(len(y_te))]))
    expected = 100 * (1 - clf.predict(conf(*forget).reshape(-1, 1)).mean())
    loader = lambda x, y: DataLoader(TensorDataset(x, y), batch_size=7)  # noqa: E731
    got = metrics.mia_efficacy(model, loader(*retain), loader(x_te, y_te), loader(*forget))
    assert got == pytest.approx(expected, abs=1e-9)


def _salun_svc_mia(model, shadow_train, shadow_test, target_test):
    """SalUn's SVC_MIA with target_train=None, re-done in torch as its evaluation/SVC_MIA.py computes it (m_entropy
    included, with its whole-label-vector column indexing and log p as the reverse log-probability)."""
    from sklearn.svm import SVC

    def collect(x, y):
        with torch.no_grad():
            return torch.softmax(model.eval()(x).float(), -1).double(), y

    def entropy(p):
        return -torch.where(p > 0, p * p.log(), torch.zeros(())).sum(-1)

    def m_entropy(p, y):
        log_p = torch.where(p > 0, p.log(), torch.tensor(1e-30, dtype=p.dtype).log())
        probs, logs = p.clone(), log_p.clone()
        probs[:, y] = (1 - p)[:, y]
        logs[:, y] = log_p[:, y]
        return -(probs * logs).sum(-1)

    def feats(p, y):
        return {"correctness": (p.argmax(1) == y).double(), "confidence": p.gather(1, y[:, None]),
                "entropy": entropy(p), "m_entropy": m_entropy(p, y), "prob": p}

    a, b, c = (feats(*collect(*split)) for split in (shadow_train, shadow_test, target_test))
    out = {}
    for name in a:
        x = torch.cat([a[name], b[name]]).reshape(len(a[name]) + len(b[name]), -1).numpy()
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, np.r_[np.ones(len(a[name])), np.zeros(len(b[name]))])
        out[name] = 100 * (1 - clf.predict(c[name].reshape(len(c[name]), -1).numpy()).mean())
    return out


def test_mia_variants_match_salun_svc_mia_computed_independently():
    task = toy_task()
    model = trained_small_cnn(task)
    x_tr, y_tr = task.train_set.tensors
    x_te, y_te = task.test_set.tensors
    forget, retain = (x_tr[:30], y_tr[:30]), (x_tr[30:], y_tr[30:])
    expected = _salun_svc_mia(model, (retain[0][:len(y_te)], retain[1][:len(y_te)]), (x_te, y_te), forget)
    loader = lambda x, y: DataLoader(TensorDataset(x, y), batch_size=9)  # noqa: E731
    got = metrics.mia_variants(model, loader(*retain), loader(x_te, y_te), loader(*forget))
    assert set(got) == set(metrics.MIA_FEATURES)
    for name in metrics.MIA_FEATURES:
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name
    assert len({round(v, 6) for v in got.values()}) > 1  # the features are not all the same thing
    with pytest.raises(ValueError, match="features must be names"):
        metrics.mia_variants(model, loader(*retain), loader(x_te, y_te), loader(*forget), ("loss",))


def test_mia_features_on_hand_made_probabilities():
    probs = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    labels = np.array([0, 2])
    f = metrics.mia_features(probs, labels)
    assert f["correctness"][:, 0].tolist() == [1.0, 1.0]  # argmax of a tie is the first column
    assert f["confidence"][:, 0].tolist() == [0.5, 0.7]
    assert f["entropy"][0, 0] == pytest.approx(np.log(2))
    # labels {0, 2} present: columns 0 and 2 take (1 - p) log p, column 1 p log p (p = 0 gives log 1e-30 * 1)
    row0 = -(0.5 * np.log(0.5) + 0.5 * np.log(0.5) + 1.0 * np.log(1e-30))
    assert f["m_entropy"][0, 0] == pytest.approx(row0)
    assert f["prob"].shape == (2, 3)


def test_svc_mia_separates_members_from_non_members():
    rng = np.random.default_rng(0)
    members, non_members = rng.uniform(0.9, 1.0, 200), rng.uniform(0.0, 0.5, 200)
    assert metrics.svc_mia(members, non_members, rng.uniform(0.9, 1.0, 50)) < 0.05   # looks like training data
    assert metrics.svc_mia(members, non_members, rng.uniform(0.0, 0.5, 50)) > 0.95   # looks unseen: forgotten
    with pytest.raises(ValueError, match="needs members"):
        metrics.svc_mia(members, np.empty(0), members)


def test_evaluate_and_avg_gap():
    task = toy_task()
    model = trained_small_cnn(task)
    loader = DataLoader(task.test_set, batch_size=16)
    m = metrics.evaluate(model, loader, loader, loader)
    assert set(m) == {"UA", "RA", "TA", "MIA", *(f"MIA_{f}" for f in metrics.MIA_FEATURES if f != "confidence")}
    assert m["UA"] == pytest.approx(100 - m["TA"]) and m["RA"] == m["TA"]
    assert all(0 <= v <= 100 for v in m.values())
    assert metrics.avg_gap({"UA": 10, "RA": 90, "TA": 80, "MIA": 20}, {"UA": 14, "RA": 92, "TA": 80, "MIA": 10}) \
        == pytest.approx(4.0)


def test_evaluate_reads_each_metric_from_its_own_loader():
    class AlwaysZero(nn.Module):  # predicts class 0 for every input
        def forward(self, x):
            return torch.tensor([4.0, 0.0, 0.0, 0.0]).expand(len(x), 4) + 0 * x.flatten(1)[:, :1]

    def loader(labels):
        labels = torch.tensor(labels)
        return DataLoader(TensorDataset(torch.randn(len(labels), 2), labels), batch_size=3)

    forget, retain, test = loader([0] * 7 + [1]), loader([0, 0, 1, 1]), loader([0, 1, 2, 3] * 3)
    model = AlwaysZero()
    m = metrics.evaluate(model, forget, retain, test)
    assert (m["UA"], m["RA"], m["TA"]) == (12.5, 50.0, 25.0)
    assert m["MIA"] == metrics.mia_variants(model, retain, test, forget)["confidence"]


# --- scenarios ----------------------------------------------------------------------------------------------------

def test_classwise_split_forgets_the_class_and_drops_it_from_the_test_set():
    train, test = torch.arange(100) % 4, torch.arange(40) % 4
    s = C.forget_split(train, test, forget_class=2)
    assert (train[s.forget] == 2).all() and len(s.forget) == 25
    assert not (train[s.retain] == 2).any() and len(s.retain) == 75
    assert s.retain_subset is None
    assert not (test[s.test] == 2).any() and len(s.test) == 30


def test_random_splits_are_seeded_and_disjoint():
    train, test = torch.arange(100) % 4, torch.arange(40) % 4
    s = C.forget_split(train, test, num_forget=10, retain_fraction=0.2, seed=3)
    assert len(s.forget) == 10 and len(s.test) == 40  # random forgetting keeps the whole test set
    assert len(set(s.forget.tolist()) | set(s.retain.tolist())) == 100
    assert not set(s.forget.tolist()) & set(s.retain.tolist())
    assert len(s.retain_subset) == 18 and set(s.retain_subset.tolist()) <= set(s.retain.tolist())
    again = C.forget_split(train, test, num_forget=10, retain_fraction=0.2, seed=3)
    assert torch.equal(s.forget, again.forget) and torch.equal(s.retain_subset, again.retain_subset)
    assert not torch.equal(s.forget, C.forget_split(train, test, num_forget=10, seed=4).forget)
    within = C.forget_split(train, test, forget_class=1, num_forget=5)
    assert len(within.forget) == 5 and (train[within.forget] == 1).all() and len(within.test) == 40


@pytest.mark.parametrize("kwargs, match", [
    ({}, "pass forget_class"), ({"forget_class": 4}, "forget_class must be in"),
    ({"forget_class": 0, "num_forget": 26}, "num_forget must be in"),
    ({"forget_class": 0, "retain_fraction": 1.5}, "retain_fraction must be in")])
def test_bad_scenarios_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C.forget_split(torch.arange(100) % 4, torch.arange(40) % 4, **kwargs)


# --- models, checkpoints and data ---------------------------------------------------------------------------------

def test_salun_resnet18_has_the_cifar_stem_and_loads_salun_checkpoints(tmp_path):
    model = models.resnet18_cifar(10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    state = model.state_dict()
    assert {"normalize.mean", "normalize.std", "fc.weight", "layer4.1.conv2.weight"} <= set(state)

    torch.manual_seed(1)
    source = models.resnet18_cifar(10)
    # SalUn saves {"state_dict": ..., ...}; DataParallel adds "module."
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
               tmp_path / "model_SA_best.pth.tar")
    loaded = models.load_checkpoint(models.resnet18_cifar(10), tmp_path / "model_SA_best.pth.tar")
    assert_same_state(loaded, snapshot(source))
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    assert_same_state(models.load_checkpoint(models.resnet18_cifar(10), tmp_path / "plain.pt"), snapshot(source))


def test_bad_checkpoints_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        models.load_checkpoint(models.resnet18_cifar(10), tmp_path / "missing.pt")
    torch.save(models.resnet18_cifar(100).state_dict(), tmp_path / "cifar100.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        models.load_checkpoint(models.resnet18_cifar(10), tmp_path / "cifar100.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": object.__new__(C.Split)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="tensors only"):
        models.load_checkpoint(models.resnet18_cifar(10), tmp_path / "pickled.pt")


def test_build_model_knows_torchvision_names_and_refuses_others():
    assert models.build_model("resnet18", 7).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 7)
    for dataset, mean in (("cifar10", 0.4914), ("cifar100", 0.5071), ("imagefolder", 0.4914)):  # SalUn's statistics
        assert models.build_model("resnet18-cifar", 100, 3, dataset).normalize.mean[0] == torch.tensor(mean)
    with pytest.raises(ValueError, match="arch must be"):
        models.build_model("no-such-net", 10)
    with pytest.raises(ValueError, match="arch 'resnet18-cifar' takes 3-channel images, the data has 1"):
        models.build_model("resnet18-cifar", 10, in_channels=1)
    with pytest.raises(ValueError, match="1-channel"):
        models.build_model("digits-cnn", 10, in_channels=3)


def make_image_folder(root, classes=3, per_class=6, size=10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(60 * c + 40, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_task_reads_local_folders(tmp_path):
    task = C.load_task("imagefolder", make_image_folder(tmp_path / "imgs"), image_size=8)
    assert task.num_classes == 3 and len(task.train_set) == 18 and len(task.test_set) == 18
    x, y = task.train_set[0]
    assert x.shape == (3, 8, 8) and C.targets_of(task.train_set).tolist() == [0] * 6 + [1] * 6 + [2] * 6
    with pytest.raises(FileNotFoundError, match="needs a 'train' and a 'test'"):
        C.load_task("imagefolder", tmp_path / "imgs" / "train")


def test_cifar_and_unknown_datasets_fail_clearly_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cifar10 there"):
        C.load_task("cifar10", tmp_path)
    with pytest.raises(ValueError, match="needs --data"):
        C.load_task("cifar100")
    with pytest.raises(ValueError, match="dataset must be one of"):
        C.load_task("mnist")


def test_original_model_is_trained_once_then_cached(tmp_path):
    task = toy_task()
    with pytest.raises(ValueError, match="pass --checkpoint"):
        C.original_model(task, "resnet18", cache_dir=tmp_path)
    model = C.original_model(task, "resnet18", cache_dir=tmp_path, train_epochs=1)
    assert [p.name for p in tmp_path.iterdir()] == [C.cached_model_name(task, "resnet18", 0, 1)]
    assert_same_state(C.original_model(task, "resnet18", cache_dir=tmp_path, train_epochs=1), snapshot(model))
    with pytest.raises(ValueError, match="pass --checkpoint"):  # the recipe's epochs: another model
        C.original_model(task, "resnet18", cache_dir=tmp_path)


def test_a_model_cached_under_the_old_key_is_named(tmp_path, caplog):
    task = dataclasses.replace(toy_task(), source="/data/a|size32")
    torch.save(small_cnn().state_dict(), tmp_path / "toy-resnet18-seed0.pt")  # the key before data and epochs
    with pytest.raises(ValueError, match="the same N as the run that trained it"):
        C.original_model(task, "resnet18", cache_dir=tmp_path)
    assert "toy-resnet18-seed0.pt was cached before" in caplog.text and "--checkpoint" in caplog.text


def test_cached_models_are_keyed_by_what_made_them():
    task = toy_task()
    names = {C.cached_model_name(task, "resnet18", 0), C.cached_model_name(task, "resnet18", 1),
             C.cached_model_name(task, "resnet18", 0, train_epochs=1),
             C.cached_model_name(dataclasses.replace(task, source="/data/a|size32"), "resnet18", 0),
             C.cached_model_name(dataclasses.replace(task, source="/data/b|size32"), "resnet18", 0),
             C.cached_model_name(dataclasses.replace(task, source="/data/a|size64"), "resnet18", 0)}
    assert len(names) == 6
    # the recipe's own epochs and no data root: the plain name (digits models cached before keep theirs)
    assert C.cached_model_name(task, "resnet18", 0, train_epochs=task.train_epochs) == "toy-resnet18-seed0.pt"


def test_state_digest_tells_models_apart():
    model = small_cnn()
    digest = C.state_digest(model)
    assert C.state_digest(small_cnn(seed=1)) != digest
    copy = small_cnn(seed=1)
    copy.load_state_dict(model.state_dict())
    assert C.state_digest(copy) == digest
    with torch.no_grad():
        next(copy.parameters()).view(-1)[0] += 1e-6  # one element, one ulp-scale change
    assert C.state_digest(copy) != digest


def test_image_folder_tasks_record_their_root_and_size(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    first, second = C.load_task("imagefolder", root, image_size=8), C.load_task("imagefolder", root, image_size=16)
    assert str(root.resolve()) in first.source and first.source != second.source


# --- baselines ----------------------------------------------------------------------------------------------------

def test_baselines_move_the_model_the_way_they_should():
    task = toy_task()
    model = trained_small_cnn(task)
    forget = DataLoader(TensorDataset(*[t[:30] for t in task.train_set.tensors]), batch_size=10)
    retain = DataLoader(TensorDataset(*[t[30:] for t in task.train_set.tensors]), batch_size=30)
    before = 100 - sf.training.accuracy(model, forget)
    ga = C.copy.deepcopy(model)
    history = baselines.gradient_ascent(ga, forget, None, epochs=3, lr=1e-2)
    assert len(history) == 3 and 100 - sf.training.accuracy(ga, forget) > before
    rl = C.copy.deepcopy(model)
    baselines.random_labels(rl, forget, retain, epochs=3, lr=1e-2,
                            on_epoch=lambda e, m: {"seen": e})
    assert not torch.equal(rl[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="FT needs retain data"):
        baselines.finetune(C.copy.deepcopy(model), forget, None, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="lr must be a finite positive"):
        baselines.gradient_ascent(C.copy.deepcopy(model), forget, None, epochs=1, lr=0)


# --- the side-by-side run and its files ---------------------------------------------------------------------------

def test_run_compares_methods_without_touching_the_model_and_writes_a_report(tmp_path):
    task = toy_task()
    model = trained_small_cnn(task)
    saved = snapshot(model)
    split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class=1,
                           retain_fraction=0.25)
    semu_model, report, out = C.run(task, model, split, config=sf.SEMUConfig(gamma=0.9), methods=("ft", "ga", "rl"),
                                    semu_settings={"optimizer": "adam", "lr": 1e-2, "epochs": 2},
                                    baseline_settings={m: {"epochs": 1} for m in ("ft", "ga", "rl")},
                                    retrain=lambda: trained_small_cnn(task), progress=False)
    assert_same_state(model, saved)
    table = out["metrics"]
    assert list(table) == ["original", "semu", "ft", "ga", "rl", "retrain"]
    for method, values in table.items():
        assert {"UA", "RA", "TA", "MIA", "trainable_share", "seconds", "avg_gap"} <= set(values)
        assert all(np.isfinite(v) for v in values.values())
    assert table["retrain"]["avg_gap"] == 0
    assert 0 < table["semu"]["trainable_share"] < 100 and table["original"]["trainable_share"] == 0
    assert [e["epoch"] for e in out["history"]["semu"]] == [1, 2]
    assert {"forget_acc", "retain_acc"} <= set(out["history"]["rl"][0])
    layer = report.layers[0]
    assert layer.singular_values and layer.total_energy > 0

    files = results.write_classification(tmp_path, semu_model, report, out, {"dataset": "toy"})
    assert sf.load_adapters(trained_small_cnn(task), tmp_path / "adapters").report.trainable_params == \
        report.trainable_params
    for name in ("metrics.json", "run.json", "report.md", "accuracy_per_epoch.png", "spectra.png",
                 "trainable_share.png"):
        assert name in files and (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == table  # floats survive JSON exactly
    report = (tmp_path / "report.md").read_text()
    assert "| semu |" in report and "Avg. Gap" in report and "![spectra](spectra.png)" in report
    (tmp_path / "report.md").unlink()
    assert results.render(tmp_path)[0] == "report.md" and (tmp_path / "report.md").read_text() == report
    assert "semu" in results.format_table(table)


def test_a_method_s_row_does_not_depend_on_the_methods_run_before_it():
    """Each method reads its own freshly shuffled loaders from the same random start: RL's row is the same alone
    and after GA, whatever SEMU's epoch count."""
    task = toy_task()
    model = trained_small_cnn(task)
    split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class=None,
                           num_forget=30)

    def rl_row(methods, semu_epochs):
        out = C.run(task, model, split, config=sf.SEMUConfig(gamma=0.9), methods=methods,
                    semu_settings={"optimizer": "adam", "lr": 1e-2, "epochs": semu_epochs},
                    baseline_settings={m: {"epochs": 2} for m in methods}, progress=False)[2]
        return {k: v for k, v in out["metrics"]["rl"].items() if k != "seconds"}

    assert rl_row(("rl",), 1) == rl_row(("ga", "rl"), 3)


def test_random_forgetting_stops_at_the_test_accuracy():
    task = toy_task()
    model = trained_small_cnn(task)
    split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class=None,
                           num_forget=30)
    settings = {"optimizer": "adam", "lr": 5e-2, "epochs": 12}
    runs = {stop: C.run(task, model, split, config=sf.SEMUConfig(gamma=0.9), methods=(), semu_settings=settings,
                        stop_at_test_accuracy=stop, progress=False)[2] for stop in (False, True)}
    target = runs[True]["metrics"]["original"]["TA"]
    free, stopped = runs[False]["history"]["semu"], runs[True]["history"]["semu"]
    assert len(free) == 12 and free[-1]["forget_acc"] < target  # random labels go on below the target
    first = next(e["epoch"] for e in free if e["forget_acc"] <= target)  # the same epochs up to the stop
    assert [e["epoch"] for e in stopped] == list(range(1, first + 1))
    assert all(e["forget_acc"] > target for e in stopped[:-1]) and stopped[-1]["forget_acc"] <= target
    assert runs[True]["metrics"]["semu"]["UA"] == pytest.approx(100 - stopped[-1]["forget_acc"])
    classwise = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class=1)
    assert classwise.classwise and not split.classwise
    with pytest.raises(ValueError, match="stop_at_test_accuracy is for random forgetting"):
        C.run(task, model, classwise, config=sf.SEMUConfig(), methods=(), stop_at_test_accuracy=True, progress=False)


def test_epoch_hook_stops_at_or_below_its_level():
    task = toy_task()
    model = trained_small_cnn(task)
    split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class=None,
                           num_forget=30)
    loaders = C.make_loaders(task, split, 0)
    acc = C.accuracy(model, loaders.forget_eval)
    assert "stop" not in C._epoch_hook(loaders)(1, model)
    assert "stop" not in C._epoch_hook(loaders, stop_below=acc - 1e-6)(1, model)
    assert C._epoch_hook(loaders, stop_below=acc)(1, model)["stop"] is True


@pytest.mark.parametrize("flags, expected", [((), False), (("--num-forget", "20"), True),
                                             (("--num-forget", "20", "--no-stop-at-test-accuracy"), False),
                                             (("--num-forget", "20", "--preset", "official"), False)])
def test_cli_stops_at_test_accuracy_for_random_forgetting_only(monkeypatch, tmp_path, flags, expected):
    from semu_fast.cli import main

    class Reached(Exception):
        pass

    def fake_run(*args, stop_at_test_accuracy, **kwargs):
        raise Reached(stop_at_test_accuracy)

    monkeypatch.setattr(C, "run", fake_run)
    with pytest.raises(Reached) as reached:
        main(["unlearn", "--quiet", "--out", str(tmp_path / "out"), *flags])
    assert reached.value.args == (expected,)


@pytest.mark.parametrize("flags", [(), ("--device", "cpu")])
def test_cli_builds_and_trains_every_model_on_the_device(monkeypatch, tmp_path, flags):
    """unlearn's --device (default: cuda when available) reaches the original model and Retrain; SEMU and the
    baselines run where their copy of the original is."""
    from semu_fast.cli import main

    class Reached(Exception):
        pass

    seen = {}
    real_original = C.original_model
    monkeypatch.setattr(C, "original_model",
                        lambda *a, **k: seen.update(original=k["device"]) or real_original(*a, **k))
    real_train = C.train_model

    def train_model(*args, **kwargs):  # the original is trained through it too, when it is not cached yet
        if args[6:7] != ("Retrain",):
            return real_train(*args, **kwargs)
        seen["retrain"] = args[7]

    monkeypatch.setattr(C, "train_model", train_model)

    def fake_run(task, model, split, *, retrain, **kwargs):
        retrain()
        raise Reached(next(model.parameters()).device.type)

    monkeypatch.setattr(C, "run", fake_run)
    with pytest.raises(Reached) as reached:
        main(["unlearn", "--quiet", "--out", str(tmp_path / "out"), *flags])
    expected = flags[-1] if flags else "cuda" if torch.cuda.is_available() else "cpu"
    assert seen == {"original": expected, "retrain": expected} and reached.value.args == (expected,)


def test_cached_and_checkpointed_models_load_onto_the_device(tmp_path):
    # The meta device stands in for a GPU here: loading onto it moves no data, but the models must end up there.
    cnn = C.pretrained_digits_cnn(tmp_path)  # trained and cached
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op"
        models = [C.pretrained_digits_cnn(tmp_path, device="meta"),
                  C.original_model(C.load_task("digits"), checkpoint=tmp_path / "cnn.pt", device="meta")]
    assert all(p.device.type == "meta" for model in models for p in model.parameters())
    assert all(p.device.type == "cpu" for p in cnn.parameters())


def test_run_skips_ft_without_retain_data_and_rejects_unknown_methods():
    task = toy_task()
    model = trained_small_cnn(task)
    split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), forget_class=0)
    _, _, out = C.run(task, model, split, config=sf.SEMUConfig(), methods=("ft",),
                      semu_settings={"epochs": 1}, progress=False)
    assert list(out["metrics"]) == ["original", "semu"]
    with pytest.raises(ValueError, match="methods must be among"):
        C.run(task, model, split, config=sf.SEMUConfig(), methods=("salun",), progress=False)


def test_render_names_a_folder_that_is_not_a_results_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a results folder of semu-fast unlearn"):
        results.render(tmp_path)


def test_record_run_removes_only_what_the_previous_run_listed_and_this_one_did_not_write(tmp_path, caplog):
    out = tmp_path / "out"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "w.safetensors").write_text("old")
    for name in ("run.json", "spectra.png", "metrics.json", "mine.txt"):
        (out / name).write_text("old")
    (tmp_path / "outside.txt").write_text("keep")
    assert results.record_run(out, ["metrics.json"]) == []  # no list yet (an older version's run): nothing goes
    results.write_json(out / results.MANIFEST, ["metrics.json", "run.json", "lora/", "spectra.png", "gone.png",
                                                "../outside.txt", "/etc/hostname", "a/b", ".", 7])
    with caplog.at_level("WARNING", logger="semu_fast"):
        assert results.record_run(out, ["metrics.json", "spectra.png"]) == ["lora/", "run.json"]
    assert "removed lora/, run.json" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [results.MANIFEST, "metrics.json", "mine.txt", "spectra.png"]
    assert (tmp_path / "outside.txt").exists() and results.read_json(out / results.MANIFEST) == ["metrics.json",
                                                                                                  "spectra.png"]
    (out / results.MANIFEST).write_text("{not json")
    assert results.record_run(out, []) == [] and (out / "spectra.png").exists()  # unreadable list: nothing goes


def test_record_run_keeps_what_this_run_read(tmp_path):
    """unlearn-sd --save-unet into a copy of the model, then --model that copy --out it again: the unet/ the first run
    wrote is the second run's model, not a leftover."""
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "lora").mkdir()
    results.write_json(out / results.MANIFEST, ["metrics.json", "unet/", "lora/"])
    assert results.record_run(out, ["metrics.json"], [out / "unet", out / "vae", None]) == ["lora/"]
    assert (out / "unet").is_dir() and not (out / "lora").exists()
    results.write_json(out / results.MANIFEST, ["unet/", "data.jsonl"])
    (out / "data.jsonl").write_text("{}")
    assert results.record_run(out, [], [out / "unet" / "config.json", out / "data.jsonl"]) == []
    assert (out / "unet").is_dir() and (out / "data.jsonl").exists()


def _unlearn_folder(tmp_path, scenario):
    folder = tmp_path / "run"
    (folder / "adapters").mkdir(parents=True)
    results.write_json(folder / "run.json", {"scenario": scenario, "history": {}, "semu_report": {}})
    return folder / "adapters"


def test_eval_draws_the_split_of_the_run_that_made_the_adapters(monkeypatch, tmp_path):
    """Adapters of an `unlearn --preset official` run are measured on SalUn's split, not ours."""
    from semu_fast.cli import main

    class Drawn(Exception):
        pass

    def split(name):
        def draw(*args, **kwargs):
            raise Drawn(name)
        return draw

    monkeypatch.setattr(C, "salun_split", split("official"))
    monkeypatch.setattr(C, "forget_split", split("ours"))
    for preset, flags in (("official", ["--seed", "2"]), ("ours", [])):
        adapters = _unlearn_folder(tmp_path / preset, {"dataset": "digits", "preset": preset, "forget_class": 0,
                                                       "num_forget": None, "seed": int(flags[-1]) if flags else 0})
        with pytest.raises(Drawn) as drawn:
            main(["eval", "--quiet", "--cache-dir", str(tmp_path / "cache"), "--adapters", str(adapters), *flags])
        assert drawn.value.args == (preset,)


def test_a_bad_retrain_checkpoint_is_refused_before_anything_trains(monkeypatch, tmp_path, capsys):
    from semu_fast.cli import main

    monkeypatch.setattr(C, "run", lambda *a, **k: pytest.fail("trained before reading --retrain-checkpoint"))
    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.ones(2)}, bad)
    with pytest.raises(SystemExit):
        main(["unlearn", "--quiet", "--cache-dir", str(tmp_path / "cache"), "--retrain-checkpoint", str(bad),
              "--out", str(tmp_path / "out")])
    assert "argument --retrain-checkpoint: checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_torchvision_models_with_auxiliary_heads_return_plain_logits(arch):
    model = models.build_model(arch, 3).train()
    size = 75 if arch == "inception_v3" else 32
    assert isinstance(model(torch.randn(2, 3, size, size)), torch.Tensor)


def test_seconds_leave_out_the_accuracies_recorded_for_the_plot(monkeypatch):
    """A clock that moves only while the per-epoch hook measures accuracy: a method's seconds must not see it."""
    task = C.load_task("digits", seed=0)
    split = C.forget_split(C.targets_of(task.train_set), C.targets_of(task.test_set), 0, None, 0.0, 0)
    clock, real = [0.0], C.accuracy

    def accuracy(*args, **kwargs):  # only the per-epoch hook reads it
        clock[0] += 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "accuracy", accuracy)
    monkeypatch.setattr(C.time, "perf_counter", lambda: clock[0])
    torch.manual_seed(0)
    _, _, result = C.run(task, models.digits_cnn(), split, config=sf.SEMUConfig(gamma=0.9),
                         semu_settings={"epochs": 2, "select_best": False}, methods=("ga",),
                         baseline_settings={"ga": {"epochs": 1}}, progress=False)
    assert clock[0] == 60.0  # 2 + 1 epochs, 2 accuracies each
    assert result["metrics"]["semu"]["seconds"] == 0.0 and result["metrics"]["ga"]["seconds"] == 0.0


def test_report_refuses_json_of_the_wrong_shape(tmp_path):
    results.write_json(tmp_path / "metrics.json", {})
    results.write_json(tmp_path / "run.json", [])
    with pytest.raises(ValueError, match="must each hold a JSON object"):
        results.render(tmp_path)


def test_cifar100_error_names_its_own_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python/"):
        C.load_task("cifar100", tmp_path)
