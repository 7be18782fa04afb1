// Causal grouped-query attention on the GPU, the f32 kernels and the dispatch (device side; contract
// in attention.h, launchers in launch.h). The tensor-core kernels for D = 64 and 128 live in
// attention_tc_fwd.cu / attention_tc_bwd.cu; attention_forward / attention_backward below pick them
// for those D (AttentionKernel::kAuto) and these f32 kernels for every other D, or for any D with
// AttentionKernel::kF32 (the benchmark's baseline). The delta pass (rowsum(dout ⊙ out)) here serves
// both backward kernels.
// Flash-attention-2 tiling: the S × S score matrix never exists in device memory.
//
// Forward: one block per (query tile of 64 rows, query head, sequence) streams over the key tiles
// at or below the diagonal, keeping the row max m, the row sum l and the output accumulator in
// registers (online softmax, f32, base-2 exponentials of log2(e)-prescaled scores). Saves the
// natural-log row log-sum-exp lse = m + log(l), as cpu::AttentionSaved does.
// Backward: delta = rowsum(dout ⊙ out) first (one warp per row), then one block per (key tile of
// 64 keys, key/value head, sequence) walks the group's query heads and the query tiles at or below
// the diagonal, recomputes P from lse, accumulates dk and dv in registers (so the group's heads sum
// without atomics) and adds its share of dq into an f32 buffer with float4 atomics.
//
// Math: plain f32 FMA on shared-memory tiles (inputs converted from bf16 on load), a 16 × 16
// thread grid in which thread (ty, tx) owns rows ty + 16·i of a 64-row tile. Correct for any
// head_dim D ≤ 128 with D % 8 == 0 (tiles padded to 64 or 128 columns with zeros).
// Performance limits: no tensor cores, no cp.async pipelining, f32 tiles in shared memory (forward
// ~82 KB, backward ~165 KB at D = 128, so 2 and 1 blocks per SM), and a __syncthreads between every
// load and compute phase; much slower than the tensor-core kernels at D = 64 and 128
// (docs/performance.md, Attention).
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/attention_tc.cuh"
#include "kernels/cuda/launch.h"

namespace moetp::cuda::launch {

namespace {

constexpr int kBr = 64;        // query rows per tile
constexpr int kBc = 64;        // key rows per tile (== kBr: the diagonal tile of query tile t is key tile t)
constexpr int kThreads = 256;  // 16 × 16 thread grid
constexpr int kLdP = kBc + 1;  // row stride of the P / dS tiles (odd: rows ty and ty+1 fall in different banks)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(kBr == kBc, "the causal tile loops assume square tiles");
static_assert(kBr == 64 && kThreads == 256, "rows ty + 16·i, i < 4, cover a 64-row tile");

// Row stride (in floats) of a 64 × kD f32 shared-memory tile. The 4-float pad keeps float4
// alignment and puts rows tx and tx + 1 four banks apart, so the 8 threads of a 128-bit phase
// reading rows tx + 16·j hit distinct banks.
template <int kD>
constexpr int tile_ld() {
  return kD + 4;
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// dst[r][c] = f32(src[(row0 + r) · row_stride + c]) for r < 64, c < kD; zero where row0 + r >= num_rows
// or c >= D. Rows of src are 16-byte aligned and D % 8 == 0 (checked on the host).
template <int kD>
__device__ __forceinline__ void load_tile(float* dst, const uint16_t* __restrict__ src, int64_t row_stride, int row0,
                                          int num_rows, int D) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per tile row
  constexpr int kLd = tile_ld<kD>();
  for (int idx = threadIdx.x; idx < 64 * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < num_rows && c < D) {
      raw = __ldg(reinterpret_cast<const uint4*>(src + (row0 + r) * row_stride + c));
    }
    float4* d = reinterpret_cast<float4*>(dst + r * kLd + c);
    d[0] = make_float4(bf16_lo(raw.x), bf16_hi(raw.x), bf16_lo(raw.y), bf16_hi(raw.y));
    d[1] = make_float4(bf16_lo(raw.z), bf16_hi(raw.z), bf16_lo(raw.w), bf16_hi(raw.w));
  }
}

// acc[i][j] += Σ_d A[ty + 16i][d] · B[tx + 16j][d]: a 64 × 64 tile of A · Bᵀ, both row-major tiles.
template <int kD>
__device__ __forceinline__ void tile_abt(const float* A, const float* B, float (&acc)[4][4], int ty, int tx) {
  constexpr int kLd = tile_ld<kD>();
#pragma unroll 2
  for (int d = 0; d < kD; d += 4) {
    float4 a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(A + (ty + 16 * i) * kLd + d);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(B + (tx + 16 * j) * kLd + d);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float s = acc[i][j];
        s = fmaf(a[i].x, b[j].x, s);
        s = fmaf(a[i].y, b[j].y, s);
        s = fmaf(a[i].z, b[j].z, s);
        s = fmaf(a[i].w, b[j].w, s);
        acc[i][j] = s;
      }
    }
  }
}

