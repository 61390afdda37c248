// Every schema of the semu_fast operator library, in one place. CPU kernels register in csrc/cpu/, CUDA kernels in
// csrc/cuda/; the Python layer adds fake (meta) implementations and fills any key a kernel is missing for. The
// Python module around the library (semu_fast._C) is csrc/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(semu_fast, m) {
  // accumulators[i] += grads[i] for every i: fp32 accumulators, any floating grad dtype, one call for many tensors.
  m.def("accumulate_(Tensor(a!)[] accumulators, Tensor[] grads) -> ()");
  // Thin SVDs of a batch of (m x n) matrices with n <= 64 through their n x n Gram matrices:
  // U (B, m, q), S (B, q), Vh (B, q, n), q = min(m, n); float32 out (float64 for float64 in).
  m.def("gram_svd(Tensor G) -> (Tensor U, Tensor S, Tensor Vh)");
  // grads[i] -= c_i weights[i] in place (c_i from projection: "orthogonal", "official", "none"); returns the float64
  // energies ||grads[i]||^2 after the projection. grads: float32, contiguous; weights: any float dtype.
  m.def("project_perpendicular_(Tensor(a!)[] grads, Tensor[] weights, str projection) -> Tensor");
}
