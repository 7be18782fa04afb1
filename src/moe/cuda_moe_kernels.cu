// Device side of the single-GPU MoE layer's own kernels (contracts in cuda_moe_kernels.h): the
// routing plan (CUB stable radix sort by expert), forced-balance routing, the gather-side combine
// and the combine backward. Rows of H bf16 values move 16 bytes per thread when H % 8 == 0 and the
// bases are 16-byte aligned, else one value per thread.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/ops_common.cuh"
#include "moe/cuda_moe_kernels.h"

namespace moetp::moe::launch {

namespace {

using bf16_t = __nv_bfloat16;
using cuda::launch::detail::block_sum;
using cuda::launch::detail::grid_blocks;
using cuda::launch::detail::row_threads;

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Bits that distinguish expert ids in [0, E): the sort runs only over those.
int key_bits(int64_t E) {
  int bits = 1;
  while (bits < 31 && (int64_t{1} << bits) < E) ++bits;
  return bits;
}

size_t sort_bytes(int64_t M, int64_t E) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<int>(M), 0, key_bits(E));
  return bytes;
}

__global__ void iota_kernel(int32_t* __restrict__ p, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = static_cast<int32_t>(i);
  }
}

__global__ void plan_finish_kernel(const int32_t* __restrict__ flat, int64_t M, int64_t K, int64_t* __restrict__ token,
                                   int32_t* __restrict__ pos) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t f = flat[i];
    token[i] = f / K;
    pos[f] = static_cast<int32_t>(i);
  }
}

// Per-block histogram in shared memory, then one global add per (block, expert). Integer adds:
// the result does not depend on their order.
__global__ void histogram_kernel(const int32_t* __restrict__ idx, int64_t M, int32_t* __restrict__ counts, int64_t E) {
  extern __shared__ int32_t hist[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = idx[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
  }
}

__global__ void force_balance_kernel(int32_t* __restrict__ idx, float* __restrict__ weight, int64_t M, int64_t E,
                                     float inv_k) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < M;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    idx[j] = static_cast<int32_t>(j % E);
    weight[j] = inv_k;
  }
}

// kVec consecutive bf16 values <-> f32 (kVec = 8: one 16-byte access).
template <int kVec>
__device__ __forceinline__ void load_bf16(const bf16_t* p, float* v) {
  if constexpr (kVec == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      v[2 * j] = f.x;
      v[2 * j + 1] = f.y;
    }
  } else {
    static_assert(kVec == 1, "kVec is 8 or 1");
    v[0] = __bfloat162float(*p);
  }
}

template <int kVec>
__device__ __forceinline__ void store_bf16(bf16_t* p, const float* v) {
  if constexpr (kVec == 8) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
    static_assert(kVec == 1, "kVec is 8 or 1");
    *p = __float2bfloat16_rn(v[0]);
  }
}

template <int kVec>
__global__ void combine_rows_kernel(const bf16_t* __restrict__ src, const int32_t* __restrict__ pos,
                                    const float* __restrict__ weight, const float* __restrict__ add,
                                    bf16_t* __restrict__ out, int64_t N, int64_t K, int64_t H) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < H; c += static_cast<int64_t>(blockDim.x) * kVec) {
      float acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        float v[kVec];
        load_bf16<kVec>(src + static_cast<int64_t>(pos[n * K + k]) * H + c, v);
        const float w = weight != nullptr ? weight[n * K + k] : 1.0f;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          // Multiply and add rounded separately (no FMA), as the CPU fold.
          acc[j] = __fadd_rn(acc[j], weight != nullptr ? __fmul_rn(w, v[j]) : v[j]);
        }
      }
      if (add != nullptr) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] = __fadd_rn(acc[j], add[n * H + c + j]);
      }
      store_bf16<kVec>(out + n * H + c, acc);
    }
  }
}

// One row of the combine backward: dy_row = w · d_row (bf16, rounded as the CPU), and where dweight_f
// is set, *dweight_f = d_row · y_row (a block-wide sum: every thread of the block calls this with the
// same dweight_f, null or not).
template <int kVec>
__device__ __forceinline__ void combine_backward_row(const bf16_t* __restrict__ d_row, const bf16_t* __restrict__ y_row,
                                                     float w, bf16_t* __restrict__ dy_row, float* dweight_f, int64_t H,
                                                     float* scratch) {
  float dot = 0.0f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < H; c += static_cast<int64_t>(blockDim.x) * kVec) {
    float d[kVec], o[kVec];
    load_bf16<kVec>(d_row + c, d);
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = __fmul_rn(w, d[j]);
    store_bf16<kVec>(dy_row + c, o);
    if (dweight_f != nullptr) {
      float v[kVec];
      load_bf16<kVec>(y_row + c, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) dot = fmaf(d[j], v[j], dot);
    }
  }
  if (dweight_f != nullptr) {
    const float total = block_sum(dot, scratch);
    if (threadIdx.x == 0) *dweight_f = total;
  }
}

