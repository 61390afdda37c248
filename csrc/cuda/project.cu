// CUDA kernels of semu_fast::project_perpendicular_ on multi_tensor.cuh (one launch per weight dtype serves all
// layers). Every reduction is deterministic, bitwise the same run to run (as the CPU kernel): each chunk's block
// writes its partial sums to its own slot of a buffer, and a second kernel adds each layer's slots in a fixed
// order, instead of atomicAdd in scheduler order. The passes, in stream order:
//   dot:    per chunk, <G,W> and ||W||^2                  -> partial[2 slot], partial[2 slot + 1]
//   sum:    per layer, over its slots                      -> sums[2 layer], sums[2 layer + 1]
//   update: c from the layer's sums, G -= c W in place; per chunk ||G_perp||^2 -> partial[slot]
//   sum:    per layer                                      -> energies[layer]
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "../project.h"
#include "block_reduce.cuh"
#include "multi_tensor.cuh"

namespace semu_fast {
namespace {

template <typename w_t>
__global__ void __launch_bounds__(kMultiTensorThreads)
    dot_kernel(const __grid_constant__ ChunkTable<2> table, double* __restrict__ partial) {
  __shared__ double scratch[kMultiTensorThreads / 32];
  const Chunk chunk = block_chunk(table);
  const float* g = static_cast<const float*>(table.ptrs[0][chunk.tensor]) + chunk.begin;
  const w_t* w = static_cast<const w_t*>(table.ptrs[1][chunk.tensor]) + chunk.begin;
  const int64_t n = chunk.length;
  const bool vector = pack_aligned(g) && pack_aligned(w);
  double gw = 0.0, ww = 0.0;
  for (int64_t pass = 0; pass * kTile < n; ++pass) {
    Pack<float> gp[kUnroll];
    Pack<w_t> wp[kUnroll];
    load_pass(g, w, pass, n, vector, gp, wp);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const double wi = static_cast<double>(wp[u].v[k]);
        gw += static_cast<double>(gp[u].v[k]) * wi;
        ww += wi * wi;
      }
  }
  gw = block_sum(gw, scratch);
  ww = block_sum(ww, scratch);
  if (threadIdx.x == 0) {
    partial[2 * chunk.slot] = gw;
    partial[2 * chunk.slot + 1] = ww;
  }
}

template <typename w_t>
__global__ void __launch_bounds__(kMultiTensorThreads)
    update_kernel(const __grid_constant__ ChunkTable<2> table, const double* __restrict__ sums, Projection mode,
                  double* __restrict__ partial) {
  __shared__ double scratch[kMultiTensorThreads / 32];
  const Chunk chunk = block_chunk(table);
  float* g = static_cast<float*>(table.ptrs[0][chunk.tensor]) + chunk.begin;
  const w_t* w = static_cast<const w_t*>(table.ptrs[1][chunk.tensor]) + chunk.begin;
  const int64_t n = chunk.length;
  const bool vector = pack_aligned(g) && pack_aligned(w);
  const int32_t layer = table.id[chunk.tensor];
  const double c = projection_coefficient(sums[2 * layer], sums[2 * layer + 1], mode);
  double energy = 0.0;
  for (int64_t pass = 0; pass * kTile < n; ++pass) {
    Pack<float> gp[kUnroll];
    Pack<w_t> wp[kUnroll];
    load_pass(g, w, pass, n, vector, gp, wp);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        // Lanes past the chunk's end hold 0 - c * 0 = 0: they add nothing and are not stored.
        const float value = static_cast<float>(static_cast<double>(gp[u].v[k]) - c * static_cast<double>(wp[u].v[k]));
        gp[u].v[k] = value;
        energy += static_cast<double>(value) * value;
      }
      store_pack(g, pack_start(pass, u), n, vector, gp[u]);
    }
  }
  energy = block_sum(energy, scratch);
  if (threadIdx.x == 0) partial[chunk.slot] = energy;
}

// Per-layer slot ranges for sum_kernel, by value like the chunk table: layer first + i owns slots
// [slots[i], slots[i + 1]).
constexpr int kMaxSumLayers = 256;
struct LayerSlots {
  int64_t slots[kMaxSumLayers + 1];
  int64_t first;
};

