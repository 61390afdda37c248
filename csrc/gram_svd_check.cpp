// Argument checks of semu_fast::gram_svd, shared by its CPU and CUDA kernels.
#include <ATen/ATen.h>

#include "gram_svd.h"

namespace semu_fast {

void check_gram_svd_args(const at::Tensor& G) {
  TORCH_CHECK(G.dim() == 3, "gram_svd: G must have shape (B, m, n), got ", G.sizes());
  TORCH_CHECK(at::isFloatingType(G.scalar_type()), "gram_svd: G must be a floating tensor, got ", G.scalar_type());
  TORCH_CHECK(G.size(2) >= 1 && G.size(2) <= kGramSvdMaxN, "gram_svd: G's last dim n must be in [1, ", kGramSvdMaxN,
              "] (the Gram matrix is n x n), got ", G.size(2));
  TORCH_CHECK(G.size(1) >= 1, "gram_svd: G must have at least one row, got shape ", G.sizes());
}

}  // namespace semu_fast