// Slot-side combine backward: row i holds entry f = flat[i] of token n = f / K.
template <int kVec>
__global__ void combine_backward_kernel(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ y,
                                        const int32_t* __restrict__ flat, const float* __restrict__ weight,
                                        bf16_t* __restrict__ dy, float* __restrict__ dweight, int64_t M, int64_t K,
                                        int64_t H) {
  __shared__ float scratch[32];
  for (int64_t i = blockIdx.x; i < M; i += gridDim.x) {
    const int64_t f = flat[i];
    combine_backward_row<kVec>(dout + (f / K) * H, y + i * H, weight[f], dy + i * H,
                               dweight != nullptr ? dweight + f : nullptr, H, scratch);
  }
}

// vexpert combine backward: per expert-side row i of received row q = rows[i], entry c = cols[i].
template <int kVec>
__global__ void vexpert_combine_backward_kernel(const bf16_t* __restrict__ dz, const bf16_t* __restrict__ y,
                                                const int64_t* __restrict__ rows, const int64_t* __restrict__ cols,
                                                const float* __restrict__ weight, int64_t C, bf16_t* __restrict__ dy,
                                                float* __restrict__ dweight, int64_t R, int64_t H) {
  __shared__ float scratch[32];
  for (int64_t i = blockIdx.x; i < R; i += gridDim.x) {
    const int64_t q = rows[i];
    const int64_t f = q * C + cols[i];
    combine_backward_row<kVec>(dz + q * H, y + i * H, weight[f], dy + i * H,
                               dweight != nullptr ? dweight + f : nullptr, H, scratch);
  }
}

// One thread per (n, k): the sent rows of token n in send order (the CPU order).
__global__ void vexpert_weight_grad_kernel(const float* __restrict__ dw_sent, const int64_t* __restrict__ tok_begin,
                                           const int64_t* __restrict__ tok_rows, float* __restrict__ dw, int64_t N,
                                           int64_t K) {
  for (int64_t f = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; f < N * K;
       f += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = f / K, k = f % K;
    float acc = 0.0f;
    for (int64_t b = tok_begin[n]; b < tok_begin[n + 1]; ++b) acc = __fadd_rn(acc, dw_sent[tok_rows[b] * K + k]);
    dw[f] = acc;
  }
}

