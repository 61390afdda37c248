import copy

import pytest
import torch
import torch.nn.functional as F

from semu_fast.gradients import accumulate_gradients
from conftest import DEVICES
from helpers import forget_batches, small_cnn, snapshot, assert_same_state


def _clone_and_sum(model, batches):
    """The official pattern: per-batch gradients cloned, then summed (float64 here, as the oracle)."""
    model = model.double()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    total = None
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
    return total


def _weights(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def test_streamed_sum_equals_clone_and_sum_in_float64():
    model, batches = small_cnn(), forget_batches()
    expected = _clone_and_sum(small_cnn(), batches)
    got = accumulate_gradients(model, batches, _weights(model))
    assert set(got) == set(_weights(model))
    for name, acc in got.items():
        ref = expected[f"{name}.weight"]
        assert acc.dtype == torch.float32
        assert torch.allclose(acc.double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_gradient_pass_leaves_model_untouched_in_eval_norm_mode():
    model, batches = small_cnn(), forget_batches()
    model.eval()
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    user_grad = torch.full_like(model[0].bias, 7.0)
    model[0].bias.grad = user_grad
    accumulate_gradients(model, batches, _weights(model))
    assert_same_state(model, before)  # BatchNorm running statistics included
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[0].bias.grad is user_grad and all(
        p.grad is None for n, p in model.named_parameters() if n != "0.bias")
    assert not any(m.training for m in model.modules())


def test_train_norm_mode_updates_running_statistics_like_the_official_code():
    model, batches = small_cnn(), forget_batches()
    before = model[1].running_mean.clone()
    accumulate_gradients(model, batches, _weights(model), norm_mode="train")
    assert not torch.equal(model[1].running_mean, before)


def test_custom_loss_fn_and_bf16_model():
    model, batches = small_cnn(dtype=torch.bfloat16), forget_batches(dtype=torch.bfloat16)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(batch[0]).float().square().mean()

    reference_model = copy.deepcopy(model).double()
    reference_model[1].eval()  # as the gradient pass runs it: norm layers in eval mode
    got = accumulate_gradients(model, batches, _weights(model), loss_fn)
    assert len(calls) == len(batches)
    expected = {}
    for x, _ in batches:  # the same loss in float64 from the same bf16 weights, summed over the batches
        reference_model.zero_grad()
        reference_model(x.double()).square().mean().backward()
        for name, layer in _weights(reference_model).items():
            expected[name] = expected.get(name, 0) + layer.weight.grad
    assert set(got) == set(expected)
    for name, acc in got.items():  # bf16 forward and backward: about 2^-8 relative, summed over 3 batches
        assert acc.dtype == torch.float32
        scale = expected[name].abs().max().item()
        assert scale > 0
        torch.testing.assert_close(acc.double(), expected[name], rtol=0, atol=0.05 * scale, msg=name)


def test_empty_loader_is_an_error_and_model_is_untouched():
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no batches"):
        accumulate_gradients(model, [], _weights(model))
    assert_same_state(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("batch, match", [
    (torch.randn(4, 3, 6, 6), r"\(inputs, targets\)"),
    ((torch.randn(4, 3, 6, 6),), r"\(inputs, targets\)"),
])
def test_unusable_batches_are_reported(batch, match):
    model = small_cnn()
    with pytest.raises(TypeError, match=match):
        accumulate_gradients(model, [batch], _weights(model))


def test_non_scalar_loss_is_reported():
    model = small_cnn()
    with pytest.raises(TypeError, match="scalar"):
        accumulate_gradients(model, forget_batches(), _weights(model), lambda m, b: m(b[0]))


def test_nan_gradient_names_the_layer():
    model = small_cnn()
    model[7].weight.register_hook(lambda g: g * float("nan"))  # only this layer's gradient goes bad
    with pytest.raises(FloatingPointError, match="layer '7'"):
        accumulate_gradients(model, forget_batches(), _weights(model))


def test_a_loss_that_is_nan_on_every_batch_is_refused_and_on_some_is_reported():
    """Cross-entropy over targets that are all ignored (-100, as in a fully masked LLM batch) is NaN with a zero
    gradient: on every batch the sums would be zero, every layer left without an adapter and nothing said why."""
    import semu_fast as sf

    model = small_cnn()
    before = snapshot(model)
    masked = [(x, torch.full_like(y, -100)) for x, y in forget_batches()]
    with pytest.raises(ValueError, match="NaN or Inf on all 3 batches.*-100"):
        sf.prepare(model, masked)
    assert_same_state(model, before)
    with pytest.warns(UserWarning, match="NaN or Inf on 1 of 4 batches"):
        grads = accumulate_gradients(model, forget_batches() + masked[:1], _weights(model))
    assert all(torch.equal(grads[n], g) for n, g in accumulate_gradients(model, forget_batches(),
                                                                         _weights(model)).items())


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 7)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_linears_stream_more_accurately_than_summing_rounded_gradients(dtype, device):
    """A half-precision Linear under a loss linear in its output (so dy = c is the same however the sum is formed):
    the streamed weight gradient, summed in float32, against the float64 sum of c^T x over the batches, next to the
    per-batch gradients autograd forms in the weight's dtype, summed. The streamed sum must be far closer."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(96, 80).to(device, dtype)  # on CUDA: cuBLAS sums the products in float32 (addmm)
    c = torch.randn(32, 80, generator=gen).to(device, dtype)
    xs = [torch.randn(32, 96, generator=gen).to(device, dtype) for _ in range(16)]
    loss_fn = lambda m, batch: (m(batch[0]) * c).float().sum()  # noqa: E731
    got = accumulate_gradients(layer, [(x,) for x in xs], {"": layer}, loss_fn)[""]
    exact = sum(c.double().T @ x.double() for x in xs)
    rounded = torch.zeros_like(exact)
    for x in xs:
        layer.weight.requires_grad_(True)
        layer.weight.grad = None
        loss_fn(layer, (x,)).backward()
        rounded += layer.weight.grad.double()  # autograd's gradient, in the weight's dtype
    err = (got.double() - exact).abs().max().item()
    err_rounded = (rounded - exact).abs().max().item()
    assert err <= 1e-5 * exact.abs().max().item() and err < err_rounded / 50, (err, err_rounded)


def test_streamed_pass_restores_the_layers_and_leaves_instance_forwards_alone():
    model = _mlp(torch.bfloat16)
    calls = []
    own = model[2].forward = lambda x: calls.append(1) or torch.nn.Linear.forward(model[2], x)  # e.g. a device hook
    flags = [p.requires_grad for p in model.parameters()]
    batches = [(torch.randn(8, 48).bfloat16(), torch.randint(0, 7, (8,)))]
    accumulate_gradients(model, batches, _weights(model))
    assert "forward" not in model[0].__dict__ and model[2].forward is own and calls == [1]  # ran, not bypassed
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_a_shared_half_precision_weight_sums_every_use_as_in_float32():
    """A weight used by two modules (a tied LM head): its gradient is the parameter's whole gradient in every dtype
    (the hook path), not one module's share."""
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11, bias=False)
    head.weight = embed.weight
    model = torch.nn.Sequential(embed, torch.nn.Tanh(), head)
    batch = [(torch.randint(0, 11, (6,)), torch.randint(0, 11, (6,)))]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        results[dtype] = accumulate_gradients(m, batch, {"2": m[2]}, lambda m, b: F.cross_entropy(
            m(b[0]).float(), b[1]))["2"]
    scale = results[torch.float32].abs().max()
    assert (results[torch.bfloat16] - results[torch.float32]).abs().max() <= 0.02 * scale


def test_streamed_and_hooked_paths_agree():
    """The same half-precision model through the streamed path (plain Linear) and the hook path (a Linear subclass
    with its own forward, which is not streamed)."""
    class OwnLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)

    model = _mlp(torch.bfloat16)
    hooked = _mlp(torch.bfloat16)
    for i in (0, 2, 4):
        own = OwnLinear(hooked[i].in_features, hooked[i].out_features).to(torch.bfloat16)
        own.load_state_dict(hooked[i].state_dict())
        hooked[i] = own
    batches = [(torch.randn(32, 48, generator=torch.Generator().manual_seed(i)).bfloat16(),
                torch.randint(0, 7, (32,), generator=torch.Generator().manual_seed(i))) for i in range(3)]
    a = accumulate_gradients(model, batches, _weights(model))
    b = accumulate_gradients(hooked, batches, _weights(hooked))
    assert set(a) == set(b) == set(_weights(model))
    for name in a:
        scale = b[name].abs().max().item()
        assert torch.allclose(a[name], b[name], rtol=0, atol=0.02 * scale), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grad_clip_scales_each_batch_like_clip_grad_norm(dtype):
    """The official DDPM gradient pass: per batch, backward, clip_grad_norm_(weights, c), then add to the sum."""
    batches = forget_batches()
    ref_model = small_cnn().double()
    ref_model.train()
    ref_model[1].eval()
    weights = [m.weight for m in _weights(ref_model).values()]
    total = [torch.zeros_like(w) for w in weights]
    norms = []
    for x, y in batches:
        ref_model.zero_grad()
        F.cross_entropy(ref_model(x.double()), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(weights, 0.1).item())
        total = [t + w.grad for t, w in zip(total, weights)]
    assert max(norms) > 0.1 > min(norms)  # clipped and unclipped batches both occur
    model = small_cnn(dtype=dtype)
    got = accumulate_gradients(model, batches if dtype == torch.float32 else
                               [(x.to(dtype), y) for x, y in batches], _weights(model), grad_clip=0.1)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float64: 1e-6}[dtype]
    assert list(got) == list(_weights(model))  # the order of `total`
    for (name, acc), ref in zip(got.items(), total):
        torch.testing.assert_close(acc.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=name)
    plain = small_cnn(dtype=dtype)
    unclipped = accumulate_gradients(plain, batches if dtype == torch.float32 else
                                     [(x.to(dtype), y) for x, y in batches], _weights(plain))
    assert any(not torch.allclose(unclipped[n], got[n]) for n in got)


