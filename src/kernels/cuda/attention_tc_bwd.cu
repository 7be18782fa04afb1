// Causal grouped-query attention backward on the tensor cores, head_dim 64 and 128 (contract in
// attention.h, launcher in launch.h; helpers and fragment layouts in attention_tc.cuh).
//
// Flash-attention-2 backward, key-major: one block per (key tile of kBc = 16·kWarps keys, key/value
// head, sequence) keeps K and V in shared memory and walks the group's query heads and, per head,
// the query tiles of kBr rows at or below the diagonal (Q, dout, lse, delta double-buffered through
// cp.async). Warp w owns keys 16w..16w+15 and computes, with the keys as mma rows,
//   Sᵀ = K·Qᵀ, dPᵀ = V·doutᵀ (f32), Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), dSᵀ = Pᵀ ⊙ (dPᵀ − delta),
//   dV += Pᵀ·dout and dK += dSᵀ·Q with Pᵀ and dSᵀ rounded to bf16 in registers as A operands,
// so dK and dV (16 keys × D f32 per warp) stay in registers over all heads and query tiles: no
// atomics, bitwise reproducible. dSᵀ also goes to shared memory (bf16), and after a barrier the
// warps compute dQ = dS·K for the tile (warp = 16 query rows × D / (kWarps·16 / kBr) columns) and add
// scale · dQ into the f32 dq accumulator with float4 atomics (so dq is not reproducible bit for bit,
// unless dq_turns orders the key tiles' adds: attn_tc::dq_wait_turn).
// Warps whose 16 keys all follow the tile's last query skip the tile, and dQ only runs over the live
// 16-key slices.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/attention_tc.cuh"
#include "kernels/cuda/launch.h"

