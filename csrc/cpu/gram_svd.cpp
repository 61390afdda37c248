// CPU kernel of semu_fast::gram_svd: a batch of thin SVDs of (m x n) matrices with small n (conv gradients split
// per input channel: n = kh*kw). G is read once to build float64 Gram matrices; LAPACK's symmetric eigensolver
// (syevd through at::linalg_eigh) diagonalises them, and U = G V / sigma is one batched GEMM.
// Measured here: for n = 9 the hand-written cyclic Jacobi of gram_svd.h took ~40 us per matrix, syevd ~10 us, and
// Jacobi's O(n^3)-per-sweep cost grows badly by n = 49 (7x7 kernels), so the CPU path uses syevd.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gram_svd.h"

namespace semu_fast {

void check_gram_svd_args(const at::Tensor& G);  // csrc/gram_svd_check.cpp

namespace {

// a += G_b^T G_b for one (m x n) matrix, accumulated in float64 straight from G's dtype. N > 0 fixes n at compile
// time so the inner loops unroll and vectorise (the common kernel sizes); N = 0 is the generic loop.
template <int N, typename scalar_t>
void gram_one(const scalar_t* __restrict__ g, double* __restrict__ out, int64_t m, int64_t n_runtime) {
  const int64_t n = N > 0 ? N : n_runtime;
  // A local accumulator the compiler knows nothing else touches, so it stays in registers / L1.
  double acc[(N > 0 ? N : kGramSvdMaxN) * (N > 0 ? N : kGramSvdMaxN)] = {};
  double row[N > 0 ? N : kGramSvdMaxN];
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < n; ++i) row[i] = static_cast<double>(g[r * n + i]);
    for (int64_t i = 0; i < n; ++i) {
      const double x = row[i];
      for (int64_t j = 0; j < n; ++j) acc[i * n + j] += x * row[j];
    }
  }
  for (int64_t i = 0; i < n * n; ++i) out[i] = acc[i];
}

template <typename scalar_t>
void gram_dispatch(const scalar_t* g, double* a, int64_t m, int64_t n) {
  switch (n) {
    case 1: return gram_one<1>(g, a, m, n);
    case 4: return gram_one<4>(g, a, m, n);
    case 9: return gram_one<9>(g, a, m, n);
    case 25: return gram_one<25>(g, a, m, n);
    case 49: return gram_one<49>(g, a, m, n);
    default: return gram_one<0>(g, a, m, n);
  }
}

// G_b^T G_b for every matrix of the batch, in float64, without a float64 copy of G.
at::Tensor gram_float64(const at::Tensor& G) {
  const int64_t batch = G.size(0), m = G.size(1), n = G.size(2);
  at::Tensor gram = at::empty({batch, n, n}, G.options().dtype(at::kDouble));
  double* out = gram.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gram_float64", [&] {
    const scalar_t* g_all = G.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) gram_dispatch(g_all + b * m * n, out + b * n * n, m, n);
    });
  });
  return gram;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_svd_cpu(const at::Tensor& G_in) {
  check_gram_svd_args(G_in);
  const auto out_dtype = G_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor G = G_in.contiguous();
  const int64_t m = G.size(1), n = G.size(2), q = std::min(m, n);
  if (n == 1) {  // 1x1 convs: sigma = ||g||, U = g / sigma, V = 1; no eigensolver needed
    at::Tensor S = at::linalg_vector_norm(G.to(at::kDouble), 2, {1}).to(out_dtype);  // (B, 1)
    S = at::where(S > 0, S, at::zeros_like(S));
    const at::Tensor U = G.to(out_dtype) * at::where(S > 0, S.reciprocal(), at::zeros_like(S)).unsqueeze(1);
    return {U, S, at::ones({G.size(0), 1, 1}, G.options().dtype(out_dtype))};
  }
  auto [eig, V] = at::linalg_eigh(gram_float64(G));  // ascending
  eig = eig.flip(-1).narrow(-1, 0, q);
  V = V.flip(-1).narrow(-1, 0, q);  // (B, n, q), leading eigenvectors in columns
  // A fixed sign per vector (its largest entry positive) makes the result deterministic.
  const at::Tensor pivot = V.abs().argmax(1, /*keepdim=*/true);
  V = V * at::where(V.gather(1, pivot) < 0, -1.0, 1.0);
  at::Tensor S = eig.clamp_min(0).sqrt();
  S = at::where(S > kGramSvdRelTol * S.narrow(-1, 0, 1), S, at::zeros_like(S));
  const at::Tensor inv = at::where(S > 0, S.reciprocal(), at::zeros_like(S));
  // U = G (V / sigma): scaling the n x q factor is cheaper than scaling the m x q product.
  const at::Tensor U = at::bmm(G.to(out_dtype), (V * inv.unsqueeze(1)).to(out_dtype));
  return {U, S.to(out_dtype), V.transpose(1, 2).to(out_dtype).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CPU, m) { m.impl("gram_svd", &gram_svd_cpu); }

}  // namespace semu_fast
