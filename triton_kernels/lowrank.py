"""Triton kernels of the SEMU adapter ops (semu_fast.lowrank).

- dual_matmul: C = A1 B1 + A2 B2 (+ bias) in one GEMM over the two K ranges, so the adapter's low-rank term lands
  in the same accumulator as x A^T (forward) or dy A (backward) with no concatenated copy and no second pass over C.
- conv_delta_add: A + dW with dW[:, n] = U[n] R[n] Vh[n], one program per (input channel, block of outputs).
- conv_delta_contract: dR[n] = U[n]^T dW[:, n] Vh[n]^T, one program per input channel.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests it). float16/bfloat16/float32;
float32 products use IEEE precision (no TF32), as cuBLAS does by default. Index arithmetic is 64-bit (an operand may
hold more than 2^31 elements)."""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter's tl.dot gets bfloat16 wrong: upcast there
# The interpreter runs every config it is given: one small one there.
_GEMM_CONFIGS = [triton.Config({"BM": 32, "BN": 32, "BK": 16, "GROUP_M": 4})] if _INTERPRET else [
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BM": 64, "BN": 256, "BK": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
]


def _prune(configs, named_args, **kwargs):
    """float32 (IEEE) GEMMs: one config. Autotuning four of them cost ~40 s of compilation on the first call (H200),
    for a kernel that is only used when forced (it measured slower than cuBLAS there)."""
    if named_args["a1"].dtype == torch.float32 and len(configs) > 1:
        return [c for c in configs if c.kwargs["BK"] == 32][:1]
    return configs


