// Row movement on the GPU (device side; contracts in ops.h): gathers (embedding forward, the
// dispatchers' gather_rows) and deterministic scatter-adds (embedding backward, scatter_add_rows,
// fold_weighted).
//
// Scatter-adds do not use atomics: the (key, position) pairs are radix-sorted by key (stable, so
// positions stay in increasing order within a key), and one block per distinct key walks its run,
// adding the rows into the destination in position order. Each destination element therefore sees
// exactly the CPU reference's sequence of f32 additions (dst += src[i] for increasing i), and the
// adds and multiplies are written with __fadd_rn/__fmul_rn so nvcc cannot fuse them into FMAs: the
// result is bit-identical to the CPU loop on the same f32 inputs, run after run.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/ops_common.cuh"

namespace moetp::cuda::launch {

namespace {

using detail::grid_blocks;
using detail::load_bf16x8;
using detail::record_fault;
using detail::row_threads;
using detail::to_f32;

// ---- gather -------------------------------------------------------------------------------------

// out[i] = src[index[i]] in units of `Unit` (row_units per row); a bad index zero-fills the row.
template <typename Index, typename Unit>
__global__ void gather_rows_kernel(const Unit* __restrict__ src, Unit* __restrict__ out,
                                   const Index* __restrict__ index, int64_t M, int64_t R, int64_t row_units,
                                   IndexFault* fault, IndexOp op) {
  for (int64_t i = blockIdx.x; i < M; i += gridDim.x) {
    const int64_t r = static_cast<int64_t>(index[i]);
    Unit* o = out + i * row_units;
    if (r < 0 || r >= R) {
      if (threadIdx.x == 0) record_fault(fault, op, i, r, R);
      for (int64_t c = threadIdx.x; c < row_units; c += blockDim.x) o[c] = Unit{};
      continue;
    }
    const Unit* s = src + r * row_units;
    for (int64_t c = threadIdx.x; c < row_units; c += blockDim.x) o[c] = s[c];
  }
}

// Widest copy unit (16, 8, 4, 2 or 1 bytes) that divides the row and both base addresses.
template <typename Index>
cudaError_t gather_any(const void* src, void* out, const Index* index, int64_t M, int64_t R, int64_t row_bytes,
                       IndexFault* fault, IndexOp op, cudaStream_t stream) {
  if (M == 0 || row_bytes == 0) return cudaSuccess;
  const uint64_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out) |
                         static_cast<uint64_t>(row_bytes);
  const unsigned grid = grid_blocks(M);
  auto go = [&](auto unit) {
    using Unit = decltype(unit);
    const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(Unit));
    gather_rows_kernel<Index, Unit><<<grid, row_threads(row_units), 0, stream>>>(
        static_cast<const Unit*>(src), static_cast<Unit*>(out), index, M, R, row_units, fault, op);
  };
  if (align % 16 == 0) {
    go(uint4{});
  } else if (align % 8 == 0) {
    go(uint2{});
  } else if (align % 4 == 0) {
    go(uint32_t{});
  } else if (align % 2 == 0) {
    go(uint16_t{});
  } else {
    go(uint8_t{});
  }
  return cudaGetLastError();
}

// ---- sorted accumulate --------------------------------------------------------------------------

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Bits that distinguish keys in [0, limit): sorting only those keeps radix passes few. Keys outside
// the range are faults; they may then interleave with valid keys (only the result, never memory
// safety, is affected, and the fault is reported).
int key_bits(int64_t limit, bool key64) {
  int bits = 1;
  while (bits < (key64 ? 63 : 31) && (int64_t{1} << bits) < limit) ++bits;
  return bits;
}

template <typename Key>
size_t cub_sort_bytes(int64_t M) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const Key*>(nullptr), static_cast<Key*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<int>(M));
  return bytes;
}

__global__ void iota_kernel(int32_t* p, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = static_cast<int32_t>(i);
  }
}

