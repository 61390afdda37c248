// CUDA kernel of semu_fast::accumulate_, multi-tensor-apply style: every tensor of one grad dtype is cut into
// fixed-size chunks, a table of (accumulator, grad, offset, length) rows goes to the device, and one launch
// handles all chunks, one thread block each. Hundreds of layer gradients cost one launch, not hundreds.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "../accumulate.h"

namespace semu_fast {
namespace {

constexpr int64_t kChunk = 1 << 16;
constexpr int kThreads = 512;

template <typename scalar_t>
__global__ void accumulate_chunks_kernel(const int64_t* __restrict__ table) {
  const int64_t* row = table + 4 * static_cast<int64_t>(blockIdx.x);
  float* acc = reinterpret_cast<float*>(row[0]) + row[2];
  const scalar_t* grad = reinterpret_cast<const scalar_t*>(row[1]) + row[2];
  const int64_t length = row[3];
  for (int64_t j = threadIdx.x; j < length; j += blockDim.x) acc[j] += static_cast<float>(grad[j]);
}

void accumulate_cuda(at::TensorList accumulators, at::TensorList grads) {
  check_accumulate_args(accumulators, grads, c10::DeviceType::CUDA);
  if (accumulators.empty()) return;
  const c10::cuda::CUDAGuard guard(accumulators[0].device());
  // Contiguous grads are kept alive here until the launches are queued (the caching allocator orders reuse on
  // the stream, so nothing is freed under a running kernel).
  std::vector<at::Tensor> contiguous;
  std::map<std::pair<c10::ScalarType, c10::DeviceIndex>, std::vector<int64_t>> tables;
  for (size_t i = 0; i < accumulators.size(); ++i) {
    contiguous.push_back(grads[i].contiguous());
    const at::Tensor& grad = contiguous.back();
    auto& table = tables[{grad.scalar_type(), grad.device().index()}];
    for (int64_t start = 0; start < grad.numel(); start += kChunk) {
      table.insert(table.end(), {reinterpret_cast<int64_t>(accumulators[i].data_ptr<float>()),
                                 reinterpret_cast<int64_t>(grad.data_ptr()), start,
                                 std::min(kChunk, grad.numel() - start)});
    }
  }
  for (auto& [key, table] : tables) {
    if (table.empty()) continue;
    const auto [dtype, index] = key;
    const c10::cuda::CUDAGuard device_guard(index);
    const at::Tensor host = at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, at::kLong);
    const at::Tensor rows = host.to(at::Device(at::kCUDA, index));
    const auto stream = at::cuda::getCurrentCUDAStream(index);
    const auto blocks = static_cast<unsigned>(table.size() / 4);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "accumulate_cuda", [&] {
      accumulate_chunks_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(rows.const_data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CUDA, m) { m.impl("accumulate_", &accumulate_cuda); }

}  // namespace semu_fast
