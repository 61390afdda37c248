import copy

import pytest
import torch

import semu_fast as sf
from semu_fast.losses import random_label_loss
from conftest import requires_cuda
from helpers import assert_same_state, forget_batches, small_cnn, snapshot


def test_training_changes_only_R():
    model = small_cnn()
    before = snapshot(model)
    sm, report = sf.unlearn(model, forget_batches(), config=sf.SEMUConfig(gamma=0.9), optimizer="adam", lr=1e-2,
                            epochs=2, progress=False)
    assert any((a.R != 0).any() for a in sm.adapters.values())
    state = sm.model.state_dict()
    for key, value in before.items():
        # Adapted layers keep their weights under base_layer; everything else keeps its name.
        parts = key.split(".")
        moved = ".".join(parts[:-1] + ["base_layer", parts[-1]])
        assert torch.equal(state.get(key, state.get(moved)), value), key
    assert len(report.training["history"]) == 2 and report.timings["train"] > 0


@requires_cuda
def test_unlearning_on_cuda_follows_the_cpu_run():
    """sf.unlearn end to end on the GPU (gradient pass, SVD, random labels drawn on the CPU, Adam on R): base
    weights untouched, and R where the CPU run puts it, up to float32 differences (no retain data: an epoch chosen by
    a near tie of scores would differ for reasons that are not errors)."""
    model = small_cnn()
    before = snapshot(model)
    runs = {}
    for device in ("cpu", "cuda"):
        on = lambda batches: [(x.to(device), y.to(device)) for x, y in batches]  # noqa: E731
        runs[device], _ = sf.unlearn(copy.deepcopy(model).to(device), on(forget_batches()),
                                     config=sf.SEMUConfig(gamma=0.9), optimizer="adam", lr=1e-2, epochs=2,
                                     progress=False)
    for name, adapter in runs["cpu"].adapters.items():
        R_cpu, R_gpu = adapter.R.detach(), runs["cuda"].adapters[name].R.detach().cpu()
        assert R_gpu.shape == R_cpu.shape and R_cpu.abs().max() > 0
        assert (R_gpu - R_cpu).norm() <= 5e-2 * R_cpu.norm(), name
    assert_same_state(runs["cuda"].unload().cpu(), before)


def test_unlearning_with_retain_data_and_select_best_restores_the_best_epoch():
    model = small_cnn()
    sm, report = sf.unlearn(model, forget_batches(), retain_loader=forget_batches(seed=9), lr=1e-2,
                            optimizer="adam", epochs=3, progress=False)
    history = report.training["history"]
    assert all("retain_acc" in h and "forget_acc" in h for h in history)
    best = max(history, key=lambda h: h["score"])
    assert report.training["best_epoch"] == best["epoch"]


def test_select_best_restores_the_R_of_the_best_scored_epoch(monkeypatch):
    # forget accuracy by epoch (forget set, then retain set, each epoch): epoch 2 scores best; epoch 3 moves R on
    accuracies = iter([60.0, 90.0, 20.0, 90.0, 40.0, 90.0])
    monkeypatch.setattr("semu_fast.training.accuracy", lambda *args: next(accuracies))
    seen = {}

    def record(epoch, semu_model):
        seen[epoch] = [p.detach().clone() for p in semu_model.trainable_parameters()]

    sm, report = sf.unlearn(small_cnn(), forget_batches(), retain_loader=forget_batches(seed=9), lr=1e-2, epochs=3,
                            on_epoch=record, progress=False)
    assert [h["score"] for h in report.training["history"]] == [65.0, 85.0, 75.0]
    assert report.training["best_epoch"] == 2
    assert all(torch.equal(p, q) for p, q in zip(sm.trainable_parameters(), seen[2]))
    assert not all(torch.equal(p, q) for p, q in zip(seen[2], seen[3]))  # the last epoch's R is not the one kept


def test_random_labels_never_equal_the_true_ones():
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 3, (500,))
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3, requires_grad=True)

    real_ce = torch.nn.functional.cross_entropy

    def spy_ce(logits, labels):
        seen.append(labels)
        return real_ce(logits, labels)

    torch.nn.functional.cross_entropy = spy_ce
    try:
        random_label_loss(Spy(), (torch.zeros(500, 1), targets), gen)
    finally:
        torch.nn.functional.cross_entropy = real_ce
    labels = seen[0]
    assert (labels != targets).all() and set(labels.tolist()) == {0, 1, 2}


def test_custom_train_loss_is_used():
    calls = []

    def loss(model, batch, generator):
        calls.append(1)
        return model(batch[0]).square().mean()

    sf.unlearn(small_cnn(), forget_batches(), train_loss_fn=loss, epochs=1, progress=False)
    assert len(calls) == len(forget_batches())


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ({"lr": 0}, "lr must be a finite positive"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"momentum": -1}, "momentum must be a finite non-negative"),
    ({"lr": float("nan")}, "lr must be a finite positive"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite non-negative"),
])
def test_bad_training_arguments_fail_before_the_model_changes(kwargs, match):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        sf.unlearn(model, forget_batches(), progress=False, **kwargs)
    assert_same_state(model, before)
    assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in model.modules())