def test_grad_clip_is_checked_and_refuses_split_passes():
    import semu_fast as sf

    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="grad_clip must be a finite positive number"):
            sf.SEMUConfig(grad_clip=bad)
    with pytest.raises(ValueError, match="grad_clip clips each batch's gradient over every layer at once"):
        sf.prepare(small_cnn(), forget_batches(), config=sf.SEMUConfig(grad_clip=1.0, max_accumulator_bytes=2000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_count_each_linears_inputs_and_bound_its_gradient_rank(dtype):
    """GradientSums.rows: the input rows every Linear (or Conv1D) took during the pass, over all batches and leading
    dimensions, on each of the three accumulation routes (direct float32, streamed bf16, clipped); the rank of each
    summed gradient is at most that count. A weight used by two modules and a Conv2d get no count."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    shared = torch.nn.Linear(16, 16)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(12, 40), "b": Conv1D(40, 40), "shared": shared,
                                 "tied": torch.nn.Linear(16, 16), "conv": torch.nn.Conv2d(1, 2, 3)}).to(dtype)
    model["tied"].weight = model["shared"].weight

    def loss_fn(m, batch):
        h = m["b"](m["a"](batch[0]))  # (batch, tokens, 40): rows = batch * tokens
        z = m["tied"](m["shared"](h[..., :16]))
        image = batch[0][:1, :1, :9].reshape(1, 1, 3, 3)
        return h.float().square().mean() + z.float().mean() + m["conv"](image).float().mean()

    batches = [(torch.randn(2, 3, 12).to(dtype),), (torch.randn(1, 2, 12).to(dtype),)]
    layers = dict(model.items())
    for clip in (None, 1.0):
        sums = accumulate_gradients(model, batches, layers, loss_fn, grad_clip=clip)
        assert sums.rows == {"a": 8, "b": 8}
        for name, rows in sums.rows.items():
            rounding = 1e-4 if dtype == torch.float32 else 3e-2  # Conv1D's bf16 gradients are rounded per batch
            assert torch.linalg.matrix_rank(sums[name].double(), rtol=rounding) <= rows
        assert set(sums) == set(layers)
        # The shared weight's whole gradient (both uses) reaches both names, on every route.
        reference = copy.deepcopy(model).float()
        for batch in batches:
            loss_fn(reference, (batch[0].float(),)).backward()
        expected = reference["shared"].weight.grad
        scale = 1.0 if clip is None else None
        for name in ("shared", "tied"):
            if scale is None:  # clipped per batch: the direction is kept
                assert torch.nn.functional.cosine_similarity(sums[name].flatten(), expected.flatten(), 0) > 0.9
            else:
                assert torch.allclose(sums[name], expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_an_eval_model_keeps_every_module_s_mode_so_the_pass_is_deterministic():
    """Modules that read self.training for randomness without being nn.Dropout (nn.MultiheadAttention's dropout
    here) stay in the eval mode the user left them in; a layer with gradient checkpointing on is marked training."""
    from semu_fast.gradients import set_norm_mode

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
            self.norm = torch.nn.LayerNorm(8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.norm(self.attn(x, x, x)[0]).mean(1))

    model = Block().eval()
    batches = [(torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))]
    layers = {"head": model.head, "attn.out_proj": model.attn.out_proj}
    first = accumulate_gradients(model, batches, layers)
    second = accumulate_gradients(model, batches, layers)
    assert all(torch.equal(first[n], second[n]) for n in layers)
    assert not any(m.training for m in model.modules())
    model.attn.gradient_checkpointing = True  # as transformers marks a checkpointed layer
    model.rnn = torch.nn.GRU(8, 8)  # cuDNN's RNN backward runs only in training mode
    set_norm_mode(model, "eval")
    assert model.attn.training and model.rnn.training
    assert not model.attn.out_proj.training and not model.head.training and not model.norm.training


def test_eval_mode_gives_every_module_its_own_flag_back():
    from semu_fast._utils import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    model[1].eval()  # mixed flags, as the gradient pass leaves an eval model's checkpointed layers
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_streamed_weight_used_outside_its_module_sums_that_use_too(dtype):
    """A half-precision Linear whose weight a tied decoder also uses through F.linear: the streamed gradient of the
    module's own use plus autograd's of the other, against float64 autograd."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.randn(5, 6)

    def loss_fn(m, batch):
        z = torch.tanh(m(batch[0]))
        return (F.linear(z.to(m.weight.dtype), m.weight.t()).float() - batch[1]).square().sum()

    expected = copy.deepcopy(enc).double()
    loss_fn(expected, (x.double(), y.double())).backward()
    half = copy.deepcopy(enc).to(dtype)
    got = accumulate_gradients(half, [(x.to(dtype), y)], {"": half}, loss_fn)[""]
    scale = expected.weight.grad.abs().max().item()
    torch.testing.assert_close(got.double(), expected.weight.grad, rtol=0, atol=0.02 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_linear_called_with_its_input_keyword(dtype):
    import semu_fast as sf

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(input=x)

    batches = [(torch.randn(8, 6).to(dtype), torch.randint(0, 3, (8,)))]
    sm = sf.prepare(Net().to(dtype), batches, loss_fn=lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]))
    assert sm.adapters and sm(batches[0][0]).shape == (8, 3)


@pytest.mark.parametrize("erase", ["zero_grad_in_place", "zero_grad", "submodule_zero_grad", "grad_to_none"])
def test_a_loss_fn_that_erases_gradients_is_refused_and_the_model_kept(erase):
    """A loss_fn copied from a training loop that zeroes gradients would erase the float32 layers' earlier batches,
    which sum in their own .grad (zero_grad(set_to_none=False) without a trace): it is refused, the model kept."""
    model, batches = small_cnn(), forget_batches()
    saved = snapshot(model)

    def loss_fn(m, batch):
        if erase == "grad_to_none":
            for p in m.parameters():
                p.grad = None
        else:
            target = next(m.children()) if erase == "submodule_zero_grad" else m
            target.zero_grad(set_to_none=erase != "zero_grad_in_place")
        x, y = batch
        return F.cross_entropy(m(x), y)

    match = "was replaced during the pass" if erase == "grad_to_none" else "zero_grad\\(\\) was called during"
    with pytest.raises(RuntimeError, match=match):
        accumulate_gradients(model, batches, _weights(model), loss_fn=loss_fn)
    assert_same_state(model, saved)
    assert all("zero_grad" not in m.__dict__ for m in model.modules())  # the guard is gone again
    model.zero_grad()


def test_zero_grad_in_loss_fn_is_harmless_and_allowed_without_float32_layers():
    """Half-precision Linears stream their sums outside .grad: zero_grad() erases nothing there and is allowed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).bfloat16()
    layers = {"0": model[0], "2": model[2]}
    batches = [(torch.randn(4, 6).bfloat16(), torch.randint(0, 3, (4,))) for _ in range(3)]

    def loss_fn(m, batch, zero=True):
        if zero:
            m.zero_grad(set_to_none=False)
        return F.cross_entropy(m(batch[0]).float(), batch[1])

    with_zero = accumulate_gradients(model, batches, layers, loss_fn=loss_fn)
    plain = accumulate_gradients(model, batches, layers, loss_fn=lambda m, b: loss_fn(m, b, zero=False))
    for name in layers:
        assert torch.equal(with_zero[name], plain[name])