// One block per run of equal keys in `keys` (sorted); the block's threads split the H columns and
// each walks the run in order. kWeighted multiplies each row by w[key, cols[pos]] first.
template <typename Key, typename Src, bool kWeighted>
__global__ void sorted_accumulate_kernel(const Key* __restrict__ keys, const int32_t* __restrict__ pos, int64_t M,
                                         const Src* __restrict__ src, int64_t H, const int64_t* __restrict__ cols,
                                         const float* __restrict__ w, int64_t C, float* __restrict__ dst, int64_t R,
                                         IndexFault* fault, IndexOp row_op, IndexOp col_op) {
  for (int64_t i = blockIdx.x; i < M; i += gridDim.x) {
    const int64_t key = static_cast<int64_t>(keys[i]);
    if (i > 0 && static_cast<int64_t>(keys[i - 1]) == key) continue;  // not the start of a run
    int64_t end = i + 1;
    while (end < M && static_cast<int64_t>(keys[end]) == key) ++end;
    if (key < 0 || key >= R) {
      if (threadIdx.x == 0) {
        for (int64_t j = i; j < end; ++j) record_fault(fault, row_op, pos[j], key, R);
      }
      continue;
    }
    if constexpr (kWeighted) {
      if (threadIdx.x == 0) {
        for (int64_t j = i; j < end; ++j) {
          const int64_t col = cols[pos[j]];
          if (col < 0 || col >= C) record_fault(fault, col_op, pos[j], col, C);
        }
      }
    }
    float* d = dst + key * H;
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
      float acc = d[c];
      for (int64_t j = i; j < end; ++j) {
        const int64_t p = pos[j];
        float v = to_f32(src[p * H + c]);
        if constexpr (kWeighted) {
          const int64_t col = cols[p];
          if (col < 0 || col >= C) continue;
          v = __fmul_rn(w[key * C + col], v);
        }
        acc = __fadd_rn(acc, v);
      }
      d[c] = acc;
    }
  }
}

