import pytest
import torch
import torch.nn.functional as F

from semu_fast.gradients import accumulate_gradients
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
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def test_streamed_sum_equals_clone_and_sum_in_float64():
    model, batches = small_cnn(), forget_batches()
    expected = _clone_and_sum(small_cnn(), batches)
    got = accumulate_gradients(model, batches, _weights(model))
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

    got = accumulate_gradients(model, batches, _weights(model), loss_fn)
    assert len(calls) == len(batches)
    assert all(acc.dtype == torch.float32 and acc.abs().sum() > 0 for acc in got.values())


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
