// Argument checks shared by the CPU and CUDA kernels of semu_fast::accumulate_. They run over every pair before
// any accumulator is written, so a bad call leaves all of them untouched.
#pragma once
#include <ATen/ATen.h>

#include "disjoint.h"
#include "dtypes.h"

namespace semu_fast {

inline void check_accumulate_args(at::TensorList accumulators, at::TensorList grads, c10::DeviceType device) {
  TORCH_CHECK(accumulators.size() == grads.size(), "accumulate_: accumulators and grads must have the same length, got ",
              accumulators.size(), " and ", grads.size());
  for (size_t i = 0; i < accumulators.size(); ++i) {
    const auto& acc = accumulators[i];
    const auto& grad = grads[i];
    TORCH_CHECK(acc.scalar_type() == at::kFloat, "accumulate_: accumulators[", i, "] must be float32, got ",
                acc.scalar_type());
    TORCH_CHECK(is_kernel_float(grad.scalar_type()), "accumulate_: grads[", i,
                "] must be a floating dtype (float32, float16, bfloat16, float64), got ", grad.scalar_type());
    TORCH_CHECK(acc.sizes() == grad.sizes(), "accumulate_: grads[", i, "] has shape ", grad.sizes(),
                " but accumulators[", i, "] has shape ", acc.sizes());
    TORCH_CHECK(acc.device().type() == device && grad.device() == acc.device(), "accumulate_: accumulators[", i,
                "] and grads[", i, "] must both be on one ", c10::DeviceTypeName(device), " device, got ",
                acc.device(), " and ", grad.device());
    TORCH_CHECK(acc.is_contiguous(), "accumulate_: accumulators[", i, "] must be contiguous");
  }
  check_disjoint("accumulate_", "accumulators", accumulators);
  check_disjoint_reads("accumulate_", "accumulators", accumulators, "grads", grads);
}

}  // namespace semu_fast