// One block per layer: thread t adds slots t, t + blockDim, ... in order, then the fixed block tree.
template <int kValues>
__global__ void __launch_bounds__(kMultiTensorThreads)
    sum_kernel(const __grid_constant__ LayerSlots layers, const double* __restrict__ partial,
               double* __restrict__ out) {
  __shared__ double scratch[kMultiTensorThreads / 32];
  const int64_t begin = layers.slots[blockIdx.x], end = layers.slots[blockIdx.x + 1];
#pragma unroll
  for (int v = 0; v < kValues; ++v) {
    double sum = 0.0;
    for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) sum += partial[kValues * s + v];
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) out[kValues * (layers.first + blockIdx.x) + v] = sum;
  }
}

// out[kValues * layer + v] = the sum of partial[kValues * slot + v] over the layer's slots, for every layer.
// first_slot has layers + 1 entries (the last one the total).
template <int kValues>
void sum_per_layer(const std::vector<int64_t>& first_slot, const double* partial, double* out, cudaStream_t stream) {
  const int64_t layers = static_cast<int64_t>(first_slot.size()) - 1;
  for (int64_t first = 0; first < layers; first += kMaxSumLayers) {
    const int64_t count = std::min<int64_t>(kMaxSumLayers, layers - first);
    LayerSlots table{};
    table.first = first;
    for (int64_t i = 0; i <= count; ++i) table.slots[i] = first_slot[first + i];
    sum_kernel<kValues><<<static_cast<unsigned>(count), kMultiTensorThreads, 0, stream>>>(table, partial, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor project_perpendicular_cuda(at::TensorList grads, at::TensorList weights, c10::string_view mode_) {
  const Projection mode = check_project_args(grads, weights, std::string_view(mode_.data(), mode_.size()),
                                             c10::DeviceType::CUDA);
  const int64_t layers = static_cast<int64_t>(grads.size());
  if (layers == 0) return at::empty({0}, at::kDouble);
  for (const auto& g : grads)
    TORCH_CHECK(g.device() == grads[0].device(), "project_perpendicular_: all tensors must be on one CUDA device, got ",
                g.device(), " and ", grads[0].device());
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  int64_t total = 0;
  for (const auto& g : grads) total += g.numel();
  const int64_t chunk = chunk_elements(total, layers);
  // Slots number the chunks of all layers in list order, whatever weight dtype groups them for launching.
  std::vector<int64_t> first_slot(layers + 1, 0);
  for (int64_t t = 0; t < layers; ++t) first_slot[t + 1] = first_slot[t] + chunk_count(grads[t].numel(), chunk);

  std::vector<at::Tensor> contiguous;  // alive until the launches are queued
  contiguous.reserve(layers);
  std::map<c10::ScalarType, std::vector<TensorRef<2>>> groups;
  for (int64_t t = 0; t < layers; ++t) {
    contiguous.push_back(weights[t].contiguous());
    const at::Tensor& w = contiguous.back();
    groups[w.scalar_type()].push_back({{grads[t].data_ptr(), const_cast<void*>(w.const_data_ptr())}, w.numel(),
                                       static_cast<int32_t>(t), first_slot[t]});
  }
  const auto options = grads[0].options().dtype(at::kDouble);
  at::Tensor partial = at::empty({2 * std::max<int64_t>(first_slot.back(), 1)}, options);
  at::Tensor sums = at::empty({2 * layers}, options);
  at::Tensor energies = at::empty({layers}, options);

  for (const auto& [dtype, refs] : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "project_dot_cuda", [&] {
      multi_tensor_apply<2>(refs, chunk, [&](const ChunkTable<2>& table, int blocks) {
        dot_kernel<scalar_t><<<blocks, kMultiTensorThreads, 0, stream>>>(table, partial.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  sum_per_layer<2>(first_slot, partial.const_data_ptr<double>(), sums.data_ptr<double>(), stream);
  for (const auto& [dtype, refs] : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "project_update_cuda", [&] {
      multi_tensor_apply<2>(refs, chunk, [&](const ChunkTable<2>& table, int blocks) {
        update_kernel<scalar_t><<<blocks, kMultiTensorThreads, 0, stream>>>(table, sums.const_data_ptr<double>(), mode,
                                                                            partial.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  sum_per_layer<1>(first_slot, partial.const_data_ptr<double>(), energies.data_ptr<double>(), stream);
  return energies;
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CUDA, m) { m.impl("project_perpendicular_", &project_perpendicular_cuda); }

}  // namespace semu_fast