__device__ __forceinline__ void axpy4(float4& y, float a, const float4& x) {
  y.x = fmaf(a, x.x, y.x);
  y.y = fmaf(a, x.y, y.y);
  y.z = fmaf(a, x.z, y.z);
  y.w = fmaf(a, x.w, y.w);
}

// Sum / max over the 16 lanes that share ty (lanes 0-15 or 16-31 of the warp).
__device__ __forceinline__ float row_max16(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float row_sum16(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int kD>
constexpr size_t forward_smem_bytes() {
  return sizeof(float) * (static_cast<size_t>(kBr) * tile_ld<kD>() + static_cast<size_t>(kBc) * tile_ld<kD>() +
                          static_cast<size_t>(kBr) * kLdP);
}

// grid (num_q_tiles, Hq, B). Thread (ty, tx) owns query rows ty + 16i; in the score tile keys
// tx + 16j, in the output tile columns tx·4 + 64j.
template <int kD>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(
    const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
    uint16_t* __restrict__ out, float* __restrict__ lse, int S, int Hq, int Hkv, int D, float scale_log2) {
  constexpr int kLd = tile_ld<kD>();
  constexpr int kDj = kD / 64;  // float4 column groups per thread in the output tile
  extern __shared__ float4 smem_f4[];
  float* q_s = reinterpret_cast<float*>(smem_f4);  // [kBr][kLd]
  float* kv_s = q_s + kBr * kLd;                   // [kBc][kLd]: K, then V of the same key tile
  float* p_s = kv_s + kBc * kLd;                   // [kBr][kLdP]

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int q_tile = gridDim.x - 1 - blockIdx.x;  // the longest rows (most key tiles) start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = h / (Hq / Hkv);
  const int q0 = q_tile * kBr;
  const int64_t q_stride = static_cast<int64_t>(Hq) * D, kv_stride = static_cast<int64_t>(Hkv) * D;
  const uint16_t* q_bh = q + static_cast<int64_t>(b) * S * q_stride + static_cast<int64_t>(h) * D;
  const uint16_t* k_bg = k + static_cast<int64_t>(b) * S * kv_stride + static_cast<int64_t>(g) * D;
  const uint16_t* v_bg = v + static_cast<int64_t>(b) * S * kv_stride + static_cast<int64_t>(g) * D;

  load_tile<kD>(q_s, q_bh, q_stride, q0, S, D);

  float m[4], l[4];  // running max (log2 domain) and this thread's partial row sum
  float4 o[4][kDj];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < kDj; ++j) o[i][j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }

  for (int k_tile = 0; k_tile <= q_tile; ++k_tile) {
    const int k0 = k_tile * kBc;
    load_tile<kD>(kv_s, k_bg, kv_stride, k0, S, D);
    __syncthreads();  // K (and on the first pass Q) in place

    float s[4][4] = {};
    tile_abt<kD>(q_s, kv_s, s, ty, tx);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int qi = q0 + ty + 16 * i;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int kj = k0 + tx + 16 * j;
        s[i][j] = (kj <= qi && kj < S) ? s[i][j] * scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      const float m_new = fmaxf(m[i], row_max16(tile_max));
      // Every row sees key k0 (q0 >= k0), so m_new is finite; the guard only keeps exp2 away from ∞ − ∞.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[i] - m_use);  // 0 on the first tile (m = −∞)
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = exp2f(s[i][j] - m_use);  // masked: exp2(−∞) = 0 exactly
        p_s[(ty + 16 * i) * kLdP + tx + 16 * j] = p;
        sum += p;
      }
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
#pragma unroll
      for (int j = 0; j < kDj; ++j) {
        o[i][j].x *= alpha;
        o[i][j].y *= alpha;
        o[i][j].z *= alpha;
        o[i][j].w *= alpha;
      }
    }
    __syncthreads();  // P written; everyone done reading K
    load_tile<kD>(kv_s, v_bg, kv_stride, k0, S, D);
    __syncthreads();  // V in place

#pragma unroll 4
    for (int c = 0; c < kBc; ++c) {
      float p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = p_s[(ty + 16 * i) * kLdP + c];
      float4 vv[kDj];
#pragma unroll
      for (int j = 0; j < kDj; ++j) vv[j] = *reinterpret_cast<const float4*>(kv_s + c * kLd + tx * 4 + 64 * j);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < kDj; ++j) axpy4(o[i][j], p[i], vv[j]);
      }
    }
    __syncthreads();  // done with V and P before the next tile overwrites them
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float row_l = row_sum16(l[i]);
    const int qi = q0 + ty + 16 * i;
    if (qi >= S) continue;
    const float inv_l = 1.0f / row_l;
    uint16_t* out_row = out + (static_cast<int64_t>(b) * S + qi) * q_stride + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int j = 0; j < kDj; ++j) {
      const int d = tx * 4 + 64 * j;
      if (d < D) {  // D % 8 == 0, so d < D implies d + 4 <= D
        uint2 packed;
        packed.x = pack_bf16x2(o[i][j].x * inv_l, o[i][j].y * inv_l);
        packed.y = pack_bf16x2(o[i][j].z * inv_l, o[i][j].w * inv_l);
        *reinterpret_cast<uint2*>(out_row + d) = packed;
      }
    }
    if (tx == 0) lse[(static_cast<int64_t>(b) * Hq + h) * S + qi] = (m[i] + log2f(row_l)) * kLn2;
  }
}

