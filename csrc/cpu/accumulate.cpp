// CPU kernel of semu_fast::accumulate_: fp32 += any floating dtype, parallel over elements.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../accumulate.h"
#include "parallel.h"

namespace semu_fast {
namespace {

void accumulate_cpu(at::TensorList accumulators, at::TensorList grads) {
  check_accumulate_args(accumulators, grads, c10::DeviceType::CPU);
  for (size_t i = 0; i < accumulators.size(); ++i) {
    const at::Tensor grad = grads[i].contiguous();
    float* acc = accumulators[i].data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "accumulate_cpu", [&] {
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) acc[j] += static_cast<float>(g[j]);
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CPU, m) { m.impl("accumulate_", &accumulate_cpu); }

}  // namespace semu_fast
