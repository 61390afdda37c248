// CPU kernel of semu_fast::gram_svd: a batch of thin SVDs of (m x n) matrices with small n (conv gradients split
// per input channel: n = kh*kw), one matrix per task, fused so each matrix is used while it is in cache: the
// float64 Gram, LAPACK's symmetric eigensolver (syevd) on it, then U = G V / sigma.
// Measured here (2 cores): syevd costs ~13 us per 9x9 Gram, called directly or through batched at::linalg_eigh
// (the CUDA kernel's Jacobi, run serially, ~14 us; ~250 us against ~80 us at n = 25), so the eigensolver is LAPACK's
// and the gain is elsewhere: no batch-wide passes between the steps (the separate bmm for U alone, inner dimension
// 9, took ~7 ms on a (512, 512, 9) batch), a row-blocked Gram, float32 U loops, and both cores.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/BatchLinearAlgebra.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../gram_svd.h"

namespace semu_fast {
namespace {

// Rows of G added to the Gram per step: each accumulator is loaded and stored once per kRows rows and the
// products of a step vectorise across them (measured 1.6x the row-at-a-time loop for n = 9).
constexpr int kRows = 2;

// Scratch of one thread, sized for n.
struct Workspace {
  explicit Workspace(int n)
      : acc(n * n * kRows), a(n * n), eig(n), w(n * n), work(1 + 6 * n + 2 * n * n), iwork(3 + 5 * n) {}
  std::vector<double> acc, a, eig, w, work;
  std::vector<int> iwork;
};

// a = G^T G (n x n, both triangles) in float64, from G's own dtype. N > 0 fixes n at compile time (the common
// kernel sizes) so the loops unroll; N = 0 is the generic path.
template <int N, typename in_t>
void gram(const in_t* __restrict__ g, int64_t m, int n_runtime, double* __restrict__ acc, double* __restrict__ a) {
  const int n = N > 0 ? N : n_runtime;
  std::fill(acc, acc + n * n * kRows, 0.0);
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows) {
    double block[(N > 0 ? N : kGramSvdMaxN) * kRows];  // block[i * kRows + l] = G[r + l, i]
    for (int l = 0; l < kRows; ++l)
      for (int i = 0; i < n; ++i) block[i * kRows + l] = static_cast<double>(g[(r + l) * n + i]);
    for (int i = 0; i < n; ++i)
      for (int j = i; j < n; ++j)
        for (int l = 0; l < kRows; ++l) acc[(i * n + j) * kRows + l] += block[i * kRows + l] * block[j * kRows + l];
  }
  for (int i = 0; i < n; ++i)
    for (int j = i; j < n; ++j) {
      double sum = 0.0;
      for (int l = 0; l < kRows; ++l) sum += acc[(i * n + j) * kRows + l];
      for (int64_t t = r; t < m; ++t) sum += static_cast<double>(g[t * n + i]) * static_cast<double>(g[t * n + j]);
      a[i * n + j] = a[j * n + i] = sum;
    }
}

// One matrix: writes U (m x q), S (q), Vh (q x n).
template <int N, typename in_t, typename out_t>
void gram_svd_one(const in_t* __restrict__ g, int64_t m, int n_runtime, out_t* __restrict__ U, out_t* __restrict__ S,
                  out_t* __restrict__ Vh, Workspace& ws) {
  const int n = N > 0 ? N : n_runtime;
  const int q = static_cast<int>(std::min<int64_t>(m, n));
  double* a = ws.a.data();
  double* eig = ws.eig.data();
  gram<N>(g, m, n, ws.acc.data(), a);
  // Eigenvectors overwrite a, one per n-stride row (LAPACK's columns); eigenvalues ascending.
  if (n == 1) {
    eig[0] = a[0];
    a[0] = 1.0;
  } else {
#if AT_BUILD_WITH_LAPACK()
    int info = 0;
    at::native::lapackSyevd<double, double>('V', 'L', n, a, n, eig, ws.work.data(), static_cast<int>(ws.work.size()),
                                            nullptr, 0, ws.iwork.data(), static_cast<int>(ws.iwork.size()), &info);
    TORCH_CHECK(info == 0, "gram_svd: LAPACK syevd failed (info ", info, ")");
#else
    TORCH_CHECK(false, "gram_svd: this build of torch has no LAPACK");
#endif
  }
  int src[kGramSvdMaxN];  // src[k]: the eigenpair in descending position k
  for (int i = 0; i < n; ++i) src[descending_rank(eig, i, n)] = i;
  // W = V diag(sign / sigma): U = G W. Zero columns where sigma is cut off, and for k >= q (not stored). Both
  // factors are scaled by the largest sigma, U = (G / sigma_max) (V diag(sign sigma_max / sigma)), so that W's
  // entries stay within 1e7 (the cut-off) in the output dtype: a float32 G whose sigma fall below ~3e-39 had
  // 1 / sigma overflow float32, and U came out Inf/NaN next to finite S.
  const double top = q > 0 ? singular_value(eig[src[0]], eig[src[0]]) : 0.0;
  const double unit = top > 0 && top - top == 0.0 ? top : 1.0;
  double* w = ws.w.data();
  out_t wo[(N > 0 ? N : kGramSvdMaxN) * (N > 0 ? N : kGramSvdMaxN)];
  for (int k = 0; k < n; ++k) {
    const double* v = a + src[k] * n;
    const double sigma = k < q ? singular_value(eig[src[k]], eig[src[0]]) : 0.0;
    const double sign = pivot_sign(v, 1, n);
    const double scale = sigma > 0 ? sign * (unit / sigma) : 0.0;
    for (int j = 0; j < n; ++j) w[j * n + k] = scale * v[j];
    if (k >= q) continue;
    S[k] = static_cast<out_t>(sigma);
    for (int j = 0; j < n; ++j) Vh[k * n + j] = static_cast<out_t>(sign * v[j]);
  }
  for (int j = 0; j < n * n; ++j) wo[j] = static_cast<out_t>(w[j]);
  const double inverse_unit = 1.0 / unit;
  // U in the output precision: float32 halves the work. Column k's error grows as eps * sigma_max / sigma_k (about
  // 3e-3 at sigma_k = 1e-6 sigma_max), which only directions a rank rule keeps at gamma close to 1 reach.
  for (int64_t r = 0; r < m; ++r) {
    out_t out[N > 0 ? N : kGramSvdMaxN] = {};
    for (int j = 0; j < n; ++j) {
      const out_t x = static_cast<out_t>(static_cast<double>(g[r * n + j]) * inverse_unit);
      for (int k = 0; k < n; ++k) out[k] += x * wo[j * n + k];
    }
    for (int k = 0; k < q; ++k) U[r * q + k] = out[k];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_svd_cpu(const at::Tensor& G_in) {
  check_gram_svd_args(G_in);
  const at::Tensor G = G_in.contiguous();
  const int64_t batch = G.size(0), m = G.size(1);
  const int n = static_cast<int>(G.size(2)), q = static_cast<int>(std::min<int64_t>(m, n));
  const auto options = G.options().dtype(G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor U = at::empty({batch, m, q}, options);
  at::Tensor S = at::empty({batch, q}, options);
  at::Tensor Vh = at::empty({batch, q, n}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "gram_svd_cpu", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    out_t* u = U.data_ptr<out_t>();
    out_t* s = S.data_ptr<out_t>();
    out_t* vh = Vh.data_ptr<out_t>();
    auto run = [&](auto one) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        Workspace ws(n);
        for (int64_t b = begin; b < end; ++b) one(g + b * m * n, m, n, u + b * m * q, s + b * q, vh + b * q * n, ws);
      });
    };
    switch (n) {  // the usual 1x1, 2x2, 3x3, 5x5, 7x7 kernels
      case 1: return run(gram_svd_one<1, scalar_t, out_t>);
      case 4: return run(gram_svd_one<4, scalar_t, out_t>);
      case 9: return run(gram_svd_one<9, scalar_t, out_t>);
      case 25: return run(gram_svd_one<25, scalar_t, out_t>);
      case 49: return run(gram_svd_one<49, scalar_t, out_t>);
      default: return run(gram_svd_one<0, scalar_t, out_t>);
    }
  });
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CPU, m) { m.impl("gram_svd", &gram_svd_cpu); }

}  // namespace semu_fast
