import copy
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import semu_fast as sf
from semu_fast._utils import _owner
from helpers import assert_same_state, forget_batches, small_cnn, snapshot


def _trained(config=None):
    model = small_cnn()
    model.eval()
    sm = sf.prepare(model, forget_batches(), config=config or sf.SEMUConfig(gamma=0.9))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.copy_(torch.randn(adapter.R.shape, generator=gen))
    return sm


@pytest.mark.parametrize("conv_rank", ["max", "per_channel"])
def test_save_load_round_trip_is_exact(tmp_path, conv_rank):
    sm = _trained(sf.SEMUConfig(gamma=0.9, conv_rank=conv_rank))
    x = forget_batches(seed=4)[0][0]
    expected = sm(x)
    sm.save_adapters(tmp_path / "adapters")
    fresh = small_cnn()
    fresh.eval()
    loaded = sf.load_adapters(fresh, tmp_path / "adapters")
    assert loaded.adapters.keys() == sm.adapters.keys()
    for name, adapter in sm.adapters.items():
        other = loaded.adapters[name]
        for part in ("R", "U", "Vh"):
            assert torch.equal(getattr(other, part), getattr(adapter, part)), (name, part)
        assert other.ranks == adapter.ranks
    assert torch.equal(loaded(x), expected)
    assert loaded.config == sm.config
    assert [r.k for r in loaded.report.layers] == [r.k for r in sm.report.layers]
    assert loaded.report.to_dict() == sm.report.to_dict()  # timings, gradient passes, skipped layers included


def test_adapters_saved_in_float64_load_back_in_float64(tmp_path):
    sm = _trained()
    sm.double()
    x = forget_batches(seed=4)[0][0].double()
    expected = sm(x)
    sm.save_adapters(tmp_path / "adapters")
    loaded = sf.load_adapters(small_cnn().double().eval(), tmp_path / "adapters")
    for name, adapter in sm.adapters.items():
        for part in ("R", "U", "Vh"):
            got = getattr(loaded.adapters[name], part)
            assert got.dtype == torch.float64 and torch.equal(got, getattr(adapter, part)), (name, part)
    assert isinstance(loaded.adapters[next(iter(sm.adapters))].R, torch.nn.Parameter)
    assert torch.equal(loaded(x), expected)
    loaded.merge_adapters()  # merged in float64 too: the same outputs to float64 rounding
    torch.testing.assert_close(loaded(x), expected, rtol=1e-12, atol=1e-12)


def test_saved_folder_has_safetensors_and_json_and_no_temporary_files(tmp_path):
    _trained().save_adapters(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert names == ["adapter_config.json", config["weights_file"]] and config["weights_file"].startswith("adapters-")
    assert config["layers"]["7"]["kind"] == "linear" and config["semu_config"]["gamma"] == 0.9


def test_loading_into_a_model_of_other_shapes_fails_before_changing_it(tmp_path):
    _trained().save_adapters(tmp_path)
    other = small_cnn(num_classes=7)
    before = snapshot(other)
    with pytest.raises(ValueError, match="layer '9' has weight shape"):
        sf.load_adapters(other, tmp_path)
    assert_same_state(other, before)
    assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in other.modules())


