import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import semu_fast as sf
from semu_fast.ops import reference
from conftest import DEVICES, assert_close_to_reference, interpreter_ok, triton_device


def _linear_args(gen, out, inp, k, dtype=torch.float64):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return r(out, inp).to(dtype), r(out, k), r(k, k), r(k, inp), r(out).to(dtype)


def _train_step(fn, x, params, dy):
    """y = fn(x, *params) and the gradients of <y, dy> for x and R (params[2])."""
    x = x.detach().requires_grad_(True)
    R = params[2].detach().requires_grad_(True)
    y = fn(x, *params[:2], R, *params[3:])
    y.backward(dy.to(y.dtype))
    return y, x.grad, R.grad


@pytest.mark.parametrize("out, inp, k, lead", [(7, 5, 1, (3,)), (33, 17, 8, (2, 4)), (16, 64, 16, (5,)),
                                               (10, 3, 3, ()), (257, 300, 256, (9,)), (65, 129, 64, (3, 7))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_linear_forward_and_backward_match_reference(gen, out, inp, k, lead, dtype, device):
    """y, dx and dR in each dtype against the float64 materialised adapter (R random so every term counts)."""
    W, U, R, Vh, b = _linear_args(gen, out, inp, k)
    x = torch.randn(*lead, inp, generator=gen, dtype=torch.float64)
    dy = torch.randn(*lead, out, generator=gen, dtype=torch.float64)
    refs = _train_step(reference.lowrank_linear, x, (W, U, R, Vh, b), dy)
    plains = _train_step(reference.lowrank_linear, x.to(dtype), [t.to(dtype) for t in (W, U, R, Vh, b)], dy)
    factors = [t.to(device) for t in (W.to(dtype), U.float(), R.float(), Vh.float(), b.to(dtype))]
    gots = _train_step(sf.ops.lowrank_linear, x.to(dtype).to(device), factors, dy.to(device))
    assert gots[0].dtype == gots[1].dtype == dtype and gots[2].dtype == torch.float32
    for what, got, plain, ref in zip(("y", "dx", "dR"), gots, plains, refs):
        assert_close_to_reference(got if what != "dR" else got.to(dtype), plain, ref, what)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded-3d"])
def test_lowrank_linear_noncontiguous_input(gen, layout):
    W, U, R, Vh, b = _linear_args(gen, 12, 9, 4)
    base = torch.randn(9, 14, generator=gen, dtype=torch.float64)
    x = {"transposed": base.t(), "sliced": base.t()[::2],
         "expanded-3d": base.t()[:3].unsqueeze(0).expand(2, 3, 9)}[layout]
    assert not x.is_contiguous()
    dy = torch.randn(*x.shape[:-1], 12, generator=gen, dtype=torch.float64)
    for got, ref in zip(_train_step(sf.ops.lowrank_linear, x, (W, U, R, Vh, b), dy),
                        _train_step(reference.lowrank_linear, x, (W, U, R, Vh, b), dy)):
        torch.testing.assert_close(got, ref)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel, padding, dilation, unbatched", [(3, 1, 1, False), ((2, 4), "same", 1, False),
                                                                  (3, "same", 2, True), (1, "valid", 1, False)])
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_conv2d_gradients_match_reference(gen, dtype, kernel, padding, dilation, unbatched, device):
    """dx and dR through the conv weight gradient contracted with U and Vh, in each dtype."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    cin, out, k = 4, 70, min(3, kh * kw)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    W, U, R, Vh, b = r(out, cin, kh, kw), r(cin, out, k), r(cin, k, k), r(cin, k, kh * kw), r(out)
    x = r(cin, 7, 8) if unbatched else r(2, cin, 7, 8)
    args = dict(padding=padding, dilation=dilation)
    ref_fn = lambda x, *p: reference.lowrank_conv2d(x, *p, **args)  # noqa: E731
    dy = ref_fn(x, W, U, R, Vh, b).detach().clone().normal_(generator=gen)
    refs = _train_step(ref_fn, x, (W, U, R, Vh, b), dy)
    plains = _train_step(ref_fn, x.to(dtype), [t.to(dtype) for t in (W, U, R, Vh, b)], dy)
    gots = _train_step(lambda x, *p: sf.ops.lowrank_conv2d(x, *p, **args), x.to(dtype).to(device),
                       [t.to(device) for t in (W.to(dtype), U.float(), R.float(), Vh.float(), b.to(dtype))],
                       dy.to(device))
    assert gots[2].dtype == torch.float32
    for what, got, plain, ref in zip(("y", "dx", "dR"), gots, plains, refs):
        assert_close_to_reference(got.to(dtype), plain, ref, what)


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
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1, got stride \(2, 2\)"):  # as F.conv2d
        sf.ops.lowrank_conv2d(torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(2, 4, 1),
                              torch.randn(2, 1, 1), torch.randn(2, 1, 9), stride=2, padding="same")


    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in\), got a 0-d tensor"):
        sf.ops.lowrank_linear(torch.tensor(1.0, dtype=torch.float64), W, U, R, Vh, b)
    with pytest.raises(ValueError, match="padding must be an int or a pair of ints, got 1.0"):
        sf.ops.lowrank_conv2d(torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(2, 4, 1),
                              torch.randn(2, 1, 1), torch.randn(2, 1, 9), padding=1.0)


def test_lowrank_linear_with_no_input_features_is_the_bias(gen):
    W, U, R, Vh, b = _linear_args(gen, 6, 0, 2)
    x = torch.randn(3, 4, 0, dtype=torch.float64, requires_grad=True)
    y = sf.ops.lowrank_linear(x, W, U, R, Vh, b)
    torch.testing.assert_close(y, F.linear(x, W, b), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_double_backward_through_the_adapter_ops_is_refused_not_wrong(gen, op):
    """The backwards read tensors saved without history: a gradient penalty came out silently wrong (the conv's
    d/dR of ||dL/dx||^2 about half the reference)."""
    r = lambda *s, grad=False: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    if op == "linear":
        x, args = r(3, 4, grad=True), (r(5, 4), r(5, 2), r(2, 2, grad=True), r(2, 4))
        y = sf.ops.lowrank_linear(x, *args)
    else:
        x, args = r(2, 3, 6, 6, grad=True), (r(4, 3, 3, 3), r(3, 4, 2), r(3, 2, 2, grad=True), r(3, 2, 9))
        y = sf.ops.lowrank_conv2d(x, *args, padding=1)
    with pytest.raises(RuntimeError, match=f"lowrank_{op}.* has no double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_lowrank_conv2d_backward_with_factors_of_mixed_dtypes(gen):
    """The forward took U in float64 with R, Vh in float32; the backward raised 'expected scalar type Double'."""
    x = torch.randn(2, 3, 6, 6, generator=gen)
    W = torch.randn(4, 3, 3, 3, generator=gen)
    U = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    R = torch.randn(3, 2, 2, generator=gen, requires_grad=True)
    Vh = torch.randn(3, 2, 9, generator=gen, requires_grad=True)
    sf.ops.lowrank_conv2d(x, W, U, R, Vh, padding=1).square().sum().backward()
    want = [t.detach().double().requires_grad_() for t in (U, R, Vh)]
    reference.lowrank_conv2d(x.double(), W.double(), *want, padding=1).square().sum().backward()
    for got, ref in zip((U, R, Vh), want):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_adapter_ops_under_autocast_compute_in_its_dtype_as_plain_layers_do(gen, op):
    """A Trainer with bf16=True runs the model under torch.autocast: the op's GEMMs came out in bf16 one by one
    and its in-place sum then mixed dtypes (a RuntimeError at the first step)."""
    r = lambda *s, grad=False: torch.randn(*s, generator=gen, requires_grad=grad)  # noqa: E731
    if op == "linear":
        x, W, U, Vh, b = r(4, 8, grad=True), r(6, 8), r(6, 2), r(2, 8), r(6)
        R = r(2, 2, grad=True)
        call = lambda f, *a: f(*a)  # noqa: E731
        fn, ref = sf.ops.lowrank_linear, lambda x, W, U, R, Vh, b: F.linear(x, W + U @ R @ Vh, b)  # noqa: E731
    else:
        x, W, U, Vh, b = r(2, 3, 6, 6, grad=True), r(4, 3, 3, 3), r(3, 4, 2), r(3, 2, 9), r(4)
        R = r(3, 2, 2, grad=True)
        call = lambda f, *a: f(*a, padding=1)  # noqa: E731
        fn, ref = sf.ops.lowrank_conv2d, lambda x, W, U, R, Vh, b, padding: F.conv2d(  # noqa: E731
            x, W + torch.bmm(U, torch.bmm(R, Vh)).transpose(0, 1).reshape(W.shape), b, padding=padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = call(fn, x, W, U, R, Vh, b), call(ref, x, W, U, R, Vh, b)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=5e-2)
    y.float().square().sum().backward()
    assert R.grad.dtype == torch.float32 and torch.isfinite(R.grad).all() and x.grad.dtype == torch.float32
    x64 = x.detach().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not autocast's to cast, as for F.linear
        assert call(fn, x64, W.double(), U.double(), R.detach().double(), Vh.double(), b.double()).dtype == \
            torch.float64


def _largest_allocation(fn) -> int:
    """The most bytes any single operator allocated while fn ran (CPU), kernels' insides included: the custom ops
    are opaque to TorchFunctionMode/TorchDispatchMode spies, but not to the profiler's memory accounting."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(max(e.cpu_memory_usage, e.self_cpu_memory_usage) for e in prof.events())


