"""sf.unlearn checkpoints: an interrupted run resumed from its folder ends exactly where an uninterrupted one does."""
import numpy as np
import pytest
import torch

import semu_fast as sf
from helpers import KillingLoader, forget_batches, small_cnn


class Interrupting:
    """A loader that raises KeyboardInterrupt once `budget` batches have been drawn from any loader sharing the
    counter: the run dies mid-epoch, as a killed job would."""

    def __init__(self, batches, counter, budget=None):
        self.batches, self.counter, self.budget = batches, counter, budget

    def __iter__(self):
        for batch in self.batches:
            self.counter[0] += 1
            if self.budget is not None and self.counter[0] > self.budget:
                raise KeyboardInterrupt("simulated kill")
            yield batch


def _unlearn(folder=None, budget=None, drawn=None, **overrides):
    """drawn: a one-element list that counts the batches the run reads (both loaders)."""
    counter = drawn if drawn is not None else [0]
    args = dict(config=sf.SEMUConfig(gamma=0.9, norm_mode="train", seed=4), optimizer="adam", lr=1e-2, epochs=3,
                progress=False, checkpoint_dir=folder, checkpoint_every=2 if folder else None)
    args.update(overrides)
    model = small_cnn(seed=1)
    return sf.unlearn(model, Interrupting(forget_batches(), counter, budget),
                      Interrupting(forget_batches(seed=9), counter, budget), **args)


def _state(sm):
    return {k: v.clone() for k, v in sm.model.state_dict().items()}


def _left_after(whole: int, budget: int) -> int:
    """The most batches a resumed run may read after a kill at `budget`: the whole run's less prepare's 3 and each
    finished epoch's 12 (6 steps, 6 scoring); it may read the killed epoch's again (its skipped steps' batches)."""
    return whole - 3 - 12 * ((budget - 3) // 12)


def _resume(monkeypatch, folder, **overrides):
    """_unlearn(folder) that must resume: prepare may not run (the adapters come from the checkpoint). Returns
    (model, report, batches read)."""
    def no_prepare(*args, **kwargs):
        raise AssertionError("a resumed run ran prepare")

    drawn = [0]
    with monkeypatch.context() as patch:
        patch.setattr("semu_fast.training.prepare", no_prepare)
        model, report = _unlearn(folder, drawn=drawn, **overrides)
    return model, report, drawn[0]


@pytest.mark.parametrize("budget", [8, 14, 30])  # epoch 1 step 5, epoch 1 evaluation, epoch 3 step 3
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, budget, monkeypatch):
    whole = [0]
    expected_model, expected_report = _unlearn(drawn=whole)
    with pytest.raises(KeyboardInterrupt):
        _unlearn(tmp_path, budget)
    assert (tmp_path / "training_state.pt").exists() and (tmp_path / "adapters").is_dir()
    resumed_model, resumed_report, drawn = _resume(monkeypatch, tmp_path)
    assert drawn <= _left_after(whole[0], budget)
    expected, got = _state(expected_model), _state(resumed_model)
    assert expected.keys() == got.keys()
    for key in expected:  # R, BatchNorm statistics (norm_mode="train"), U, Vh, base weights
        assert torch.equal(expected[key], got[key]), key
    assert resumed_report.training["history"] == expected_report.training["history"]
    assert resumed_report.training["best_epoch"] == expected_report.training["best_epoch"]


@pytest.mark.parametrize("budget", [8, 16, 20])  # epoch 1 step 5, epoch 2 step 1, epoch 2's scoring
def test_a_run_with_max_steps_resumes_exactly_and_stops_at_the_same_step(tmp_path, budget, monkeypatch):
    whole = [0]
    expected_model, expected_report = _unlearn(max_steps=8, drawn=whole)  # 6 steps a pass (forget, retain alternate)
    assert expected_report.training["epochs"] == 2
    with pytest.raises(KeyboardInterrupt):
        _unlearn(tmp_path, budget, max_steps=8)
    resumed_model, resumed_report, drawn = _resume(monkeypatch, tmp_path, max_steps=8)
    assert drawn <= _left_after(whole[0], budget)
    expected, got = _state(expected_model), _state(resumed_model)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert resumed_report.training["history"] == expected_report.training["history"]
    with pytest.raises(ValueError, match="max_steps differ"):  # a checkpoint of another length is another run
        _unlearn(tmp_path, max_steps=9)


