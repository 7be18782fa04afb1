// Device helpers shared by the ops_*.cu kernels (device side only; never include from host .cpp):
// bf16 <-> f32 conversion, warp and block reductions, the index-fault record, launch geometry.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace moetp::cuda::launch::detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}

// 8 consecutive bf16 values (one 16-byte access; p 16-byte aligned) <-> f32.
__device__ __forceinline__ void load_bf16x8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void store_bf16x8(__nv_bfloat16* p, const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Block-wide sum in a fixed tree order (deterministic for a fixed blockDim). Every thread gets the
// result. `scratch` holds >= 32 values; the call starts and ends with a barrier so it can be reused.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < num_warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Records a bad index. The first recorder fills the fields; later ones only count. Read by the host
// after a synchronisation (cuda::check_index_faults).
__device__ __forceinline__ void record_fault(IndexFault* fault, IndexOp op, int64_t position, int64_t value,
                                             int64_t limit) {
  if (fault == nullptr) return;
  if (atomicAdd(&fault->count, 1ull) == 0ull) {
    fault->op = static_cast<int32_t>(op);
    fault->position = position;
    fault->value = value;
    fault->limit = limit;
  }
}

// Grid size for grid-stride loops over `n` work items of one block each (or `per_block` items).
inline unsigned grid_blocks(int64_t n, int64_t per_block = 1, int64_t cap = int64_t{1} << 20) {
  int64_t g = (n + per_block - 1) / per_block;
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return static_cast<unsigned>(g);
}

// Threads for a block that walks a row of `width` elements: a multiple of 32 in [32, max_threads].
inline unsigned row_threads(int64_t width, int64_t max_threads = 256) {
  int64_t t = (width + kWarp - 1) / kWarp * kWarp;
  if (t < kWarp) t = kWarp;
  if (t > max_threads) t = max_threads;
  return static_cast<unsigned>(t);
}

}  // namespace moetp::cuda::launch::detail
