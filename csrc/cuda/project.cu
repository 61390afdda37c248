// CUDA kernels of semu_fast::project_perpendicular_, multi-tensor style (as accumulate.cu): every layer of one
// weight dtype is cut into chunks listed in one table; one launch reduces <G,W> and ||W||^2 for all of them
// (float64, block reduction, one atomicAdd per block), a second rewrites G -= c W in place and sums ||G_perp||^2.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "../project.h"

namespace semu_fast {
namespace {

constexpr int64_t kChunk = 1 << 16;
constexpr int kThreads = 256;
constexpr int kRow = 5;  // table row: grad ptr, weight ptr, offset, length, layer index

__device__ double block_sum(double value, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffff, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? shared[lane] : 0.0;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffff, value, offset);
  __syncthreads();
  return value;  // valid in thread 0
}

template <typename scalar_t>
__global__ void reduce_kernel(const int64_t* __restrict__ table, double* __restrict__ sums) {
  __shared__ double shared[kThreads / 32];
  const int64_t* row = table + kRow * static_cast<int64_t>(blockIdx.x);
  const float* g = reinterpret_cast<const float*>(row[0]) + row[2];
  const scalar_t* w = reinterpret_cast<const scalar_t*>(row[1]) + row[2];
  double gw = 0.0, ww = 0.0;
  for (int64_t i = threadIdx.x; i < row[3]; i += blockDim.x) {
    const double wi = static_cast<double>(w[i]);
    gw += static_cast<double>(g[i]) * wi;
    ww += wi * wi;
  }
  gw = block_sum(gw, shared);
  ww = block_sum(ww, shared);
  if (threadIdx.x == 0) {
    atomicAdd(sums + 2 * row[4], gw);
    atomicAdd(sums + 2 * row[4] + 1, ww);
  }
}

template <typename scalar_t>
__global__ void update_kernel(const int64_t* __restrict__ table, const double* __restrict__ sums, int mode,
                              double* __restrict__ energies) {
  __shared__ double shared[kThreads / 32];
  const int64_t* row = table + kRow * static_cast<int64_t>(blockIdx.x);
  float* g = reinterpret_cast<float*>(row[0]) + row[2];
  const scalar_t* w = reinterpret_cast<const scalar_t*>(row[1]) + row[2];
  const double gw = sums[2 * row[4]], ww = sums[2 * row[4] + 1];
  // mode: 0 orthogonal, 1 official, 2 none (projection_coefficient, on the device).
  const double c = (mode == 2 || ww <= 0.0) ? 0.0 : (mode == 0 ? gw / ww : gw / sqrt(ww));
  double energy = 0.0;
  for (int64_t i = threadIdx.x; i < row[3]; i += blockDim.x) {
    const float value = static_cast<float>(static_cast<double>(g[i]) - c * static_cast<double>(w[i]));
    g[i] = value;
    energy += static_cast<double>(value) * value;
  }
  energy = block_sum(energy, shared);
  if (threadIdx.x == 0) atomicAdd(energies + row[4], energy);
}

at::Tensor project_perpendicular_cuda(at::TensorList grads, at::TensorList weights, c10::string_view mode_) {
  const std::string_view mode(mode_.data(), mode_.size());
  check_project_args(grads, weights, mode, c10::DeviceType::CUDA);
  const int64_t layers = static_cast<int64_t>(grads.size());
  if (layers == 0) return at::empty({0}, at::kDouble);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  for (const auto& g : grads)
    TORCH_CHECK(g.device() == grads[0].device(), "project_perpendicular_: all tensors must be on one CUDA device");
  const auto options = grads[0].options().dtype(at::kDouble);
  at::Tensor sums = at::zeros({2 * layers}, options);
  at::Tensor energies = at::zeros({layers}, options);
  const int mode_id = mode == "orthogonal" ? 0 : (mode == "official" ? 1 : 2);
  std::vector<at::Tensor> contiguous;
  std::map<c10::ScalarType, std::vector<int64_t>> tables;
  for (int64_t t = 0; t < layers; ++t) {
    contiguous.push_back(weights[t].contiguous());
    const at::Tensor& w = contiguous.back();
    auto& table = tables[w.scalar_type()];
    for (int64_t start = 0; start < w.numel(); start += kChunk)
      table.insert(table.end(), {reinterpret_cast<int64_t>(grads[t].data_ptr<float>()),
                                 reinterpret_cast<int64_t>(w.data_ptr()), start, std::min(kChunk, w.numel() - start), t});
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<std::pair<c10::ScalarType, at::Tensor>> device_tables;
  for (auto& [dtype, table] : tables) {
    if (table.empty()) continue;
    const at::Tensor rows = at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, at::kLong)
                                .to(grads[0].device());
    device_tables.emplace_back(dtype, rows);
  }
  // All reductions finish (stream order) before any update reads the sums.
  for (auto& [dtype, rows] : device_tables) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "project_reduce_cuda", [&] {
      reduce_kernel<scalar_t><<<static_cast<unsigned>(rows.numel() / kRow), kThreads, 0, stream>>>(
          rows.const_data_ptr<int64_t>(), sums.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (auto& [dtype, rows] : device_tables) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "project_update_cuda", [&] {
      update_kernel<scalar_t><<<static_cast<unsigned>(rows.numel() / kRow), kThreads, 0, stream>>>(
          rows.const_data_ptr<int64_t>(), sums.const_data_ptr<double>(), mode_id, energies.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return energies;
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CUDA, m) { m.impl("project_perpendicular_", &project_perpendicular_cuda); }

}  // namespace semu_fast
