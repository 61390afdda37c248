import os
import subprocess
import sys

import pytest
import torch

import semu_fast as sf
from semu_fast.ops import reference
from conftest import DEVICES, FLOAT_DTYPES, interpreter_ok, requires_cuda, triton_device

SHAPES = [(1,), (7,), (33, 65), (3, 5, 3, 3), (70001,)]


def _pairs(gen, dtype, transpose=False):
    accs, grads = [], []
    for shape in SHAPES:
        accs.append(torch.randn(shape, generator=gen))
        grad = torch.randn(shape[::-1] if transpose else shape, generator=gen).to(dtype)
        grads.append(grad.permute(*reversed(range(grad.dim()))) if transpose else grad)
    return accs, grads


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_equals_reference_bit_exact(gen, dtype, transpose, device):
    accs, grads = _pairs(gen, dtype, transpose)
    accs, grads = [a.to(device) for a in accs], [g.to(device) for g in grads]
    expected = [a.clone() for a in accs]
    reference.accumulate_(expected, grads)
    sf.ops.accumulate_(accs, grads)
    for got, want in zip(accs, expected):
        assert torch.equal(got, want)  # one fp32 add of an exactly converted value: no rounding freedom


def test_accumulate_twice_sums_both(gen):
    acc = torch.zeros(100)
    a, b = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    sf.ops.accumulate_([acc], [a])
    sf.ops.accumulate_([acc], [b])
    assert torch.equal(acc, (torch.zeros(100) + a) + b)