__global__ void add_to_bf16_kernel(const float* __restrict__ a, const float* __restrict__ b, bf16_t* __restrict__ out,
                                   int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16_rn(b != nullptr ? __fadd_rn(a[i], b[i]) : a[i]);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

size_t routing_plan_workspace_bytes(int64_t M) {
  if (M <= 0) return 0;
  // The sort's scratch for the widest key range the router allows (E <= 1024): never less than
  // what routing_plan asks for, whatever E is.
  return 2 * align_up(static_cast<size_t>(M) * sizeof(int32_t)) + align_up(sort_bytes(M, 1024));
}

cudaError_t routing_plan(const int32_t* topk_idx_NK, int64_t N, int64_t K, int64_t E, void* workspace,
                         size_t workspace_bytes, int32_t* flat_M, int64_t* token_M, int32_t* pos_NK, int32_t* counts_E,
                         cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(counts_E, 0, static_cast<size_t>(E) * sizeof(int32_t), stream);
  const int64_t M = N * K;
  if (err != cudaSuccess || M == 0) return err;
  if (E > 1024 || workspace_bytes < routing_plan_workspace_bytes(M)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  int32_t* keys_out = reinterpret_cast<int32_t*>(ws);
  ws += align_up(static_cast<size_t>(M) * sizeof(int32_t));
  int32_t* vals_in = reinterpret_cast<int32_t*>(ws);
  ws += align_up(static_cast<size_t>(M) * sizeof(int32_t));
  size_t bytes = sort_bytes(M, E);

  iota_kernel<<<grid_blocks(M, 256, 4096), 256, 0, stream>>>(vals_in, M);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // Radix sort is stable: pairs of one expert keep their n·K + k order.
  err = cub::DeviceRadixSort::SortPairs(ws, bytes, topk_idx_NK, keys_out, vals_in, flat_M, static_cast<int>(M), 0,
                                        key_bits(E), stream);
  if (err != cudaSuccess) return err;
  plan_finish_kernel<<<grid_blocks(M, 256, 4096), 256, 0, stream>>>(flat_M, M, K, token_M, pos_NK);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  histogram_kernel<<<grid_blocks(M, 256 * 16, 1024), 256, static_cast<size_t>(E) * sizeof(int32_t), stream>>>(
      keys_out, M, counts_E, E);
  return cudaGetLastError();
}

cudaError_t force_balance_routing(int32_t* topk_idx_NK, float* topk_weight_NK, int64_t N, int64_t K, int64_t E,
                                  cudaStream_t stream) {
  const int64_t M = N * K;
  if (M == 0) return cudaSuccess;
  force_balance_kernel<<<grid_blocks(M, 256, 4096), 256, 0, stream>>>(topk_idx_NK, topk_weight_NK, M, E,
                                                                      1.0f / static_cast<float>(K));
  return cudaGetLastError();
}

cudaError_t combine_rows(const uint16_t* src_MH, const int32_t* pos_NK, const float* weight_NK, const float* add_NH,
                         uint16_t* out_NH, int64_t N, int64_t K, int64_t H, cudaStream_t stream) {
  if (N == 0 || H == 0) return cudaSuccess;
  const auto* src = reinterpret_cast<const bf16_t*>(src_MH);
  auto* out = reinterpret_cast<bf16_t*>(out_NH);
  if (H % 8 == 0 && aligned16(src) && aligned16(out) && (add_NH == nullptr || aligned16(add_NH))) {
    combine_rows_kernel<8>
        <<<grid_blocks(N), row_threads(H / 8), 0, stream>>>(src, pos_NK, weight_NK, add_NH, out, N, K, H);
  } else {
    combine_rows_kernel<1><<<grid_blocks(N), row_threads(H), 0, stream>>>(src, pos_NK, weight_NK, add_NH, out, N, K, H);
  }
  return cudaGetLastError();
}

cudaError_t combine_backward(const uint16_t* dout_NH, const uint16_t* y_MH, const int32_t* flat_M,
                             const float* weight_NK, uint16_t* dy_MH, float* dweight_NK, int64_t M, int64_t K,
                             int64_t H, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const auto* dout = reinterpret_cast<const bf16_t*>(dout_NH);
  const auto* y = reinterpret_cast<const bf16_t*>(y_MH);
  auto* dy = reinterpret_cast<bf16_t*>(dy_MH);
  if (H % 8 == 0 && aligned16(dout) && aligned16(y) && aligned16(dy)) {
    combine_backward_kernel<8>
        <<<grid_blocks(M), row_threads(H / 8), 0, stream>>>(dout, y, flat_M, weight_NK, dy, dweight_NK, M, K, H);
  } else {
    combine_backward_kernel<1>
        <<<grid_blocks(M), row_threads(H), 0, stream>>>(dout, y, flat_M, weight_NK, dy, dweight_NK, M, K, H);
  }
  return cudaGetLastError();
}

cudaError_t vexpert_combine_backward(const uint16_t* dz_QH, const uint16_t* y_RH, const int64_t* rows_R,
                                     const int64_t* cols_R, const float* weight_QC, int64_t C, uint16_t* dy_RH,
                                     float* dweight_QC, int64_t R, int64_t H, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  const auto* dz = reinterpret_cast<const bf16_t*>(dz_QH);
  const auto* y = reinterpret_cast<const bf16_t*>(y_RH);
  auto* dy = reinterpret_cast<bf16_t*>(dy_RH);
  if (H % 8 == 0 && aligned16(dz) && aligned16(y) && aligned16(dy)) {
    vexpert_combine_backward_kernel<8><<<grid_blocks(R), row_threads(H / 8), 0, stream>>>(dz, y, rows_R, cols_R,
                                                                                          weight_QC, C, dy, dweight_QC,
                                                                                          R, H);
  } else {
    vexpert_combine_backward_kernel<1><<<grid_blocks(R), row_threads(H), 0, stream>>>(dz, y, rows_R, cols_R, weight_QC,
                                                                                      C, dy, dweight_QC, R, H);
  }
  return cudaGetLastError();
}

cudaError_t vexpert_weight_grad(const float* dw_sent_SK, const int64_t* tok_begin_N1, const int64_t* tok_rows_S,
                                float* dweight_NK, int64_t N, int64_t K, cudaStream_t stream) {
  if (N * K == 0) return cudaSuccess;
  vexpert_weight_grad_kernel<<<grid_blocks(N * K, 256, 4096), 256, 0, stream>>>(dw_sent_SK, tok_begin_N1, tok_rows_S,
                                                                               dweight_NK, N, K);
  return cudaGetLastError();
}

cudaError_t add_to_bf16(const float* a, const float* b, uint16_t* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  add_to_bf16_kernel<<<grid_blocks(n, 256, 4096), 256, 0, stream>>>(a, b, reinterpret_cast<bf16_t*>(out), n);
  return cudaGetLastError();
}

}  // namespace moetp::moe::launch
