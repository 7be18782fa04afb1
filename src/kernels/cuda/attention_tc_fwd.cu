// Causal grouped-query attention forward on the tensor cores, head_dim 64 and 128 (contract in
// attention.h, launcher in launch.h; helpers and fragment layouts in attention_tc.cuh).
//
// Flash-attention-2: one block per (query tile of kBr = 16·kWarps rows, query head, sequence); warp w
// owns rows 16w..16w+15 of the tile and keeps them in registers: Q as mma A fragments, the output
// accumulator O (16 × D f32), and per row the running max m and sum l (online softmax in f32, base-2
// exponentials of log2(e)-prescaled scores). The key/value tiles of kBc rows at or below the
// diagonal stream through double-buffered shared memory (cp.async, the next tile loads while this
// one is used): S = Q·Kᵀ (mma, f32), causal mask on the diagonal tiles only, P = exp2(S·scale·log2e
// − m), P rounded to bf16 in registers as the A operand of O += P·V (mma), and warps whose rows all
// precede a key tile skip it. The row sum l adds the f32 P before rounding. The output goes out
// through shared memory in 16-byte rows; lse = (m + log2 l)·ln 2.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/attention_tc.cuh"
#include "kernels/cuda/attention_wgmma.h"
#include "kernels/cuda/launch.h"

namespace moetp::cuda::launch {

namespace {

using namespace attn_tc;

template <int kD, int kWarps, int kBc>
constexpr size_t fwd_smem_bytes() {
  return 2 * (static_cast<size_t>(16 * kWarps) * kD + 4 * static_cast<size_t>(kBc) * kD);  // Q, 2 × (K, V)
}

// grid: one block per (query tile, b, h), longest tiles first: blockIdx.x = rank · (B·Hq) + b·Hq + h
// with query tile = num_q_tiles − 1 − rank.
template <int kD, int kWarps, int kBc, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    attention_forward_tc_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                                const uint16_t* __restrict__ v, uint16_t* __restrict__ out, float* __restrict__ lse,
                                const int64_t* __restrict__ docs, int num_docs, int row_len, int S, int Hq, int Hkv,
                                int num_q_tiles, int num_bh, float scale_log2) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBr = 16 * kWarps;
  constexpr int kChunks = kD / 8;                   // 16-byte chunks per row
  constexpr int kKvTileBytes = kBc * kD * 2;
  static_assert(kD == 64 || kD == 128, "tensor-core head dims");
  static_assert(kBc % 16 == 0, "key tiles of whole 16-key mma steps");

  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* q_s = smem;                        // [kBr][kD], later the output staging
  uint8_t* k_s = q_s + kBr * kD * 2;          // [2][kBc][kD]
  uint8_t* v_s = k_s + 2 * kKvTileBytes;      // [2][kBc][kD]
  const uint32_t q_sa = smem_addr(q_s), k_sa = smem_addr(k_s), v_sa = smem_addr(v_s);

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int bh = static_cast<int>(blockIdx.x) % num_bh;
  const int q_tile = num_q_tiles - 1 - static_cast<int>(blockIdx.x) / num_bh;
  const int h = bh % Hq, b = bh / Hq;
  const int g = h / (Hq / Hkv);
  const int64_t q_stride = static_cast<int64_t>(Hq) * kD, kv_stride = static_cast<int64_t>(Hkv) * kD;
  const uint16_t* q_bh = q + static_cast<int64_t>(b) * S * q_stride + static_cast<int64_t>(h) * kD;
  const uint16_t* k_bg = k + static_cast<int64_t>(b) * S * kv_stride + static_cast<int64_t>(g) * kD;
  const uint16_t* v_bg = v + static_cast<int64_t>(b) * S * kv_stride + static_cast<int64_t>(g) * kD;

  const int q0 = q_tile * kBr;
  const int num_k_tiles = (min(q0 + kBr, S) + kBc - 1) / kBc;  // keys [0, min(q0 + kBr, S)) are seen
  const int row_lo = q0 + 16 * warp;                              // this warp's rows: row_lo .. row_lo + 15
  // Packed documents: row r sees keys [start(r), r]. The block starts at the key tile of its first
  // row's document; a warp skips the tiles before its first row's document and masks where a tile
  // starts before its last row's document.
  int tile_start = 0, warp_start_lo = 0, warp_start_hi = 0, row_start[2] = {0, 0};
  if (docs != nullptr) {
    auto start = [&](int r) { return static_cast<int>(docs[doc_of(docs, num_docs, min(r, S - 1))]); };
    tile_start = start(q0);
    warp_start_lo = start(row_lo);
    warp_start_hi = start(row_lo + 15);
    row_start[0] = start(row_lo + gid);
    row_start[1] = start(row_lo + gid + 8);
  }
  const int kt_begin = tile_start / kBc;

