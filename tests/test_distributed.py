"""SEMU on torch.distributed: 2 processes (gloo, CPU) against one process over the whole forget set."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import semu_fast as sf
from semu_fast import distributed
from helpers import KillingLoader, forget_batches, small_cnn

WORLD = 2
CONFIG = dict(gamma=0.9, seed=3)


def _model():
    """small_cnn plus a Linear big enough (300 x 260) for the randomized SVD path."""
    torch.manual_seed(0)
    return nn.Sequential(small_cnn(num_classes=300), nn.ReLU(), nn.Linear(300, 260))


def _batches():
    return forget_batches(n=64, batch=8, num_classes=260)


def _factors(sm):
    return {name: (a.U.clone(), a.Vh.clone(), a.ranks) for name, a in sm.adapters.items()}


def _exit_without_teardown():
    """End a worker that finished and saved its results: about 1 in 25 spawned workers that ran sf.prepare on gloo
    abort in the interpreter's C++ teardown ("terminate called without an active exception") after everything is
    done and saved, which mp.spawn reports as a failure. Skipping that teardown keeps the test about SEMU."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fully_shard(model):
    """FSDP2 on the CPU: the CNN block and the root are units, so every targeted layer sits inside one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)


def _worker(rank, init_file, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        shard = _batches()[rank::WORLD]  # as a DistributedSampler would split it
        model = _model()
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        if mode in ("fsdp2", "fsdp2-unlearn"):
            _fully_shard(model)
        if mode in ("unlearn", "fsdp2-unlearn"):
            sm, _ = sf.unlearn(model, shard, config=sf.SEMUConfig(**CONFIG), optimizer="adam", lr=1e-2, epochs=2,
                               progress=False)
            result = {"R": {n: a.R.detach().clone() for n, a in sm.adapters.items()}}
        else:
            result = {}
            if mode == "plain":  # the rows each rank's Linear saw are summed over the ranks (its SVD's rank hint)
                from semu_fast import distributed
                from semu_fast.gradients import accumulate_gradients

                result["rows"] = accumulate_gradients(model, shard, {"2": model[2]},
                                                      group=distributed.resolve(None)).rows
            sm = sf.prepare(model, shard, config=sf.SEMUConfig(**CONFIG))
            result.update(factors=_factors(sm), timings=sm.report.timings)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def _run(tmp_path, mode):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), mode), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("mode", ["plain", "ddp", "fsdp2"])
def test_two_ranks_give_the_single_process_adapters(tmp_path, mode):
    results = _run(tmp_path, mode)
    single = _factors(sf.prepare(_model(), _batches(), config=sf.SEMUConfig(**CONFIG)))
    for result in results:
        assert result["factors"].keys() == single.keys()
        for name, (U, Vh, ranks) in single.items():
            U2, Vh2, ranks2 = result["factors"][name]
            assert U2.shape == U.shape and ranks2 == ranks, name
            # Same subspaces: the gradients' sums differ only in the order of float additions.
            torch.testing.assert_close(U2 @ (U2.transpose(-1, -2) @ U), U, atol=2e-3, rtol=0)
            torch.testing.assert_close(Vh2.transpose(-1, -2) @ (Vh2 @ Vh.transpose(-1, -2)), Vh.transpose(-1, -2),
                                       atol=2e-3, rtol=0)
    if mode == "plain":
        assert [result["rows"] for result in results] == [{"2": len(_batches()) * 8}] * WORLD
    for name in single:  # the ranks hold identical factors (broadcast from each layer's owner)
        assert all(torch.equal(results[0]["factors"][name][i], results[1]["factors"][name][i]) for i in (0, 1))


def test_training_R_on_two_ranks_keeps_them_in_sync(tmp_path):
    r0, r1 = _run(tmp_path, "unlearn")
    assert r0["R"].keys() == r1["R"].keys() and r0["R"]
    for name in r0["R"]:
        assert torch.equal(r0["R"][name], r1["R"][name]), name
    assert any(R.abs().sum() > 0 for R in r0["R"].values())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.ReLU(), nn.Linear(16, 5))


class _Stream:
    """Batches that can be read again but have no length (as a DataLoader over an IterableDataset)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _failing_loss(rank, fail_rank, at_call, error):
    """Cross-entropy that raises `error` on rank fail_rank at its call number at_call."""
    calls = []

    def loss_fn(model, batch, *generator):
        calls.append(1)
        if rank == fail_rank and len(calls) == at_call:
            raise error
        return nn.functional.cross_entropy(model(batch[0]), batch[1])
    return loss_fn


