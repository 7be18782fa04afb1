// Causal grouped-query attention forward for Hopper (sm_90a): TMA loads and wgmma, head_dim 64 and
// 128 (contract in attention.h; configuration 2 of attention_forward_tc, launch.h).
//
// One block per (128-row query tile, query head, sequence), longest tiles first, three warpgroups:
// warpgroup 0 is the producer (one thread issues the TMA loads: the Q tile once, then the key and
// value tiles of 128 keys through a ring of shared memory, each stage with a "full" barrier per
// operand and an "empty" barrier the consumers release); warpgroups 1 and 2 are the consumers,
// each owning 64 query rows. Per key tile a consumer computes S = Q·Kᵀ (wgmma, both operands in
// shared memory, K-major), masks the diagonal tile and rows outside their documents, runs the
// online softmax on the accumulator fragment (base-2 exponentials of log2(e)-prescaled scores, as
// attention_tc_fwd.cu), rounds P to bf16 in registers and accumulates O += P·V with the
// register-sourced wgmma (V read MN-major from shared memory). With packed documents a warpgroup
// skips the tiles before its rows' documents. The accumulator fragment of S is, per warp, the
// mma.m16n8k16 layout of attention_tc.cuh, so the FA2 masking and softmax carry over and the A
// fragment of k-step t of P is S registers 8t..8t+7 in pairs. ptxas allocates at most 168
// registers a thread at this block size (setmaxnreg does not raise its budget), which the ping-pong
// form (S, O and the previous tile's P live at once) exceeds at head_dim 128: it spills there.
//
// Shared-memory tiles are TMA boxes of 64 head-dim columns (128 bytes, 128B swizzle) by 128 rows:
// Q, K and V each hold kD / 64 such blocks per stage (ggemm layout notes, grouped_gemm_layout.h).
// Descriptors: Q and K K-major (LBO 16, SBO 1024, k-step +32 bytes inside the row, +1 block every 4
// k-steps); V MN-major (k-step of 16 keys +2048 bytes, LBO = one block = the next 64 columns of D).
// The tensor maps are 4-D {D, heads, S, B}, so rows past a sequence's end read as zeros.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/attention_tc.cuh"
#include "kernels/cuda/attention_wgmma.h"
#include "kernels/cuda/grouped_gemm.cuh"
#include "kernels/cuda/grouped_gemm_layout.h"
#include "kernels/cuda/tensor_map.h"

