"""Official SEMU checkpoints (gmum/semu's CustomLinear / CustomConv2d state) to our adapters and back: outputs equal
the official materialised forward, computed here in float64 from the checkpoint alone."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from semu_fast.official import load_official, official_state_dict
from helpers import small_cnn


def _orthonormal(shape, gen):
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=gen, dtype=torch.float64))
    return q.float()


def _official_checkpoint(model, seed=0, per_channel=False):
    """A state dict as the official code saves it after training R: classification form (factors truncated to k),
    or the DDPM form (factors whole, R nonzero only inside each channel's kept block, n_imp_comps)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        w = layer.weight.detach()
        del state[f"{name}.weight"]
        if isinstance(layer, nn.Linear):
            out, inp = w.shape
            k = 2 if not per_channel else min(out, inp)
            u, vh = _orthonormal((out, k), gen), _orthonormal((inp, k), gen).T.contiguous()
            r = torch.randn(k, k, generator=gen) * 0.1
            if per_channel:
                kept = torch.tensor(1)
                r[1:, :] = 0
                r[:, 1:] = 0
                state[f"{name}.n_imp_comps"] = kept
        else:
            out, inp, kh, kw = w.shape
            full = min(out, kh * kw)
            k = full if per_channel else min(2, full)
            u = torch.stack([_orthonormal((out, k), gen) for _ in range(inp)])
            vh = torch.stack([_orthonormal((kh * kw, k), gen).T for _ in range(inp)])
            r = torch.randn(inp, k, k, generator=gen) * 0.1
            if per_channel:
                ranks = torch.randint(0, k + 1, (inp, 1), generator=gen)
                ranks[0] = k  # at least one channel at full rank
                mask = torch.arange(k) < ranks.view(-1, 1, 1)
                r = r * (mask & mask.transpose(1, 2))
                state[f"{name}.n_imp_comps"] = ranks
        state.update({f"{name}.weight": r, f"{name}.a": w.clone(), f"{name}.u": u, f"{name}.vh": vh})
    return state


def _official_forward(model, state, x):
    """The official CustomLinear / CustomConv2d forward (A + U R Vh materialised), in float64, from the state."""
    model = copy.deepcopy(model).double()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for name in layers:
            layer = model.get_submodule(name)
            u, r, vh = (state[f"{name}.{p}"].double() for p in ("u", "weight", "vh"))
            delta = u @ r @ vh
            if isinstance(layer, nn.Conv2d):
                delta = delta.unflatten(2, layer.kernel_size).permute(1, 0, 2, 3)
            layer.weight.copy_(state[f"{name}.a"].double() + delta)
    return model.eval()(x.double())


@pytest.mark.parametrize("per_channel", [False, True], ids=["classification", "ddpm"])
def test_import_gives_the_official_forward(per_channel):
    model = small_cnn().eval()
    state = _official_checkpoint(model, per_channel=per_channel)
    x = torch.randn(4, 3, 6, 6)
    expected = _official_forward(model, state, x)
    semu_model = load_official(copy.deepcopy(model), state)
    got = semu_model.eval()(x)
    assert (expected - _official_forward(model, {**state, **{k: torch.zeros_like(v) for k, v in state.items()
                                                              if k.endswith(".weight") and v.dim() != 1}}, x)
            ).abs().max() > 1e-3  # R matters: the comparison below proves something
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    if per_channel:
        conv = semu_model.adapters["0"]
        assert conv.ranks == state["0.n_imp_comps"].view(-1).tolist()
        assert semu_model.report.trainable_params == sum(
            a.trainable_params() for a in semu_model.adapters.values())
        assert semu_model.config.conv_rank == "per_channel"


def test_export_round_trips_and_reloads():
    model = small_cnn().eval()
    state = _official_checkpoint(model)
    semu_model = load_official(copy.deepcopy(model), state)
    exported = official_state_dict(semu_model)
    assert exported.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(exported[key], value), key
    ddpm = _official_checkpoint(model, per_channel=True)
    again = load_official(copy.deepcopy(model), official_state_dict(load_official(copy.deepcopy(model), ddpm)))
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(again.eval()(x).double(), _official_forward(model, ddpm, x), rtol=1e-4, atol=1e-5)


def test_load_from_a_checkpoint_file_and_load_base(tmp_path):
    model = small_cnn(seed=0).eval()
    state = _official_checkpoint(model)
    path = tmp_path / "own_SVDcheckpoint.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "evaluation_result": {}}, path)
    other = small_cnn(seed=1).eval()
    with pytest.raises(ValueError, match="holds other weights than the checkpoint's `a`"):
        load_official(other, path)
    assert torch.equal(other[0].weight, small_cnn(seed=1)[0].weight)  # refused before anything changed
    semu_model = load_official(other, path, load_base=True)
    x = torch.randn(2, 3, 6, 6)
    # load_base takes the weights of adapted layers (and their biases) from the checkpoint; copy the rest as a user
    # restoring the official model would
    other[1].load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("1.")})
    torch.testing.assert_close(semu_model.eval()(x).double(), _official_forward(model, state, x), rtol=1e-4,
                               atol=1e-5)


