import pytest
import torch

import semu_fast as sf
from semu_fast.ops import reference
from semu_fast.ops.svd import select_rank
from conftest import DEVICES, requires_cuda


def _decaying(gen, m, n, rank=None, batch=None, decay=0.7):
    """G = U diag(decay^i) V^T (+ exact rank deficiency when rank is given), float64."""
    shape = (batch,) if batch else ()
    q = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*shape, m, q, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*shape, n, q, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(q, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return U @ torch.diag_embed(s.expand(*shape, q)) @ V.transpose(-1, -2)


@pytest.mark.parametrize("rule", ["at_least", "official"])
@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_select_rank_matches_brute_force(gen, rule, gamma):
    S = torch.sort(torch.rand(50, 17, generator=gen, dtype=torch.float64) ** 4, descending=True).values
    S[3] = 0  # an all-zero spectrum: k = 0
    S[4, 5:] = 0  # rank deficient
    assert torch.equal(select_rank(S, gamma, rule), reference.select_rank(S, gamma, rule))


def test_official_rule_is_numpy_searchsorted_right_at_least_one(gen):
    S = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    ratios = reference.explained_variance(S)
    for gamma in (0.01, float(ratios[1]), 0.9, 0.99, 1.0):
        expected = max(1, int(torch.searchsorted(ratios, torch.tensor(gamma, dtype=torch.float64), right=True)))
        assert int(select_rank(S, gamma, "official")) == expected


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_official_rule_without_floor_is_plain_searchsorted(gen, method):
    """min_rank=0: the official DDPM/SD rank, searchsorted(side="right") alone; k = 0 when the first direction
    already explains more than gamma, on every path of truncated_svd."""
    S = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    ratios = reference.explained_variance(S)
    for gamma in (0.01, float(ratios[0]) - 1e-6, float(ratios[1]), 0.99, 1.0):
        expected = int(torch.searchsorted(ratios, torch.tensor(gamma, dtype=torch.float64), right=True))
        assert int(select_rank(S, gamma, "official", min_rank=0)) == expected
        assert int(select_rank(S, gamma, "official", min_rank=1)) == max(1, expected)
    G = _decaying(gen, 300, 260, decay=0.5)  # the first direction holds 75% of the energy
    result = sf.ops.truncated_svd(G, 0.5, "official", method=method, generator=gen, min_rank=0)
    assert result.S.shape == (0,) and result.U.shape == (300, 0) and result.Vh.shape == (0, 260)
    assert int(result.ranks) == 0 and float(result.captured_energy) == 0.0
    assert sf.ops.truncated_svd(G, 0.5, "official", method=method, generator=gen).S.shape == (1,)
    batch = sf.ops.truncated_svd(_decaying(gen, 12, 9, batch=3, decay=0.5), 0.5, "official", min_rank=0)
    assert batch.ranks.tolist() == [0, 0, 0] and batch.U.shape == (3, 12, 0)
    with pytest.raises(ValueError, match="min_rank must be 0 or 1"):
        sf.ops.truncated_svd(G, 0.5, "official", min_rank=2)


def test_at_least_rule_is_the_smallest_k_reaching_gamma(gen):
    S = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    ratios = reference.explained_variance(S)
    k = int(select_rank(S, 0.9, "at_least"))
    assert ratios[k - 1] >= 0.9 and (k == 1 or ratios[k - 2] < 0.9)
    # Exactly at a cumulative ratio, that k itself suffices.
    assert int(select_rank(S, float(ratios[1]), "at_least")) == 2


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (9, 9), (64, 9), (1, 5)])
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_exact_method_equals_reference_bit_for_bit(gen, shape, gamma):
    G = _decaying(gen, *shape).float()
    U, S, Vh = sf.ops.truncated_svd(G, gamma, method="exact")
    Ur, Sr, Vhr, kr = reference.truncated_svd(G, gamma)
    k = int(kr)
    assert U.shape == (shape[0], k) and S.shape == (k,) and Vh.shape == (k, shape[1])
    assert torch.equal(U, Ur[:, :k]) and torch.equal(S, Sr[:k]) and torch.equal(Vh, Vhr[:k])


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_kept_subspace_captures_at_least_gamma(gen, gamma):
    G = _decaying(gen, 60, 45)
    result = sf.ops.truncated_svd(G, gamma)
    captured = (result.U.T @ G).square().sum() / G.square().sum()
    assert captured >= gamma - 1e-12
    assert torch.allclose(result.captured_energy / result.total_energy, captured, atol=1e-12)