namespace moetp::cuda::launch {

namespace {

namespace gg = ::moetp::cuda::ggemm;
using attn_tc::doc_of;
using attn_tc::ex2;
using attn_tc::kLn2;
using attn_tc::kLog2e;
using attn_tc::pack_bf16x2;
using attn_tc::stat_index;
using namespace ggemm_ptx;

constexpr int kBr = 128, kBc = 128, kThreads = 384;
constexpr int kRowBytes = 128;  // one 64-column block row of bf16

template <int kD>
constexpr int q_bytes() {
  return kBr * kD * 2;
}
template <int kD>
constexpr int kv_bytes() {
  return kBc * kD * 2;
}
template <int kD, int kStages>
constexpr int smem_bytes() {
  return 1024 /* alignment slack */ + q_bytes<kD>() + 2 * kStages * kv_bytes<kD>() + 8 * (1 + 3 * kStages) /* barriers */;
}

template <int kD, int kStages, bool kPingpong>
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_wgmma_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                                   const __grid_constant__ CUtensorMap v_map, uint16_t* __restrict__ out,
                                   float* __restrict__ lse, const int64_t* __restrict__ docs, int num_docs, int row_len,
                                   int S, int Hq, int Hkv, int num_q_tiles, int num_bh, float scale_log2) {
  static_assert(kD == 64 || kD == 128, "wgmma head dims");
  constexpr int kDBlocks = kD / 64;
  constexpr uint32_t kQBytes = q_bytes<kD>(), kKvBytes = kv_bytes<kD>();
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // 128B-swizzled tiles want 1024 alignment
  const uint32_t q_sa = base, k_sa = q_sa + kQBytes, v_sa = k_sa + kStages * kKvBytes;
  const uint32_t bars = v_sa + kStages * kKvBytes;
  const uint32_t q_full = bars;
  auto k_full = [&](int st) { return bars + 8u * static_cast<uint32_t>(1 + st); };
  auto v_full = [&](int st) { return bars + 8u * static_cast<uint32_t>(1 + kStages + st); };
  auto empty = [&](int st) { return bars + 8u * static_cast<uint32_t>(1 + 2 * kStages + st); };

  const int bh = static_cast<int>(blockIdx.x) % num_bh;
  const int q_tile = num_q_tiles - 1 - static_cast<int>(blockIdx.x) / num_bh;
  const int h = bh % Hq, b = bh / Hq;
  const int g = h / (Hq / Hkv);
  const int q0 = q_tile * kBr;
  const int num_k_tiles = (min(q0 + kBr, S) + kBc - 1) / kBc;
  auto start = [&](int r) { return static_cast<int>(docs[doc_of(docs, num_docs, min(r, S - 1))]); };
  const int kt_begin = docs != nullptr ? start(q0) / kBc : 0;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(k_full(st), 1);
      mbar_init(v_full(st), 1);
      mbar_init(empty(st), 8);  // lane 0 of each consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = static_cast<int>(threadIdx.x) / 128;
  if (wg == 0) {  // producer
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      tma_prefetch_desc(&q_map);
      tma_prefetch_desc(&k_map);
      tma_prefetch_desc(&v_map);
      mbar_arrive_expect_tx(q_full, kQBytes);
#pragma unroll
      for (int j = 0; j < kDBlocks; ++j) tma_load_4d(q_sa + j * kBr * kRowBytes, &q_map, q_full, 64 * j, h, q0, b);
      for (int kt = kt_begin, i = 0; kt < num_k_tiles; ++kt, ++i) {
        const int st = i % kStages;
        mbar_wait(empty(st), static_cast<uint32_t>(((i / kStages) & 1) ^ 1));
        const uint32_t ks = k_sa + st * kKvBytes, vs = v_sa + st * kKvBytes;
        mbar_arrive_expect_tx(k_full(st), kKvBytes);
#pragma unroll
        for (int j = 0; j < kDBlocks; ++j) tma_load_4d(ks + j * kBc * kRowBytes, &k_map, k_full(st), 64 * j, g, kt * kBc, b);
        mbar_arrive_expect_tx(v_full(st), kKvBytes);
#pragma unroll
        for (int j = 0; j < kDBlocks; ++j) tma_load_4d(vs + j * kBc * kRowBytes, &v_map, v_full(st), 64 * j, g, kt * kBc, b);
      }
    }
    return;
  }

  setmaxnreg_inc<232>();
  const int c = wg - 1;  // consumer: rows q0 + 64c .. q0 + 64c + 63
  const int t = static_cast<int>(threadIdx.x) % 128;
  const int warp = t / 32, lane = t % 32, gid = lane / 4, tig = lane % 4;
  const int row_lo = q0 + 64 * c + 16 * warp;  // this warp's rows: row_lo .. row_lo + 15
  int wg_start = 0, warp_start_hi = 0, row_start[2] = {0, 0};
  if (docs != nullptr) {
    wg_start = start(q0 + 64 * c);
    warp_start_hi = start(row_lo + 15);
    row_start[0] = start(row_lo + gid);
    row_start[1] = start(row_lo + gid + 8);
  }

  float o[kD / 2];
#pragma unroll
  for (int j = 0; j < kD / 2; ++j) o[j] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows gid, gid + 8 (log2 domain)
  float l[2] = {0.0f, 0.0f};            // this thread's part of their running sums