namespace moetp::cuda::launch {

namespace {

using namespace attn_tc;

template <int kD, int kWarps, int kBr>
constexpr size_t bwd_smem_bytes() {
  constexpr size_t kBc = 16 * kWarps;
  return 2 * (2 * kBc * kD + 4 * static_cast<size_t>(kBr) * kD + kBc * kBr) +  // K, V, 2 × (Q, dout), dSᵀ
         sizeof(float) * 4 * kBr;                                               // 2 × (lse, delta)
}

// grid: one block per (key tile, b, g), the low key tiles (most query tiles) first:
// blockIdx.x = key tile · (B·Hkv) + b·Hkv + g.
template <int kD, int kWarps, int kBr, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    attention_backward_tc_kernel(const uint16_t* __restrict__ dout, const uint16_t* __restrict__ q,
                                 const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 float* __restrict__ dq_accum, uint16_t* __restrict__ dk, uint16_t* __restrict__ dv,
                                 int* __restrict__ dq_turns, const int64_t* __restrict__ docs, int num_docs,
                                 int row_len, int S, int Hq, int Hkv, int num_bg, float scale, float scale_log2) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBc = 16 * kWarps;
  constexpr int kChunksD = kD / 8;     // 16-byte chunks per row of K, V, Q, dout
  constexpr int kChunksQ = kBr / 8;    // 16-byte chunks per row of dSᵀ (kBr queries)
  constexpr int kQTileBytes = kBr * kD * 2;
  constexpr int kRowSlices = kBr / 16;              // dQ: 16-row slices of the query tile ...
  constexpr int kColSlices = kWarps / kRowSlices;   // ... times column slices = warps
  constexpr int kDq = kD / kColSlices;              // dQ columns per warp
  static_assert(kD == 64 || kD == 128, "tensor-core head dims");
  static_assert(kBr >= 64 && kBr % 16 == 0 && kWarps % kRowSlices == 0 && kDq % 16 == 0, "dQ warp layout");
  static_assert(kBr == 64, "attention_dq_turns counts 64-row query tiles");

  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* k_s = smem;                                // [kBc][kD]
  uint8_t* v_s = k_s + kBc * kD * 2;                  // [kBc][kD]
  uint8_t* q_s = v_s + kBc * kD * 2;                  // [2][kBr][kD]
  uint8_t* do_s = q_s + 2 * kQTileBytes;              // [2][kBr][kD]
  uint8_t* ds_s = do_s + 2 * kQTileBytes;             // [kBc][kBr] dSᵀ, bf16
  float* stats_s = reinterpret_cast<float*>(ds_s + kBc * kBr * 2);  // [2][lse | delta][kBr]
  const uint32_t k_sa = smem_addr(k_s), v_sa = smem_addr(v_s), q_sa = smem_addr(q_s), do_sa = smem_addr(do_s);
  const uint32_t ds_sa = smem_addr(ds_s), stats_sa = smem_addr(stats_s);

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int k_tile = static_cast<int>(blockIdx.x) / num_bg;
  const int bg = static_cast<int>(blockIdx.x) % num_bg;
  const int g = bg % Hkv, b = bg / Hkv;
  const int group = Hq / Hkv;
  const int64_t q_stride = static_cast<int64_t>(Hq) * kD, kv_stride = static_cast<int64_t>(Hkv) * kD;
  const int64_t kv_off = static_cast<int64_t>(b) * S * kv_stride + static_cast<int64_t>(g) * kD;
  const int k0 = k_tile * kBc;
  const int qt_begin = k0 / kBr;  // earlier query tiles see none of these keys
  // Packed documents: key j is seen by queries [j, end(j)); the block's query tiles end with its last
  // key's document. Per 16-key slice the end of its last key's document (a slice is live for a query
  // tile starting before it), per thread the ends of its two keys (the element mask).
  int qt_end = (S + kBr - 1) / kBr, slice_end[kWarps], key_end[2] = {S, S};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) slice_end[w] = S;
  if (docs != nullptr) {
    auto end = [&](int j) { return static_cast<int>(docs[doc_of(docs, num_docs, min(j, S - 1)) + 1]); };
    qt_end = (end(k0 + kBc - 1) + kBr - 1) / kBr;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) slice_end[w] = end(k0 + 16 * w + 15);
    key_end[0] = end(k0 + 16 * warp + gid);
    key_end[1] = end(k0 + 16 * warp + gid + 8);
  }
  const int iters_per_head = qt_end - qt_begin;
  const int num_iters = group * iters_per_head;

  // Iteration it: query head g·group + it / iters_per_head, query tile qt_begin + it % iters_per_head.
  auto load_query_tile = [&](int it, int buf) {
    const int h = g * group + it / iters_per_head;
    const int q0 = (qt_begin + it % iters_per_head) * kBr;
    const int64_t q_off = static_cast<int64_t>(b) * S * q_stride + static_cast<int64_t>(h) * kD;
    load_tile_async<kBr, kChunksD, kThreads>(q_sa + buf * kQTileBytes, q + q_off, q_stride, q0, S);
    load_tile_async<kBr, kChunksD, kThreads>(do_sa + buf * kQTileBytes, dout + q_off, q_stride, q0, S);
    const int64_t stat_off = (static_cast<int64_t>(b) * Hq + h) * S;
    for (int i = static_cast<int>(threadIdx.x); i < 2 * kBr; i += kThreads) {
      const int r = i % kBr;
      const bool valid = q0 + r < S;
      const int64_t at = docs != nullptr ? stat_index(valid ? q0 + r : 0, h, Hq, row_len) : stat_off + (valid ? q0 + r : 0);
      const float* src = (i < kBr ? lse : delta) + at;
      cp_async_4(stats_sa + static_cast<uint32_t>((buf * 2 * kBr + i) * 4), src, valid);
    }
  };

  load_tile_async<kBc, kChunksD, kThreads>(k_sa, k + kv_off, kv_stride, k0, S);
  load_tile_async<kBc, kChunksD, kThreads>(v_sa, v + kv_off, kv_stride, k0, S);
  load_query_tile(0, 0);
  cp_async_commit();

  const uint32_t lane_a = lane_offset_a<kChunksD>(lane), lane_b = lane_offset_b<kChunksD>(lane);
  const uint32_t lane_bt = lane_offset_bt<kChunksD>(lane), lane_ds = lane_offset_b<kChunksQ>(lane);
  float dk_acc[kD / 8][4], dv_acc[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;
  }

  for (int it = 0; it < num_iters; ++it) {
    // The buffer the prefetch fills was last read before the mid-iteration barrier of it − 1.
    if (it + 1 < num_iters) load_query_tile(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int buf = it & 1;
    const int h = g * group + it / iters_per_head;
    const int q0 = (qt_begin + it % iters_per_head) * kBr;
    const uint32_t qb = q_sa + buf * kQTileBytes, dob = do_sa + buf * kQTileBytes;
    const float* lse_t = stats_s + buf * 2 * kBr;
    const float* delta_t = lse_t + kBr;
    // 16-key slices with a key at or before the tile's last query (q0 + kBr > k0 always holds) whose
    // last key's document reaches the tile.
    uint32_t live = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (k0 + 16 * w <= q0 + kBr - 1 && q0 < slice_end[w]) live |= 1u << w;
    }

    if ((live >> warp) & 1u) {
      const int kw = k0 + 16 * warp;
      float s[kBr / 8][4], dp[kBr / 8][4];
#pragma unroll
      for (int n = 0; n < kBr / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t ka[4], va[4];
        ldsm_x4(ka, k_sa + tile_offset<kChunksD>(lane_a, warp, kk));
        ldsm_x4(va, v_sa + tile_offset<kChunksD>(lane_a, warp, kk));
#pragma unroll
        for (int np = 0; np < kBr / 16; ++np) {
          const uint32_t off = tile_offset<kChunksD>(lane_b, np, kk);
          uint32_t bq[4], bo[4];  // queries 16np.., d 16kk..: b0, b1 of query n-tile 2np, then 2np + 1
          ldsm_x4(bq, qb + off);
          mma_bf16(s[2 * np], ka, bq[0], bq[1]);
          mma_bf16(s[2 * np + 1], ka, bq[2], bq[3]);
          ldsm_x4(bo, dob + off);
          mma_bf16(dp[2 * np], va, bo[0], bo[1]);
          mma_bf16(dp[2 * np + 1], va, bo[2], bo[3]);
        }
      }
      // Pᵀ and dSᵀ in place: element (key kw + gid + 8(e/2), query q0 + 8n + 2tig + e%2).
      const bool need_mask = kw + 15 > q0 || q0 + kBr > S || q0 + kBr > key_end[0] || q0 + kBr > key_end[1];
#pragma unroll
      for (int n = 0; n < kBr / 8; ++n) {
        const int col = 8 * n + 2 * tig;
        const float2 lse2 = *reinterpret_cast<const float2*>(lse_t + col);
        const float2 dl2 = *reinterpret_cast<const float2*>(delta_t + col);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float row_lse = (e & 1) ? lse2.y : lse2.x;
          const float row_delta = (e & 1) ? dl2.y : dl2.x;
          float p = ex2(fmaf(s[n][e], scale_log2, -row_lse * kLog2e));
          if (need_mask) {
            const int key = kw + gid + 8 * (e >> 1);
            const int query = q0 + col + (e & 1);
            if (key > query || query >= S || query >= key_end[e >> 1]) p = 0.0f;
          }
          s[n][e] = p;
          dp[n][e] = p * (dp[n][e] - row_delta);
        }
      }
      uint32_t pa[kBr / 16][4], da[kBr / 16][4];  // A fragments (keys × 16 queries) of k-step t
#pragma unroll
      for (int t = 0; t < kBr / 16; ++t) {
        pa[t][0] = pack_bf16x2(s[2 * t][0], s[2 * t][1]);
        pa[t][1] = pack_bf16x2(s[2 * t][2], s[2 * t][3]);
        pa[t][2] = pack_bf16x2(s[2 * t + 1][0], s[2 * t + 1][1]);
        pa[t][3] = pack_bf16x2(s[2 * t + 1][2], s[2 * t + 1][3]);
        da[t][0] = pack_bf16x2(dp[2 * t][0], dp[2 * t][1]);
        da[t][1] = pack_bf16x2(dp[2 * t][2], dp[2 * t][3]);
        da[t][2] = pack_bf16x2(dp[2 * t + 1][0], dp[2 * t + 1][1]);
        da[t][3] = pack_bf16x2(dp[2 * t + 1][2], dp[2 * t + 1][3]);
      }
      // dV += Pᵀ·dout, dK += dSᵀ·Q (B operands: rows = queries of the tile, .trans).
#pragma unroll
      for (int t = 0; t < kBr / 16; ++t) {
#pragma unroll
        for (int dpair = 0; dpair < kD / 16; ++dpair) {
          const uint32_t off = tile_offset<kChunksD>(lane_bt, t, dpair);
          uint32_t bo[4], bq[4];
          ldsm_x4_trans(bo, dob + off);
          mma_bf16(dv_acc[2 * dpair], pa[t], bo[0], bo[1]);
          mma_bf16(dv_acc[2 * dpair + 1], pa[t], bo[2], bo[3]);
          ldsm_x4_trans(bq, qb + off);
          mma_bf16(dk_acc[2 * dpair], da[t], bq[0], bq[1]);
          mma_bf16(dk_acc[2 * dpair + 1], da[t], bq[2], bq[3]);
        }
      }
      // dSᵀ rows 16w.. to shared memory: da[t][j] is query n-tile 2t + j/2, row half j%2.
#pragma unroll
      for (int t = 0; t < kBr / 16; ++t) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = 16 * warp + gid + 8 * (j & 1);
          *reinterpret_cast<uint32_t*>(ds_s + swizzle<kChunksQ>(row, 2 * t + (j >> 1)) + 4 * tig) = da[t][j];
        }
      }
    }
    __syncthreads();  // dSᵀ complete; all reads of this iteration's Q, dout, lse, delta are done

    // dQ (kBr × kD) = dS · K over the live key slices; warp: rows 16·rs.., columns kDq·cs.. .
    const int rs = warp % kRowSlices, cs = warp / kRowSlices;
    float acc[kDq / 8][4];
