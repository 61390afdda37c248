import pytest
import torch

import semu_fast as sf
from semu_fast.ops import reference
from conftest import DEVICES

SHAPES = [(5, 7), (64, 3, 3, 3), (16, 8, 1, 1), (1, 1), (130, 33)]


def _pair(gen, shape, dtype=torch.float32, strided=False):
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.randn(shape[::-1] if strided else shape, generator=gen, dtype=torch.float64)
    if strided:
        w = w.permute(*reversed(range(w.dim())))
    return g.to(dtype), w.to(dtype)


@pytest.mark.parametrize("strided", [False, True])
def test_orthogonal_projection_is_perpendicular_to_weight(gen, strided):
    grads, weights = zip(*(_pair(gen, s, torch.float64, strided) for s in SHAPES))
    for p, w, g in zip(sf.ops.project_perpendicular(grads, weights, "orthogonal"), weights, grads):
        # <P, W> relative to ||G|| ||W|| (P itself is 0 for a 1x1 weight, so no cosine).
        assert abs((p * w).sum().item()) <= 1e-12 * (g.norm() * w.norm()).item()
        # G = P + c W: what was removed is parallel to W.
        residual = g - p
        assert torch.allclose(residual, (residual * w).sum() / (w * w).sum() * w, atol=1e-12)


def test_official_projection_divides_by_the_norm_not_its_square(gen):
    g, w = _pair(gen, (20, 30), torch.float64)
    w = w * 3.0  # ||W|| != 1, so the two formulas differ
    (official,) = sf.ops.project_perpendicular([g], [w], "official")
    expected = g - (torch.sum(g * w) / torch.linalg.norm(w)) * w  # the official code, literally
    assert torch.allclose(official, expected, rtol=0, atol=1e-12)
    (orthogonal,) = sf.ops.project_perpendicular([g], [w], "orthogonal")
    assert not torch.allclose(official, orthogonal)