@triton.jit
def _accumulate_product(acc, a_ptr, b_ptr, rm, rn, M, N, K, s_am, s_ak, s_bk, s_bn, BK: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += A[rm, :K] @ B[:K, rn], streaming K in BK-wide slices (rm, rn: int64 row and column indices)."""
    for k0 in range(0, K, BK):
        rk = (k0 + tl.arange(0, BK)).to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=(rk[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


# Tuned per power-of-two bucket of M (the token count changes every batch; re-tuning each time would dominate).
@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K1", "K2"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _dual_matmul_kernel(a1, b1, a2, b2, bias, c, M, N, K1, K2, M_BUCKET,
                        s_a1m, s_a1k, s_b1k, s_b1n, s_a2m, s_a2k, s_b2k, s_b2n, s_bias, s_cm, s_cn,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row blocks share each column block of B while it is in L2.
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows
    pid_n = (pid % (GROUP_M * grid_n)) // rows
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate_product(acc, a1, b1, rm, rn, M, N, K1, s_a1m, s_a1k, s_b1k, s_b1n, BK, PRECISION, UPCAST)
    acc = _accumulate_product(acc, a2, b2, rm, rn, M, N, K2, s_a2m, s_a2k, s_b2k, s_b2n, BK, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias + rn * s_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the value only matters for float32 operands


def dual_matmul(a1, b1, a2, b2, bias=None):
    """a1 @ b1 + a2 @ b2 (+ bias) in a1's dtype; all operands of one float dtype (not float64), any strides."""
    M, N = a1.shape[0], b1.shape[1]
    c = torch.empty(M, N, dtype=a1.dtype, device=a1.device)
    if M == 0 or N == 0:
        return c
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _dual_matmul_kernel[grid](a1, b1, a2, b2, bias if bias is not None else c, c, M, N, a1.shape[1], a2.shape[1],
                              triton.next_power_of_2(M), *a1.stride(), *b1.stride(), *a2.stride(), *b2.stride(),
                              bias.stride(0) if bias is not None else 0, *c.stride(),
                              HAS_BIAS=bias is not None, PRECISION=_precision(a1.dtype),
                              UPCAST=_INTERPRET and a1.dtype == torch.bfloat16)
    return c


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


@triton.jit
def _conv_delta_add_kernel(A, U, R, Vh, out, OUT, K, P,
                           s_ao, s_an, s_ap, s_un, s_uo, s_uk, s_rn, s_ra, s_rb, s_vn, s_vk, s_vp,
                           BO: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ro = tl.program_id(1).to(tl.int64) * BO + tl.arange(0, BO)
    rk = tl.arange(0, BK)
    rp = tl.arange(0, BP)
    u = tl.load(U + n * s_un + ro[:, None] * s_uo + rk[None, :] * s_uk, mask=(ro[:, None] < OUT) & (rk[None, :] < K),
                other=0.0).to(tl.float32)
    r = tl.load(R + n * s_rn + rk[:, None] * s_ra + rk[None, :] * s_rb, mask=(rk[:, None] < K) & (rk[None, :] < K),
                other=0.0).to(tl.float32)
    v = tl.load(Vh + n * s_vn + rk[:, None] * s_vk + rp[None, :] * s_vp, mask=(rk[:, None] < K) & (rp[None, :] < P),
                other=0.0).to(tl.float32)
    delta = tl.dot(u, tl.dot(r, v, input_precision="ieee"), input_precision="ieee")
    offsets = n * s_an + ro[:, None] * s_ao + rp[None, :] * s_ap
    mask = (ro[:, None] < OUT) & (rp[None, :] < P)
    a = tl.load(A + offsets, mask=mask, other=0.0)
    tl.store(out + offsets, (a.to(tl.float32) + delta).to(a.dtype), mask=mask)


def conv_delta_add(A, U, R, Vh):
    """A + dW in A's dtype, dW[:, n] = U[n] R[n] Vh[n] reshaped to the kernel, computed in float32.
    A: (out, in, kh, kw); U (in, out, k), R (in, k, k), Vh (in, k, kh*kw)."""
    A = A.contiguous()
    out_ch, cin = A.shape[:2]
    k, P = R.shape[-1], Vh.shape[-1]
    result = torch.empty_like(A)
    if A.numel() == 0 or k == 0:
        return result.copy_(A)
    BO = 64
    _conv_delta_add_kernel[(cin, triton.cdiv(out_ch, BO))](
        A, U, R, Vh, result, out_ch, k, P, A.stride(0), A.stride(1), 1, *U.stride(), *R.stride(), *Vh.stride(),
        BO=BO, BK=_block(k), BP=_block(P))
    return result


@triton.jit
def _conv_delta_contract_kernel(dW, U, Vh, dR, OUT, K, P, s_wo, s_wn, s_wp, s_un, s_uo, s_uk, s_vn, s_vk, s_vp,
                                s_rn, s_ra, s_rb, BO: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BK)
    rp = tl.arange(0, BP)
    acc = tl.zeros((BK, BP), dtype=tl.float32)  # U[n]^T dW[:, n], streamed over the outputs
    for o0 in range(0, OUT, BO):
        ro = (o0 + tl.arange(0, BO)).to(tl.int64)
        u = tl.load(U + n * s_un + ro[:, None] * s_uo + rk[None, :] * s_uk,
                    mask=(ro[:, None] < OUT) & (rk[None, :] < K), other=0.0).to(tl.float32)
        g = tl.load(dW + n * s_wn + ro[:, None] * s_wo + rp[None, :] * s_wp,
                    mask=(ro[:, None] < OUT) & (rp[None, :] < P), other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(u), g, acc, input_precision="ieee")
    v = tl.load(Vh + n * s_vn + rk[:, None] * s_vk + rp[None, :] * s_vp, mask=(rk[:, None] < K) & (rp[None, :] < P),
                other=0.0).to(tl.float32)
    dr = tl.dot(acc, tl.trans(v), input_precision="ieee")
    tl.store(dR + n * s_rn + rk[:, None] * s_ra + rk[None, :] * s_rb, dr, mask=(rk[:, None] < K) & (rk[None, :] < K))


def conv_delta_contract(dW, U, Vh):
    """dR[n] = U[n]^T dW[:, n] Vh[n]^T in float32. dW: (out, in, kh, kw); U (in, out, k);
    Vh (in, k, kh*kw). Returns (in, k, k)."""
    dW = dW.contiguous()
    out_ch, cin = dW.shape[:2]
    k, P = U.shape[-1], Vh.shape[-1]
    dR = torch.zeros(cin, k, k, dtype=torch.float32, device=dW.device)
    if dW.numel() == 0 or k == 0:
        return dR
    _conv_delta_contract_kernel[(cin,)](dW, U, Vh, dR, out_ch, k, P, dW.stride(0), dW.stride(1), 1, *U.stride(),
                                        *Vh.stride(), *dR.stride(), BO=32, BK=_block(k), BP=_block(P))
    return dR