def test_rank_deficient_gradient_gets_its_true_rank_at_gamma_one(gen):
    G = _decaying(gen, 30, 20, rank=4, decay=0.9)
    result = sf.ops.truncated_svd(G, 0.999999)
    assert int(result.ranks) <= 4
    assert torch.allclose(result.U @ torch.diag(result.S) @ result.Vh, G, atol=1e-3)


def test_all_zero_gradient_gives_rank_zero():
    result = sf.ops.truncated_svd(torch.zeros(6, 5), 0.9)
    assert int(result.ranks) == 0 and result.U.shape == (6, 0) and result.Vh.shape == (0, 5)


def test_batched_conv_matrices_rank_each_channel(gen):
    G = _decaying(gen, 16, 9, batch=7)
    G[2] = 0  # a dead input channel
    G[3] = _decaying(gen, 16, 9, rank=1)
    result = sf.ops.truncated_svd(G.float(), 0.9)
    _, _, _, expected = reference.truncated_svd(G.float(), 0.9)
    assert torch.equal(result.ranks, expected)
    assert result.ranks[2] == 0 and result.ranks[3] == 1
    assert result.U.shape == (7, 16, int(expected.max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_in_float32(gen, dtype):
    G = _decaying(gen, 20, 12).to(dtype)
    U, S, Vh = sf.ops.truncated_svd(G, 0.9)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    _, Sr, _, kr = reference.truncated_svd(G.double(), 0.9)
    assert S.shape[-1] == int(kr)
    assert torch.allclose(S.double(), Sr[:int(kr)], rtol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"gamma": 0.0}, ValueError, "gamma must be a number in"),
    ({"gamma": 1.5}, ValueError, "gamma must be a number in"),
    ({"gamma": float("nan")}, ValueError, "gamma"),
    ({"gamma": 0.9, "rank_rule": "at_most"}, ValueError, "rank_rule must be one of"),
    ({"gamma": 0.9, "method": "magic"}, ValueError, "method must be one of"),
])
def test_truncated_svd_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf.ops.truncated_svd(torch.randn(4, 3), **kwargs)


