"""Property-based checks (hypothesis) of every sf.ops op against the float64 references, over shapes, dtypes,
strides and spectra drawn at random."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import semu_fast as sf  # noqa: E402
from semu_fast.ops import reference  # noqa: E402
from conftest import assert_close_to_reference  # noqa: E402

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])
SHAPES = st.lists(st.integers(1, 40), min_size=1, max_size=4).map(tuple)


def _tensor(seed, shape, dtype, transpose):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape[::-1] if transpose else shape, generator=gen)
    return (t.permute(*reversed(range(t.dim()))) if transpose else t).to(dtype)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=SHAPES, dtype=DTYPES, transpose=st.booleans(), seed=st.integers(0, 2**31))
def test_accumulate_property(shape, dtype, transpose, seed):
    grad = _tensor(seed, shape, dtype, transpose)
    acc = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    expected = acc.clone()
    reference.accumulate_([expected], [grad])
    sf.ops.accumulate_([acc], [grad])
    assert torch.equal(acc, expected)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=SHAPES, wdtype=DTYPES, transpose=st.booleans(), seed=st.integers(0, 2**31),
       mode=st.sampled_from(["orthogonal", "official", "none"]))
def test_project_property(shape, wdtype, transpose, seed, mode):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    weight = _tensor(seed + 1, shape, wdtype, transpose)
    (expected,) = reference.project_perpendicular([grad], [weight], mode)
    energies = sf.ops.project_perpendicular_([grad], [weight], mode)
    assert torch.allclose(grad, expected, rtol=2e-7, atol=2e-7 * expected.abs().max().item())
    assert energies[0].item() == pytest.approx(grad.double().square().sum().item(), rel=1e-12, abs=1e-30)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(b=st.integers(1, 6), m=st.integers(1, 70), n=st.integers(1, 30), seed=st.integers(0, 2**31),
       rank=st.integers(0, 30))
def test_gram_svd_property(b, m, n, seed, rank):
    gen = torch.Generator().manual_seed(seed)
    r = min(rank, m, n)
    G = torch.randn(b, m, r, generator=gen, dtype=torch.float64) @ torch.randn(b, r, n, generator=gen,
                                                                                 dtype=torch.float64)
    U, S, Vh = sf.ops.gram_svd(G)
    S_ref = torch.linalg.svdvals(G)
    scale = S_ref[:, :1].clamp(min=1e-300)
    err = (S - S_ref).abs() / scale
    resolved = S_ref > 1e-6 * scale  # below that, the Gram route may return 0 (documented cut-off at 1e-7)
    assert (err[resolved] <= 1e-9).all() and (err <= 1e-6).all()
    assert torch.allclose(torch.bmm(U * S.unsqueeze(1), Vh), G, atol=1e-8 * max(1.0, G.abs().max().item()))


def _grads(fn, x, W, U, R, Vh, b, dy):
    """(y, dx, dR) of <fn(x, W, U, R, Vh, b), dy>."""
    x, R = x.detach().requires_grad_(True), R.detach().requires_grad_(True)
    y = fn(x, W, U, R, Vh, b)
    y.backward(dy.to(y.dtype))
    return y, x.grad, R.grad


def _cast_keeping_layout(x, dtype):
    """x in `dtype`, still strided: .to() returns a contiguous copy of a view with gaps."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x.to(dtype)
    strided = torch.empty(*x.shape, 3, dtype=dtype)[..., 1].copy_(x)
    assert not strided.is_contiguous()
    return strided