def test_lowrank_linear_never_forms_the_weight(gen):
    """The delta path multiplies by Vh, R and U in turn: no (out, in) tensor is ever allocated."""
    W, U, R, Vh, b = (t.float() for t in _linear_args(gen, 300, 200, 2, torch.float32))
    x = torch.randn(4, 200)
    weight_bytes = W.numel() * W.element_size()
    assert _largest_allocation(lambda: F.linear(x, W + U @ R @ Vh, b)) >= weight_bytes  # the check sees one
    assert _largest_allocation(lambda: sf.ops.lowrank_linear(x, W, U, R, Vh, b)) < weight_bytes / 4


def test_lowrank_linear_backward_never_forms_the_weight_gradient(gen):
    """Forward and backward (training R, x requiring grad): no operator allocates an (out, in) tensor."""
    W, U, R, Vh, b = (t.float() for t in _linear_args(gen, 300, 200, 2, torch.float32))
    x = torch.randn(4, 200, requires_grad=True)
    R.requires_grad_(True)
    weight_bytes = W.numel() * W.element_size()
    assert _largest_allocation(lambda: sf.ops.lowrank_linear(x, W, U, R, Vh, b).sum().backward()) < weight_bytes / 4
    assert x.grad is not None and R.grad is not None


def test_lowrank_ops_pass_opcheck(gen):
    """Schema, fake, autograd registration and aliasing of both custom ops (torch.library.opcheck)."""
    W, U, R, Vh, b = (t.float() for t in _linear_args(gen, 6, 5, 3))
    x = torch.randn(4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.semu_fast.lowrank_linear.default, (x, W, U, R.requires_grad_(True), Vh, b))
    conv = (torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3), torch.randn(3, 4, 2),
            torch.randn(3, 2, 2, requires_grad=True), torch.randn(3, 2, 9), None, [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.semu_fast.lowrank_conv2d.default, conv)
    for name, args in {"dual_matmul": (torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 2), torch.randn(2, 5),
                                       torch.randn(5)),
                       "conv_delta_add": [t.detach() for t in conv[1:5]],
                       "conv_delta_contract": (torch.randn(4, 3, 3, 3), conv[2], conv[4])
                       }.items():
        torch.library.opcheck(getattr(torch.ops.semu_fast, name).default, args)


