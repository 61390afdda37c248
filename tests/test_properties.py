"""Property-based checks (hypothesis) of the C++ ops against the float64 references, over shapes, dtypes and
strides drawn at random."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import semu_fast as sf  # noqa: E402
from semu_fast import reference  # noqa: E402

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