def _scenario(rank, name, out_dir):
    """One rank's part of a scenario in which the ranks disagree; returns what the rank got (raising is recorded)."""
    data = forget_batches(n=56, batch=8)  # 7 batches
    shard = data[rank::WORLD]  # 4 and 3 batches
    even = data[:6][rank::WORLD]
    train = dict(epochs=2, progress=False, select_best=False)
    if name == "prepare_loss_error":  # rank 1's third batch fails
        sf.prepare(_mlp(), shard, loss_fn=_failing_loss(rank, 1, 3, ValueError("bad batch")))
    elif name == "prepare_svd_error":
        import semu_fast.pipeline as pipeline

        if rank == 1:
            pipeline._layer_factors = lambda *args: (_ for _ in ()).throw(MemoryError("out of memory"))
        sf.prepare(_mlp(), even)
    elif name == "prepare_empty_shard":  # rank 0 holds nothing: the sums are rank 1's batches
        sm = sf.prepare(_mlp(), [] if rank == 0 else data, config=sf.SEMUConfig(**CONFIG))
        return _factors(sm)
    elif name == "train_uneven":  # refused before prepare: the loaders have a length
        sf.unlearn(_mlp(), shard, **train)
    elif name == "train_uneven_stream":  # no length: the first step one rank lacks stops both
        sf.unlearn(_mlp(), _Stream(shard), **train)
    elif name == "train_nan":  # rank 0's loss is NaN at its second training step
        def nan_loss(model, batch, generator):
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            nan_loss.calls += 1
            return loss * float("nan") if rank == 0 and nan_loss.calls == 2 else loss
        nan_loss.calls = 0
        sf.unlearn(_mlp(), even, train_loss_fn=nan_loss, **train)
    elif name == "fsdp2_train_nan":  # FSDP2's backward holds collectives: the failing rank must still take part
        model = _model()
        _fully_shard(model)

        def nan_loss_fsdp(model, batch, generator):
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            nan_loss_fsdp.calls += 1
            return loss * float("nan") if rank == 0 and nan_loss_fsdp.calls == 2 else loss
        nan_loss_fsdp.calls = 0
        sf.unlearn(model, _batches()[rank::WORLD], train_loss_fn=nan_loss_fsdp, **train)
    elif name == "on_epoch_stop":  # rank 1 alone asks to stop after epoch 1: both stop there, in sync
        sm, report = sf.unlearn(_mlp(), even, on_epoch=lambda e, m: {"stop": rank == 1}, epochs=3, progress=False)
        return {"epochs": report.training["epochs"], "R": {n: a.R.detach().clone() for n, a in sm.adapters.items()}}
    elif name == "on_epoch_error":
        def on_epoch(epoch, model):
            if rank == 0:
                raise KeyError("no such metric")
        sf.unlearn(_mlp(), even, on_epoch=on_epoch, **train)
    elif name == "checkpoint_on_one_rank":
        sf.unlearn(_mlp(), even, checkpoint_dir=os.path.join(out_dir, "ckpt") if rank == 0 else None, **train)
    elif name == "checkpoint_every_on_one_rank":
        sf.unlearn(_mlp(), even, checkpoint_dir=os.path.join(out_dir, "ckpt"), checkpoint_every=1 if rank == 0
                   else None, **train)
    elif name == "epochs_differ":
        sf.unlearn(_mlp(), even, **{**train, "epochs": 2 + rank})
    elif name == "score_error":  # rank 1's retain data fails while an epoch is scored (retain_mode="score")
        retain = [b if rank == 0 or i else (b[0][:, :1], b[1]) for i, b in enumerate(even)]
        sf.unlearn(_mlp(), even, retain, retain_mode="score", **train)
    elif name == "checkpoint_write_error":  # rank 0 cannot write the training state (a full disk, say)
        import semu_fast.checkpoint as checkpoint

        if rank == 0:
            checkpoint.atomic_write = lambda path, write: (_ for _ in ()).throw(OSError(28, "No space left"))
        sf.unlearn(_mlp(), even, checkpoint_dir=os.path.join(out_dir, "ckpt"), **train)
    elif name == "checkpoint_per_rank":  # a folder per rank: only rank 0's holds a checkpoint to resume
        for _ in range(2):
            sf.unlearn(_mlp(), even, checkpoint_dir=os.path.join(out_dir, f"ckpt{rank}"), **train)
    elif name == "labels":  # the random labels each rank draws
        drawn = []

        def record(model, batch, generator):
            drawn.append(torch.randint(0, 1000, (3,), generator=generator))
            return nn.functional.cross_entropy(model(batch[0]), batch[1])
        sf.unlearn(_mlp(), even, train_loss_fn=record, **train)
        return torch.stack(drawn)
    elif name == "process_group_list":
        sf.prepare(_mlp(), even, process_group=[0, 1])
    elif name == "process_group_without_this_rank":
        only_rank0 = dist.new_group([0])
        sm = sf.prepare(_mlp(), even, process_group=only_rank0)  # a group of one on rank 0: one process
        return len(sm.adapters)
    return "ok"


