import pytest
import torch

import semu_fast as sf
from semu_fast.ops import svd

from conftest import DEVICES


def _batch(gen, b, m, n, dtype=torch.float32):
    G = torch.randn(b, m, n, generator=gen, dtype=torch.float64)
    if b > 2:
        G[1] = 0  # a dead input channel
        G[2] = torch.randn(m, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, n, generator=gen,
                                                                                 dtype=torch.float64)
    return G.to(dtype)


def _check_against_float64_svd(G, U, S, Vh):
    U64, S64, Vh64 = torch.linalg.svd(G.double(), full_matrices=False)
    scale = S64[..., :1].clamp(min=1e-300)
    tol = 1e-12 if S.dtype == torch.float64 else 2e-6
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert ((S.double() - S64).abs() / scale).max() <= tol
    # Up to sign, per resolved singular value: compare the rank-one pieces u s v^T, free of the sign choice.
    resolved = S64 > 1e-6 * scale
    piece = lambda u, s, vh: u.unsqueeze(-1) * (s.unsqueeze(-1) * vh).unsqueeze(-2)  # noqa: E731
    mine = piece(U.double().transpose(-1, -2), S.double(), Vh.double())
    ref = piece(U64.transpose(-1, -2), S64, Vh64)
    err = ((mine - ref).abs().amax((-1, -2)) / scale)[resolved]
    # Repeated singular values have no unique pieces; random matrices have none.
    assert err.numel() == 0 or err.max() <= 100 * tol
    # Vh rows are orthonormal even for null directions; U columns are for resolved ones, zero otherwise.
    q = S.shape[-1]
    assert torch.allclose(Vh.double() @ Vh.double().transpose(-1, -2), torch.eye(q, dtype=torch.float64).expand_as(
        Vh @ Vh.transpose(-1, -2)), atol=100 * tol)
    assert (U[~(S > 0).unsqueeze(-2).expand_as(U)] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b, m, n", [(6, 64, 9), (4, 512, 9), (3, 16, 1), (5, 64, 49), (4, 6, 9), (2, 9, 9),
                                      (3, 128, 25)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_svd_matches_torch_svd_up_to_sign(gen, device, b, m, n, dtype):
    G = _batch(gen, b, m, n, dtype).to(device)
    U, S, Vh = sf.ops.gram_svd(G)
    q = min(m, n)
    assert U.shape == (b, m, q) and S.shape == (b, q) and Vh.shape == (b, q, n) and S.dtype == dtype
    assert (S[:, :-1] >= S[:, 1:]).all()
    _check_against_float64_svd(G.cpu(), U.cpu(), S.cpu(), Vh.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_svd_low_precision_input_computes_in_float32(gen, dtype):
    G = _batch(gen, 3, 32, 9, dtype)
    U, S, Vh = sf.ops.gram_svd(G)
    assert S.dtype == torch.float32
    _check_against_float64_svd(G.float(), U, S, Vh)


def test_gram_svd_rank_deficient_channels_get_exact_zeros(gen):
    G = _batch(gen, 4, 32, 9)
    _, S, _ = sf.ops.gram_svd(G)
    assert (S[1] == 0).all()
    assert S[2, 0] > 0 and (S[2, 1:] == 0).all()


def test_gram_svd_is_deterministic(gen):
    G = _batch(gen, 8, 64, 9)
    a, b = sf.ops.gram_svd(G), sf.ops.gram_svd(G)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gram_svd_torch_fallback_agrees(gen):
    G = _batch(gen, 5, 40, 9)
    _check_against_float64_svd(G, *svd._gram_svd_torch(G))


@pytest.mark.parametrize("device", DEVICES)
def test_every_backend_gives_the_same_signs(gen, device):
    """The sign convention (each Vh row's largest-magnitude entry positive) is the kernels' and the fallback's, so
    SEMU_FAST_IMPL=torch gives the same adapters, not sign-flipped ones."""
    G = _batch(gen, 6, 20, 9).to(device)  # with a zero and a rank-one channel: their null directions are arbitrary
    U, S, Vh = sf.ops.gram_svd(G)
    U_t, S_t, Vh_t = svd._gram_svd_torch(G)
    resolved = S > 0
    assert resolved.sum() == 4 * 9 + 1
    pivots = Vh_t.gather(-1, Vh_t.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert (pivots[resolved] > 0).all()
    assert torch.allclose(Vh_t[resolved], Vh[resolved], atol=1e-5)
    assert torch.allclose(U_t, U, atol=1e-4) and torch.allclose(S_t, S, rtol=1e-5)


@pytest.mark.parametrize("G", [torch.randn(3, 4), torch.randn(2, 5, 65), torch.ones(2, 3, 3, dtype=torch.int32),
                               torch.randn(2, 0, 3), torch.randn(2, 3, 3).to(torch.float8_e5m2)])
def test_gram_svd_rejects_bad_input(G):
    with pytest.raises(ValueError, match="gram_svd: G must be"):
        sf.ops.gram_svd(G)


def test_cpp_gram_svd_checks_arguments_itself():
    with pytest.raises(RuntimeError, match="last dim n must be in"):
        torch.ops.semu_fast.gram_svd(torch.randn(2, 5, 65))
    with pytest.raises(RuntimeError, match="must be a floating tensor"):
        torch.ops.semu_fast.gram_svd(torch.randn(2, 5, 3).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e200])
def test_gram_svd_refuses_nan_inf_and_overflowing_input(value):
    """A NaN, an Inf or a float64 entry whose square overflows came out as a clean singular value 0 (n = 1)."""
    G = torch.ones(2, 3, 1, dtype=torch.float64)
    G[1, 0, 0] = value
    with pytest.raises(ValueError, match="NaN or Inf" if value != 1e200 else "Gram matrix would overflow"):
        sf.ops.gram_svd(G)
    S = torch.ops.semu_fast.gram_svd(G)[1]  # the kernel itself (no check in front) passes it on, never a clean 0
    assert S[0, 0] == 3 ** 0.5 and not torch.isfinite(S[1]).any()


def test_opcheck_gram_svd(gen):
    torch.library.opcheck(torch.ops.semu_fast.gram_svd.default, (torch.randn(3, 8, 4, generator=gen),))


def test_truncated_svd_of_conv_batches_uses_gram_and_agrees_with_exact(gen):
    G = _batch(gen, 16, 64, 9)
    fast = sf.ops.truncated_svd(G, 0.9)
    exact = sf.ops.truncated_svd(G, 0.9, method="exact")
    assert torch.equal(fast.ranks, exact.ranks)
    # fp32 LAPACK leaves ~eps * sigma_max where gram_svd returns exact zeros.
    assert torch.allclose(fast.S, exact.S, rtol=1e-5, atol=1e-5 * exact.S.max().item())
    assert torch.allclose(fast.captured_energy, exact.captured_energy, rtol=1e-6)


def test_relative_tolerance_is_the_same_in_the_kernel_and_the_fallback():
    """Singular values just above and below GRAM_SVD_REL_TOL of the largest: the C++ kernel and the torch fallback
    zero the same ones (float64, where the Gram route resolves both)."""
    U = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q
    V = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).Q
    tol = svd.GRAM_SVD_REL_TOL
    S = torch.tensor([1.0, 0.3, 3 * tol, tol / 3], dtype=torch.float64)
    G = ((U * S) @ V.T).unsqueeze(0)
    kept_kernel = sf.ops.gram_svd(G)[1] > 0
    kept_fallback = svd._gram_svd_torch(G)[1] > 0
    assert kept_kernel.tolist() == kept_fallback.tolist() == [[True, True, True, False]]


def test_auto_routes_conv_batches_to_gram_svd(gen, monkeypatch):
    calls = []
    monkeypatch.setattr(svd, "_gram_svd_checked", lambda G: calls.append(G.shape) or svd._gram_svd_torch(G))
    sf.ops.truncated_svd(_batch(gen, 4, 32, 9), 0.9)
    assert calls == [(4, 32, 9)]
    sf.ops.truncated_svd(_batch(gen, 4, 32, 9), 0.9, method="exact")
    assert len(calls) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 9, 25, 49, 55, 64])
