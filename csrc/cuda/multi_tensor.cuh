// Multi-tensor apply (apex style), shared by the CUDA kernels that walk lists of tensors (accumulate.cu,
// project.cu): each tensor is cut into equal chunks, one thread block per chunk, and one launch serves many
// tensors. The table that tells each block its (tensor, chunk) is a kernel argument passed BY VALUE: it travels
// inside the launch itself, so there is no device buffer to fill and no host-to-device copy (a blocking one from
// pageable memory would stall every call). The table is a fixed-size struct under 4 KB, the classic kernel
// argument limit; when it fills, it is launched and refilled.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace semu_fast {

// Threads per block of the element-wise kernels; each thread moves kVec-element packs, kUnroll packs in flight.
constexpr int kMultiTensorThreads = 256;
constexpr int kVec = 4;
constexpr int kUnroll = 4;
// One pass of a block over a chunk covers this many elements; chunks are multiples of it, so every chunk starts
// as aligned as its tensor does (vector loads stay possible past chunk 0).
constexpr int64_t kTile = int64_t{kMultiTensorThreads} * kVec * kUnroll;
// Chunks grow with the call up to 256 Ki elements (1 MB of fp32): a full table then moves ~0.8 GB (fp32 += bf16)
// per launch, ~200 us at H200 bandwidth, long next to the few us between two launches; a small call gets small
// chunks, so even a few MB spread over all SMs.
constexpr int64_t kMaxChunk = int64_t{1} << 18;

// The table: kMaxTensors tensors and kMaxBlocks blocks per launch. 320 blocks of 256 threads all stay resident on
// an H100/H200 (132 SMs), so a launch runs in one wave; but that is only ~30% occupancy, which is what limits
// bandwidth (H200: accumulate 2.97 TB/s with bf16 grads, 3.70 TB/s with fp32, of ~4.8). Doubling kUnroll instead
// spilled registers (measured with ptxas -v): more blocks per launch is the next step.
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;

template <int kLists>
struct ChunkTable {
  void* ptrs[kLists][kMaxTensors];   // list l's tensor, for the tensors of this launch
  int64_t numel[kMaxTensors];
  int64_t first_slot[kMaxTensors];   // call-wide index of the tensor's chunk 0: where per-chunk results go
  int32_t id[kMaxTensors];           // the tensor's position in the caller's list: where per-tensor results go
  int64_t chunk;                     // elements per chunk (one value for the whole call)
  uint8_t block_tensor[kMaxBlocks];  // block b works on tensor block_tensor[b] ...
  int32_t block_chunk[kMaxBlocks];   // ... chunk block_chunk[b] of it
};
static_assert(sizeof(ChunkTable<2>) <= 3840, "the chunk table must stay a kernel argument (4 KB with the others)");

// What one block works on: elements [begin, begin + length) of tensor `tensor` of the table.
struct Chunk {
  int tensor;
  int64_t begin, length, slot;
};

template <int kLists>
__device__ __forceinline__ Chunk block_chunk(const ChunkTable<kLists>& table) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t c = table.block_chunk[blockIdx.x];
  const int64_t begin = c * table.chunk;
  const int64_t rest = table.numel[t] - begin;
  return {t, begin, rest < table.chunk ? rest : table.chunk, table.first_slot[t] + c};
}

// kVec elements moved as one vector when aligned to the pack's size (16 B for fp32; 8 B for bf16/fp16, 32 B as two
// 16 B loads for fp64).
template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// Elements [i, i + kVec) of p; those at or past n read as 0. One vector load when the pack is whole and `vector`
// (the block's pointers are aligned); element loads otherwise. Both give the same values, so results never
// depend on alignment.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p, int64_t i, int64_t n, bool vector) {
  if (vector && i + kVec <= n) return *reinterpret_cast<const Pack<T>*>(p + i);
  Pack<T> out;