// One warp per (b, s, h) row of dout/out: delta[b, h, s] = Σ_d dout · out in f32.
__global__ void attention_delta_kernel(const uint16_t* __restrict__ dout, const uint16_t* __restrict__ out,
                                       float* __restrict__ delta, int64_t num_rows, int S, int Hq, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_rows) return;  // whole warp leaves together
  const uint16_t* a = dout + row * D;
  const uint16_t* o = out + row * D;
  float acc = 0.0f;
  for (int c = lane * 8; c < D; c += 32 * 8) {
    const uint4 x = __ldg(reinterpret_cast<const uint4*>(a + c));
    const uint4 y = __ldg(reinterpret_cast<const uint4*>(o + c));
    acc = fmaf(bf16_lo(x.x), bf16_lo(y.x), acc);
    acc = fmaf(bf16_hi(x.x), bf16_hi(y.x), acc);
    acc = fmaf(bf16_lo(x.y), bf16_lo(y.y), acc);
    acc = fmaf(bf16_hi(x.y), bf16_hi(y.y), acc);
    acc = fmaf(bf16_lo(x.z), bf16_lo(y.z), acc);
    acc = fmaf(bf16_hi(x.z), bf16_hi(y.z), acc);
    acc = fmaf(bf16_lo(x.w), bf16_lo(y.w), acc);
    acc = fmaf(bf16_hi(x.w), bf16_hi(y.w), acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int64_t h = row % Hq;
    const int64_t s = (row / Hq) % S;
    const int64_t b = row / (static_cast<int64_t>(Hq) * S);
    delta[(b * Hq + h) * S + s] = acc;
  }
}

