// The per-matrix math of semu_fast::gram_svd. For G (m x n) with small n, the Gram matrix G^T G (n x n, float64)
// is diagonalised; its eigenvalues are sigma^2 and its eigenvectors V, and U = G V / sigma. Squaring G costs
// accuracy only for sigma below ~1e-7 sigma_max, which is under float32 resolution anyway; those singular values are
// returned as 0 with zero U columns. The argument check, the sort, the sign rule and the cut-off below serve both
// kernels; the CPU kernel diagonalises with LAPACK (faster there), the CUDA kernel with the Jacobi below (one thread
// block per matrix), which csrc/test/test_ops.cpp also runs on the host, as CI has no GPU.
//
// Jacobi order: round-robin ("parallel ordering", Brent & Luk). The n indices, padded to an even np with one dummy
// index whose row and column of the Gram are zero, are split into np/2 disjoint pairs per step, and np-1 steps
// meet every pair once (one sweep). Rotations of disjoint pairs commute, so all rotations of a step are computed
// from the same matrix and applied together, by parallel threads. Converges quadratically like the cyclic order.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "dtypes.h"
#include "host_device.h"

namespace semu_fast {

// Largest n (kernel height x width) gram_svd accepts: a 7x7 kernel needs 49; 64 keeps the CUDA kernel's Gram in
// 32 KB of shared memory (the whole block fits the default 48 KB, no opt-in).
constexpr int64_t kGramSvdMaxN = 64;
// Singular values below this share of the largest are returned as 0 (Gram squaring has lost them).
constexpr double kGramSvdRelTol = 1e-7;
// Quadratic convergence takes ~6-10 sweeps for n <= 64; the cap only bounds pathological input (NaN, inf).
constexpr int kJacobiMaxSweeps = 30;

inline void check_gram_svd_args(const at::Tensor& G) {
  TORCH_CHECK(G.dim() == 3, "gram_svd: G must have shape (B, m, n), got ", G.sizes());
  TORCH_CHECK(is_kernel_float(G.scalar_type()), "gram_svd: G must be a floating tensor, got ", G.scalar_type());
  TORCH_CHECK(G.size(2) >= 1 && G.size(2) <= kGramSvdMaxN, "gram_svd: G's last dim n must be in [1, ", kGramSvdMaxN,
              "] (the Gram matrix is n x n), got ", G.size(2));
  TORCH_CHECK(G.size(1) >= 1, "gram_svd: G must have at least one row, got shape ", G.sizes());
}

// n padded to even: the round-robin schedule pairs an even number of indices.
SEMU_HD inline int jacobi_padded(int n) { return n + (n & 1); }

// Pair i (0 <= i < np/2) of step `step` (0 <= step < np-1), as p < q. Circle method: index np-1 stays put and
// meets `step`; the others sit on a circle of odd size np-1 and pair up symmetrically around `step`.
SEMU_HD inline void jacobi_pair(int np, int step, int i, int& p, int& q) {
  const int ring = np - 1;
  const int a = i == 0 ? np - 1 : (step + i) % ring;
  const int b = i == 0 ? step : (step - i + ring) % ring;
  p = a < b ? a : b;
  q = a < b ? b : a;
}

// The rotation J = [[c, s], [-s, c]] on (p, q) with (J^T A J)_pq = 0; t = s / c. The smaller angle (|t| <= 1)
// keeps the iteration stable (Golub & Van Loan 8.5.2).
struct JacobiRotation {
  double c, s, t;
};

SEMU_HD inline JacobiRotation jacobi_rotation(double app, double aqq, double apq) {
  if (apq == 0.0) return {1.0, 0.0, 0.0};
  const double theta = (aqq - app) / (2.0 * apq);
  // theta^2 overflows past ~1e154; there t = 1 / (2 theta) to double precision.
  const double t = fabs(theta) > 1e150 ? 0.5 / theta
                                       : (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
  const double c = 1.0 / sqrt(t * t + 1.0);
  return {c, t * c, t};
}

// The 2x2 block of A on rows (p, q) of pair P and columns (r, s) of pair R, P != R, becomes J_P^T X J_R.
SEMU_HD inline void jacobi_rotate_block(double& xpr, double& xps, double& xqr, double& xqs, JacobiRotation P,
                                        JacobiRotation R) {
  const double ypr = R.c * xpr - R.s * xps, yps = R.s * xpr + R.c * xps;
  const double yqr = R.c * xqr - R.s * xqs, yqs = R.s * xqr + R.c * xqs;
  xpr = P.c * ypr - P.s * yqr;
  xqr = P.s * ypr + P.c * yqr;
  xps = P.c * yps - P.s * yqs;
  xqs = P.s * yps + P.c * yqs;
}

// The same on the symmetric np x np matrix a (row-major): the block at rows (p, q), columns (r, s), and its mirror.
SEMU_HD inline void jacobi_update_block(double* a, int np, int p, int q, int r, int s, JacobiRotation P,
                                        JacobiRotation R) {
  double xpr = a[p * np + r], xps = a[p * np + s], xqr = a[q * np + r], xqs = a[q * np + s];
  jacobi_rotate_block(xpr, xps, xqr, xqs, P, R);
  a[p * np + r] = a[r * np + p] = xpr;
  a[p * np + s] = a[s * np + p] = xps;
  a[q * np + r] = a[r * np + q] = xqr;
  a[q * np + s] = a[s * np + q] = xqs;
}

// The diagonal block of pair P: a_pq becomes exactly 0 and the diagonal moves by t a_pq (the accurate form).
SEMU_HD inline void jacobi_rotate_diagonal(double& app, double& aqq, double& apq, double& aqp, JacobiRotation P) {
  app -= P.t * apq;
  aqq += P.t * apq;
  apq = 0.0;
  aqp = 0.0;
}

// Columns p, q of V become those of V J_P.
SEMU_HD inline void jacobi_rotate_pair(double& vp, double& vq, JacobiRotation P) {
  const double x = vp, y = vq;
  vp = P.c * x - P.s * y;
  vq = P.s * x + P.c * y;
}

// Sweeps stop once the off-diagonal mass is 1e-15 of the diagonal's (in norm): the eigenvalues are then exact to
// ~1e-15 lambda_max, far below what the cut-off and float32 output can see.
SEMU_HD inline bool jacobi_converged(double off_squares, double diag_squares) {
  return off_squares <= 1e-30 * diag_squares;
}

// Position of eigenvalue i when n eigenvalues are sorted descending, ties by index (a stable sort). NaN ranks
// last, so the ranks are always a permutation of 0..n-1 (every output column is written).
SEMU_HD inline int descending_rank(const double* eig, int i, int n) {
  const double key_i = eig[i] == eig[i] ? eig[i] : -INFINITY;
  int rank = 0;
  for (int j = 0; j < n; ++j) {
    const double key_j = eig[j] == eig[j] ? eig[j] : -INFINITY;
    rank += (key_j > key_i) || (key_j == key_i && j < i);
  }
  return rank;
}

// +1 or -1: the sign that makes the largest-magnitude entry (the first one, on ties) of a vector positive. A
// fixed sign per vector makes the result deterministic.
SEMU_HD inline double pivot_sign(const double* v, int64_t stride, int n) {
  int arg = 0;
  for (int r = 1; r < n; ++r)
    if (fabs(v[r * stride]) > fabs(v[arg * stride])) arg = r;
  return v[arg * stride] < 0 ? -1.0 : 1.0;
}

// sigma_k from the k-th largest eigenvalue and the largest one, with the relative cut-off applied.
SEMU_HD inline double singular_value(double eig, double eig_max) {
  // x - x is 0 only for finite x: a NaN or infinite Gram (NaN/Inf input, or float64 entries past ~1e154) must not
  // come out as a clean sigma of 0.
  if (!(eig - eig == 0.0) || !(eig_max - eig_max == 0.0)) return (eig - eig) + (eig_max - eig_max);  // NaN
  const double top = eig_max > 0 ? sqrt(eig_max) : 0.0;
  const double s = eig > 0 ? sqrt(eig) : 0.0;
  return s > kGramSvdRelTol * top ? s : 0.0;
}

}  // namespace semu_fast