  load_tile_async<kBr, kChunks, kThreads>(q_sa, q_bh, q_stride, q0, S);
  cp_async_commit();
  load_tile_async<kBc, kChunks, kThreads>(k_sa, k_bg, kv_stride, kt_begin * kBc, S);
  load_tile_async<kBc, kChunks, kThreads>(v_sa, v_bg, kv_stride, kt_begin * kBc, S);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (key/value tile 0 may still be in flight)
  __syncthreads();
  const uint32_t lane_a = lane_offset_a<kChunks>(lane), lane_b = lane_offset_b<kChunks>(lane);
  const uint32_t lane_bt = lane_offset_bt<kChunks>(lane);
  uint32_t q_frag[kD / 16][4];
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) ldsm_x4(q_frag[kk], q_sa + tile_offset<kChunks>(lane_a, warp, kk));

  float o[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows gid, gid + 8 (log2 domain)
  float l[2] = {0.0f, 0.0f};            // this thread's part of their running sums

  for (int kt = kt_begin; kt < num_k_tiles; ++kt) {
    const int buf = (kt - kt_begin) & 1;
    if (kt + 1 < num_k_tiles) {  // the buffer it fills was last read in the previous iteration (barrier below)
      const uint32_t off = static_cast<uint32_t>((buf ^ 1) * kKvTileBytes);
      load_tile_async<kBc, kChunks, kThreads>(k_sa + off, k_bg, kv_stride, (kt + 1) * kBc, S);
      load_tile_async<kBc, kChunks, kThreads>(v_sa + off, v_bg, kv_stride, (kt + 1) * kBc, S);
    }
    cp_async_commit();
    cp_async_wait<1>();  // all but the prefetch just issued: this tile has landed
    __syncthreads();

    const int k0 = kt * kBc;
    // Else every key of the tile is in this warp's future, or before its rows' documents.
    if (k0 <= row_lo + 15 && k0 + kBc > warp_start_lo) {
      const uint32_t kb = k_sa + static_cast<uint32_t>(buf * kKvTileBytes);
      const uint32_t vb = v_sa + static_cast<uint32_t>(buf * kKvTileBytes);
      float s[kBc / 8][4];
#pragma unroll
      for (int n = 0; n < kBc / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < kBc / 16; ++np) {
          uint32_t bk[4];  // keys 16np.., d 16kk..: b0, b1 of key n-tile 2np, then of 2np + 1
          ldsm_x4(bk, kb + tile_offset<kChunks>(lane_b, np, kk));
          mma_bf16(s[2 * np], q_frag[kk], bk[0], bk[1]);
          mma_bf16(s[2 * np + 1], q_frag[kk], bk[2], bk[3]);
        }
      }
      // The tile reaches past some row of this warp (causal mask) or starts before some row's
      // document (document mask).
      if (k0 + kBc - 1 > row_lo || k0 < warp_start_hi) {
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = k0 + 8 * n + 2 * tig + (e & 1);
            const int row = row_lo + gid + 8 * (e >> 1);
            if (key > row || key < row_start[e >> 1]) s[n][e] = -INFINITY;
          }
        }
      }
      // Online softmax per row half (e >> 1). A row whose keys so far are all masked (a tile before
      // its document) keeps m = −∞: it subtracts 0 instead, so that p = 0 and alpha = 0, not NaN.
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * hf], s[n][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[hf], mx * scale_log2);
        const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = ex2(m[hf] - m_sub);  // 0 on the row's first live tile (m = −∞)
        m[hf] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n) {
          s[n][2 * hf] = ex2(fmaf(s[n][2 * hf], scale_log2, -m_sub));  // masked: 2^−∞ = 0
          s[n][2 * hf + 1] = ex2(fmaf(s[n][2 * hf + 1], scale_log2, -m_sub));
          sum += s[n][2 * hf] + s[n][2 * hf + 1];
        }
        l[hf] = l[hf] * alpha + sum;
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
          o[n][2 * hf] *= alpha;
          o[n][2 * hf + 1] *= alpha;
        }
      }
      // O += P·V, P rounded to bf16 (k-step t of P = score n-tiles 2t, 2t + 1).