def test_lowrank_ops_compile_without_graph_breaks(gen):
    W, U, R, Vh, b = (t.float() for t in _linear_args(gen, 6, 5, 3))
    R.requires_grad_(True)
    convR = torch.randn(3, 2, 2, requires_grad=True)
    conv = (torch.randn(4, 3, 3, 3), torch.randn(3, 4, 2), convR, torch.randn(3, 2, 9))

    def f(x, img):
        h = sf.ops.lowrank_linear(x, W, U, R, Vh, b)
        return h.square().sum() + sf.ops.lowrank_conv2d(img, *conv, padding="same").square().sum()

    x, img = torch.randn(2, 7, 5), torch.randn(2, 3, 6, 6)
    f(x, img).backward()
    expected = (R.grad.clone(), convR.grad.clone())
    R.grad = convR.grad = None
    torch.compile(f, fullgraph=True, backend="aot_eager")(x, img).backward()
    torch.testing.assert_close(R.grad, expected[0])
    torch.testing.assert_close(convR.grad, expected[1])


@pytest.mark.gpu  # on the GPU when there is one, else under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, N, K1, K2, bias, transposed", [(5, 7, 9, 1, "contiguous", False),
                                                            (40, 33, 70, 17, None, True),
                                                            (1, 64, 16, 16, "strided", True)])
