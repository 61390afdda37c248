// Block-wide float64 sum with a fixed reduction tree: the same inputs give bitwise the same sum on every run
// (unlike atomicAdd, whose order follows the scheduler).
#pragma once

namespace semu_fast {

// Sum of `value` over the block; the result is valid in thread 0. blockDim.x must be a multiple of 32 (<= 1024);
// `scratch` holds blockDim.x / 32 doubles. Every thread must call it (it synchronises the block, before returning
// too, so scratch can be reused by the next call).
__device__ inline double block_sum(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  return value;
}

}  // namespace semu_fast
