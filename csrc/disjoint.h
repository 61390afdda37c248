// The check that no two tensors an op writes share memory, for every kernel that writes a list of tensors.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace semu_fast {

// Two written tensors on overlapping memory would race on the GPU (two thread blocks read-modify-write one element)
// and count twice on the CPU. Views of one flat buffer that do not overlap are fine. The tensors must be contiguous
// (checked before), so each occupies exactly [data_ptr, data_ptr + nbytes). Runs before anything is written.
inline void check_disjoint(const char* op, const char* name, at::TensorList tensors) {
  std::vector<std::tuple<int, uintptr_t, uintptr_t, size_t>> spans;  // (device, start, end, index)
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() == 0) continue;
    const auto start = reinterpret_cast<uintptr_t>(tensors[i].data_ptr());
    spans.emplace_back(tensors[i].device().index(), start, start + tensors[i].nbytes(), i);
  }
  std::sort(spans.begin(), spans.end());
  // Sorted by start, an overlap anywhere shows up between neighbours.
  for (size_t k = 1; k < spans.size(); ++k) {
    const auto& [device_a, start_a, end_a, a] = spans[k - 1];
    const auto& [device_b, start_b, end_b, b] = spans[k];
    TORCH_CHECK_VALUE(device_a != device_b || start_b >= end_a, op, ": ", name, "[", std::min(a, b), "] and ", name,
                      "[", std::max(a, b), "] overlap in memory (the same tensor twice?); each tensor written must "
                      "be distinct");
  }
}

}  // namespace semu_fast