#pragma unroll
    for (int n = 0; n < kDq / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (int ks = 0; ks < kWarps; ++ks) {
      if (!((live >> ks) & 1u)) continue;
      uint32_t a[4];  // A = dS (queries × keys) from dSᵀ (keys × queries): .trans
      ldsm_x4_trans(a, ds_sa + tile_offset<kChunksQ>(lane_ds, ks, rs));
#pragma unroll
      for (int dpair = 0; dpair < kDq / 16; ++dpair) {
        uint32_t bk[4];
        ldsm_x4_trans(bk, k_sa + tile_offset<kChunksD>(lane_bt, ks, cs * (kDq / 16) + dpair));
        mma_bf16(acc[2 * dpair], a, bk[0], bk[1]);
        mma_bf16(acc[2 * dpair + 1], a, bk[2], bk[3]);
      }
    }
    // Lanes tig, tig ^ 1 swap halves so that each holds 4 consecutive columns of one row: even tig
    // row gid, columns 2tig..2tig+3; odd tig row gid + 8, columns 2tig−2..2tig+1.
    const bool even = (tig & 1) == 0;
    const int qi = q0 + 16 * rs + gid + (even ? 0 : 8);
    int* turns = dq_turns == nullptr ? nullptr
                                     : dq_turns + (static_cast<int64_t>(b) * Hq + h) * ((S + kBr - 1) / kBr) + q0 / kBr;
    // Key tiles add in order from the first that reaches this query tile (its first row's document).
    if (turns != nullptr) {
      const int first = docs != nullptr ? static_cast<int>(docs[doc_of(docs, num_docs, q0)]) / kBc : 0;
      dq_wait_turn(turns, k_tile - first);
    }
    float* dq_row = dq_accum + static_cast<int64_t>(b) * S * q_stride + static_cast<int64_t>(qi) * q_stride +
                    static_cast<int64_t>(h) * kD + cs * kDq + 2 * (even ? tig : tig - 1);
#pragma unroll
    for (int n = 0; n < kDq / 8; ++n) {
      const float x0 = __shfl_xor_sync(0xffffffffu, even ? acc[n][2] : acc[n][0], 1);
      const float x1 = __shfl_xor_sync(0xffffffffu, even ? acc[n][3] : acc[n][1], 1);
      const float4 add = even ? make_float4(acc[n][0] * scale, acc[n][1] * scale, x0 * scale, x1 * scale)
                              : make_float4(x0 * scale, x1 * scale, acc[n][2] * scale, acc[n][3] * scale);
      if (qi < S) atomicAdd(reinterpret_cast<float4*>(dq_row + 8 * n), add);
    }
    if (turns != nullptr) dq_pass_turn(turns);
  }

  // dK (scaled) and dV out through this warp's own rows of k_s / v_s, as 16-byte chunks.
  __syncthreads();  // every warp is done reading K and V
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const uint32_t off = swizzle<kChunksD>(16 * warp + gid + 8 * hf, n) + 4 * tig;
      *reinterpret_cast<uint32_t*>(k_s + off) =
          pack_bf16x2(dk_acc[n][2 * hf] * scale, dk_acc[n][2 * hf + 1] * scale);
      *reinterpret_cast<uint32_t*>(v_s + off) = pack_bf16x2(dv_acc[n][2 * hf], dv_acc[n][2 * hf + 1]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * kChunksD / 32; ++i) {
    const int idx = i * 32 + lane;
    const int r = idx / kChunksD, c = idx % kChunksD;
    const int key = k0 + 16 * warp + r;
    if (key < S) {
      const int64_t o = kv_off + static_cast<int64_t>(key) * kv_stride + c * 8;
      const uint32_t so = swizzle<kChunksD>(16 * warp + r, c);
      *reinterpret_cast<uint4*>(dk + o) = *reinterpret_cast<const uint4*>(k_s + so);
      *reinterpret_cast<uint4*>(dv + o) = *reinterpret_cast<const uint4*>(v_s + so);
    }
  }
}