@pytest.mark.parametrize("G, error, match", [
    (torch.randn(4), ValueError, r"\(m, n\) or \(B, m, n\)"),
    (torch.ones(3, 3, dtype=torch.int32), TypeError, "floating"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
])
def test_truncated_svd_rejects_bad_matrices(G, error, match):
    with pytest.raises(error, match=match):
        sf.ops.truncated_svd(G, 0.9)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
@pytest.mark.parametrize("method", ["exact", "gram", "randomized", "auto"])
def test_rank_and_energies_do_not_depend_on_the_scale_of_g(gen, scale, method):
    """Float32 energies overflowed for entries of 1e20 ("NaN or Inf") and underflowed to k = 0 for 1e-30."""
    G = _gradient_like(gen, 300, 280)
    gamma = 0.9
    plain = sf.ops.truncated_svd(G, gamma, method=method, generator=torch.Generator().manual_seed(0))
    scaled = sf.ops.truncated_svd(G * scale, gamma, method=method, generator=torch.Generator().manual_seed(0))
    assert int(scaled.ranks) == int(plain.ranks) > 0
    torch.testing.assert_close(scaled.S.double() / scale, plain.S.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(scaled.total_energy / scale ** 2, plain.total_energy, rtol=1e-6, atol=0)
    assert float(scaled.captured_energy / scaled.total_energy) >= gamma


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-40), (torch.float64, 1e-200), (torch.float64, 1e-300)])
@pytest.mark.parametrize("batched", [False, True])
def test_subnormal_and_tiny_float64_gradients_keep_their_rank(gen, dtype, scale, batched):
    """The first scaling multiplied by 2**133 (inf in float32) and squared 2**996 (OverflowError)."""
    G = (torch.randn(6, 20, 9, generator=gen) if batched else _gradient_like(gen, 300, 280)).to(dtype)
    plain = sf.ops.truncated_svd(G, 0.9)
    tiny = sf.ops.truncated_svd(G * scale, 0.9)
    assert torch.equal(tiny.ranks, plain.ranks)
    torch.testing.assert_close(tiny.S.double() / scale, plain.S.double(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("method", ["auto", "randomized"])
@pytest.mark.parametrize("gamma", [0.9999999, 1.0])
def test_gamma_near_one_gives_the_exact_rank_not_the_basis_width(gen, method, gamma):
    """Float32 energies of a partial basis cannot resolve such a gamma: a rank-20 G came out k = 64."""
    G = torch.randn(300, 20, generator=gen) @ torch.randn(20, 280, generator=gen)
    got = sf.ops.truncated_svd(G, gamma, method=method, generator=torch.Generator().manual_seed(1))
    exact = sf.ops.truncated_svd(G, gamma, method="exact")
    assert int(got.ranks) == int(exact.ranks)


def test_gram_method_on_an_empty_matrix_returns_it_empty():
    out = sf.ops.truncated_svd(torch.zeros(0, 5), 0.5, method="gram")
    assert out.U.shape == (0, 0) and out.Vh.shape == (0, 5) and int(out.ranks) == 0


def _gradient_like(gen, m, n, decay=0.08, noise=0.02):
    """A decaying spectrum plus a noise floor holding `noise` of the norm (fp32), like summed gradients."""
    q = min(m, n)
    U = torch.linalg.qr(torch.randn(m, q, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, q, generator=gen)).Q
    G = (U * torch.exp(-decay * torch.arange(q, dtype=torch.float32))) @ V.T
    E = torch.randn(m, n, generator=gen)
    return G + E * (noise * G.norm() / E.norm())


@pytest.mark.parametrize("shape", [(300, 500), (600, 280), (256, 256)])
@pytest.mark.parametrize("gamma", [0.8, 0.9, 0.95])
@pytest.mark.parametrize("rule", ["at_least", "official"])
@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_meets_the_contract(gen, shape, gamma, rule, device):
    G = _gradient_like(gen, *shape)
    result = sf.ops.truncated_svd(G.to(device), gamma, rule, method="randomized",
                                  generator=torch.Generator(device=device).manual_seed(0))
    _assert_meets_the_contract(G, result, gamma, rule)


@pytest.mark.parametrize("shape", [(300, 500), (600, 280)])
@pytest.mark.parametrize("gamma", [0.9, 0.95])
@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_on_a_slow_decay_estimates_the_columns_still_needed(gen, shape, gamma, device, monkeypatch):
    # The first 64-column block holds ~85% of this spectrum's energy: the finder must estimate how many more columns
    # it needs (range_finder.predicted_columns), a step the fast-decaying spectra above never reach.
    import semu_fast.ops.range_finder as range_finder

    calls = []
    real = range_finder.predicted_columns
    monkeypatch.setattr(range_finder, "predicted_columns", lambda *a: calls.append(a) or real(*a))
    G = _gradient_like(gen, *shape, decay=0.015)
    result = sf.ops.truncated_svd(G.to(device), gamma, method="randomized",
                                  generator=torch.Generator(device=device).manual_seed(0))
    assert calls, "the slow spectrum did not reach predicted_columns: the test no longer covers it"
    assert result.U.device.type == device
    _assert_meets_the_contract(G, result, gamma, "at_least")


def _assert_meets_the_contract(G, result, gamma, rule):
    U, S, Vh = (t.cpu() for t in result)
    _, S_ex, _, k_ex = reference.truncated_svd(G.double(), gamma, rule)
    k, k_ex = S.shape[-1], int(k_ex)
    total = G.double().square().sum()
    captured = ((U.double().T @ G.double()).square().sum() / total).item()
    if rule == "at_least":
        assert captured >= gamma - 1e-6  # measured exactly, against the whole G
        assert k_ex <= k <= k_ex + max(2, 0.02 * k_ex)
    else:
        assert abs(k - k_ex) <= max(2, 0.02 * k_ex)
    assert torch.allclose(S.double(), S_ex[:k], rtol=1e-3, atol=0)
    assert int(result.ranks) == k
    # U and Vh are orthonormal and reproduce G's projection.
    assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4) and torch.allclose(Vh @ Vh.T, torch.eye(k), atol=1e-4)
    assert torch.allclose(U.T @ G, S[:, None] * Vh, atol=1e-4 * S[0].item())


@pytest.mark.parametrize("device", DEVICES)
def test_auto_meets_the_contract_on_every_device(gen, device):
    """method="auto" on a matrix large enough for the cost model: it calibrates on this device (an LLM-sized probe
    on a GPU) and whichever path it takes keeps the rank rule."""
    G = _gradient_like(gen, 300, 500, decay=0.015)
    result = sf.ops.truncated_svd(G.to(device), 0.9, generator=torch.Generator(device=device).manual_seed(0))
    _assert_meets_the_contract(G, result, 0.9, "at_least")


def test_randomized_svd_is_deterministic_for_a_seed(gen):
    G = _gradient_like(gen, 400, 300)
    runs = [sf.ops.truncated_svd(G, 0.9, method="randomized", generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))


def test_randomized_svd_falls_back_to_exact_on_a_flat_spectrum(gen):
    G = torch.randn(300, 300, generator=gen)  # white noise: k approaches min(m, n)
    got = sf.ops.truncated_svd(G, 0.9, method="randomized", generator=torch.Generator().manual_seed(0))
    expected = sf.ops.truncated_svd(G, 0.9, method="exact")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_auto_uses_the_randomized_path_for_large_matrices_only(gen, monkeypatch):
    import semu_fast.ops.svd as svd_module

    calls = []
    real = svd_module._randomized
    monkeypatch.setattr(svd_module, "_randomized", lambda *a: calls.append(a[0].shape) or real(*a))
    sf.ops.truncated_svd(_gradient_like(gen, 300, 260), 0.9)
    sf.ops.truncated_svd(_gradient_like(gen, 100, 260), 0.9)
    sf.ops.truncated_svd(_gradient_like(gen, 300, 260)[None].expand(2, -1, -1), 0.9)
    assert calls == [(300, 260)]


def test_randomized_rejects_batches():
    with pytest.raises(ValueError, match="2-D"):
        sf.ops.truncated_svd(torch.randn(2, 30, 20), 0.9, method="randomized")


# --- the hinted path (rank_hint: a Linear gradient's rank is at most the rows it saw) -------------------------------

def _few_rows_gradient(gen, m, n, rows, perturbation):
    """dY^T X summed over `rows` rows (rank <= rows), minus a full-rank part holding `perturbation` of the norm (what
    the perpendicular projection subtracts, c W), float32."""
    dY = torch.randn(rows, m, generator=gen) * torch.linspace(2.0, 0.1, rows)[:, None]
    G = dY.T @ torch.randn(rows, n, generator=gen)
    W = torch.randn(m, n, generator=gen)
    return G - W * (perturbation * G.norm() / W.norm())


@pytest.mark.parametrize("shape", [(300, 700), (700, 300), (400, 400)])
@pytest.mark.parametrize("perturbation", [0.0, 1e-3, 3e-2])
@pytest.mark.parametrize("rule", ["at_least", "official"])
@pytest.mark.parametrize("method, device", [("auto", "cpu"), ("randomized", "cpu"),  # on a GPU, auto's plan follows
                                            pytest.param("randomized", "cuda", marks=requires_cuda)])  # its costs
def test_hinted_path_matches_the_exact_svd(gen, monkeypatch, shape, perturbation, rule, method, device):
    """Given the rows behind G as rank_hint, one sketch replaces the adaptive blocks: same k as the exact SVD (or
    one more: the energy it leaves out may move the cut by one), the kept energy >= gamma measured against the whole
    G, the leading singular values and the kept subspace as the exact SVD's, orthonormal factors."""
    import semu_fast.ops.svd as svd_module

    outcomes = []
    real = svd_module._hinted
    monkeypatch.setattr(svd_module, "_hinted", lambda *a: outcomes.append(real(*a)) or outcomes[-1])
    G = _few_rows_gradient(gen, *shape, rows=60, perturbation=perturbation)
    result = sf.ops.truncated_svd(G.to(device), 0.9, rule, method=method, rank_hint=60,
                                  generator=torch.Generator(device=device).manual_seed(0))
    assert len(outcomes) == 1 and outcomes[0] is not None  # the hinted path ran and its result stood
    U, S, Vh = (t.cpu() for t in result)
    U_ex, S_ex, Vh_ex, k_ex = reference.truncated_svd(G.double(), 0.9, rule)
    k, k_ex = S.shape[-1], int(k_ex)
    assert k_ex <= k <= k_ex + 1 if rule == "at_least" else abs(k - k_ex) <= 1
    total = G.double().square().sum()
    if rule == "at_least":
        assert ((U.double().T @ G.double()).square().sum() / total).item() >= 0.9 - 1e-6
    lead = min(k, k_ex)
    assert torch.allclose(S[:lead].double(), S_ex[:lead], rtol=1e-4, atol=1e-6 * S_ex[0].item())
    overlap = torch.linalg.matrix_norm(U[:, :lead].double().T @ U_ex[:, :lead]) ** 2 / lead
    assert overlap > 1 - 1e-3
    assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4) and torch.allclose(Vh @ Vh.T, torch.eye(k), atol=1e-4)
    assert int(result.ranks) == k and not torch.isnan(result.captured_energy)


