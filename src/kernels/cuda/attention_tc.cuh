// Device helpers of the tensor-core attention kernels (attention_tc_fwd.cu, attention_tc_bwd.cu):
// inline PTX for cp.async, ldmatrix and mma.sync.m16n8k16 (bf16 in, f32 accumulate), the swizzled
// shared-memory tile layout they share, and the fragment conventions below. Device code only.
//
// Fragments of mma.m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"), lane = 4·gid + tig:
//   A (16 × 16, row-major, 4 × b32 = 8 bf16): a0 (row gid,     cols 2tig, 2tig+1)
//                                             a1 (row gid + 8, cols 2tig, 2tig+1)
//                                             a2 (row gid,     cols 2tig+8, 2tig+9)
//                                             a3 (row gid + 8, cols 2tig+8, 2tig+9)
//   B (16 × 8, "col": B[k][n]), 2 × b32:      b0 (k 2tig, 2tig+1, col n = gid), b1 (k 2tig+8, 2tig+9)
//   C/D (16 × 8 f32), 4 regs:                 c0, c1 (row gid, cols 2tig, 2tig+1), c2, c3 (row gid+8)
// A C fragment pair (n-tiles 2t, 2t+1) therefore is, once rounded to bf16, the A fragment of k-step t
// of the next product (the flash-attention register reuse of P and dS).
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8 × 8 matrix i, which lands in register i;
// without .trans lane l receives row l/4, cols 2(l%4), 2(l%4)+1, with .trans row 2(l%4)+{0,1}, col l/4.
//
// Shared-memory tiles are row-major with rows of kChunks 16-byte chunks (kChunks >= 8); chunk c of
// row r is stored at chunk c ^ (r % 8), so the 8 row addresses of one ldmatrix matrix (8 rows, one
// chunk) fall in 8 different bank groups, as do the 16-byte cp.async writes of a row.
// Shared-memory reads and writes through asm carry a "memory" clobber, so the compiler keeps them in
// order with the plain C++ stores to the same tiles (dSᵀ, output staging) around the barriers.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace moetp::cuda::launch::attn_tc {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of chunk `chunk` of row `row` in a swizzled tile of kChunks chunks per row.
template <int kChunks>
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  static_assert(kChunks >= 8 && (kChunks & (kChunks - 1)) == 0, "rows of 8, 16, ... chunks");
  return static_cast<uint32_t>(row * kChunks * 16 + ((chunk ^ (row & 7)) << 4));
}

// ldmatrix row addresses. Every x4 load here reads rows 16i + r(lane) and chunks 2j + c(lane) of a
// tile, with r < 16 and c in {0, 1}: lane_offset = swizzle(r, c) once per lane, then
// tile_offset(lane_offset, i, j) = swizzle(16i + r, 2j + c), because (16i + r) % 8 = r % 8, the row
// part of the offset has no bits in the chunk field, and 2j + c = 2j ^ c. One XOR per (i, j) instead
// of a register per (i, j) the compiler would otherwise hoist out of the loops.
template <int kChunks>
__device__ __forceinline__ uint32_t tile_offset(uint32_t lane_offset, int i, int j) {
  return static_cast<uint32_t>(16 * i * kChunks * 16) + (lane_offset ^ static_cast<uint32_t>(j << 5));
}
// The three lane patterns: rows 0-15 with chunks {0 | 1} by lane / 16 (A operands, Q/K/V rows as
// mma rows); rows {0-7 | 8-15} by lane / 16 with chunks by (lane / 8) % 2 (B operands read without
// .trans, and A operands read with .trans); rows by (lane / 8) % 2 with chunks by lane / 16 (B
// operands read with .trans).
template <int kChunks>
__device__ __forceinline__ uint32_t lane_offset_a(int lane) {
  return swizzle<kChunks>(lane % 16, lane / 16);
}
template <int kChunks>
__device__ __forceinline__ uint32_t lane_offset_b(int lane) {
  return swizzle<kChunks>(lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
}
template <int kChunks>
__device__ __forceinline__ uint32_t lane_offset_bt(int lane) {
  return swizzle<kChunks>(lane % 8 + 8 * ((lane / 8) % 2), lane / 16);
}

// 16 bytes global -> shared, asynchronous; valid == false writes 16 zero bytes (reads nothing).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// 4 bytes global -> shared, asynchronous; valid == false writes 4 zero bytes.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a · b on the tensor cores: (16 × 16 bf16) · (16 × 8 bf16) -> 16 × 8 f32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x (MUFU, flushes denormals; 2^-inf = 0).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats rounded to nearest-even bf16; `lo` in the low half (the lower column index).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) | (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16);
}

// Rows [row0, row0 + kRows) of a (num_rows, ·) bf16 matrix with the given row stride (elements),
// kChunks · 8 columns from `src`, into a swizzled tile at shared address `dst`; rows at or past
// num_rows are zero-filled (so that 0 · garbage never makes a NaN). Rows are 16-byte aligned.
template <int kRows, int kChunks, int kThreads>
__device__ __forceinline__ void load_tile_async(uint32_t dst, const uint16_t* __restrict__ src, int64_t row_stride,
                                                int row0, int num_rows) {
  static_assert((kRows * kChunks) % kThreads == 0, "whole passes");
#pragma unroll
  for (int pass = 0; pass < kRows * kChunks / kThreads; ++pass) {
    const int idx = pass * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < num_rows;
    const uint16_t* p = valid ? src + static_cast<int64_t>(row0 + r) * row_stride + c * 8 : src;
    cp_async_16(dst + swizzle<kChunks>(r, c), p, valid);
  }
}

// Packed documents (cu_seqlens over the flat token stream, `docs[0..num_docs]`): the document of
// token t, the largest d with docs[d] <= t. Binary search; uniform cost.
__device__ __forceinline__ int doc_of(const int64_t* __restrict__ docs, int num_docs, int64_t t) {
  int lo = 0, hi = num_docs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (docs[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Index of (token t, head h) in a (B, Hq, row_len) statistics array (lse, delta), t over B·row_len.
__device__ __forceinline__ int64_t stat_index(int64_t t, int h, int Hq, int row_len) {
  return (t / row_len * Hq + h) * static_cast<int64_t>(row_len) + t % row_len;
}

// Deterministic dq (cuda::attention_backward's `deterministic`): the key tiles of a (sequence, query
// head, query tile) add their dq shares in key-tile order, so every dq element sums in one fixed
// order. `turns` counts the key tiles that have added; key tile j waits until it reads j. Lower key
// tiles have lower block indices, so they are resident or done when a higher one waits (no deadlock).
__device__ __forceinline__ void dq_wait_turn(const int* turns, int turn) {
  if (threadIdx.x == 0) {
    int seen;
    while (true) {
      asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(seen) : "l"(turns) : "memory");
      if (seen == turn) break;
      __nanosleep(32);
    }
  }
  __syncthreads();
}
__device__ __forceinline__ void dq_pass_turn(int* turns) {
  __threadfence();  // this thread's adds are visible before the next key tile's
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(turns, 1);
}

}  // namespace moetp::cuda::launch::attn_tc