def test_truncated_adapter_file_is_reported(tmp_path):
    _trained().save_adapters(tmp_path)
    path = next(tmp_path.glob("adapters-*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    model = small_cnn()
    with pytest.raises(ValueError, match="corrupted"):
        sf.load_adapters(model, tmp_path)
    assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in model.modules())


def test_corrupted_config_is_reported(tmp_path):
    _trained().save_adapters(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        sf.load_adapters(small_cnn(), tmp_path)


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved SEMU adapter folder"):
        sf.load_adapters(small_cnn(), tmp_path / "nowhere")


def test_saving_removes_only_what_earlier_saves_wrote(tmp_path):
    for name in (".notes.tmp", "adapters.safetensors", "readme.md", ".adapter_config.json.x.tmp.bak"):
        (tmp_path / name).write_text("the user's")
    killed = tmp_path / ".adapter_config.json.abc123.tmp"
    killed.write_text("left by a killed save")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(killed, (two_hours_ago, two_hours_ago))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = _owner().split("@", 1)[1]
    (tmp_path / f".adapter_config.json.k1ll3d.{ended.pid}@{host}.tmp").write_text("its writer is gone")
    in_flight = [tmp_path / ".adapters-0123456789abcdef.safetensors.def456.tmp",  # names no writer: an hour's grace
                 tmp_path / f".adapter_config.json.l1v3.{_owner()}.tmp",  # its writer (this process) runs
                 tmp_path / f".adapter_config.json.3l53.{ended.pid}@other-{host}.tmp"]  # another machine's
    for path in in_flight:
        path.write_text("another save, being written now")
    _trained().save_adapters(tmp_path)
    _trained().save_adapters(tmp_path)  # the first save's weights file goes
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".notes.tmp", "adapters.safetensors", "readme.md", ".adapter_config.json.x.tmp.bak", "adapter_config.json",
         config["weights_file"]] + [p.name for p in in_flight])


def test_saves_into_one_folder_at_once_all_succeed_and_leave_a_loadable_folder(tmp_path):
    """Every rank saving at the end of a script: a save must neither remove another's temporary (its rename then
    fails) nor the weights another is about to commit (its config then names a missing file)."""
    sms = [_trained() for _ in range(4)]
    for i, sm in enumerate(sms):  # different adapters: each save writes its own weights file
        with torch.no_grad():
            next(iter(sm.adapters.values())).R.add_(i)
    expected = {json.dumps(_r_of(sm)) for sm in sms}
    base = small_cnn().eval()  # copied in the threads: small_cnn() seeds the global generator, which they share
    errors, start = [], threading.Barrier(len(sms))

    def save_and_load(sm):
        start.wait()
        for _ in range(15):
            try:
                sm.save_adapters(tmp_path)
                assert json.dumps(_r_of(sf.load_adapters(copy.deepcopy(base), tmp_path))) in expected
            except Exception as err:  # noqa: BLE001 (collected, reported below)
                errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=save_and_load, args=(sm,)) for sm in sms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter_config.json", config["weights_file"]])
    assert json.dumps(_r_of(sf.load_adapters(small_cnn().eval(), tmp_path))) in expected


def _r_of(sm) -> dict:
    return {name: adapter.R.tolist() for name, adapter in sm.adapters.items()}


def test_a_semu_folder_and_a_peft_lora_do_not_overwrite_each_other(tmp_path):
    pytest.importorskip("peft")
    from semu_fast.lora import export_lora
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    sm = sf.prepare(mlp, [(torch.randn(8, 6), torch.randint(0, 3, (8,)))])
    sm.save_adapters(tmp_path / "semu")
    export_lora(sm, tmp_path / "lora")
    before = {p.name: p.read_bytes() for p in (tmp_path / "semu").iterdir()}
    with pytest.raises(ValueError, match="is a SEMU adapter folder's config.*export the LoRA into another folder"):
        export_lora(sm, tmp_path / "semu")
    assert {p.name: p.read_bytes() for p in (tmp_path / "semu").iterdir()} == before
    lora = {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()}
    with pytest.raises(ValueError, match="exists and is not a SEMU adapter config.*save the adapters into another"):
        sm.save_adapters(tmp_path / "lora")
    assert {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()} == lora
    with pytest.raises(ValueError, match="is a file: a LoRA is written as a folder"):
        export_lora(sm, tmp_path / "lora" / "adapter_config.json")