  // S = Q·Kᵀ of the key tile at stage address ks (issued, not waited for).
  auto issue_s = [&](float (&s)[kBc / 2], uint32_t ks) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t koff = static_cast<uint32_t>((kk / 4) * kBc * kRowBytes + (kk % 4) * 32);
      const uint64_t da = gg::make_smem_desc(
          q_sa + static_cast<uint32_t>((kk / 4) * kBr * kRowBytes + c * 64 * kRowBytes + (kk % 4) * 32), gg::kKMajorLbo,
          gg::kKMajorSbo);
      const uint64_t db = gg::make_smem_desc(ks + koff, gg::kKMajorLbo, gg::kKMajorSbo);
      wgmma_m64n128k16<0, 0>(s, da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  // O += P·V of the value tile at stage address vs (issued, not waited for).
  auto issue_pv = [&](const uint32_t (&p)[kBc / 16][4], uint32_t vs) {
#pragma unroll
    for (int kstep = 0; kstep < kBc / 16; ++kstep) {
      const uint64_t db = gg::make_smem_desc(vs + static_cast<uint32_t>(kstep) * 2048u,
                                             static_cast<uint32_t>(kBc * kRowBytes), gg::kMnMajorSbo);
      wgmma_rs_bf16<kD, 1>(o, p[kstep], db, 1);
    }
    wgmma_commit();
  };
  // Masks the scores of the tile at key k0, updates the running max and sums, rescales O and rounds
  // P to bf16 A fragments (k-step t = s registers 8t..8t+7 in pairs).
  auto softmax = [&](float (&s)[kBc / 2], int k0, uint32_t (&p)[kBc / 16][4]) {
    // The tile reaches past some row of this warp (causal mask) or starts before some row's
    // document (document mask). s[4n + e]: row half e >> 1, key k0 + 8n + 2tig + (e & 1).
    if (k0 + kBc - 1 > row_lo || k0 < warp_start_hi) {
#pragma unroll
      for (int n = 0; n < kBc / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + 8 * n + 2 * tig + (e & 1);
          const int row = row_lo + gid + 8 * (e >> 1);
          if (key > row || key < row_start[e >> 1]) s[4 * n + e] = -INFINITY;
        }
      }
    }
    // Online softmax per row half; a row with every key so far masked keeps m = −∞ and subtracts 0.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kBc / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * hf], s[4 * n + 2 * hf + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hf], mx * scale_log2);
      const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = ex2(m[hf] - m_sub);
      m[hf] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kBc / 8; ++n) {
        s[4 * n + 2 * hf] = ex2(fmaf(s[4 * n + 2 * hf], scale_log2, -m_sub));
        s[4 * n + 2 * hf + 1] = ex2(fmaf(s[4 * n + 2 * hf + 1], scale_log2, -m_sub));
        sum += s[4 * n + 2 * hf] + s[4 * n + 2 * hf + 1];
      }
      l[hf] = l[hf] * alpha + sum;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        o[4 * n + 2 * hf] *= alpha;
        o[4 * n + 2 * hf + 1] *= alpha;
      }
    }
#pragma unroll
    for (int kstep = 0; kstep < kBc / 16; ++kstep) {
#pragma unroll
      for (int r = 0; r < 4; ++r) p[kstep][r] = pack_bf16x2(s[8 * kstep + 2 * r], s[8 * kstep + 2 * r + 1]);
    }
  };
  auto stage_of = [&](int i) { return i % kStages; };
  auto parity_of = [&](int i) { return static_cast<uint32_t>((i / kStages) & 1); };
  auto release = [&](int i) {
    if (lane == 0) mbar_arrive(empty(stage_of(i)));
  };
  const int num_tiles = num_k_tiles - kt_begin;

  mbar_wait(q_full, 0);
  if constexpr (!kPingpong) {
    for (int i = 0; i < num_tiles; ++i) {
      const int st = stage_of(i);
      const uint32_t parity = parity_of(i);
      const int k0 = (kt_begin + i) * kBc;
      mbar_wait(k_full(st), parity);
      if (k0 + kBc <= wg_start) {
        // Every row of this warpgroup starts its document after this tile. It still waits for the
        // whole tile before releasing it, so that its arrivals count toward this tile's phase.
        mbar_wait(v_full(st), parity);
        release(i);
        continue;
      }
      float s[kBc / 2];
      uint32_t p[kBc / 16][4];
      wgmma_fence();
      issue_s(s, k_sa + st * kKvBytes);
      wgmma_wait<0>();
      fence_acc(s);
      softmax(s, k0, p);
      mbar_wait(v_full(st), parity);
      wgmma_fence();
      issue_pv(p, v_sa + st * kKvBytes);
      wgmma_wait<0>();
      fence_acc(o);
      release(i);
    }
  } else {
    // Ping-pong: the two consumers take turns issuing their GEMMs (named barriers 1 + c), so that one
    // runs its softmax while the other's GEMMs keep the tensor cores busy. Iteration i issues S of
    // tile i together with P·V of tile i − 1 and then runs the softmax of tile i; the last P·V
    // follows the loop. Consumer 1 opens consumer 0's first turn and skips its own last hand-over.
    constexpr int kTurnThreads = 256;
    const int my_turn = 1 + c, other_turn = 2 - c;
    if (c == 1) named_barrier_arrive(1, kTurnThreads);
    uint32_t p[kBc / 16][4];
    int pending = -1;  // the tile whose P·V is still to be issued
    for (int i = 0; i < num_tiles; ++i) {
      const int st = stage_of(i);
      const int k0 = (kt_begin + i) * kBc;
      const bool skip = k0 + kBc <= wg_start;
      mbar_wait(k_full(st), parity_of(i));
      if (pending >= 0) mbar_wait(v_full(stage_of(pending)), parity_of(pending));
      float s[kBc / 2];
      named_barrier_sync(my_turn, kTurnThreads);
      wgmma_fence();
      if (!skip) issue_s(s, k_sa + st * kKvBytes);
      if (pending >= 0) issue_pv(p, v_sa + stage_of(pending) * kKvBytes);
      if (!(c == 1 && i == num_tiles - 1)) named_barrier_arrive(other_turn, kTurnThreads);
      wgmma_wait<0>();
      fence_acc(s);
      fence_acc(o);
      if (pending >= 0) release(pending);
      pending = -1;
      if (skip) {  // every row of this warpgroup starts its document after this tile
        mbar_wait(v_full(st), parity_of(i));
        release(i);
        continue;
      }
      softmax(s, k0, p);
      pending = i;
    }
    if (pending >= 0) {
      mbar_wait(v_full(stage_of(pending)), parity_of(pending));
      wgmma_fence();
      issue_pv(p, v_sa + stage_of(pending) * kKvBytes);
      wgmma_wait<0>();
      fence_acc(o);
      release(pending);
    }
  }

  // Full row sums, normalise, write bf16 pairs and the row statistics.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
  }
  const float inv_l[2] = {1.0f / l[0], 1.0f / l[1]};
  const int64_t q_stride = static_cast<int64_t>(Hq) * kD;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = row_lo + gid + 8 * hf;
    if (row >= S) continue;
    uint16_t* dst = out + (static_cast<int64_t>(b) * S + row) * q_stride + static_cast<int64_t>(h) * kD + 2 * tig;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      *reinterpret_cast<uint32_t*>(dst + 8 * n) =
          pack_bf16x2(o[4 * n + 2 * hf] * inv_l[hf], o[4 * n + 2 * hf + 1] * inv_l[hf]);
    }
    if (tig == 0) {
      const int64_t at = docs != nullptr ? stat_index(row, h, Hq, row_len) : (static_cast<int64_t>(b) * Hq + h) * S + row;
      lse[at] = (m[hf] + __log2f(l[hf])) * kLn2;
    }
  }
}