def test_same_seed_gives_identical_results():
    results = []
    for _ in range(2):
        sm, _ = sf.unlearn(small_cnn(), forget_batches(), optimizer="adam", lr=1e-2, epochs=2, progress=False)
        results.append({n: a.R.detach().clone() for n, a in sm.adapters.items()})
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_semu_forgets_a_digit_class_with_the_default_settings():
    """The whole method on real data, with sf.unlearn's defaults: a trained digits CNN forgets class 3 while keeping
    the others (the official SGD lr 1e-5 left it at 100% there)."""
    from semu_fast.workflows.classification import pretrained_digits_cnn
    from semu_fast.workflows.digits import load_digits_split, loader
    from semu_fast.metrics import accuracy

    (x, y), _ = load_digits_split(0)
    model = pretrained_digits_cnn(seed=0)
    forget, retain = loader(x[y == 3], y[y == 3]), loader(x[y != 3], y[y != 3])
    assert accuracy(model, forget) > 95
    sm, _ = sf.unlearn(model, forget, progress=False)
    assert accuracy(sm, forget) < 10
    assert accuracy(sm, retain) > 85


def test_patience_stops_when_the_score_stops_improving():
    # lr so small that nothing changes: the first epoch stays best and training stops after `patience` more.
    sm, report = sf.unlearn(small_cnn(), forget_batches(), lr=1e-12, epochs=10, patience=2, progress=False)
    assert report.training["epochs"] == 3 and report.training["best_epoch"] == 1


def test_patience_counts_reaching_best_plus_min_delta_as_improvement(monkeypatch):
    # The official early exit: an epoch reaching exactly best + min_delta improves (epoch 2 here), so training
    # stops `patience` epochs after it, not after epoch 1. Scores are 100 - forget acc, exact in binary.
    forget_accs = iter([50.0, 49.5, 49.5, 49.5, 49.5, 49.5])
    monkeypatch.setattr("semu_fast.training.accuracy", lambda *args: next(forget_accs))
    _, report = sf.unlearn(small_cnn(), forget_batches(), lr=1e-12, epochs=6, patience=2, min_delta=0.5,
                           progress=False)
    assert report.training["epochs"] == 4 and report.training["best_epoch"] == 2


def test_bad_patience_is_rejected():
    with pytest.raises(ValueError, match="patience must be an int >= 1 or None"):
        sf.unlearn(small_cnn(), forget_batches(), patience=0, progress=False)


def test_max_grad_norm_bounds_every_step_of_R():
    batches = forget_batches()  # 3 batches: 3 SGD steps of lr 1
    settings = dict(epochs=1, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, select_best=False,
                    progress=False)
    clipped, _ = sf.unlearn(small_cnn(), batches, max_grad_norm=1e-3, **settings)
    free, _ = sf.unlearn(small_cnn(), batches, **settings)
    norm = lambda sm: torch.linalg.vector_norm(torch.cat([p.flatten() for p in sm.trainable_parameters()]))  # noqa
    assert norm(clipped) <= 3 * 1e-3 * (1 + 1e-4)
    assert norm(free) > 10 * norm(clipped)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite positive number"):
        sf.unlearn(small_cnn(), batches, max_grad_norm=0.0, progress=False)


def test_on_epoch_can_stop_training():
    seen = []

    def on_epoch(epoch, semu_model):
        seen.append(epoch)
        return {"marker": float(epoch), "stop": epoch == 2}

    _, report = sf.unlearn(small_cnn(), forget_batches(), epochs=5, on_epoch=on_epoch, progress=False)
    assert seen == [1, 2] and report.training["epochs"] == 2
    assert all("stop" not in entry for entry in report.training["history"])
    assert report.training["history"][-1]["marker"] == 2.0


def test_max_steps_ends_the_run_mid_epoch_after_exactly_that_many_steps():
    calls = []

    def loss(model, batch, generator):
        calls.append(1)
        return random_label_loss(model, batch, generator)

    _, report = sf.unlearn(small_cnn(), forget_batches(), epochs=10, max_steps=5, train_loss_fn=loss,
                           progress=False, select_best=False)
    assert len(calls) == 5 and report.training["epochs"] == 2  # 3 batches a pass: 3 + 2
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            sf.unlearn(small_cnn(), forget_batches(), max_steps=bad, progress=False)


def test_patience_needs_the_built_in_loss():
    with pytest.raises(ValueError, match="patience stops on the classification score"):
        sf.unlearn(small_cnn(), forget_batches(), patience=2, progress=False,
                   train_loss_fn=lambda model, batch, generator: model(batch[0]).sum())
