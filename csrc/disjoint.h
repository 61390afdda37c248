// The checks that no two tensors an op writes share memory, and that no tensor it reads shares memory with one it
// writes, for every kernel that writes a list of tensors.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
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

// A tensor read (any strides) that shares memory with a tensor written would be read after some of its elements
// were written: a wrong sum on the CPU, a race on the GPU. Only reads[i] being exactly written[i] (same address,
// dtype, shape and strides: each element reads itself before it is written) is fine. One sweep over the spans
// sorted by start finds any read-write overlap: the later-starting one begins before the earlier one ends.
inline void check_disjoint_reads(const char* op, const char* written_name, at::TensorList written,
                                 const char* read_name, at::TensorList reads) {
  struct Span { int device; uintptr_t start, end; bool read; size_t index; };
  std::vector<Span> spans;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // offset of the last element, in elements (torch strides are never negative)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::pair<uintptr_t, uintptr_t>(start, start + (last + 1) * t.element_size());
  };
  for (size_t i = 0; i < written.size(); ++i) {
    if (written[i].numel() == 0) continue;
    const auto [start, end] = span(written[i]);
    spans.push_back({written[i].device().index(), start, end, false, i});
  }
  for (size_t i = 0; i < reads.size(); ++i) {
    const auto& r = reads[i];
    if (r.numel() == 0) continue;
    if (i < written.size() && r.data_ptr() == written[i].data_ptr() && r.scalar_type() == written[i].scalar_type() &&
        r.sizes() == written[i].sizes() && r.strides() == written[i].strides())
      continue;
    const auto [start, end] = span(r);
    spans.push_back({r.device().index(), start, end, true, i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return std::tie(a.device, a.start) < std::tie(b.device, b.start);
  });
  const Span* furthest[2] = {nullptr, nullptr};  // per kind (written, read): the span reaching furthest so far
  for (size_t k = 0; k < spans.size(); ++k) {
    const Span& s = spans[k];
    if (k > 0 && spans[k - 1].device != s.device) furthest[0] = furthest[1] = nullptr;
    const Span* other = furthest[s.read ? 0 : 1];
    if (other != nullptr && s.start < other->end) {
      const Span& w = s.read ? *other : s;
      const Span& r = s.read ? s : *other;
      TORCH_CHECK_VALUE(false, op, ": ", read_name, "[", r.index, "] overlaps ", written_name, "[", w.index,
                        "] in memory; a tensor read must not share memory with one written (", read_name,
                        "[i] may only be ", written_name, "[i] itself)");
    }
    const Span*& mine = furthest[s.read ? 1 : 0];
    if (mine == nullptr || s.end > mine->end) mine = &s;
  }
}

}  // namespace semu_fast
