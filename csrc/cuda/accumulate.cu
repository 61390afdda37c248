// CUDA kernel of semu_fast::accumulate_ on multi_tensor.cuh: one launch per grad dtype (and device) serves all
// tensors, one block per chunk. Pure streaming (read acc and grad, write acc), so the kernel is about bytes in
// flight: kVec-element vector loads, kUnroll of them issued before the first add.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "../accumulate.h"
#include "multi_tensor.cuh"

namespace semu_fast {
namespace {

// At most 64 registers per thread, so 4 blocks fit an SM and a full table (kMaxBlocks) runs in one wave.
// __grid_constant__: the table is read in place from the kernel argument space, never copied per thread.
template <typename scalar_t>
__global__ void __launch_bounds__(kMultiTensorThreads, 4)
    accumulate_kernel(const __grid_constant__ ChunkTable<2> table) {
  const Chunk chunk = block_chunk(table);
  float* acc = static_cast<float*>(table.ptrs[0][chunk.tensor]) + chunk.begin;
  const scalar_t* grad = static_cast<const scalar_t*>(table.ptrs[1][chunk.tensor]) + chunk.begin;
  const int64_t n = chunk.length;
  const bool vector = pack_aligned(acc) && pack_aligned(grad);
  for (int64_t pass = 0; pass * kTile < n; ++pass) {
    Pack<float> a[kUnroll];
    Pack<scalar_t> g[kUnroll];
    load_pass(acc, grad, pass, n, vector, a, g);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // One fp32 add of the exactly converted value, as the CPU kernel and acc + grad.float(): bit-exact.
#pragma unroll
      for (int k = 0; k < kVec; ++k) a[u].v[k] += static_cast<float>(g[u].v[k]);
      store_pack(acc, pack_start(pass, u), n, vector, a[u]);
    }
  }
}

void accumulate_cuda(at::TensorList accumulators, at::TensorList grads) {
  check_accumulate_args(accumulators, grads, c10::DeviceType::CUDA);
  // Contiguous grads are kept alive here until the launches are queued (the caching allocator orders reuse on
  // the stream, so nothing is freed under a running kernel).
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(grads.size());
  std::map<std::pair<c10::DeviceIndex, c10::ScalarType>, std::vector<TensorRef<2>>> groups;
  for (size_t i = 0; i < accumulators.size(); ++i) {
    contiguous.push_back(grads[i].contiguous());
    const at::Tensor& grad = contiguous.back();
    void* ptrs[2] = {accumulators[i].data_ptr(), const_cast<void*>(grad.const_data_ptr())};
    groups[{grad.device().index(), grad.scalar_type()}].push_back(
        {{ptrs[0], ptrs[1]}, grad.numel(), static_cast<int32_t>(i), /*first_slot=*/0});
  }
  for (const auto& [key, refs] : groups) {
    const auto [device, dtype] = key;
    const c10::cuda::CUDAGuard guard(device);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device);
    int64_t total = 0;
    for (const auto& ref : refs) total += ref.numel;
    const int64_t chunk = chunk_elements(total, static_cast<int64_t>(refs.size()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "accumulate_cuda", [&] {
      multi_tensor_apply<2>(refs, chunk, [&](const ChunkTable<2>& table, int blocks) {
        accumulate_kernel<scalar_t><<<blocks, kMultiTensorThreads, 0, stream>>>(table);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CUDA, m) { m.impl("accumulate_", &accumulate_cuda); }

}  // namespace semu_fast