def _scenario_worker(rank, init_file, out_dir, name):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        try:
            result = {"ok": _scenario(rank, name, out_dir)}
        except Exception as err:
            result = {"error": (type(err).__name__, str(err))}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def _run_scenario(tmp_path, name, timeout=150):
    """Each rank's outcome; a rank still running after `timeout` seconds (waiting for another) fails the test."""
    import time

    ctx = mp.start_processes(_scenario_worker, args=(str(tmp_path / "init"), str(tmp_path), name), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{name}: a rank was still waiting after {timeout} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name, failing, own_error", [
    ("prepare_loss_error", 1, ("ValueError", "bad batch")),
    ("prepare_svd_error", 1, ("MemoryError", "out of memory")),
    ("train_nan", 0, ("FloatingPointError", "loss is nan")),
    ("fsdp2_train_nan", 0, ("FloatingPointError", "loss is nan")),
    ("on_epoch_error", 0, ("KeyError", "no such metric")),
    ("score_error", 1, ("ValueError", "must agree on in")),
    ("checkpoint_write_error", 0, ("OSError", "No space left")),
])
def test_one_rank_s_error_stops_every_rank_instead_of_leaving_it_waiting(tmp_path, name, failing, own_error):
    results = _run_scenario(tmp_path, name)
    kind, message = results[failing]["error"]
    assert kind == own_error[0] and own_error[1] in message, results
    other = results[1 - failing]["error"]
    assert other[0] == "RankFailed" and "1 other rank(s) of 2 failed" in other[1], results


@pytest.mark.parametrize("name, expected", [
    ("train_uneven", ("ValueError", "the ranks' forget_loaders hold [4, 3]")),
    ("train_uneven_stream", ("ValueError", "1 of 2 ranks have a batch at epoch 1, step 4")),
    ("checkpoint_on_one_rank", ("ValueError", "the ranks differ in checkpoint_dir given")),
    ("checkpoint_every_on_one_rank", ("ValueError", "the ranks differ in checkpoint_every")),
    ("epochs_differ", ("ValueError", "the ranks differ in epochs: epochs = [2, 3]")),
    ("checkpoint_per_rank", ("ValueError", "the ranks found different checkpoints")),
    ("process_group_list", ("TypeError", "process_group must be a torch.distributed ProcessGroup")),
])
def test_ranks_that_disagree_are_refused_on_every_rank(tmp_path, name, expected):
    for result in _run_scenario(tmp_path, name):
        assert result.get("error", ("none", ""))[0] == expected[0] and expected[1] in result["error"][1], result