def test_mode_none_returns_the_gradient(gen):
    g, w = _pair(gen, (4, 6))
    (out,) = sf.ops.project_perpendicular([g], [w], "none")
    assert torch.equal(out, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_projection_in_low_precision_matches_float64_reference(gen, dtype):
    g, w = _pair(gen, (48, 40), dtype)
    (out,) = sf.ops.project_perpendicular([g], [w], "orthogonal")
    assert out.dtype == dtype
    g64, w64 = g.double(), w.double()
    ref = g64 - (g64.flatten() @ w64.flatten()) / (w64.flatten() @ w64.flatten()) * w64  # written out, not shared
    # The reduction is float64; the only error is the final rounding to dtype.
    assert torch.allclose(out.double(), ref, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_zero_weight_leaves_gradient_unchanged(gen):
    g = torch.randn(3, 4, generator=gen)
    for mode in ("orthogonal", "official"):
        (out,) = sf.ops.project_perpendicular([g], [torch.zeros(3, 4)], mode)
        assert torch.equal(out, g)


def test_projection_does_not_modify_inputs(gen):
    g, w = _pair(gen, (6, 6))
    g0, w0 = g.clone(), w.clone()
    sf.ops.project_perpendicular([g], [w])
    assert torch.equal(g, g0) and torch.equal(w, w0)


@pytest.mark.parametrize("grads, weights, mode, error, match", [
    ([torch.zeros(2, 2)], [torch.zeros(2, 3)], "orthogonal", ValueError, "shape"),
    ([torch.zeros(2, 2)], [], "orthogonal", ValueError, "same length"),
    ([torch.zeros(2, 2)], [torch.zeros(2, 2)], "parallel", ValueError, "mode must be one of"),
    ([torch.zeros(2, 2, dtype=torch.int64)], [torch.zeros(2, 2)], "orthogonal", TypeError, "floating"),
])
def test_projection_rejects_bad_input(grads, weights, mode, error, match):
    with pytest.raises(error, match=match):
        sf.ops.project_perpendicular(grads, weights, mode)


def test_opcheck_project_perpendicular(gen):
    g, w = _pair(gen, (5, 3))
    torch.library.opcheck(torch.ops.semu_fast.project_perpendicular.default, ([g], [w], "orthogonal"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["orthogonal", "official", "none"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_inplace_projection_matches_reference_and_returns_energies(gen, device, mode, wdtype):
    pairs = [_pair(gen, s, torch.float32, strided=True) for s in SHAPES + [(300, 257)]]
    grads = [g.contiguous().to(device) for g, _ in pairs]
    weights = [w.to(wdtype).to(device) for _, w in pairs]  # strided (transposed) weights
    weights[1] = torch.zeros_like(weights[1])  # a zero weight leaves its gradient alone
    expected = reference.project_perpendicular([g.cpu() for g in grads], [w.cpu() for w in weights], mode)
    energies = sf.ops.project_perpendicular_(grads, weights, mode)
    assert energies.dtype == torch.float64 and energies.shape == (len(grads),)
    for got, want, energy in zip(grads, expected, energies.cpu()):
        # The same float64 formula; only the reduction order differs: within an ulp of float32.
        assert torch.allclose(got.cpu(), want, rtol=2e-7, atol=2e-7 * want.abs().max().item())
        assert energy.item() == pytest.approx(got.double().square().sum().item(), rel=1e-12)


def test_inplace_projection_torch_fallback_agrees_with_the_kernel(gen):
    from semu_fast.ops import project

    g, w = _pair(gen, (64, 3, 3, 3))
    a, b = g.clone(), g.clone()
    ea = sf.ops.project_perpendicular_([a], [w])
    eb = project._torch([b], [w], "orthogonal")
    assert torch.allclose(a, b, rtol=2e-7, atol=1e-7) and torch.allclose(ea, eb, rtol=1e-10)


@pytest.mark.parametrize("grads, error, match", [
    ([torch.zeros(3, 3, dtype=torch.float64)], TypeError, "contiguous float32"),
    ([torch.zeros(3, 3).t()], TypeError, "non-contiguous"),
])
def test_inplace_projection_rejects_bad_accumulators(grads, error, match):
    with pytest.raises(error, match=match):
        sf.ops.project_perpendicular_(grads, [torch.zeros(3, 3)])


def test_cpp_projection_checks_arguments_itself():
    g = torch.ones(3)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.semu_fast.project_perpendicular_([g], [torch.ones(3)], "sideways")
    with pytest.raises(RuntimeError, match="has shape"):
        torch.ops.semu_fast.project_perpendicular_([g], [torch.ones(4)], "orthogonal")
    assert torch.equal(g, torch.ones(3))


def test_opcheck_inplace_projection(gen):
    g, w = _pair(gen, (6, 5))
    torch.library.opcheck(torch.ops.semu_fast.project_perpendicular_.default, ([g], [w], "official"))


@pytest.mark.parametrize("device", DEVICES)
def test_cpp_projection_rejects_the_same_grad_twice_untouched(gen, device):
    g = torch.randn(64, 9, generator=gen).to(device)
    before = g.clone()
    w = torch.randn(64, 9, generator=gen).to(device)
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] overlap"):
        torch.ops.semu_fast.project_perpendicular_([g, g], [w, w], "orthogonal")
    assert torch.equal(g, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["python", "cpp"])
def test_weights_sharing_memory_with_a_grad_are_rejected_untouched(gen, device, op):
    """A weight read while the grad it shares memory with is written came out 1.6e-3 off the reference."""
    call = sf.ops.project_perpendicular_ if op == "python" else torch.ops.semu_fast.project_perpendicular_
    buf = torch.randn(40, generator=gen).to(device)
    before = buf.clone()
    with pytest.raises(ValueError, match=r"weights\[0\] overlaps grads\[0\]"):
        call([buf[1:31]], [buf[:30]], "orthogonal")
    other = torch.randn(10, generator=gen).to(device)
    with pytest.raises(ValueError, match=r"weights\[0\] overlaps grads\[1\]"):
        call([other, buf[20:]], [buf[15:25], torch.ones(20, device=device)], "orthogonal")
    assert torch.equal(buf, before)
    g = buf[:30].clone()  # a grad projected against itself is fine: it becomes 0
    call([g], [g], "orthogonal")
    assert g.abs().max() < 1e-5


def test_inplace_projection_of_no_tensors_returns_no_energies():
    energies = sf.ops.project_perpendicular_([], [])
    assert energies.dtype == torch.float64 and energies.shape == (0,)


def test_float8_weights_are_refused_before_any_grad_is_written():
    g0, g1 = torch.ones(3), torch.ones(3)
    with pytest.raises(TypeError, match=r"weights\[1\] must be a floating tensor"):
        sf.ops.project_perpendicular_([g0, g1], [torch.ones(3), torch.ones(3).to(torch.float8_e5m2)])
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be a floating tensor"):
        torch.ops.semu_fast.project_perpendicular_([g0, g1], [torch.ones(3), torch.ones(3).to(torch.float8_e5m2)],
                                                   "orthogonal")
    assert torch.equal(g0, torch.ones(3)) and torch.equal(g1, torch.ones(3))


def _layers(gen, device):
    """Layers of mixed weight dtypes, some spanning many chunks, one empty, one with an odd size (a tail)."""
    shapes = [(512, 1000), (64, 3, 3, 3), (0, 7), (4097,), (1000, 300), (33, 65)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32, torch.bfloat16]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    # Weights partly aligned with their grads, so the projection changes them substantially.
    weights = [(0.5 * g.cpu() + torch.randn(s, generator=gen)).to(device, d) for g, s, d in zip(grads, shapes, dtypes)]
    return grads, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["orthogonal", "official"])
def test_projection_and_energies_are_bit_identical_across_calls(gen, device, mode):
    grads, weights = _layers(gen, device)
    runs = []
    for _ in range(4):
        g = [x.clone() for x in grads]
        energies = torch.ops.semu_fast.project_perpendicular_(g, weights, mode)
        runs.append((g, energies))
    for g, energies in runs[1:]:
        assert torch.equal(energies, runs[0][1])
        assert all(torch.equal(a, b) for a, b in zip(g, runs[0][0]))
    # Bit-identical and right: against the float64 formula.
    g, energies = runs[0]
    for i, (g0, w, got) in enumerate(zip(grads, weights, g)):
        g64, w64 = g0.double().cpu(), w.double().cpu()
        ww = (w64 * w64).sum()
        c = (g64 * w64).sum() / (ww if mode == "orthogonal" else ww.sqrt()) if ww > 0 else 0.0
        want = g64 - c * w64
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        assert torch.allclose(got.double().cpu(), want, rtol=1e-6, atol=1e-6 * scale)
        assert energies[i].item() == pytest.approx(got.double().square().sum().item(), rel=1e-12, abs=0)
    assert energies[0] > 0 and energies[2] == 0  # a real layer, and the empty one