@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
@pytest.mark.parametrize("rule", ["at_least", "official"])
@pytest.mark.parametrize("gamma", [0.9, 0.95])
def test_a_flat_tail_outside_the_hint_is_accepted_by_the_rank_bound(gen, monkeypatch, shape, rule, gamma):
    """A projection's full-rank part spreads energy over every direction outside the sketch: too much for the
    residual test, yet the rank bound (basis energies between G's and G's minus what the basis misses) keeps k
    within max(1, 1%) of exact. With HINT_RESIDUAL 0 only that bound can accept."""
    import semu_fast.ops.svd as svd_module

    monkeypatch.setattr(svd_module, "HINT_RESIDUAL", 0.0)
    G = _few_rows_gradient(gen, *shape, rows=100, perturbation=5e-2)
    total = float(G.double().square().sum())
    result = svd_module._hinted(G, total, gamma, rule, 1, torch.Generator().manual_seed(0), 100)
    assert result is not None
    k, k_ex = result.S.shape[-1], int(reference.truncated_svd(G.double(), gamma, rule)[3])
    assert k_ex <= k <= k_ex + max(1, k // 100) if rule == "at_least" else abs(k - k_ex) <= max(1, k // 100)
    U = result.U.double()
    if rule == "at_least":
        assert ((U.T @ G.double()).square().sum() / total).item() >= gamma - 1e-6
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("method", ["auto", "randomized"])
def test_a_wrong_rank_hint_costs_time_not_accuracy(gen, monkeypatch, method):
    """A hint far below G's rank (a weight also used outside its layer's forward): the energy left outside the sketch
    shows it, the hinted result is dropped and the other paths give the exact rank."""
    import semu_fast.ops.svd as svd_module

    outcomes = []
    real = svd_module._hinted
    monkeypatch.setattr(svd_module, "_hinted", lambda *a: outcomes.append(real(*a)) or outcomes[-1])
    G = _few_rows_gradient(gen, 300, 500, rows=200, perturbation=0.0)
    got = sf.ops.truncated_svd(G, 0.95, method=method, generator=torch.Generator().manual_seed(0), rank_hint=20)
    assert outcomes == [None]
    assert int(got.ranks) == int(reference.truncated_svd(G.double(), 0.95, "at_least")[3])


def test_rank_hint_at_or_above_the_dimensions_changes_nothing(gen):
    G = _few_rows_gradient(gen, 300, 280, rows=270, perturbation=1e-3)
    for hint in (270, 280, 10_000):
        got = sf.ops.truncated_svd(G, 0.9, generator=torch.Generator().manual_seed(0), rank_hint=hint)
        expected = sf.ops.truncated_svd(G, 0.9, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("hint, G, match", [
    (0, torch.randn(30, 20), "rank_hint must be an int >= 1 or None"),
    (-3, torch.randn(30, 20), "rank_hint must be an int >= 1 or None"),
    (True, torch.randn(30, 20), "rank_hint must be an int >= 1 or None"),
    (2.5, torch.randn(30, 20), "rank_hint must be an int >= 1 or None"),
    (4, torch.randn(2, 30, 20), "rank_hint applies to a 2-D G"),
])
def test_truncated_svd_rejects_bad_rank_hints(hint, G, match):
    with pytest.raises(ValueError, match=match):
        sf.ops.truncated_svd(G, 0.9, rank_hint=hint)


@pytest.mark.parametrize("shape", [(40, 1000), (100, 150), (8, 16), (1, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_svd_matches_the_full_svd(gen, shape, dtype):
    from semu_fast.ops.range_finder import wide_svd

    B = torch.randn(*shape, generator=gen, dtype=torch.float64)
    U, S, Vh = wide_svd(B.to(dtype))
    S_ex = torch.linalg.svdvals(B)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert U.dtype == S.dtype == Vh.dtype == dtype and Vh.shape == (shape[0], shape[1])
    assert torch.allclose(S.double(), S_ex, rtol=tol, atol=tol * S_ex[0].item())
    assert torch.allclose(wide_svd(B.to(dtype), compute_uv=False).double(), S_ex, rtol=tol, atol=tol * S_ex[0].item())
    assert torch.allclose((U * S) @ Vh, B.to(dtype), atol=tol * 10 * S_ex[0].item())
    assert torch.allclose(Vh @ Vh.T, torch.eye(shape[0], dtype=dtype), atol=tol * 10)


# --- the Gram path and the cost model -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(300, 500), (600, 280), (256, 256), (40, 1000)])
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("rule", ["at_least", "official"])
@pytest.mark.parametrize("device", DEVICES)
def test_gram_path_matches_the_exact_svd(gen, shape, gamma, rule, device):
    """Same k as the exact SVD (up to max(2, 2%) near the cut), the kept energy >= gamma measured against the whole
    G, the leading singular values to 1e-4 and orthonormal factors."""
    G = _gradient_like(gen, *shape)
    U, S, Vh = (t.cpu() for t in sf.ops.truncated_svd(G.to(device), gamma, rule, method="gram"))
    _, S_ex, _, k_ex = reference.truncated_svd(G.double(), gamma, rule)
    k, k_ex = S.shape[-1], int(k_ex)
    assert abs(k - k_ex) <= max(2, 0.02 * k_ex)
    total = G.double().square().sum()
    captured = ((U.double().T @ G.double()).square().sum() / total).item()
    if rule == "at_least":
        assert captured >= gamma - 1e-6
    lead = min(k, k_ex)
    assert torch.allclose(S[:lead].double(), S_ex[:lead], rtol=1e-4, atol=1e-6 * S_ex[0].item())
    assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4) and torch.allclose(Vh @ Vh.T, torch.eye(k), atol=1e-4)


def test_gram_path_refuses_gamma_it_cannot_resolve(gen):
    from semu_fast.ops.svd import GRAM_MAX_GAMMA

    G = _gradient_like(gen, 50, 60)
    with pytest.raises(ValueError, match="method='gram' resolves gamma"):
        sf.ops.truncated_svd(G, (1 + GRAM_MAX_GAMMA) / 2, method="gram")
    with pytest.raises(ValueError, match="svd='gram' resolves gamma"):  # before any forget pass
        sf.SEMUConfig(svd="gram", gamma_overrides={"attn": 1.0})


def test_empty_and_wide_kernel_batches_take_the_exact_path(gen):
    empty = sf.ops.truncated_svd(torch.zeros(3, 5, 0), 0.9)
    assert empty.U.shape == (3, 5, 0) and (empty.ranks == 0).all()
    wide = torch.randn(2, 20, 81, generator=gen)  # a 9x9 kernel: n = 81 > 64, no gram_svd
    assert torch.equal(sf.ops.truncated_svd(wide, 0.9, method="gram").ranks,
                       sf.ops.truncated_svd(wide, 0.9, method="exact").ranks)


def test_plan_picks_the_cheaper_path_and_caps_the_randomized_basis():
    from semu_fast.ops.svd_plan import Costs, plan, randomized_seconds

    slow_svd = Costs(gemm=1e-11, thin_gemm=2e-11, eigh=1e-10, svd=1e-9)
    fast_svd = Costs(gemm=1e-11, thin_gemm=2e-11, eigh=1e-6, svd=1e-11)
    p, q = 2048, 5632
    first = plan((q, p), torch.device("cpu"), True, slow_svd)
    assert first.fallback == "gram" and first.seconds["gram"] < first.seconds["exact"]
    assert randomized_seconds(p, q, first.max_rank, slow_svd) < first.seconds["gram"]
    assert randomized_seconds(p, q, first.max_rank + 64, slow_svd) >= first.seconds["gram"] or first.max_rank + 64 > p
    assert plan((q, p), torch.device("cpu"), True, fast_svd).fallback == "exact"
    assert plan((q, p), torch.device("cpu"), False, slow_svd).fallback == "exact"  # gamma too close to 1
    measured = Costs(gemm=1e-11, thin_gemm=2e-11, eigh=1e-10, svd=1e-10)  # about this CPU's, per thread
    hinted = plan((q, p), torch.device("cpu"), True, measured, rank_hint=528)
    assert hinted.hinted and hinted.seconds["hinted"] < min(hinted.seconds["gram"], hinted.seconds["exact"])
    assert not plan((q, p), torch.device("cpu"), True, measured, rank_hint=2000).hinted  # costs more than Gram
    assert not plan((q, p), torch.device("cpu"), True, measured).hinted


def test_calibration_is_measured_once_and_kept_per_device(tmp_path, monkeypatch):
    from semu_fast.ops import svd_plan

    assert all(v > 0 for v in vars(svd_plan.measure(torch.device("cpu"))).values())
    steady = iter([svd_plan.Costs(1e-11, 2e-11, 1e-10, 1e-10), svd_plan.Costs(1.5e-11, 2e-11, 1e-10, 1.2e-10)])
    monkeypatch.setattr(svd_plan, "measure", lambda device: next(steady))  # the test runs on a busy machine too
    monkeypatch.setenv("SEMU_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(svd_plan, "_COSTS", {})
    measured = svd_plan.calibrate("cpu")
    assert measured == svd_plan.Costs(1e-11, 2e-11, 1e-10, 1e-10)  # the faster of the two, constant by constant
    saved = (tmp_path / "svd_costs.json").read_text()
    assert svd_plan._device_key(torch.device("cpu")) in saved
    monkeypatch.setattr(svd_plan, "_COSTS", {})
    monkeypatch.setattr(svd_plan, "measure", lambda device: pytest.fail("measured again instead of reading the file"))
    assert svd_plan.costs(torch.device("cpu")) == measured


def test_an_unsteady_calibration_serves_this_process_only(tmp_path, monkeypatch, caplog):
    """Two measurements far apart (other work competing for the cores) are not written to the cache, where they
    would set every later process's plans; this process uses the faster of each."""
    from semu_fast.ops import svd_plan

    busy = iter([svd_plan.Costs(1e-11, 3e-10, 1e-10, 1e-10), svd_plan.Costs(1e-11, 2e-11, 2e-10, 1e-10)])
    monkeypatch.setattr(svd_plan, "measure", lambda device: next(busy))
    monkeypatch.setenv("SEMU_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(svd_plan, "_COSTS", {})
    with caplog.at_level("WARNING", logger="semu_fast"):
        costs = svd_plan.calibrate("cpu")
    assert costs == svd_plan.Costs(1e-11, 2e-11, 1e-10, 1e-10)
    assert svd_plan.costs(torch.device("cpu")) == costs
    assert not (tmp_path / "svd_costs.json").exists() and "unsteady (two measurements 15.0x apart" in caplog.text


@pytest.mark.parametrize("method", ["gram", "randomized"])  # the paths with products autocast would take
def test_truncated_svd_ignores_the_caller_s_autocast(method):
    """Under autocast the range finder's and the Gram route's products would run in bfloat16: the op computes in
    float32 whatever the caller's autocast says."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(300, 40, generator=gen) @ torch.randn(40, 200, generator=gen)
    plain = sf.ops.truncated_svd(G, 0.999, method=method, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sf.ops.truncated_svd(G, 0.999, method=method, generator=torch.Generator().manual_seed(1))
    assert mixed.U.dtype == mixed.S.dtype == mixed.Vh.dtype == torch.float32
    assert mixed.U.shape == plain.U.shape
    torch.testing.assert_close(mixed.S, plain.S)
    k = mixed.U.shape[-1]
    assert (mixed.U.T @ mixed.U - torch.eye(k)).abs().max() < 1e-4


@pytest.mark.parametrize("S, rule, expected", [
    ([3.3, 2.5, 1.6, 1.4, 1.3], "official", 5),  # every ratio is <= 1: all five directions
    ([8.6, 7.7, 4.9, 1.3, 0.3, 0, 0, 0, 0, 0], "at_least", 5),  # 100% is reached at the rank, not at q
])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "batch"])
def test_gamma_one_gives_the_exact_rank_whatever_the_rounding_of_the_total(S, rule, expected, batched):
    """With sum(S^2) as the total, the last ratio cumsum/sum came out 1 + 2e-16 (official: k = 4 of 5) and the ratio
    at a rank-5 G's rank 1 - 1e-16 (at_least: k = 10, every zero direction kept). The expected ranks are exact
    arithmetic's; the reference shared the formula, so comparing against it could not see this."""
    S = torch.tensor(S, dtype=torch.float64)
    assert int(select_rank(S, 1.0, rule)) == expected
    assert int(reference.select_rank(S, 1.0, rule)) == expected
    G = torch.diag(S)[None] if batched else torch.diag(S)  # the batch takes gram_svd, the 2-D G the exact SVD
    assert torch.as_tensor(sf.ops.truncated_svd(G, 1.0, rule).ranks).flatten().tolist() == [expected]