def test_ranks_agree_on_stopping_and_an_empty_shard_or_a_group_without_the_rank_are_handled(tmp_path):
    for name in ("on_epoch_stop", "prepare_empty_shard", "process_group_without_this_rank", "labels"):
        (tmp_path / name).mkdir()
    stop = _run_scenario(tmp_path / "on_epoch_stop", "on_epoch_stop")
    assert stop[0]["ok"]["epochs"] == stop[1]["ok"]["epochs"] == 1
    assert all(torch.equal(R, stop[1]["ok"]["R"][n]) for n, R in stop[0]["ok"]["R"].items())
    empty = _run_scenario(tmp_path / "prepare_empty_shard", "prepare_empty_shard")
    single = _factors(sf.prepare(_mlp(), forget_batches(n=56, batch=8), config=sf.SEMUConfig(**CONFIG)))
    for name, (U, Vh, _) in single.items():
        for rank in range(WORLD):
            torch.testing.assert_close(empty[rank]["ok"][name][0].abs(), U.abs(), atol=1e-4, rtol=0)
    group = _run_scenario(tmp_path / "process_group_without_this_rank", "process_group_without_this_rank")
    assert group[0] == {"ok": 2}  # rank 0 ran alone
    assert group[1]["error"][0] == "ValueError" and "does not hold this process" in group[1]["error"][1]
    labels = _run_scenario(tmp_path / "labels", "labels")
    assert not torch.equal(labels[0]["ok"], labels[1]["ok"])  # each rank its own random labels