def _check_adapter_op(fn, ref_fn, x, W, U, R, Vh, b, dy, dtype):
    """The op in `dtype` (factors in float32, as adapters keep them) against the float64 reference, with the plain
    dtype computation setting the tolerance. A strided x reaches the op strided."""
    refs = _grads(ref_fn, x, W, U, R, Vh, b, dy)
    xd = _cast_keeping_layout(x, dtype)
    plains = _grads(ref_fn, xd, W.to(dtype), U.to(dtype), R.to(dtype), Vh.to(dtype), b.to(dtype), dy)
    gots = _grads(fn, xd, W.to(dtype), U.float(), R.float(), Vh.float(), b.to(dtype), dy)
    for what, got, plain, ref in zip(("y", "dx", "dR"), gots, plains, refs):
        assert_close_to_reference(got.to(dtype), plain, ref, what)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(out=st.integers(1, 48), inp=st.integers(1, 48), k=st.integers(1, 24), lead=st.lists(st.integers(1, 5),
       max_size=2).map(tuple), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       transpose=st.booleans(), seed=st.integers(0, 2**31))
def test_lowrank_linear_property(out, inp, k, lead, dtype, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    W, U, R, Vh, b = r(out, inp), r(out, k), r(k, k), r(k, inp), r(out)
    x = r(*lead, inp, 3).transpose(-1, -2)[..., 1, :] if transpose else r(*lead, inp)  # strided rows when transposed
    _check_adapter_op(sf.ops.lowrank_linear, reference.lowrank_linear, x, W, U, R, Vh, b, r(*lead, out), dtype)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(cin=st.integers(1, 6), out=st.integers(1, 12), kh=st.integers(1, 3), kw=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), channels_last=st.booleans(),
       seed=st.integers(0, 2**31), data=st.data())
def test_lowrank_conv2d_property(cin, out, kh, kw, stride, padding, dilation, dtype, channels_last, seed, data):
    k = data.draw(st.integers(1, kh * kw), label="k")
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    W, U, R, Vh, b = r(out, cin, kh, kw), r(cin, out, k), r(cin, k, k), r(cin, k, kh * kw), r(out)
    x = r(2, cin, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = dict(stride=stride, padding=padding, dilation=dilation)
    dy = reference.lowrank_conv2d(x, W, U, R, Vh, b, **args).detach().clone().normal_(generator=gen)
    _check_adapter_op(lambda *a: sf.ops.lowrank_conv2d(*a, **args), lambda *a: reference.lowrank_conv2d(*a, **args),
                      x, W, U, R, Vh, b, dy, dtype)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 60), n=st.integers(1, 60), decay=st.floats(0.0, 3.0), gamma=st.floats(0.05, 1.0),
       rule=st.sampled_from(["at_least", "official"]), batch=st.sampled_from([(), (3,)]), seed=st.integers(0, 2**31))
def test_truncated_svd_property(m, n, decay, gamma, rule, batch, seed):
    """Spectra from flat (decay 0) to steep: the rank is the reference's and the kept factors are the leading ones."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(*batch, m, r, generator=gen, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(*batch, n, r, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.exp(-decay * torch.arange(r, dtype=torch.float64)) * (1 + 0.01 * torch.rand(r, generator=gen))
    G = (Q1 * spectrum) @ Q2.transpose(-1, -2)
    result = sf.ops.truncated_svd(G, gamma, rule)
    _, S_ref, _, k_ref = reference.truncated_svd(G, gamma, rule)
    assert torch.equal(torch.as_tensor(result.ranks).reshape(k_ref.shape), k_ref)
    k = result.U.shape[-1]
    assert k == int(k_ref.max()) and torch.isfinite(result.S).all()
    torch.testing.assert_close(result.S, S_ref[..., :k], rtol=1e-9, atol=1e-12)
    for i in range(int(torch.tensor(batch).prod()) if batch else 1):  # each kept part equals the reference's
        idx = (i,) if batch else ()
        ki = int(k_ref[idx])
        U, S, Vh = torch.linalg.svd(G[idx], full_matrices=False)
        expected = (U[:, :ki] * S[:ki]) @ Vh[:ki]
        got = (result.U[idx][:, :ki] * result.S[idx][:ki]) @ result.Vh[idx][:ki]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
