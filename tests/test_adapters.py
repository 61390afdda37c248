import pytest
import torch

import semu_fast as sf
from semu_fast.ops import reference
from semu_fast.adapters import SEMUConv2d
from helpers import assert_same_state, forget_batches, small_cnn, snapshot


def _prepared(dtype=torch.float32, seed=0):
    model = small_cnn(dtype=dtype)
    model.eval()
    original = snapshot(model)
    sm = sf.prepare(model, forget_batches(dtype=dtype))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.copy_(torch.randn(adapter.R.shape, generator=gen))
    return sm, original


def test_adapted_forward_equals_materialised_weights():
    sm, _ = _prepared(torch.float64)
    x = forget_batches(seed=5, dtype=torch.float64)[0][0]
    lin = sm.adapters["7"]
    h = torch.randn(4, 24, dtype=torch.float64)
    base = lin.base_layer
    expected = reference.lowrank_linear(h, base.weight, lin.U.double(), lin.R.double(), lin.Vh.double(), base.bias)
    assert torch.allclose(lin(h), expected, atol=1e-10)
    conv = sm.adapters["0"]
    b = conv.base_layer
    expected = reference.lowrank_conv2d(x, b.weight, conv.U.double(), conv.R.double(), conv.Vh.double(), b.bias,
                                        b.stride, b.padding, b.dilation)
    assert torch.allclose(conv(x), expected, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular", "zeros"])
def test_conv_adapter_honours_padding_modes(padding_mode):
    """The adapted conv equals nn.Conv2d (same padding mode) with the merged weight A + dW."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 5, 3, padding=(1, 2), padding_mode=padding_mode, dilation=(1, 2)).double()
    U, R, Vh = (torch.randn(3, 5, 2, generator=gen), torch.randn(3, 2, 2, generator=gen),
                torch.randn(3, 2, 9, generator=gen))
    adapter = SEMUConv2d(conv, U, Vh)
    with torch.no_grad():
        adapter.R.copy_(R)
    x = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    merged = torch.nn.Conv2d(3, 5, 3, padding=(1, 2), padding_mode=padding_mode, dilation=(1, 2)).double()
    merged.load_state_dict(conv.state_dict())
    with torch.no_grad():
        merged.weight += reference.conv_delta_weight(U.double(), R.double(), Vh.double(), (3, 3))
    torch.testing.assert_close(adapter(x), merged(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unmerge_restores_weights_bit_exact(dtype):
    sm, original = _prepared(dtype)
    x = forget_batches(seed=5, dtype=dtype)[0][0]
    adapted = sm(x)
    sm.merge_adapters()
    merged_out = sm(x)
    assert all(a.merged for a in sm.adapters.values())
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.2, torch.float16: 2e-2}[dtype]
    assert torch.allclose(merged_out.float(), adapted.float(), atol=tol, rtol=tol)
    sm.merge_adapters()  # idempotent
    sm.unmerge_adapters()
    for name, adapter in sm.adapters.items():
        assert torch.equal(adapter.base_layer.weight, original[f"{name}.weight"])
    assert torch.equal(sm(x), adapted)


def test_the_weight_kept_for_unmerge_moves_with_the_model():
    sm, _ = _prepared(torch.bfloat16)
    sm.merge_adapters()
    sm.to("meta")  # stands in for another device: .to() must move it, not leave a copy behind
    assert all(a._original_weight.device.type == "meta" and a._original_weight.dtype == torch.bfloat16
               for a in sm.adapters.values())
    sm, original = _prepared(torch.float32)
    sm.merge_adapters()
    sm.double()  # a cast keeps the kept weight's dtype: unmerge gives the original, in the new dtype
    sm.unmerge_adapters()
    for name, adapter in sm.adapters.items():
        assert adapter.base_layer.weight.dtype == torch.float64
        assert torch.equal(adapter.base_layer.weight, original[f"{name}.weight"].double())


def test_merge_writes_the_materialised_weight():
    sm, original = _prepared(torch.float64)
    sm.merge_adapters()
    for name, a in sm.adapters.items():
        expected = original[f"{name}.weight"] + a.delta_weight().double()
        assert torch.allclose(a.base_layer.weight, expected, atol=1e-12)


def test_disable_adapters_runs_the_original_model_even_when_merged():
    sm, original = _prepared()
    x = forget_batches(seed=6)[0][0]
    reference_model = small_cnn()
    reference_model.load_state_dict(original)
    reference_model.eval()
    expected = reference_model(x)
    adapted = sm(x)
    assert not torch.allclose(adapted, expected)
    with sm.disable_adapters():
        assert torch.equal(sm(x), expected)
    assert torch.equal(sm(x), adapted)
    sm.merge_adapters()
    with sm.disable_adapters():
        assert torch.equal(sm(x), expected)
    assert all(a.merged for a in sm.adapters.values())


def test_disable_adapters_nests_and_refuses_a_merge_inside():
    sm, original = _prepared()
    x = forget_batches(seed=6)[0][0]
    reference_model = small_cnn()
    reference_model.load_state_dict(original)
    expected = reference_model.eval()(x)
    with sm.disable_adapters():
        with sm.disable_adapters():
            pass
        assert torch.equal(sm(x), expected)  # the inner block's exit left the outer one disabled
        with pytest.raises(RuntimeError, match="cannot merge the adapters inside disable_adapters"):
            sm.merge_adapters()
        with pytest.raises(RuntimeError, match="cannot merge the adapters inside disable_adapters"):
            with sm.merged():
                pass
        assert torch.equal(sm(x), expected)
    assert not any(a.merged or a.disabled for a in sm.adapters.values())
    assert_same_state(sm.unload(), original)


@pytest.mark.parametrize("block", ["disable_adapters", "merged"])
def test_unloading_inside_a_block_keeps_what_unload_gives(block):
    sm, original = _prepared()
    sm.merge_adapters()
    with getattr(sm, block)():
        model = sm.unload()
    assert_same_state(model, original)  # the block's exit did not merge into the plain model again
    sm, original = _prepared()
    x = forget_batches(seed=7)[0][0]
    adapted = sm(x)
    if block == "merged":
        with sm.merged():
            model = sm.merge_and_unload()
        assert torch.allclose(model(x), adapted, atol=1e-5)
    else:  # the block runs the original model: merging inside is refused, and the adapters stay
        with pytest.raises(RuntimeError, match="cannot merge the adapters inside disable_adapters"):
            with sm.disable_adapters():
                sm.merge_and_unload()
        assert torch.equal(sm(x), adapted) and sm.adapters


def test_merging_again_writes_the_current_R():
    sm, original = _prepared(torch.float64)
    x = forget_batches(seed=7, dtype=torch.float64)[0][0]
    sm.merge_adapters()
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.mul_(3)
    sm.unmerge_adapters()
    expected = sm(x)
    sm.merge_adapters()
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.div_(3)
    sm.merge_adapters()  # R changed since the merge: written again from the kept weight
    for name, adapter in sm.adapters.items():
        torch.testing.assert_close(adapter.base_layer.weight, original[f"{name}.weight"] + adapter.delta_weight())
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.mul_(3)
    with sm.merged():  # (R is float32: merged and adapted forwards differ by its rounding, stale R by ~1)
        torch.testing.assert_close(sm(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sm.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-5)


def test_a_state_dict_holds_the_unmerged_weight_and_loads_into_a_merged_model():
    sm, original = _prepared()
    x = forget_batches(seed=7)[0][0]
    adapted = sm(x)
    sm.merge_adapters()
    state = {key: value.clone() for key, value in sm.state_dict().items()}
    for name in sm.adapters:
        assert torch.equal(state[f"model.{name}.base_layer.weight"], original[f"{name}.weight"])
    twin, _ = _prepared(seed=1)  # other R, unmerged
    twin.load_state_dict(state)
    torch.testing.assert_close(twin(x), adapted)
    twin.merge_adapters()  # loading into a merged model: the loaded weight and R, merged
    state[f"model.7.base_layer.weight"].zero_()
    twin.load_state_dict(state)
    assert twin.adapters["7"].merged
    torch.testing.assert_close(twin.adapters["7"].base_layer.weight, twin.adapters["7"].delta_weight())
    twin.unmerge_adapters()
    assert twin.adapters["7"].base_layer.weight.abs().max() == 0
    twin.merge_adapters()
    kept = {key: value.clone() for key, value in state.items()}
    twin.load_state_dict(state, assign=True)  # the caller's tensors become the weights: merged into a copy
    assert all(torch.equal(state[key], value) for key, value in kept.items())
    assert twin.adapters["7"].merged
    sm.half()  # a merged model cast: its state dict holds the weights in their new dtype
    assert all(value.dtype == torch.float16 for key, value in sm.state_dict().items() if "base_layer.weight" in key)


def test_an_adapter_takes_its_input_by_the_base_layer_s_keyword():
    sm, _ = _prepared()
    x = forget_batches(seed=7)[0][0]
    h = torch.randn(4, 24)
    linear, conv = sm.adapters["7"], sm.adapters["0"]
    assert torch.equal(linear(input=h), linear(h)) and torch.equal(conv(input=x), conv(x))
    with pytest.raises(TypeError, match="takes one input"):
        linear(h, h)
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    from semu_fast.adapters import SEMUConv1D

    layer = Conv1D(5, 3)  # transformers' forward(self, x)
    adapter = SEMUConv1D(layer, torch.randn(5, 2), torch.randn(2, 3))
    with torch.no_grad():
        adapter.R.normal_()
    z = torch.randn(4, 3)
    assert torch.equal(adapter(x=z), adapter(z))
    adapter.disabled = True
    assert torch.equal(adapter(x=z), layer(z))


def test_merge_and_unload_gives_a_plain_model_with_merged_weights():
    sm, original = _prepared()
    x = forget_batches(seed=7)[0][0]
    adapted = sm(x)
    model = sm.merge_and_unload()
    assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in model.modules())
    assert torch.allclose(model(x), adapted, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(model[0].weight, original["0.weight"])


def test_unload_after_merge_restores_the_original_bit_exact():
    sm, original = _prepared()
    sm.merge_adapters()
    model = sm.unload()
    assert_same_state(model, original)


def test_adapted_model_compiles_without_graph_breaks():
    sm, _ = _prepared()
    x = forget_batches(seed=8)[0][0]
    expected = sm(x)
    compiled = torch.compile(sm, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), expected, atol=1e-6)
    loss = compiled(x).square().mean()
    loss.backward()
    assert all(a.R.grad is not None and a.R.grad.abs().sum() > 0 for a in sm.adapters.values())