@pytest.mark.parametrize("every, shuffle", [(1, "generator"), (None, "generator"), (1, "batch sampler"),
                                            (1, "unseeded")])
def test_resume_is_exact_with_dropout_and_a_shuffle(tmp_path, every, shuffle):
    """torch's random state (dropout; an unseeded shuffle draws from it too) and the loader's shuffling generator
    come back with the checkpoint, so a fresh process that seeds and builds everything as the first one did ends
    where the uninterrupted run does."""
    from torch.utils.data import BatchSampler, RandomSampler, TensorDataset

    gen = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen))

    def run(folder, budget=None):
        torch.manual_seed(5)  # as a fresh process seeded the same way
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(16, 3))
        if shuffle == "batch sampler":
            sampler = BatchSampler(RandomSampler(data, generator=torch.Generator().manual_seed(0)), 8, False)
            loader = KillingLoader(data, batch_sampler=sampler, budget=budget)
        else:
            loader = KillingLoader(data, batch_size=8, shuffle=True, budget=budget,
                                    generator=torch.Generator().manual_seed(0) if shuffle == "generator" else None)
        sm, _ = sf.unlearn(model, loader, epochs=3, progress=False, select_best=False, checkpoint_dir=folder,
                           checkpoint_every=every)
        return {name: a.R.clone() for name, a in sm.adapters.items()}

    expected = run(tmp_path / "whole")
    # prepare draws 4 batches, each epoch 4 to train and 4 to score: mid-epoch 1, in epoch 1's scoring, at the
    # start of epoch 2, mid-epoch 3
    for budget in (5, 8, 12, 22):
        folder = tmp_path / str(budget)
        with pytest.raises(KeyboardInterrupt):
            run(folder, budget)
        got = run(folder)
        for name, R in expected.items():
            assert torch.equal(got[name], R), (budget, name)


def test_a_finished_checkpoint_resumes_to_the_same_result(tmp_path, monkeypatch):
    first, _ = _unlearn(tmp_path)
    again, report, drawn = _resume(monkeypatch, tmp_path)
    assert drawn == 0  # nothing left to run
    for key, value in _state(first).items():
        assert torch.equal(_state(again)[key], value), key
    assert len(report.training["history"]) == 3


@pytest.mark.parametrize("stopping", [{"patience": 1, "lr": 1e-12}, {"on_epoch": lambda epoch, model: {"stop": True}}])
def test_a_run_that_stopped_early_resumes_to_the_same_result(tmp_path, stopping, monkeypatch):
    first, first_report = _unlearn(tmp_path, select_best=False, **stopping)
    again, report, drawn = _resume(monkeypatch, tmp_path, select_best=False, **stopping)
    assert drawn == 0  # the same call again: nothing more to run
    assert len(report.training["history"]) == len(first_report.training["history"]) < 3
    for key, value in _state(first).items():
        assert torch.equal(_state(again)[key], value), key