@pytest.mark.gpu  # on the GPU when there is one, else under the interpreter
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_kernel_matches_reference(gen, dtype):
    device = triton_device()
    from semu_fast.triton_kernels.accumulate import accumulate_ as triton_accumulate_

    accs, grads = _pairs(gen, dtype, transpose=True)
    # The interpreter is slow: keep it small. Strided grads stay strided (a transposed view).
    accs = [a.flatten()[:2000].to(device) for a in accs]
    grads = [g[..., :3].to(device) if g.dim() == 2 else g.flatten()[:2000].to(device) for g in grads]
    accs = [a[:g.numel()].reshape(g.shape).contiguous() for a, g in zip(accs, grads)]
    expected = [a.clone() for a in accs]
    reference.accumulate_(expected, grads)
    triton_accumulate_(accs, grads)
    for got, want in zip(accs, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_one_call_mixes_dtypes_layouts_and_empty_tensors(gen, device):
    """Several grad dtypes, strided and empty tensors, and views of one flat accumulator buffer, in one call."""
    flat = torch.randn(2000, generator=gen).to(device)  # the views are taken on the device: one buffer there too
    tail = flat[1400:].clone()
    accs = [flat[:600].view(20, 30), flat[600:600], flat[600:1400].view(8, 100),
            torch.randn(3, 5, 3, 3, generator=gen).to(device)]
    grads = [torch.randn(30, 20, generator=gen).to(torch.bfloat16).t(), torch.empty(0, dtype=torch.float16),
             torch.randn(8, 100, generator=gen).to(torch.float64),
             torch.randn(3, 5, 3, 6, generator=gen)[..., ::2]]
    grads = [g.to(device) for g in grads]
    assert not grads[0].is_contiguous() and not grads[3].is_contiguous()
    expected = [a.clone() for a in accs]
    reference.accumulate_(expected, grads)
    sf.ops.accumulate_(accs, grads)
    for got, want in zip(accs, expected):
        assert torch.equal(got, want)
    assert torch.equal(flat[1400:], tail)  # nothing written past the views


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_accumulators_are_rejected_before_writing(device):
    flat = torch.zeros(10, device=device)
    with pytest.raises(ValueError, match=r"accumulators\[0\] and accumulators\[1\] overlap"):
        sf.ops.accumulate_([flat[:6], flat[4:]], [torch.ones(6, device=device), torch.ones(6, device=device)])
    assert torch.equal(flat, torch.zeros(10, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["python", "cpp"])
def test_grads_sharing_memory_with_an_accumulator_are_rejected_before_writing(device, op):
    """A grad read after some of its elements were written gave a running sum on the CPU ([1, 3, 6, ...])."""
    call = sf.ops.accumulate_ if op == "python" else torch.ops.semu_fast.accumulate_
    buf = torch.arange(1.0, 11.0, device=device)
    other = torch.zeros(9, device=device)
    for accs, grads, match in [([buf[1:]], [buf[:-1]], r"grads\[0\] overlaps accumulators\[0\]"),
                               ([other, buf[:4]], [buf[1:], torch.ones(4, device=device)],
                                r"grads\[0\] overlaps accumulators\[1\]"),
                               ([buf[2:6]], [buf[:8:2]], r"grads\[0\] overlaps accumulators\[0\]")]:  # strided
        with pytest.raises(ValueError, match=match):
            call(accs, grads)
    assert torch.equal(buf.cpu(), torch.arange(1.0, 11.0)) and not other.any()
    call([buf[:5], buf[5:]], [buf[:5], torch.ones(5, device=device)])  # each grad its own accumulator: fine
    assert torch.equal(buf.cpu(), torch.tensor([2.0, 4, 6, 8, 10, 7, 8, 9, 10, 11]))


def test_accumulate_of_no_tensors_is_a_no_op():
    sf.ops.accumulate_([], [])


@pytest.mark.parametrize("accs, grads, error, match", [
    ([torch.zeros(3), torch.zeros(3)], [torch.ones(3), torch.zeros(3, dtype=torch.float8_e5m2)], TypeError,
     r"grads\[1\] must be a floating tensor \(float32, float16, bfloat16, float64\)"),
    ([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], ValueError, "same length"),
    ([torch.zeros(3)], [torch.zeros(4)], ValueError, r"grads\[0\] has shape"),
    ([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)], TypeError, "must be float32"),
    ([torch.zeros(3)], [torch.zeros(3, dtype=torch.int32)], TypeError, "floating"),
    ([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], ValueError, "contiguous"),
    ([torch.zeros(3)], torch.zeros(3), TypeError, "list or tuple"),
])
def test_accumulate_rejects_bad_input_before_writing(accs, grads, error, match):
    before = [a.clone() for a in accs]
    with pytest.raises(error, match=match):
        sf.ops.accumulate_(accs, grads)
    assert all(torch.equal(a, b) for a, b in zip(accs, before))


def test_cpp_kernel_checks_arguments_itself():
    acc = torch.zeros(3)
    with pytest.raises(RuntimeError, match="must be float32|must be a floating"):
        torch.ops.semu_fast.accumulate_([acc], [torch.zeros(3, dtype=torch.int64)])
    first = torch.zeros(3)  # float8 is refused before any accumulator is written, not by the dispatch at grads[1]
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be a floating dtype"):
        torch.ops.semu_fast.accumulate_([first, acc], [torch.ones(3), torch.zeros(3, dtype=torch.float8_e4m3fn)])
    assert torch.equal(acc, torch.zeros(3)) and not first.any()


def test_opcheck_accumulate(gen):
    acc = torch.randn(5, 6, generator=gen)
    grad = torch.randn(5, 6, generator=gen).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.semu_fast.accumulate_.default, ([acc], [grad]))