#pragma unroll
      for (int t = 0; t < kBc / 16; ++t) {
        const uint32_t p[4] = {pack_bf16x2(s[2 * t][0], s[2 * t][1]), pack_bf16x2(s[2 * t][2], s[2 * t][3]),
                               pack_bf16x2(s[2 * t + 1][0], s[2 * t + 1][1]),
                               pack_bf16x2(s[2 * t + 1][2], s[2 * t + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          uint32_t bv[4];  // keys 16t.., d 16dp..: b0, b1 of d n-tile 2dp, then of 2dp + 1
          ldsm_x4_trans(bv, vb + tile_offset<kChunks>(lane_bt, t, dp));
          mma_bf16(o[2 * dp], p, bv[0], bv[1]);
          mma_bf16(o[2 * dp + 1], p, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // everyone is done with buffer kt & 1 before iteration kt + 1 refills it
  }

  // Full row sums, normalise, stage this warp's 16 rows in its own rows of q_s (read only by this
  // warp, into q_frag), then write them out as 16-byte chunks.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
  }
  const float inv_l[2] = {1.0f / l[0], 1.0f / l[1]};
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = 16 * warp + gid + 8 * hf;
      *reinterpret_cast<uint32_t*>(q_s + swizzle<kChunks>(row, n) + 4 * tig) =
          pack_bf16x2(o[n][2 * hf] * inv_l[hf], o[n][2 * hf + 1] * inv_l[hf]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * kChunks / 32; ++i) {
    const int idx = i * 32 + lane;
    const int r = idx / kChunks, c = idx % kChunks;
    const int qi = row_lo + r;
    if (qi < S) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(b) * S * q_stride + static_cast<int64_t>(qi) * q_stride +
                                static_cast<int64_t>(h) * kD + c * 8) =
          *reinterpret_cast<const uint4*>(q_s + swizzle<kChunks>(16 * warp + r, c));
    }
  }
  if (tig == 0) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int qi = row_lo + gid + 8 * hf;
      if (qi < S) {
        const int64_t at = docs != nullptr ? stat_index(qi, h, Hq, row_len) : (static_cast<int64_t>(b) * Hq + h) * S + qi;
        lse[at] = (m[hf] + __log2f(l[hf])) * kLn2;
      }
    }
  }
}

template <int kD, int kWarps, int kBc, int kMinBlocks>
cudaError_t launch_forward_tc(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                              const int64_t* docs, int64_t num_docs, int64_t row_len, int64_t B, int64_t S, int64_t Hq,
                              int64_t Hkv, float scale, cudaStream_t stream) {
  constexpr size_t kSmem = fwd_smem_bytes<kD, kWarps, kBc>();
  auto* kernel = attention_forward_tc_kernel<kD, kWarps, kBc, kMinBlocks>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  constexpr int64_t kBr = 16 * kWarps;
  const int64_t num_q_tiles = (S + kBr - 1) / kBr;
  const int64_t blocks = num_q_tiles * B * Hq;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), kWarps * 32, kSmem, stream>>>(
      q, k, v, out, lse, docs, static_cast<int>(num_docs), static_cast<int>(row_len), static_cast<int>(S),
      static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(num_q_tiles), static_cast<int>(B * Hq),
      scale * kLog2e);
  return cudaGetLastError();
}

template <int kD>
cudaError_t forward_tc_config(int config, const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                              float* lse, const int64_t* docs, int64_t num_docs, int64_t row_len, int64_t B, int64_t S,
                              int64_t Hq, int64_t Hkv, float scale, cudaStream_t stream) {
  switch (config) {
    // Config 2 (wgmma) is the default: 1.4x config 1 at D = 128 on an H100. Config 1 was the
    // mma.sync default (as fast as config 0 at D = 128, faster at D = 64). Config 3 spills
    // registers at D = 128 (docs/performance.md, Attention).
    case 0:  // 8 warps, 128 query rows, 64-key tiles, one block per SM
      return launch_forward_tc<kD, 8, 64, 1>(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, scale, stream);
    case 1:  // 4 warps, 64 query rows, 64-key tiles, two blocks per SM
      return launch_forward_tc<kD, 4, 64, 2>(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, scale, stream);
    case 2:  // Hopper: TMA + wgmma, 128 query rows over two consumer warpgroups, 128-key tiles
      return attention_forward_wgmma(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, kD, scale, false,
                                     stream);
    case 3:  // as 2, three stages, the consumers' GEMMs taking turns with their softmax
      return attention_forward_wgmma(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, kD, scale, true,
                                     stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_forward_tc(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                                 int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                                 cudaStream_t stream, int config, const AttentionDocs& docs) {
  if (B == 0 || S == 0 || Hq == 0) return cudaSuccess;
  if (Hkv <= 0 || Hq % Hkv != 0) return cudaErrorInvalidValue;
  // Packed documents: one flat row of B·S tokens, statistics still (B, Hq, S).
  const int64_t row_len = S;
  if (docs.offsets != nullptr) {
    S = B * S;
    B = 1;
  }
  if (D == 128) {
    return forward_tc_config<128>(config, q, k, v, out, lse, docs.offsets, docs.count, row_len, B, S, Hq, Hkv, scale,
                                  stream);
  }
  if (D == 64) {
    return forward_tc_config<64>(config, q, k, v, out, lse, docs.offsets, docs.count, row_len, B, S, Hq, Hkv, scale,
                                 stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moetp::cuda::launch