// The same walk with 8 consecutive columns per thread (16-byte bf16 loads, two 16-byte f32 loads
// and stores): for rows of H % 8 == 0 elements on 16-byte-aligned bases. Every column still sees
// dst += (w ·) src[pos[j]] for j in run order, so the result is bit-identical to the scalar kernel.
template <typename Src>
__device__ __forceinline__ void load8(const Src* p, float (&v)[8]);
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float (&v)[8]) {
  load_bf16x8(p, v);
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <typename Key, typename Src, bool kWeighted>
__global__ void sorted_accumulate8_kernel(const Key* __restrict__ keys, const int32_t* __restrict__ pos, int64_t M,
                                          const Src* __restrict__ src, int64_t H, const int64_t* __restrict__ cols,
                                          const float* __restrict__ w, int64_t C, float* __restrict__ dst, int64_t R,
                                          IndexFault* fault, IndexOp row_op, IndexOp col_op) {
  for (int64_t i = blockIdx.x; i < M; i += gridDim.x) {
    const int64_t key = static_cast<int64_t>(keys[i]);
    if (i > 0 && static_cast<int64_t>(keys[i - 1]) == key) continue;  // not the start of a run
    int64_t end = i + 1;
    while (end < M && static_cast<int64_t>(keys[end]) == key) ++end;
    if (key < 0 || key >= R) {
      if (threadIdx.x == 0) {
        for (int64_t j = i; j < end; ++j) record_fault(fault, row_op, pos[j], key, R);
      }
      continue;
    }
    if constexpr (kWeighted) {
      if (threadIdx.x == 0) {
        for (int64_t j = i; j < end; ++j) {
          const int64_t col = cols[pos[j]];
          if (col < 0 || col >= C) record_fault(fault, col_op, pos[j], col, C);
        }
      }
    }
    float* d = dst + key * H;
    for (int64_t c = 8 * static_cast<int64_t>(threadIdx.x); c < H; c += 8 * static_cast<int64_t>(blockDim.x)) {
      float acc[8];
      load8<float>(d + c, acc);
      for (int64_t j = i; j < end; ++j) {
        const int64_t p = pos[j];
        float scale = 1.0f;
        if constexpr (kWeighted) {
          const int64_t col = cols[p];
          if (col < 0 || col >= C) continue;
          scale = w[key * C + col];
        }
        float v[8];
        load8<Src>(src + p * H + c, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = __fadd_rn(acc[e], kWeighted ? __fmul_rn(scale, v[e]) : v[e]);
      }
      reinterpret_cast<float4*>(d + c)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      reinterpret_cast<float4*>(d + c)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename Key, typename Src, bool kWeighted>
cudaError_t sorted_accumulate(const Key* keys_in, int64_t M, const Src* src, int64_t H, const int64_t* cols,
                              const float* w, int64_t C, float* dst, int64_t R, void* workspace,
                              size_t workspace_bytes, IndexFault* fault, IndexOp row_op, IndexOp col_op,
                              cudaStream_t stream) {
  if (M == 0 || H == 0) return cudaSuccess;
  if (workspace_bytes < sorted_accumulate_workspace_bytes(M, sizeof(Key) == 8)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  Key* keys_out = reinterpret_cast<Key*>(ws);
  ws += align_up(static_cast<size_t>(M) * sizeof(Key));
  int32_t* pos_in = reinterpret_cast<int32_t*>(ws);
  ws += align_up(static_cast<size_t>(M) * sizeof(int32_t));
  int32_t* pos_out = reinterpret_cast<int32_t*>(ws);
  ws += align_up(static_cast<size_t>(M) * sizeof(int32_t));
  size_t sort_bytes = cub_sort_bytes<Key>(M);

  iota_kernel<<<grid_blocks(M, 256, 4096), 256, 0, stream>>>(pos_in, M);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairs(ws, sort_bytes, keys_in, keys_out, pos_in, pos_out, static_cast<int>(M), 0,
                                        key_bits(R, sizeof(Key) == 8), stream);
  if (err != cudaSuccess) return err;
  if (H % 8 == 0 && aligned16(src) && aligned16(dst)) {
    sorted_accumulate8_kernel<Key, Src, kWeighted><<<grid_blocks(M), row_threads(H / 8), 0, stream>>>(
        keys_out, pos_out, M, src, H, cols, w, C, dst, R, fault, row_op, col_op);
  } else {
    sorted_accumulate_kernel<Key, Src, kWeighted><<<grid_blocks(M), row_threads(H), 0, stream>>>(
        keys_out, pos_out, M, src, H, cols, w, C, dst, R, fault, row_op, col_op);
  }
  return cudaGetLastError();
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

cudaError_t embedding_forward(const int32_t* ids, const uint16_t* table, uint16_t* y, int64_t N, int64_t V, int64_t H,
                              IndexFault* fault, cudaStream_t stream) {
  return gather_any<int32_t>(table, y, ids, N, V, H * 2, fault, IndexOp::kEmbeddingForward, stream);
}

cudaError_t gather_rows(const void* src, void* out, const int64_t* rows, int64_t M, int64_t R, int64_t row_bytes,
                        IndexFault* fault, cudaStream_t stream) {
  return gather_any<int64_t>(src, out, rows, M, R, row_bytes, fault, IndexOp::kGatherRows, stream);
}

size_t sorted_accumulate_workspace_bytes(int64_t M, bool key64) {
  if (M <= 0) return 0;
  const size_t m = static_cast<size_t>(M);
  const size_t sort_bytes = key64 ? cub_sort_bytes<int64_t>(M) : cub_sort_bytes<int32_t>(M);
  return align_up(m * (key64 ? 8 : 4)) + 2 * align_up(m * 4) + align_up(sort_bytes);
}

cudaError_t embedding_backward(const int32_t* ids, const uint16_t* dy, float* dtable, int64_t N, int64_t V, int64_t H,
                               void* workspace, size_t workspace_bytes, IndexFault* fault, cudaStream_t stream) {
  return sorted_accumulate<int32_t, __nv_bfloat16, false>(
      ids, N, reinterpret_cast<const __nv_bfloat16*>(dy), H, nullptr, nullptr, 0, dtable, V, workspace,
      workspace_bytes, fault, IndexOp::kEmbeddingBackward, IndexOp::kNone, stream);
}

cudaError_t scatter_add_rows(const void* src, bool src_bf16, const int64_t* rows, float* dst, int64_t M, int64_t R,
                             int64_t H, void* workspace, size_t workspace_bytes, IndexFault* fault,
                             cudaStream_t stream) {
  if (src_bf16) {
    return sorted_accumulate<int64_t, __nv_bfloat16, false>(
        rows, M, static_cast<const __nv_bfloat16*>(src), H, nullptr, nullptr, 0, dst, R, workspace, workspace_bytes,
        fault, IndexOp::kScatterAddRows, IndexOp::kNone, stream);
  }
  return sorted_accumulate<int64_t, float, false>(rows, M, static_cast<const float*>(src), H, nullptr, nullptr, 0, dst,
                                                  R, workspace, workspace_bytes, fault, IndexOp::kScatterAddRows,
                                                  IndexOp::kNone, stream);
}

cudaError_t fold_weighted(const void* y, bool y_bf16, const int64_t* rows, const int64_t* cols, const float* w,
                          int64_t C, float* dst, int64_t M, int64_t R, int64_t H, void* workspace,
                          size_t workspace_bytes, IndexFault* fault, cudaStream_t stream) {
  if (y_bf16) {
    return sorted_accumulate<int64_t, __nv_bfloat16, true>(
        rows, M, static_cast<const __nv_bfloat16*>(y), H, cols, w, C, dst, R, workspace, workspace_bytes, fault,
        IndexOp::kFoldWeightedRows, IndexOp::kFoldWeightedCols, stream);
  }
  return sorted_accumulate<int64_t, float, true>(rows, M, static_cast<const float*>(y), H, cols, w, C, dst, R,
                                                 workspace, workspace_bytes, fault, IndexOp::kFoldWeightedRows,
                                                 IndexOp::kFoldWeightedCols, stream);
}

}  // namespace moetp::cuda::launch
