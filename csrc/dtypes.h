// The floating dtypes the kernels compute with. at::isFloatingType also admits the float8 types, which no kernel
// dispatches: they must be refused before anything is written, not half way through a list.
#pragma once
#include <ATen/ATen.h>

namespace semu_fast {

inline bool is_kernel_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

}  // namespace semu_fast
