// CUDA kernel of semu_fast::gram_svd: one thread block per matrix. The block builds the float64 Gram matrix in
// shared memory, one thread diagonalises it (n <= 64: a few thousand rotations, cheap next to reading G), and the
// block forms U = G V / sigma.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include "../gram_svd.h"

namespace semu_fast {

void check_gram_svd_args(const at::Tensor& G);  // csrc/gram_svd_check.cpp

namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void gram_svd_kernel(const scalar_t* __restrict__ G, scalar_t* __restrict__ U, scalar_t* __restrict__ S,
                                scalar_t* __restrict__ Vh, int64_t m, int n, int q) {
  extern __shared__ double scratch[];
  double* a = scratch;           // n x n Gram
  double* v = a + n * n;         // n x n eigenvectors
  double* eig = v + n * n;       // n eigenvalues
  double* sigma = eig + n;       // q singular values
  const int64_t b = blockIdx.x;
  const scalar_t* g = G + b * m * n;
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, j = idx % n;
    double acc = 0.0;
    if (i <= j)
      for (int64_t r = 0; r < m; ++r) acc += static_cast<double>(g[r * n + i]) * static_cast<double>(g[r * n + j]);
    a[idx] = acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < i; ++j) a[i * n + j] = a[j * n + i];
    jacobi_eigh(a, v, eig, n);
    singular_values_from_eigs(eig, sigma, q);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < q * n; idx += blockDim.x) {
    const int k = idx / n, j = idx % n;
    Vh[(b * q + k) * n + j] = static_cast<scalar_t>(v[j * n + k]);
    if (j == 0) S[b * q + k] = static_cast<scalar_t>(sigma[k]);
  }
  for (int64_t idx = threadIdx.x; idx < m * q; idx += blockDim.x) {
    const int64_t r = idx / q;
    const int k = static_cast<int>(idx % q);
    double acc = 0.0;
    if (sigma[k] != 0.0) {
      for (int j = 0; j < n; ++j) acc += static_cast<double>(g[r * n + j]) * v[j * n + k];
      acc /= sigma[k];
    }
    U[(b * m + r) * q + k] = static_cast<scalar_t>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_svd_cuda(const at::Tensor& G_in) {
  check_gram_svd_args(G_in);
  const c10::cuda::CUDAGuard guard(G_in.device());
  const auto out_dtype = G_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor G = G_in.to(out_dtype).contiguous();
  const int64_t batch = G.size(0), m = G.size(1);
  const int n = static_cast<int>(G.size(2)), q = static_cast<int>(std::min<int64_t>(m, n));
  at::Tensor U = at::empty({batch, m, q}, G.options());
  at::Tensor S = at::empty({batch, q}, G.options());
  at::Tensor Vh = at::empty({batch, q, n}, G.options());
  if (batch == 0) return {U, S, Vh};
  const size_t shared = sizeof(double) * (2 * n * n + n + q);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "gram_svd_cuda", [&] {
    auto kernel = gram_svd_kernel<scalar_t>;
    if (shared > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
    kernel<<<static_cast<unsigned>(batch), kThreads, shared, stream>>>(
        G.const_data_ptr<scalar_t>(), U.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(), Vh.data_ptr<scalar_t>(), m, n,
        q);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CUDA, m) { m.impl("gram_svd", &gram_svd_cuda); }

}  // namespace semu_fast