def _resume_worker(rank, init_file, out_dir):
    """Each rank with its own dropout stream, its own seeded shuffle and its own norm statistics: killed runs resumed
    from their checkpoints end where the uninterrupted run does (R and the statistics), on every rank."""
    from torch.utils.data import TensorDataset

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(10 + rank)  # this rank's shard
    data = TensorDataset(torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen))

    def run(folder, budget=None):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        torch.manual_seed(100 + rank)  # each rank's dropout masks differ
        loader = KillingLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(rank),
                               budget=budget)
        # norm_mode="train": each rank's norm statistics follow its own shard
        sm, _ = sf.unlearn(model, loader, epochs=3, progress=False, select_best=False, distributed=True,
                           checkpoint_dir=os.path.join(out_dir, folder), checkpoint_every=1,
                           config=sf.SEMUConfig(norm_mode="train"))
        state = {name: a.R.detach().clone() for name, a in sm.adapters.items()}
        state.update({name: b.clone() for name, b in sm.named_buffers() if "running" in name})
        return state, loader.drawn

    def no_prepare(*args, **kwargs):
        raise AssertionError("a resumed run ran prepare")

    import semu_fast.training as training

    try:
        (expected, _), exact = run("whole"), {}
        for budget in (5, 14):  # mid-epoch 1; the start of epoch 2
            try:
                run(str(budget), budget)
            except KeyboardInterrupt:
                pass
            dist.barrier()
            training.prepare, prepare = no_prepare, training.prepare  # a resume loads the adapters
            try:
                got, drawn = run(str(budget))
            finally:
                training.prepare = prepare
            exact[budget] = (all(torch.equal(got[name], value) for name, value in expected.items()), drawn)
        torch.save(exact, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def test_a_distributed_run_resumes_exactly_with_each_rank_s_own_random_state(tmp_path):
    mp.spawn(_resume_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        exact = torch.load(tmp_path / f"rank{rank}.pt")
        assert exact[5][0] and exact[14][0], (rank, exact)
        # the whole run reads 4 batches for prepare and 8 an epoch (4 steps, 4 to score): a resume reads the
        # epochs after the checkpoint's (the killed epoch's again), not the whole run
        assert exact[5][1] <= 24 and exact[14][1] <= 16, (rank, exact)


def test_layers_are_shared_out_by_cost():
    shapes = {"big": (4096, 4096), "mid": (2048, 2048), "a": (1024, 1024), "conv": (64, 64, 3, 3)}
    owners = distributed.assign_owners(shapes, 2)
    assert owners["big"] != owners["mid"] and set(owners.values()) == {0, 1}
    assert distributed.assign_owners(shapes, 1) == dict.fromkeys(shapes, 0)


def test_all_reduce_buckets_by_dtype_and_size(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "BUCKET_BYTES", 64)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: calls.append((t.dtype, t.numel())) or t)
    tensors = [torch.ones(4), torch.ones(4), torch.ones(20), torch.ones(3, dtype=torch.float64)]
    distributed.all_reduce_sum_(tensors, distributed.Group(None, 0, 2))
    assert calls == [(torch.float32, 8), (torch.float32, 20), (torch.float64, 3)]


def test_distributed_true_without_a_process_group_is_refused():
    with pytest.raises(RuntimeError, match="distributed=True needs torch.distributed initialised"):
        sf.prepare(small_cnn(), forget_batches(), distributed=True)
    with pytest.raises(TypeError, match="distributed must be True, False or None"):
        sf.prepare(small_cnn(), forget_batches(), distributed="yes")
    with pytest.raises(ValueError, match="process_group was given, but torch.distributed is not initialised"):
        sf.prepare(small_cnn(), forget_batches(), process_group=object())
    with pytest.raises(ValueError, match="process_group was given, but distributed=False runs in one process"):
        sf.unlearn(small_cnn(), forget_batches(), distributed=False, process_group=object(), progress=False)


def test_training_R_under_fsdp2_matches_plain_data_parallel(tmp_path):
    for run in ("plain", "fsdp"):
        (tmp_path / run).mkdir()
    plain, fsdp = _run(tmp_path / "plain", "unlearn"), _run(tmp_path / "fsdp", "fsdp2-unlearn")
    assert fsdp[0]["R"].keys() == plain[0]["R"].keys() and fsdp[0]["R"]
    for name in plain[0]["R"]:
        assert torch.equal(fsdp[0]["R"][name], fsdp[1]["R"][name]), name
        torch.testing.assert_close(fsdp[0]["R"][name], plain[0]["R"][name], rtol=1e-3, atol=1e-4)


def _fsdp_checks_worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from helpers import assert_same_state, snapshot

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)
    try:
        messages = {}
        model = _model()
        fully_shard(model[2], mesh=init_device_mesh("cpu", (1,)))  # the targeted Linear is its own unit
        before = snapshot(model)
        try:
            sf.prepare(model, _batches())
        except ValueError as err:
            messages["own unit"] = str(err)
        assert_same_state(model, before)
        model = _model()  # a DTensor parameter without FSDP2: tensor parallelism
        model[2].weight = nn.Parameter(distribute_tensor(model[2].weight.detach(), init_device_mesh("cpu", (1,)),
                                                         [Shard(0)]))
        before = snapshot(model)
        try:
            sf.prepare(model, _batches())
        except TypeError as err:
            messages["dtensor"] = str(err)
        assert_same_state(model, before)
        model = _model()
        _fully_shard(model)
        sm = sf.prepare(model, _batches())
        try:
            sm.merge_adapters()
        except RuntimeError as err:
            messages["merge"] = str(err)
        messages["merged"] = any(a.merged for a in sm.adapters.values())
        torch.save(messages, os.path.join(out_dir, "fsdp.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def test_fsdp2_own_unit_layers_tensor_parallel_weights_and_merging_are_refused(tmp_path):
    mp.spawn(_fsdp_checks_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=1, join=True)
    messages = torch.load(tmp_path / "fsdp.pt")
    assert "2 are fully_shard units of their own" in messages["own unit"]
    assert "tensor-parallel DTensor parameters" in messages["dtensor"]
    assert "cannot merge into an FSDP-sharded weight" in messages["merge"] and not messages["merged"]


def test_each_epoch_sets_the_distributed_sampler_s_epoch():
    """A DistributedSampler shuffles by (seed, epoch): without set_epoch every epoch would read one order."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    x, y = torch.cat([b[0] for b in forget_batches()]), torch.cat([b[1] for b in forget_batches()])
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=1, rank=0, shuffle=True, seed=4)
    epochs = []
    set_epoch = sampler.set_epoch
    sampler.set_epoch = lambda epoch: epochs.append(epoch) or set_epoch(epoch)
    sf.unlearn(small_cnn(), DataLoader(TensorDataset(x, y), batch_size=16, sampler=sampler), epochs=3,
               progress=False, select_best=False)
    assert epochs == [0, 1, 2]