def test_accumulate_inside_torch_compile_fullgraph(gen):
    acc = torch.zeros(8)
    grad = torch.randn(8, generator=gen)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, g):
        sf.ops.accumulate_([a], [g * 2])

    step(acc, grad)
    assert torch.equal(acc, grad * 2)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_forcing_a_backend_serves_the_op_with_it(impl):
    pytest.importorskip("triton")
    if impl == "triton" and interpreter_ok():
        pytest.skip(interpreter_ok())
    script = (
        "import torch, semu_fast as sf\n"
        "a = torch.zeros(1000); g = torch.randn(1000, dtype=torch.bfloat16)\n"
        "sf.ops.accumulate_([a], [g])\n"
        "assert torch.equal(a, g.float()), 'wrong result'\n"
        "print(sf.backends()['accumulate_']['CPU']['chosen'])\n"
    )
    env = {**os.environ, "SEMU_FAST_IMPL": impl, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == impl


# csrc/cuda/multi_tensor.cuh: tensors per chunk table, and the most elements one table covers (blocks x chunk).
MAX_TENSORS_PER_TABLE = 48
MAX_ELEMENTS_PER_TABLE = 320 * (1 << 18)


@pytest.mark.parametrize("device", DEVICES)
def test_cpp_accumulate_rejects_the_same_accumulator_twice_untouched(gen, device):
    acc = torch.randn(1000, generator=gen).to(device)
    before = acc.clone()
    grads = [torch.randn(1000, generator=gen).to(device) for _ in range(2)]
    with pytest.raises(ValueError, match=r"accumulators\[0\] and accumulators\[1\] overlap"):
        torch.ops.semu_fast.accumulate_([acc, acc], grads)
    buffer = torch.zeros(30, device=device)  # overlapping views of one buffer are duplicates too ...
    with pytest.raises(ValueError, match=r"accumulators\[1\] and accumulators\[2\] overlap"):
        torch.ops.semu_fast.accumulate_([acc, buffer[10:20], buffer[:15]], [grads[0], buffer[:10], buffer[:15]])
    assert torch.equal(acc, before) and not buffer.any()
    # ... but disjoint views of one flat buffer are fine (the check is not merely "same storage").
    ones = torch.ones(10, device=device)
    torch.ops.semu_fast.accumulate_([buffer[:10], buffer[10:20]], [ones, 2 * ones])
    assert torch.equal(buffer[:20].cpu(), torch.cat([torch.ones(10), torch.full((10,), 2.0)]))


def _many_pairs(gen, device):
    """More tensors than one chunk table holds, of every float grad dtype: empty, tiny, odd-sized (scalar tails),
    transposed (non-contiguous) and misaligned (offset by one element: the element-wise path) grads, and
    misaligned accumulators. Views are taken on the device (moving a view copies it)."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    accs, grads = [], []
    for i in range(2 * MAX_TENSORS_PER_TABLE + 5):
        dtype, kind = dtypes[i % len(dtypes)], i % 5
        if kind == 0:
            grad = randn(37, 129).to(dtype).t()  # non-contiguous
        elif kind == 1:
            grad = randn(70001 + i).to(dtype)[1:]  # one element in: not aligned for vector loads
        elif kind == 2:
            grad = randn(i % 2).to(dtype)  # empty or one element
        else:
            grad = randn(4096 * 3 + 3 if kind == 3 else (3, 5, 3, 3)).to(dtype)
        acc = randn(grad.numel() + 1)[1:].view(grad.shape) if kind == 3 else randn(grad.shape)
        accs.append(acc)
        grads.append(grad)
    return accs, grads


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_many_tensors_of_mixed_dtypes_and_strides_bit_exact(gen, device):
    accs, grads = _many_pairs(gen, device)
    assert len(accs) > MAX_TENSORS_PER_TABLE and not all(g.is_contiguous() for g in grads)
    assert any(g.data_ptr() % 16 for g in grads) and any(a.data_ptr() % 16 for a in accs)
    expected = [a + g.float() for a, g in zip(accs, grads)]
    sf.ops.accumulate_(accs, grads)
    for got, want in zip(accs, expected):
        assert torch.equal(got, want)


@requires_cuda  # the chunk table is CUDA's; on the CPU this is only big
def test_accumulate_tensor_longer_than_one_chunk_table_bit_exact(gen):
    # One tensor with more chunks than a table holds: the table is launched full and the tensor continues in the
    # next one. bf16 grads, an odd length (a partial last chunk and a scalar tail).
    n = MAX_ELEMENTS_PER_TABLE + 4096 * 7 + 3
    acc = torch.randn(n, device="cuda")
    grad = torch.randn(n, device="cuda").bfloat16()
    small_acc, small_grad = torch.randn(5, device="cuda"), torch.randn(5, device="cuda")
    expected, expected_small = acc + grad.float(), small_acc + small_grad
    torch.ops.semu_fast.accumulate_([small_acc, acc], [small_grad, grad])
    assert torch.equal(acc, expected) and torch.equal(small_acc, expected_small)


# --- accumulate_matmul_: acc += a @ b, products summed in float32 (the streamed Linear's weight gradient) ----------

MATMUL_TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (17, 33, 9), (64, 300, 48), (5, 0, 7)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_matmul_equals_the_float64_product(gen, dtype, m, k, n, strided, device):
    """bf16/fp16 inputs: their products are exact in float32, so the only error is float32 summation (relative to
    the sum of |products|); float64 inputs are summed in float32 too (the accumulator's dtype)."""
    acc = torch.randn(m, n, generator=gen)
    a = (torch.randn(k, m, generator=gen).T if strided else torch.randn(m, k, generator=gen)).to(dtype)
    b = (torch.randn(n, k, generator=gen).T if strided else torch.randn(k, n, generator=gen)).to(dtype)
    acc, a, b = acc.to(device), a.to(device), b.to(device)
    want = acc.double() + a.double() @ b.double()
    scale = 1 + a.double().abs() @ b.double().abs()
    sf.ops.accumulate_matmul_(acc, a, b)
    assert acc.dtype == torch.float32 and not torch.isnan(acc).any()
    assert ((acc.double() - want).abs() / scale).max() <= MATMUL_TOL[dtype] * max(1, k) ** 0.5


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 2), torch.ones(2, 4)), TypeError,
     "acc must be a contiguous float32 tensor"),
    (lambda: (torch.zeros(4, 3).T, torch.ones(3, 2), torch.ones(2, 4)), TypeError, "non-contiguous"),
    (lambda: (torch.zeros(3, 4), torch.ones(3, 2), torch.ones(3, 4)), ValueError, "needs acc \\(m, n\\)"),
    (lambda: (torch.zeros(3, 4), torch.ones(3, 2), torch.ones(2, 4, dtype=torch.bfloat16)), TypeError,
     "a and b must share a dtype"),
])
def test_accumulate_matmul_rejects_bad_input_before_writing(make, error, match):
    acc, a, b = make()
    before = acc.clone()
    with pytest.raises(error, match=match):
        sf.ops.accumulate_matmul_(acc, a, b)
    assert torch.equal(acc, before)


@pytest.mark.parametrize("alias", ["a is acc", "b is acc", "a views acc"])
def test_accumulate_matmul_refuses_inputs_that_share_memory_with_acc(gen, alias):
    """acc += acc @ acc would read rows already written: a wrong result, silently."""
    acc = torch.randn(8, 8, generator=gen)
    before = acc.clone()
    a, b = {"a is acc": (acc, torch.ones(8, 8)), "b is acc": (torch.ones(8, 8), acc),
            "a views acc": (acc[:, :4], torch.ones(4, 8))}[alias]
    with pytest.raises(ValueError, match="shares memory with acc"):
        sf.ops.accumulate_matmul_(acc, a, b)
    assert torch.equal(acc, before)


def test_accumulate_matmul_on_meta_tensors_checks_no_memory():
    """Meta tensors have no memory (every data_ptr() is 0): they must not read as sharing it."""
    acc = torch.empty(4, 3, device="meta")
    sf.ops.accumulate_matmul_(acc, torch.empty(4, 5, device="meta"), torch.empty(5, 3, device="meta"))
