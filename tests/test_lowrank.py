import pytest
import torch
import torch.nn.functional as F

import semu_fast as sf
from semu_fast import reference
from conftest import assert_close_to_reference


def _linear_args(gen, out, inp, k, dtype=torch.float64):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return r(out, inp).to(dtype), r(out, k), r(k, k), r(k, inp), r(out).to(dtype)


@pytest.mark.parametrize("out, inp, k, lead", [(7, 5, 1, (3,)), (33, 17, 8, (2, 4)), (16, 64, 16, (5,)),
                                               (10, 3, 3, ())])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lowrank_linear_matches_materialised_reference(gen, out, inp, k, lead, dtype):
    W, U, R, Vh, b = _linear_args(gen, out, inp, k)
    x = torch.randn(*lead, inp, generator=gen, dtype=torch.float64)
    ref64 = reference.lowrank_linear(x, W, U, R, Vh, b)
    cast = [t.to(dtype) for t in (x, W, U, R, Vh, b)]
    plain = reference.lowrank_linear(*cast)
    got = sf.ops.lowrank_linear(cast[0], cast[1], U.float(), R.float(), Vh.float(), cast[5])
    assert got.dtype == dtype
    assert_close_to_reference(got, plain, ref64)


def test_lowrank_linear_noncontiguous_input(gen):
    W, U, R, Vh, b = _linear_args(gen, 12, 9, 4)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64).t()
    assert torch.allclose(sf.ops.lowrank_linear(x, W, U, R, Vh, b), reference.lowrank_linear(x, W, U, R, Vh, b))


def test_lowrank_linear_gradients_by_gradcheck(gen):
    W, U, R, Vh, b = _linear_args(gen, 6, 5, 3)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    for t in (x, W, U, R, Vh, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(sf.ops.lowrank_linear, (x, W, U, R, Vh, b))


@pytest.mark.parametrize("cin, out, kernel, k, stride, padding, dilation", [
    (3, 8, 3, 2, 1, 1, 1), (5, 4, 1, 1, 1, 0, 1), (4, 6, 3, 3, 2, 2, 2), (2, 5, (3, 1), 2, 1, "same", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_conv2d_matches_reference(gen, cin, out, kernel, k, stride, padding, dilation, dtype):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    W, U, R, Vh, b = r(out, cin, kh, kw), r(cin, out, k), r(cin, k, k), r(cin, k, kh * kw), r(out)
    x = r(2, cin, 9, 8)
    args = dict(stride=stride, padding=padding, dilation=dilation)
    ref64 = reference.lowrank_conv2d(x, W, U, R, Vh, b, **args)
    cast = [t.to(dtype) for t in (x, W, U, R, Vh, b)]
    plain = reference.lowrank_conv2d(*cast, **args)
    got = sf.ops.lowrank_conv2d(*cast, **args)
    assert_close_to_reference(got, plain, ref64)


def test_conv_delta_is_per_input_channel_product(gen):
    cin, out, k = 3, 4, 2
    U, R, Vh = (torch.randn(cin, out, k, generator=gen), torch.randn(cin, k, k, generator=gen),
                torch.randn(cin, k, 9, generator=gen))
    delta = reference.conv_delta_weight(U, R, Vh, (3, 3))
    for n in range(cin):
        assert torch.allclose(delta[:, n].reshape(out, 9), U[n] @ R[n] @ Vh[n], atol=1e-6)


def test_lowrank_conv2d_gradients_by_gradcheck(gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    args = (r(1, 2, 5, 5), r(3, 2, 3, 3), r(2, 3, 2), r(2, 2, 2), r(2, 2, 9), r(3))
    assert torch.autograd.gradcheck(lambda *a: sf.ops.lowrank_conv2d(*a, padding=1), args)


def test_lowrank_ops_reject_bad_shapes(gen):
    W, U, R, Vh, b = _linear_args(gen, 6, 5, 3)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="R must be square"):
        sf.ops.lowrank_linear(x, W, U, R[:, :2], Vh, b)
    with pytest.raises(ValueError, match="must agree on in"):
        sf.ops.lowrank_linear(torch.randn(2, 4, dtype=torch.float64), W, U, R, Vh, b)
    with pytest.raises(ValueError, match="match R's k"):
        sf.ops.lowrank_linear(x, W, U[:, :2], R, Vh, b)
    with pytest.raises(TypeError, match="floating"):
        sf.ops.lowrank_linear(x.long(), W, U, R, Vh, b)
    with pytest.raises(ValueError, match="groups must be 1"):
        sf.ops.lowrank_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(2, 4, 1),
                              torch.randn(2, 1, 1), torch.randn(2, 1, 9), groups=2)
    with pytest.raises(ValueError, match="channels"):
        sf.ops.lowrank_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(2, 4, 1),
                              torch.randn(2, 1, 1), torch.randn(2, 1, 9))


def test_lowrank_linear_never_forms_the_weight(gen):
    """The delta path multiplies by Vh, R and U in turn: no (out, in) tensor is ever created."""
    W, U, R, Vh, b = _linear_args(gen, 300, 200, 2, torch.float32)
    x, U, R, Vh = torch.randn(4, 200), U.float(), R.float(), Vh.float()
    inputs = {t.data_ptr() for t in (x, W, U, R, Vh, b)}
    shapes = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.data_ptr() not in inputs:
                shapes.append(tuple(result.shape))
            return result

    with Spy():
        sf.ops.lowrank_linear(x, W, U, R, Vh, b)
    assert shapes and (4, 300) in shapes, shapes
    assert (300, 200) not in shapes, shapes