template <int kD, int kStages, bool kPingpong>
cudaError_t launch_config(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                   const int64_t* docs, int64_t num_docs, int64_t row_len, int64_t B, int64_t S, int64_t Hq,
                   int64_t Hkv, float scale, cudaStream_t stream) {
  const int64_t num_q_tiles = (S + kBr - 1) / kBr;
  const int64_t blocks = num_q_tiles * B * Hq;
  if (blocks > 0x7fffffff || S > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto u = [](int64_t x) { return static_cast<uint64_t>(x); };
  CUtensorMap qm, km, vm;
  cudaError_t err = make_tensor_map(&qm, q, gg::MapSpec{4, {u(kD), u(Hq), u(S), u(B)}, {64u, 1u, kBr, 1u}});
  if (err == cudaSuccess) err = make_tensor_map(&km, k, gg::MapSpec{4, {u(kD), u(Hkv), u(S), u(B)}, {64u, 1u, kBc, 1u}});
  if (err == cudaSuccess) err = make_tensor_map(&vm, v, gg::MapSpec{4, {u(kD), u(Hkv), u(S), u(B)}, {64u, 1u, kBc, 1u}});
  if (err != cudaSuccess) return err;
  auto* kernel = attention_forward_wgmma_kernel<kD, kStages, kPingpong>;
  constexpr int kSmem = smem_bytes<kD, kStages>();
  if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem)) != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmem, stream>>>(
      qm, km, vm, out, lse, docs, static_cast<int>(num_docs), static_cast<int>(row_len), static_cast<int>(S),
      static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(num_q_tiles), static_cast<int>(B * Hq),
      scale * kLog2e);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward_wgmma(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                                    const int64_t* docs, int64_t num_docs, int64_t row_len, int64_t B, int64_t S,
                                    int64_t Hq, int64_t Hkv, int64_t D, float scale, bool pingpong,
                                    cudaStream_t stream) {
  if (D == 128 && pingpong) {
    return launch_config<128, 3, true>(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, scale, stream);
  }
  if (D == 128) return launch_config<128, 2, false>(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, scale, stream);
  if (D == 64 && pingpong) {
    return launch_config<64, 3, true>(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, scale, stream);
  }
  if (D == 64) return launch_config<64, 2, false>(q, k, v, out, lse, docs, num_docs, row_len, B, S, Hq, Hkv, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace moetp::cuda::launch