template <int kD, int kWarps, int kBr, int kMinBlocks>
cudaError_t launch_backward_tc(const uint16_t* dout, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                               const float* lse, const float* delta, float* dq_accum, uint16_t* dk, uint16_t* dv,
                               int* dq_turns, const AttentionDocs& docs, int64_t row_len, int64_t B, int64_t S,
                               int64_t Hq, int64_t Hkv, float scale, cudaStream_t stream) {
  constexpr size_t kSmem = bwd_smem_bytes<kD, kWarps, kBr>();
  auto* kernel = attention_backward_tc_kernel<kD, kWarps, kBr, kMinBlocks>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  constexpr int64_t kBc = 16 * kWarps;
  const int64_t blocks = (S + kBc - 1) / kBc * B * Hkv;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), kWarps * 32, kSmem, stream>>>(
      dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, docs.offsets, static_cast<int>(docs.count),
      static_cast<int>(row_len), static_cast<int>(S), static_cast<int>(Hq), static_cast<int>(Hkv),
      static_cast<int>(B * Hkv), scale, scale * kLog2e);
  return cudaGetLastError();
}

template <int kD>
cudaError_t backward_tc_config(int config, const uint16_t* dout, const uint16_t* q, const uint16_t* k,
                               const uint16_t* v, const float* lse, const float* delta, float* dq_accum, uint16_t* dk,
                               uint16_t* dv, int* dq_turns, const AttentionDocs& docs, int64_t row_len, int64_t B,
                               int64_t S, int64_t Hq, int64_t Hkv, float scale, cudaStream_t stream) {
  switch (config) {
    // Config 0 is the default: the faster of the two at D = 128 and 64 (docs/performance.md,
    // Attention).
    case 0:  // 8 warps, 128-key tiles, 64-row query tiles, one block per SM
      return launch_backward_tc<kD, 8, 64, 1>(dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, docs,
                                              row_len, B, S, Hq, Hkv, scale, stream);
    case 1:  // 4 warps, 64-key tiles, 64-row query tiles, two blocks per SM
      return launch_backward_tc<kD, 4, 64, 2>(dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, docs,
                                              row_len, B, S, Hq, Hkv, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_backward_tc(const uint16_t* dout, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                  const float* lse, const float* delta, float* dq_accum, uint16_t* dk, uint16_t* dv,
                                  int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                                  cudaStream_t stream, int config, int* dq_turns, const AttentionDocs& docs) {
  if (B == 0 || S == 0 || Hkv == 0) return cudaSuccess;
  if (Hq % Hkv != 0) return cudaErrorInvalidValue;
  // Packed documents: one flat row of B·S tokens, statistics still (B, Hq, S).
  const int64_t row_len = S;
  if (docs.offsets != nullptr) {
    S = B * S;
    B = 1;
  }
  if (D == 128) {
    return backward_tc_config<128>(config, dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, docs, row_len, B, S,
                                   Hq, Hkv, scale, stream);
  }
  if (D == 64) {
    return backward_tc_config<64>(config, dout, q, k, v, lse, delta, dq_accum, dk, dv, dq_turns, docs, row_len, B, S,
                                  Hq, Hkv, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moetp::cuda::launch