def test_triton_dual_matmul_matches_reference(gen, dtype, M, N, K1, K2, bias, transposed):
    device = triton_device()
    from semu_fast.triton_kernels import lowrank as triton_lowrank

    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    a1, a2 = r(M, K1), r(M, K2)
    bb = None if bias is None else r(N) if bias == "contiguous" else r(2 * N)[::2]
    b1, b2 = (r(N, K1).t(), r(N, K2).t()) if transposed else (r(K1, N), r(K2, N))
    ref64 = a1 @ b1 + a2 @ b2 + (0 if bb is None else bb)
    cast = [None if t is None else t.to(dtype).to(device) for t in (a1, b1, a2, b2, bb)]
    if bias == "strided":  # .to() made it contiguous
        cast[4] = torch.empty(2 * N, dtype=dtype, device=device)[::2].copy_(cast[4])
        assert not cast[4].is_contiguous()
    plain = cast[0] @ cast[1] + cast[2] @ cast[3] + (0 if bb is None else cast[4])
    got = triton_lowrank.dual_matmul(*cast)
    assert got.dtype == dtype
    assert_close_to_reference(got, plain, ref64)


@pytest.mark.gpu  # on the GPU when there is one, else under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cin, out, kernel, k", [(3, 5, (3, 3), 2), (2, 70, (3, 3), 9), (4, 17, (1, 1), 1),
                                                  (2, 33, (5, 5), 20)])
def test_triton_conv_delta_kernels_match_reference(gen, dtype, cin, out, kernel, k):
    device = triton_device()
    from semu_fast.triton_kernels import lowrank as triton_lowrank

    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    P = kernel[0] * kernel[1]
    A, U, R, Vh, dW = r(out, cin, *kernel), r(cin, out, k), r(cin, k, k), r(cin, k, P), r(out, cin, *kernel)
    ref64 = A + reference.conv_delta_weight(U, R, Vh, kernel)
    plain = A.to(dtype) + reference.conv_delta_weight(U.to(dtype), R.to(dtype), Vh.to(dtype), kernel)
    on = lambda t, dt=torch.float32: t.to(dt).to(device)  # noqa: E731
    assert_close_to_reference(triton_lowrank.conv_delta_add(on(A, dtype), on(U), on(R), on(Vh)), plain, ref64,
                              "A + dW")
    Gn = dW.permute(1, 0, 2, 3).flatten(2)
    ref64 = U.transpose(1, 2) @ Gn @ Vh.transpose(1, 2)
    plain = (U.to(dtype).transpose(1, 2) @ Gn.to(dtype) @ Vh.to(dtype).transpose(1, 2))
    got = triton_lowrank.conv_delta_contract(on(dW, dtype), on(U), on(Vh))
    assert got.dtype == torch.float32
    assert_close_to_reference(got.to(dtype), plain, ref64, "dR")


def test_forcing_triton_serves_the_adapter_ops_end_to_end():
    """SEMU_FAST_IMPL=triton routes the adapters' products through the Triton kernels (interpreter on CPU)."""
    pytest.importorskip("triton")
    if interpreter_ok():
        pytest.skip(interpreter_ok())
    script = (
        "import torch, semu_fast as sf\n"
        "from semu_fast.ops import reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "r = lambda *s: torch.randn(*s, generator=g)\n"
        "for fn, ref, args in ((sf.ops.lowrank_linear, reference.lowrank_linear, (r(3, 5), r(6, 5), r(6, 2), r(2, 2), r(2, 5), r(6))),\n"
        "                      (sf.ops.lowrank_conv2d, reference.lowrank_conv2d, (r(2, 3, 5, 5), r(4, 3, 3, 3), r(3, 4, 2), r(3, 2, 2), r(3, 2, 9), r(4)))):\n"
        "    grads = []\n"
        "    for f in (fn, ref):\n"
        "        x, R = args[0].clone().requires_grad_(), args[3].clone().requires_grad_()\n"
        "        y = f(x, args[1], args[2], R, *args[4:])\n"
        "        y.square().sum().backward()\n"
        "        grads.append((y, x.grad, R.grad))\n"
        "    for a, b in zip(*grads):\n"
        "        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)\n"
        "print(sorted({sf.backends()[op]['CPU']['chosen'] for op in ('dual_matmul', 'conv_delta_add', 'conv_delta_contract')}))\n"
    )
    env = {**os.environ, "SEMU_FAST_IMPL": "triton", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['triton']"