template <int kD>
constexpr size_t backward_smem_bytes() {
  return sizeof(float) * (4 * static_cast<size_t>(64) * tile_ld<kD>() + 2 * static_cast<size_t>(64) * kLdP + 2 * 64);
}

// grid (num_k_tiles, Hkv, B). Per query tile: thread (ty, tx) owns query rows ty + 16i and keys
// tx + 16j of the score tile; keys ty + 16i and columns tx·4 + 64j of the dk/dv accumulators;
// query rows ty + 16i and columns tx·4 + 64j of the tile's dq.
template <int kD>
__global__ void __launch_bounds__(kThreads) attention_backward_kernel(
    const uint16_t* __restrict__ dout, const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
    const uint16_t* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dq_accum, uint16_t* __restrict__ dk, uint16_t* __restrict__ dv, int* __restrict__ dq_turns,
    int S, int Hq, int Hkv, int D, float scale, float scale_log2) {
  constexpr int kLd = tile_ld<kD>();
  constexpr int kDj = kD / 64;
  extern __shared__ float4 smem_f4[];
  float* k_s = reinterpret_cast<float*>(smem_f4);  // [kBc][kLd]
  float* v_s = k_s + kBc * kLd;                    // [kBc][kLd]
  float* q_s = v_s + kBc * kLd;                    // [kBr][kLd]
  float* do_s = q_s + kBr * kLd;                   // [kBr][kLd]
  float* p_s = do_s + kBr * kLd;                   // [kBr][kLdP]
  float* ds_s = p_s + kBr * kLdP;                  // [kBr][kLdP]
  float* lse_s = ds_s + kBr * kLdP;                // [kBr], log2 domain
  float* delta_s = lse_s + kBr;                    // [kBr]

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int k_tile = blockIdx.x;  // low tiles see the most query tiles and start first
  const int g = blockIdx.y, b = blockIdx.z;
  const int group = Hq / Hkv;
  const int k0 = k_tile * kBc;
  const int num_q_tiles = (S + kBr - 1) / kBr;
  const int64_t q_stride = static_cast<int64_t>(Hq) * D, kv_stride = static_cast<int64_t>(Hkv) * D;
  const int64_t kv_off = static_cast<int64_t>(b) * S * kv_stride + static_cast<int64_t>(g) * D;

  load_tile<kD>(k_s, k + kv_off, kv_stride, k0, S, D);
  load_tile<kD>(v_s, v + kv_off, kv_stride, k0, S, D);

  float4 dk_acc[4][kDj], dv_acc[4][kDj];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < kDj; ++j) {
      dk_acc[i][j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      dv_acc[i][j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }

  for (int hh = 0; hh < group; ++hh) {
    const int h = g * group + hh;
    const int64_t q_off = static_cast<int64_t>(b) * S * q_stride + static_cast<int64_t>(h) * D;
    const float* lse_bh = lse + (static_cast<int64_t>(b) * Hq + h) * S;
    const float* delta_bh = delta + (static_cast<int64_t>(b) * Hq + h) * S;
    for (int q_tile = k_tile; q_tile < num_q_tiles; ++q_tile) {  // earlier query tiles see none of these keys
      const int q0 = q_tile * kBr;
      __syncthreads();  // the previous tile's readers of q_s, do_s, p_s, ds_s are done
      load_tile<kD>(q_s, q + q_off, q_stride, q0, S, D);
      load_tile<kD>(do_s, dout + q_off, q_stride, q0, S, D);
      if (threadIdx.x < kBr) {
        const int qi = q0 + threadIdx.x;
        lse_s[threadIdx.x] = qi < S ? lse_bh[qi] * kLog2e : 0.0f;
        delta_s[threadIdx.x] = qi < S ? delta_bh[qi] : 0.0f;
      }
      __syncthreads();

      {
        float s[4][4] = {}, dp[4][4] = {};
        tile_abt<kD>(q_s, k_s, s, ty, tx);
        tile_abt<kD>(do_s, v_s, dp, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = ty + 16 * i;
          const int qi = q0 + r;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int c = tx + 16 * j;
            const int kj = k0 + c;
            const bool live = qi < S && kj <= qi;
            const float p = live ? exp2f(s[i][j] * scale_log2 - lse_s[r]) : 0.0f;
            p_s[r * kLdP + c] = p;
            ds_s[r * kLdP + c] = p * (dp[i][j] - delta_s[r]);  // dS without the scale (applied to dq, dk)
          }
        }
      }
      __syncthreads();

      // dv[key] += Σ_r P[r][key] · dout[r],  dk[key] += Σ_r dS[r][key] · q[r]
#pragma unroll 2
      for (int r = 0; r < kBr; ++r) {
        float p[4], ds[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          p[i] = p_s[r * kLdP + ty + 16 * i];
          ds[i] = ds_s[r * kLdP + ty + 16 * i];
        }
        float4 dov[kDj], qv[kDj];
#pragma unroll
        for (int j = 0; j < kDj; ++j) {
          dov[j] = *reinterpret_cast<const float4*>(do_s + r * kLd + tx * 4 + 64 * j);
          qv[j] = *reinterpret_cast<const float4*>(q_s + r * kLd + tx * 4 + 64 * j);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < kDj; ++j) {
            axpy4(dv_acc[i][j], p[i], dov[j]);
            axpy4(dk_acc[i][j], ds[i], qv[j]);
          }
        }
      }

      // dq[r] += scale · Σ_key dS[r][key] · k[key], added to the f32 accumulator
      float4 dq[4][kDj];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < kDj; ++j) dq[i][j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll 2
      for (int c = 0; c < kBc; ++c) {
        float ds[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ds[i] = ds_s[(ty + 16 * i) * kLdP + c];
        float4 kv[kDj];
#pragma unroll
        for (int j = 0; j < kDj; ++j) kv[j] = *reinterpret_cast<const float4*>(k_s + c * kLd + tx * 4 + 64 * j);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < kDj; ++j) axpy4(dq[i][j], ds[i], kv[j]);
        }
      }
      int* turns = dq_turns == nullptr
                       ? nullptr
                       : dq_turns + (static_cast<int64_t>(b) * Hq + h) * num_q_tiles + q_tile;
      if (turns != nullptr) attn_tc::dq_wait_turn(turns, k_tile);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qi = q0 + ty + 16 * i;
        if (qi >= S) continue;
        float* dq_row = dq_accum + q_off + static_cast<int64_t>(qi) * q_stride;
#pragma unroll
        for (int j = 0; j < kDj; ++j) {
          const int d = tx * 4 + 64 * j;
          if (d < D) {
            const float4 add =
                make_float4(dq[i][j].x * scale, dq[i][j].y * scale, dq[i][j].z * scale, dq[i][j].w * scale);
            atomicAdd(reinterpret_cast<float4*>(dq_row + d), add);
          }
        }
      }
      if (turns != nullptr) attn_tc::dq_pass_turn(turns);
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int kj = k0 + ty + 16 * i;
    if (kj >= S) continue;
    const int64_t row_off = kv_off + static_cast<int64_t>(kj) * kv_stride;