@pytest.mark.parametrize("m_over_n", [3, 0.5], ids=["tall", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_svd_up_to_n_64_matches_float64_svd(gen, device, n, m_over_n, dtype):
    m = max(1, int(m_over_n * n))
    G = _batch(gen, 5, m, n, dtype).to(device)  # with a zero and a rank-one matrix
    U, S, Vh = torch.ops.semu_fast.gram_svd(G)
    q = min(m, n)
    assert U.shape == (5, m, q) and S.shape == (5, q) and Vh.shape == (5, q, n) and S.dtype == dtype
    assert (S[:, :-1] >= S[:, 1:]).all()
    _check_against_float64_svd(G.cpu(), U.cpu(), S.cpu(), Vh.cpu())
    again = torch.ops.semu_fast.gram_svd(G)
    assert all(torch.equal(a, b) for a, b in zip((U, S, Vh), again))


@pytest.mark.parametrize("device", DEVICES)
def test_gram_svd_of_low_precision_input_matches_its_float32_svd(gen, device):
    G = _batch(gen, 4, 100, 49, torch.bfloat16).to(device)
    U, S, Vh = torch.ops.semu_fast.gram_svd(G)
    assert S.dtype == torch.float32
    _check_against_float64_svd(G.float().cpu(), U.cpu(), S.cpu(), Vh.cpu())


@pytest.mark.parametrize("scale", [1e-40, 1e-33])
def test_tiny_float32_matrices_get_finite_orthonormal_u(gen, scale):
    """1 / sigma overflowed float32 once sigma fell below ~3e-39 (denormal entries, or a graded spectrum under tiny
    entries): U came out NaN next to finite S, and truncated_svd passed it on for a conv batch whose other channels
    kept the whole batch's energy in range (no rescaling)."""
    q1 = torch.linalg.qr(torch.randn(30, 9, generator=gen, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.logspace(0, -6.5, 9, dtype=torch.float64)  # every value above the 1e-7 cut-off
    G = torch.stack([torch.randn(30, 9, generator=gen, dtype=torch.float64),
                     (q1 * spectrum) @ q2.T * scale]).float()
    U, S, Vh = sf.ops.gram_svd(G)
    assert torch.isfinite(U).all() and (S[1] > 0).all()
    kept = U[1].double()  # the columns of sigma >= 1e-4 sigma_max are orthonormal to float32 accuracy
    lead = int((S[1] >= 1e-4 * S[1, 0]).sum())
    assert torch.allclose(kept[:, :lead].T @ kept[:, :lead], torch.eye(lead, dtype=torch.float64), atol=1e-3)
    result = sf.ops.truncated_svd(G, 0.99)
    assert torch.isfinite(result.U).all()


@pytest.mark.parametrize("rule", ["at_least", "official"])
def test_conv_batches_past_the_gram_gamma_take_the_exact_svd(rule):
    """gram_svd cuts singular values below GRAM_SVD_REL_TOL of the largest: past GRAM_MAX_GAMMA, where the kept tail
    reaches them, "auto" takes the exact SVD for a batch as it does for a matrix (a float64 batch with spectrum
    exp(-3 i) kept 6 of 10 directions at gamma 1 instead of 10), and "gram" is refused."""
    S = torch.exp(-3.0 * torch.arange(10, dtype=torch.float64))
    Q = torch.linalg.qr(torch.randn(3, 20, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    G = Q * S  # three 20 x 10 matrices with singular values S
    exact = sf.ops.truncated_svd(G, 1.0, rule, method="exact").ranks
    assert (exact > 6).all()  # float64 resolves energies down to 1e-16 of the total: 7 directions, or all 10
    assert torch.equal(sf.ops.truncated_svd(G, 1.0, rule).ranks, exact)
    with pytest.raises(ValueError, match="method='gram' resolves gamma <= 0.999"):
        sf.ops.truncated_svd(G, 0.9995, rule, method="gram")
    assert torch.equal(sf.ops.truncated_svd(G, 0.99, rule).ranks, sf.ops.truncated_svd(G, 0.99, rule,
                                                                                       method="exact").ranks)