def test_bad_checkpoints_are_refused_before_the_model_changes():
    model = small_cnn().eval()
    state = _official_checkpoint(model, per_channel=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    leaky = {**state, "0.weight": state["0.weight"] + 1e-3}
    with pytest.raises(ValueError, match="nonzero entries outside the leading block"):
        load_official(model, leaky)
    with pytest.raises(ValueError, match="holds no official SEMU layer"):
        load_official(model, model.state_dict())
    with pytest.raises(ValueError, match="which model does not have"):
        load_official(nn.ModuleDict({"head": nn.Linear(3, 3)}), state)
    with pytest.raises(ValueError, match="must be a finite float tensor"):
        load_official(model, {**state, "7.u": torch.full_like(state["7.u"], float("nan"))})
    with pytest.raises(ValueError, match="must be a state dict"):
        load_official(model, [1, 2])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(p.requires_grad is False for p in model.parameters())


def test_damaged_or_misshapen_official_checkpoints_are_refused_by_key_before_the_model_changes(tmp_path):
    """A layer missing a factor, a factor of the wrong shape, ranks beyond the factors, NaN or integers in the
    weights load_base would copy, a folder, the DDPM's list form, a SEMUModel: each gets an error naming what was
    expected, and load_base copies nothing first."""
    import semu_fast as sf
    from semu_fast.official import load_official, official_state_dict
    from helpers import assert_same_state, forget_batches, small_cnn, snapshot

    sm = sf.prepare(small_cnn(), forget_batches())
    good = official_state_dict(sm)
    name = next(n for n in sm.adapters if sm.adapters[n].kind == "linear")
    conv = next(n for n in sm.adapters if sm.adapters[n].kind == "conv2d")
    model = small_cnn()
    saved = snapshot(model)
    cases = {
        "missing": ({k: v for k, v in good.items() if k != f"{name}.u"}, f"not {name}.u"),
        "u shape": ({**good, f"{name}.u": good[f"{name}.u"][:-1]}, f"{name}.u has shape"),
        "vh shape": ({**good, f"{conv}.vh": good[f"{conv}.vh"][..., :-1]}, f"{conv}.vh has shape"),
        "bias shape": ({**good, f"{name}.bias": good[f"{name}.bias"][:-1]}, f"{name}.bias has shape"),
        "ranks": ({**good, f"{name}.n_imp_comps": torch.tensor([99])}, f"{name}.n_imp_comps must be within"),
        # load_base copies `a` and the bias into the model: NaN there would become the model's weights
        "NaN a": ({**good, f"{name}.a": good[f"{name}.a"].index_fill(0, torch.tensor([0]), float("nan"))},
                  f"{name}.a must be a finite float tensor"),
        "Inf bias": ({**good, f"{conv}.bias": torch.full_like(good[f"{conv}.bias"], float("inf"))},
                     f"{conv}.bias must be a finite float tensor"),
        "integer a": ({**good, f"{name}.a": good[f"{name}.a"].long()}, f"{name}.a must be a finite float tensor"),
    }
    for case, (state, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            load_official(model, state, load_base=True)
        assert_same_state(model, saved)
    with pytest.raises(ValueError, match="is a folder"):
        load_official(model, tmp_path)
    with pytest.raises(ValueError, match="state\\['state_dict'\\] must be a state dict"):
        load_official(model, {"state_dict": [1]})
    torch.save([good, {"optimizer": 1}, 10], tmp_path / "ckpt.pth")  # the official DDPM's checkpoint list
    loaded = load_official(model, tmp_path / "ckpt.pth")
    with pytest.raises(TypeError, match="model is a SEMUModel"):
        load_official(loaded, good)
    with pytest.raises(TypeError, match="semu_model must be a SEMUModel"):
        official_state_dict(small_cnn())


def test_an_imported_report_is_strict_json_and_says_its_captured_variance_is_unknown(tmp_path):
    """Imported adapters have no gradient to measure: captured variance None (was NaN, which strict JSON refuses)."""
    import json

    import semu_fast as sf
    from helpers import forget_batches

    loaded = load_official(small_cnn(), official_state_dict(sf.prepare(small_cnn(), forget_batches())))
    assert all(layer.captured_variance is None for layer in loaded.report.layers)
    json.dumps(loaded.report.to_dict(), allow_nan=False)
    assert "n/a" in str(loaded.report)
    loaded.save_adapters(tmp_path / "adapters")
    json.loads((tmp_path / "adapters" / "adapter_config.json").read_text(),
               parse_constant=lambda name: pytest.fail(f"{name} in adapter_config.json"))
    assert sf.load_adapters(small_cnn(), tmp_path / "adapters").report.layers[0].captured_variance is None