#pragma unroll
    for (int j = 0; j < kDj; ++j) {
      const int d = tx * 4 + 64 * j;
      if (d < D) {
        uint2 packed;
        packed.x = pack_bf16x2(dk_acc[i][j].x * scale, dk_acc[i][j].y * scale);
        packed.y = pack_bf16x2(dk_acc[i][j].z * scale, dk_acc[i][j].w * scale);
        *reinterpret_cast<uint2*>(dk + row_off + d) = packed;
        packed.x = pack_bf16x2(dv_acc[i][j].x, dv_acc[i][j].y);
        packed.y = pack_bf16x2(dv_acc[i][j].z, dv_acc[i][j].w);
        *reinterpret_cast<uint2*>(dv + row_off + d) = packed;
      }
    }
  }
}

template <int kD>
cudaError_t launch_forward(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                           int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale, cudaStream_t stream) {
  constexpr size_t kSmem = forward_smem_bytes<kD>();
  cudaError_t err = cudaFuncSetAttribute(attention_forward_kernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((S + kBr - 1) / kBr), static_cast<unsigned>(Hq), static_cast<unsigned>(B));
  attention_forward_kernel<kD><<<grid, kThreads, kSmem, stream>>>(q, k, v, out, lse, static_cast<int>(S),
                                                                   static_cast<int>(Hq), static_cast<int>(Hkv),
                                                                   static_cast<int>(D), scale * kLog2e);
  return cudaGetLastError();
}

