// The per-matrix math of semu_fast::gram_svd, shared by the CPU and CUDA kernels: for G (m x n) with small n,
// the Gram matrix G^T G (n x n, float64) is diagonalised by cyclic Jacobi rotations; its eigenvalues are sigma^2
// and its eigenvectors V, and U = G V / sigma. Squaring G costs accuracy only for sigma below ~1e-7 sigma_max,
// which is under float32 resolution anyway; those singular values are returned as 0 with zero U columns.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SEMU_HD __host__ __device__
#else
#define SEMU_HD
#endif

namespace semu_fast {

// Largest n (kernel height x width) gram_svd accepts: a 7x7 kernel needs 49; 64 keeps the CUDA scratch small.
constexpr int64_t kGramSvdMaxN = 64;
// Singular values below this share of the largest are returned as 0 (Gram squaring has lost them).
constexpr double kGramSvdRelTol = 1e-7;

// a: n x n symmetric (row-major), overwritten; v: n x n eigenvectors in columns; eig: n eigenvalues, sorted
// descending together with v's columns. Cyclic Jacobi; converges quadratically, 15 sweeps is ample for n <= 64.
SEMU_HD inline void jacobi_eigh(double* a, double* v, double* eig, int n) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) v[i * n + j] = (i == j) ? 1.0 : 0.0;
  for (int sweep = 0; sweep < 30; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int p = 0; p < n; ++p) {
      diag += a[p * n + p] * a[p * n + p];
      for (int q = p + 1; q < n; ++q) off += a[p * n + q] * a[p * n + q];
    }
    if (off <= 1e-30 * diag || off == 0.0) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (apq == 0.0) continue;
        const double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
        const double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
        for (int r = 0; r < n; ++r) {  // columns p, q
          const double arp = a[r * n + p], arq = a[r * n + q];
          a[r * n + p] = c * arp - s * arq;
          a[r * n + q] = s * arp + c * arq;
        }
        for (int r = 0; r < n; ++r) {  // rows p, q
          const double apr = a[p * n + r], aqr = a[q * n + r];
          a[p * n + r] = c * apr - s * aqr;
          a[q * n + r] = s * apr + c * aqr;
        }
        for (int r = 0; r < n; ++r) {
          const double vrp = v[r * n + p], vrq = v[r * n + q];
          v[r * n + p] = c * vrp - s * vrq;
          v[r * n + q] = s * vrp + c * vrq;
        }
      }
    }
  }
  for (int i = 0; i < n; ++i) eig[i] = a[i * n + i];
  for (int i = 0; i < n; ++i) {  // selection sort, descending: n is small
    int best = i;
    for (int j = i + 1; j < n; ++j)
      if (eig[j] > eig[best]) best = j;
    if (best == i) continue;
    const double e = eig[i];
    eig[i] = eig[best];
    eig[best] = e;
    for (int r = 0; r < n; ++r) {
      const double t = v[r * n + i];
      v[r * n + i] = v[r * n + best];
      v[r * n + best] = t;
    }
  }
  // A fixed sign per vector (its largest entry positive) makes the result deterministic.
  for (int i = 0; i < n; ++i) {
    int arg = 0;
    for (int r = 1; r < n; ++r)
      if (fabs(v[r * n + i]) > fabs(v[arg * n + i])) arg = r;
    if (v[arg * n + i] < 0)
      for (int r = 0; r < n; ++r) v[r * n + i] = -v[r * n + i];
  }
}

// sigma from the Gram eigenvalues, with the relative cut-off applied.
SEMU_HD inline void singular_values_from_eigs(const double* eig, double* sigma, int q) {
  const double top = eig[0] > 0 ? sqrt(eig[0]) : 0.0;
  for (int i = 0; i < q; ++i) {
    const double s = eig[i] > 0 ? sqrt(eig[i]) : 0.0;
    sigma[i] = (s > kGramSvdRelTol * top) ? s : 0.0;
  }
}

}  // namespace semu_fast