def test_damaged_configs_and_wrong_paths_get_clear_errors(tmp_path):
    sm = _trained()
    sm.save_adapters(tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json is a file: pass the adapter folder"):
        sf.load_adapters(small_cnn(), tmp_path / "adapter_config.json")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for damage, match in (({"layers": {**config["layers"], "7": [1]}}, "damaged: layer '7' is not an object"),
                          ({"semu_config": {**config["semu_config"], "new_knob": 1}}, "semu_config or report"),
                          ({"report": []}, "semu_config and report must be objects")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **damage}))
        model = small_cnn()
        with pytest.raises(ValueError, match=match):
            sf.load_adapters(model, tmp_path)
        assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in model.modules())
    with pytest.raises(ValueError, match="adapter_config.json is a file: the adapters are saved as a folder"):
        sm.save_adapters(tmp_path / "adapter_config.json")
    sm.unload()
    with pytest.raises(RuntimeError, match="cannot unload: this SEMUModel was detached by unload"):
        sm.unload()


def test_loading_onto_an_adapted_model_says_so(tmp_path):
    sm = _trained()
    sm.save_adapters(tmp_path / "adapters")
    with pytest.raises(TypeError, match="model is a SEMUModel: load the adapters onto the original model"):
        sf.load_adapters(sm, tmp_path / "adapters")
    with pytest.raises(ValueError, match="already holds SEMU adapters"):
        sf.load_adapters(sm.model, tmp_path / "adapters")


def _tied_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3))
    model[2].weight = model[0].weight
    return model


def test_adapters_for_two_layers_do_not_load_onto_one_tied_weight(tmp_path):
    # made on an untied copy (as prepare's refusal of the tied model advises); two adapters on one tensor could not
    # both unmerge exactly
    from semu_fast.official import load_official, official_state_dict
    untied = _tied_mlp()
    untied[2].weight = torch.nn.Parameter(untied[0].weight.detach().clone())
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    sm = sf.prepare(untied, data, config=sf.SEMUConfig(gamma=0.9))
    sm.save_adapters(tmp_path)
    official = official_state_dict(sm)
    tied = _tied_mlp()
    before = snapshot(tied)
    with pytest.raises(ValueError, match="share one weight tensor.*load the adapters onto a model whose weights"):
        sf.load_adapters(tied, tmp_path)
    with pytest.raises(ValueError, match="share one weight tensor.*load the checkpoint onto a model whose weights"):
        load_official(tied, official)
    assert_same_state(tied, before)
    assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in tied.modules())


def test_a_fingerprint_without_content_hash_is_checked_on_its_shape_and_dtype(tmp_path):
    # what an FSDP2 save records (the sharded weight is not gathered to be hashed): the plain model it came from must
    # accept the adapters, a model of another dtype must not
    sm = _trained()
    sm.save_adapters(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for info in config["layers"].values():
        info["base_fingerprint"] = {k: info["base_fingerprint"][k] for k in ("shape", "dtype")}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = sf.load_adapters(small_cnn().eval(), tmp_path)
    assert loaded.adapters.keys() == sm.adapters.keys()
    with pytest.raises(sf.BaseMismatchError, match="holds other weights"):
        sf.load_adapters(small_cnn(dtype=torch.float64).eval(), tmp_path)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)),
                               torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _fsdp2_worker(rank, folder):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def sharded():
        model, mesh = _mlp(), init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=1)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    results = {}
    sf.prepare(sharded(), data).save_adapters(f"{folder}/fsdp2")
    sf.prepare(_mlp(), data).save_adapters(f"{folder}/plain")
    for what, model, source in [("fsdp2 to plain", _mlp(), "fsdp2"), ("plain to fsdp2", sharded(), "plain")]:
        try:
            results[what] = sorted(sf.load_adapters(model, f"{folder}/{source}").adapters)
        except Exception as err:  # noqa: BLE001 (reported by the test)
            results[what] = f"{type(err).__name__}: {err}"
    torch.save(results, f"{folder}/results.pt")
    dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's teardown, which can abort a gloo worker after its work is saved


def test_adapters_saved_from_fsdp2_load_onto_the_plain_model_and_back(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed")
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_worker, args=(str(tmp_path),), nprocs=1, join=True)
    results = torch.load(tmp_path / "results.pt")
    assert results == {"fsdp2 to plain": ["0.0", "0.2", "2"], "plain to fsdp2": ["0.0", "0.2", "2"]}