template <int kD>
cudaError_t launch_backward(const uint16_t* dout, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                            const float* lse, const float* delta, float* dq_accum, uint16_t* dk, uint16_t* dv,
                            int* dq_turns, int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                            cudaStream_t stream) {
  constexpr size_t kSmem = backward_smem_bytes<kD>();
  cudaError_t err = cudaFuncSetAttribute(attention_backward_kernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((S + kBc - 1) / kBc), static_cast<unsigned>(Hkv), static_cast<unsigned>(B));
  attention_backward_kernel<kD><<<grid, kThreads, kSmem, stream>>>(
      dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, static_cast<int>(S), static_cast<int>(Hq),
      static_cast<int>(Hkv), static_cast<int>(D), scale, scale * kLog2e);
  return cudaGetLastError();
}

}  // namespace

bool attention_uses_tensor_cores(int64_t D, AttentionKernel kernel) {
  return kernel == AttentionKernel::kAuto && (D == 64 || D == 128);
}

cudaError_t attention_forward(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                              int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                              cudaStream_t stream, AttentionKernel kernel, const AttentionDocs& docs) {
  if (B == 0 || S == 0 || Hq == 0) return cudaSuccess;
  if (D <= 0 || D > 128 || D % 8 != 0 || Hkv <= 0 || Hq % Hkv != 0) return cudaErrorInvalidValue;
  if (attention_uses_tensor_cores(D, kernel)) {
    return attention_forward_tc(q, k, v, out, lse, B, S, Hq, Hkv, D, scale, stream, kAttentionForwardTcDefault, docs);
  }
  if (docs.offsets != nullptr) return cudaErrorInvalidValue;
  return D <= 64 ? launch_forward<64>(q, k, v, out, lse, B, S, Hq, Hkv, D, scale, stream)
                 : launch_forward<128>(q, k, v, out, lse, B, S, Hq, Hkv, D, scale, stream);
}

cudaError_t attention_backward_delta(const uint16_t* dout, const uint16_t* out, float* delta, int64_t B, int64_t S,
                                     int64_t Hq, int64_t D, cudaStream_t stream) {
  const int64_t num_rows = B * S * Hq;
  if (num_rows == 0) return cudaSuccess;
  if (D <= 0 || D % 8 != 0) return cudaErrorInvalidValue;
  constexpr int kRowsPerBlock = kThreads / 32;
  const int64_t blocks = (num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  attention_delta_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      dout, out, delta, num_rows, static_cast<int>(S), static_cast<int>(Hq), static_cast<int>(D));
  return cudaGetLastError();
}

cudaError_t attention_backward(const uint16_t* dout, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                               const float* lse, const float* delta, float* dq_accum, uint16_t* dk, uint16_t* dv,
                               int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                               cudaStream_t stream, AttentionKernel kernel, int* dq_turns,
                               const AttentionDocs& docs) {
  if (B == 0 || S == 0 || Hkv == 0) return cudaSuccess;
  if (D <= 0 || D > 128 || D % 8 != 0 || Hq % Hkv != 0) return cudaErrorInvalidValue;
  if (attention_uses_tensor_cores(D, kernel)) {
    return attention_backward_tc(dout, q, k, v, lse, delta, dq_accum, dk, dv, B, S, Hq, Hkv, D, scale, stream,
                                 kAttentionBackwardTcDefault, dq_turns, docs);
  }
  if (docs.offsets != nullptr) return cudaErrorInvalidValue;
  return D <= 64 ? launch_backward<64>(dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, B, S, Hq, Hkv, D, scale,
                                       stream)
                 : launch_backward<128>(dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, B, S, Hq, Hkv, D, scale,
                                        stream);
}

}  // namespace moetp::cuda::launch