#pragma unroll
  for (int k = 0; k < kVec; ++k) out.v[k] = i + k < n ? p[i + k] : T(0.0f);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, int64_t n, bool vector, const Pack<T>& x) {
  if (vector && i + kVec <= n) {
    *reinterpret_cast<Pack<T>*>(p + i) = x;
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k)
    if (i + k < n) p[i + k] = x.v[k];
}

// A chunk is walked in passes of kTile elements: in pass `pass`, unrolled pack u of thread t starts at
// element pack_start(pass, u). Consecutive threads take consecutive packs (coalesced); which thread sees which
// element, and in what order, is fixed, so per-thread sums are reproducible.
__device__ __forceinline__ int64_t pack_start(int64_t pass, int u) {
  return pass * kTile + (int64_t{u} * kMultiTensorThreads + threadIdx.x) * kVec;
}

// This thread's kUnroll packs of pass `pass` from two lists, all loads issued before any value is used (the ILP
// that keeps bytes in flight).
template <typename A, typename B>
__device__ __forceinline__ void load_pass(const A* a, const B* b, int64_t pass, int64_t n, bool vector,
                                          Pack<A> (&pa)[kUnroll], Pack<B> (&pb)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    pa[u] = load_pack(a, pack_start(pass, u), n, vector);
    pb[u] = load_pack(b, pack_start(pass, u), n, vector);
  }
}

// Host side: one tensor of the call, with one pointer per list, its position in the caller's list, and the
// call-wide index of its chunk 0 (for kernels with per-chunk results; the caller numbers the chunks of all
// tensors, so the numbering does not depend on how tensors are grouped into launches).
template <int kLists>
struct TensorRef {
  std::array<void*, kLists> ptrs;
  int64_t numel;
  int32_t id;
  int64_t first_slot;
};

// Elements per chunk for a call over `total` elements in `tensors` tensors (see kMaxChunk): the whole call in one
// table if it fits, kTile at least. Each tensor's last chunk is partial, so `tensors` blocks are held back: a call
// that fits must not spill a few blocks into a second, nearly empty launch.
inline int64_t chunk_elements(int64_t total, int64_t tensors) {
  const int64_t blocks = std::max<int64_t>(kMaxBlocks - tensors, kMaxBlocks / 2);
  const int64_t per_block = (total + blocks - 1) / blocks;
  return std::clamp((per_block + kTile - 1) / kTile * kTile, kTile, kMaxChunk);
}

inline int64_t chunk_count(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

// Calls launch(table, blocks) for consecutive tables covering every chunk of every tensor, in list order.
template <int kLists, typename Launch>
void multi_tensor_apply(const std::vector<TensorRef<kLists>>& tensors, int64_t chunk, Launch&& launch) {
  ChunkTable<kLists> table{};
  table.chunk = chunk;
  int held = 0, blocks = 0;  // tensors and blocks in the table
  for (const TensorRef<kLists>& ref : tensors) {
    const int64_t chunks = chunk_count(ref.numel, chunk);
    TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "multi_tensor_apply: tensor of ", ref.numel,
                " elements has too many chunks");
    for (int l = 0; l < kLists; ++l) table.ptrs[l][held] = ref.ptrs[l];
    table.numel[held] = ref.numel;
    table.first_slot[held] = ref.first_slot;
    table.id[held] = ref.id;
    ++held;
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[blocks] = static_cast<uint8_t>(held - 1);
      table.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last = c == chunks - 1;
      if (blocks < kMaxBlocks && !(last && held == kMaxTensors)) continue;
      launch(table, blocks);
      blocks = 0;
      if (last) {
        held = 0;
      } else {  // the tensor goes on: it becomes entry 0 of the next table
        for (int l = 0; l < kLists; ++l) table.ptrs[l][0] = table.ptrs[l][held - 1];
        table.numel[0] = table.numel[held - 1];
        table.first_slot[0] = table.first_slot[held - 1];
        table.id[0] = table.id[held - 1];
        held = 1;
      }
    }
    if (chunks == 0) --held;  // an empty tensor needs no entry
  }
  if (blocks > 0) launch(table, blocks);
}

}  // namespace semu_fast