def test_resume_refuses_other_settings_and_damaged_files(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _unlearn(tmp_path, 14)
    with pytest.raises(ValueError, match="written by another run: lr differ"):
        _unlearn(tmp_path, lr=1e-3)
    with pytest.raises(ValueError, match="written by another run: max_grad_norm differ"):
        _unlearn(tmp_path, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="written by another run: train_loss_fn differ"):
        _unlearn(tmp_path, train_loss_fn=lambda model, batch, generator: model(batch[0]).sum())
    state = tmp_path / "training_state.pt"
    saved = torch.load(state, weights_only=True)
    for earlier, lack in (("1", "the random state"), ("2", "the digest of their data")):
        torch.save({**saved, "format": f"semu_fast.training_state/{earlier}"}, state)
        with pytest.raises(ValueError, match=f"written by an earlier semu_fast, whose checkpoints lack {lack}"):
            _unlearn(tmp_path)
    torch.save(saved, state)
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        _unlearn(tmp_path)
    _unlearn(tmp_path, resume=False)  # starts afresh and overwrites
    assert sf.load_adapters(small_cnn(seed=1), tmp_path / "adapters").adapters


def test_resume_refuses_other_forget_or_retain_data(tmp_path):
    model = small_cnn(seed=1)
    settings = dict(config=sf.SEMUConfig(gamma=0.9, norm_mode="train", seed=4), lr=1e-2, epochs=1, progress=False,
                    checkpoint_dir=tmp_path, checkpoint_every=2)
    sf.unlearn(model, forget_batches(), forget_batches(seed=9), **settings)[0].unload()
    with pytest.raises(ValueError, match="written by another run: forget_data differ"):
        sf.unlearn(model, forget_batches(seed=5), forget_batches(seed=9), **settings)
    with pytest.raises(ValueError, match="written by another run: retain_data differ"):
        sf.unlearn(model, forget_batches(), forget_batches(seed=10), **settings)
    sf.unlearn(model, forget_batches(), forget_batches(seed=9), **settings)  # the same data resumes


def test_data_identity_reads_what_is_in_memory_and_not_the_shuffle():
    from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset
    from semu_fast.checkpoint import data_identity
    data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = lambda dataset, **kw: data_identity(DataLoader(dataset, batch_size=2, **kw))  # noqa: E731
    assert loader(Subset(data, [0, 1, 2])) == loader(Subset(data, [0, 1, 2]), shuffle=True)
    assert loader(Subset(data, [0, 1, 2])) != loader(Subset(data, [0, 1, 3]))
    assert loader(data) != data_identity(DataLoader(data, batch_size=3))
    assert loader(data) != loader(TensorDataset(data.tensors[0] + 1e-7, data.tensors[1]))
    assert loader(ConcatDataset([data, data])) != loader(data)
    batches = [(torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1]))]
    assert data_identity(batches) != data_identity([(batches[0][0].half(), batches[0][1])])
    assert data_identity([{"ids": torch.tensor([1, 2])}]) != data_identity([{"ids": torch.tensor([1, 3])}])
    assert data_identity(DataLoader([1, 2])) != data_identity(DataLoader([1, 3]))  # samples in a list
    assert data_identity([(np.int64(1),)]) != data_identity([(np.int64(2),)])

    class Pair:  # a loader made of two (as unlearn_ddpm's forget + remain batches)
        def __init__(self, *parts):
            self.parts = parts

        def data_parts(self):
            return self.parts

    assert data_identity(Pair(batches, batches)) != data_identity(Pair(batches, batches[:0]))

    class Images(Dataset):  # samples are never read (their transforms may be random): type and length only
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            raise AssertionError("read a sample")

    assert loader(Images(4)) == loader(Images(4)) != loader(Images(5))


def test_checkpoint_arguments_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1 or None"):
        _unlearn(tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_dir"):
        _unlearn(None, checkpoint_every=3)
    assert not any(tmp_path.iterdir())


def test_a_save_removes_a_killed_save_s_temporary_but_not_another_run_s_in_flight(tmp_path):
    """Two runs sharing a checkpoint_dir (or a killed one): only temporaries no live writer can own go."""
    import subprocess
    import sys

    from semu_fast._utils import _owner

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = _owner().split("@", 1)[1]
    tmp_path.mkdir(exist_ok=True)
    killed = tmp_path / f".training_state.pt.k1ll3d.{ended.pid}@{host}.tmp"
    in_flight = tmp_path / f".training_state.pt.l1v3.{_owner()}.tmp"
    for path in (killed, in_flight):
        path.write_text("a save's temporary")
    _unlearn(tmp_path, epochs=1)
    assert not killed.exists() and in_flight.exists()
