// Hopper grouped GEMM for the expert shards (issue 7): forward, input gradient and weight gradient of
// the grouped expert linear layers in one persistent launch each, bf16 operands, f32 accumulation,
// group boundaries read from device offsets (contract: grouped_gemm_launch.h / grouped_gemm.h;
// layout arithmetic: grouped_gemm_layout.h; PTX helpers: grouped_gemm.cuh).
//
// Block: 384 threads = 3 warpgroups. Warpgroup 0 is the producer (setmaxnreg down to 40 registers;
// one thread issues every TMA load), warpgroups 1 and 2 are consumers (setmaxnreg up to 232): consumer
// c computes rows [64c, 64c + 64) of the 128 × BN tile with wgmma m64nBNk16, f32 accumulators in
// registers (BN/2 per thread). Operands stream through kStages shared-memory stages of
// (A 128 × 64 + B BN × 64) bf16, 128B-swizzled by TMA; each stage has a "full" mbarrier (the
// producer's arrive.expect_tx + the TMA complete_tx) and an "empty" mbarrier (256 consumer arrivals
// once the wgmmas that read it have retired). Consumers keep one batch of 4 wgmmas (one stage) in
// flight: after committing stage s they wait for stage s - 1's batch and release s - 1.
//
// Persistent scheduler: grid = min(#SMs, tile bound). At entry every block reads the device offsets
// into shared memory (clamped to [0, M]) and warp 0 computes the prefix of tiles per group
// (grouped_gemm_layout.h: group by group, m-tile major, n-tile minor); block b then takes tiles
// b, b + grid, ... and both roles decode them with the same cursor. No host synchronisation: the
// host knows only M, N, K, L; empty groups own no tiles (except in wgrad's overwrite mode, where
// each gets zero tiles of its dW).
//
// Ragged groups. fwd/dgrad: a tile of group l loads rows [row0 + 128·m, +128) of X or dY; rows past
// the group's end belong to group l + 1 (or lie past M, where TMA fills zeros) and only produce
// output rows that the epilogue does not store, because each output row depends on its own A row
// only. W is read through a 3-D tensor map (K, N, L), so a box never crosses into the next expert's
// weights (zero fill at N and K edges). wgrad reduces over the group's rows, so rows past the end
// must contribute zero: the reduction starts at the group's first row (TMA coordinates need no
// alignment), so only the last stage of a group can be partial, and there the consumers overwrite
// rows [valid, 64) of the A and B tiles with zeros (ordinary stores + fence.proxy.async + a named
// barrier over the 256 consumer threads) before the wgmmas. Zeroing both operands keeps a NaN or Inf
// in the next group's rows out of this group's dW. The alternative, per-group tensor maps (so TMA
// zero-fills at the group edge), needs the offsets on the host or tensormap.replace on the device;
// the masking costs one partial stage per group and keeps the launch free of host data.
//
// Epilogue, direct (configurations 0-5): straight from the accumulator registers, 2 columns per
// store (bf16x2 for fwd/dgrad, a float2 read-modify-write of dW for wgrad, beta = 1; every dW element
// belongs to one tile, so no atomics and the result is deterministic). Rows past the group's end and
// columns past N/K are not stored. The producer runs ahead into the next tile's stages during the
// epilogue.
// Epilogue, staged (configurations 6-8, cooperative, fwd/dgrad): a warpgroup whose 64 rows all lie
// inside the group writes them into its own shared-memory buffer in the TMA 128B-swizzled box layout
// and one thread issues a TMA store per 64-column box (grouped_gemm_layout.h "staged epilogue"); the
// stores run asynchronously while the warpgroup starts its next tile, and the buffer is rewritten
// only after cp.async.bulk.wait_group.read says the previous stores have read it. Blocks crossing a
// group end use the direct path. The buffers take one pipeline stage's memory. wgrad, staged: the
// f32 block leaves in two halves through the same buffer as TMA reduce-adds into dW (dW += block in
// L2, no global load in the SM; "staged wgrad epilogue" in grouped_gemm_layout.h); blocks past N
// use the direct path. wgrad's overwrite mode (Params::overwrite, the first accumulation after the
// gradients were zeroed) stores instead: TMA stores of the same boxes, no dW load in the direct path.
//
// Tests: every configuration against the CPU and cuBLAS on H200s (cuda_grouped_gemm_test), and the
// host emulator GroupedGemmLayout.EmulatedKernelMatchesReference (staging offsets, every buffer slot
// written once, TMA box and reduce coordinates inside the group). The automatic choice takes the
// staged epilogue for all three products, from device sweeps. An mbarrier wait that lasts ~10 s
// traps, so a pipeline deadlock fails the launch instead of hanging.
//
// Performance (docs/performance.md, Grouped GEMM): the staged epilogue is what makes the
// wide-output, short-reduction products (fwd N = 2048, K = 192) fast. The accumulating wgrad reads
// and writes f32 dW (8 bytes per element against the forward's 2) in an epilogue that the tensor
// cores wait for, which bounds it below the forward at K = 2048; the overwrite mode avoids the read.
// Not implemented: an overlapped wgrad epilogue (needs a second f32 accumulator set), a 2-CTA
// cluster multicasting the shared operand tile, wgrad tiles ordered largest group first.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/grouped_gemm.cuh"
#include "kernels/cuda/grouped_gemm_launch.h"
#include "kernels/cuda/grouped_gemm_layout.h"
#include "kernels/cuda/tensor_map.h"

namespace moetp::cuda::launch {

namespace {

using namespace ggemm_ptx;
namespace gg = ::moetp::cuda::ggemm;
using gg::Op;

constexpr int kThreads = 384;
constexpr int kConsumerThreads = 256;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 · (40 + 2 · 232) <= 65536
constexpr int kSmemLimit = 227 * 1024;                  // opt-in maximum per block on sm_90
constexpr int kTableBytes = 2 * (gg::kMaxGroups + 1) * 4;
constexpr int tile_m(bool pingpong) { return pingpong ? gg::kBMPingpong : gg::kBM; }
template <int kBN, bool kPingpong>
constexpr int stage_bytes() {
  return gg::stage_bytes(kBN, tile_m(kPingpong));
}
// Staged epilogue: one output buffer per consumer warpgroup (grouped_gemm_layout.h).
template <int kBN, bool kStaged>
constexpr int out_bytes() {
  return kStaged ? 2 * gg::out_block_bytes(kBN) : 0;
}
template <int kBN, bool kPingpong, bool kStaged = false>
constexpr int num_stages() {
  const int s =
      (kSmemLimit - 1024 - out_bytes<kBN, kStaged>() - kTableBytes - 16 * 8 - 16) / stage_bytes<kBN, kPingpong>();
  return s > 8 ? 8 : s;
}
template <int kBN, bool kPingpong, bool kStaged = false>
constexpr int smem_bytes() {
  return 1024 + num_stages<kBN, kPingpong, kStaged>() * (stage_bytes<kBN, kPingpong>() + 16) +
         out_bytes<kBN, kStaged>() + 16 + kTableBytes;
}
static_assert(smem_bytes<256, false>() <= kSmemLimit && smem_bytes<192, false>() <= kSmemLimit &&
              smem_bytes<128, false>() <= kSmemLimit && smem_bytes<256, true>() <= kSmemLimit &&
              smem_bytes<192, true>() <= kSmemLimit && smem_bytes<128, true>() <= kSmemLimit &&
              smem_bytes<256, false, true>() <= kSmemLimit && smem_bytes<192, false, true>() <= kSmemLimit &&
              smem_bytes<128, false, true>() <= kSmemLimit);
static_assert(num_stages<256, false, true>() >= 3 && num_stages<192, false, true>() >= 3 &&
              num_stages<128, false, true>() >= 3);

struct Params {
  const int64_t* offsets;  // L + 1 group row offsets (device)
  void* out;               // bf16 y / dx (M, n_out), or f32 dw (L, N, n_out)
  int M;                   // rows of x / dy
  int L;                   // groups
  int mo_fixed;            // wgrad: N (rows of each dW_l); unused otherwise
  int n_out;               // output columns: fwd N, dgrad K, wgrad K
  int red;                 // fwd K, dgrad N (wgrad: the group's rows, from the offsets)
  int n_tiles;             // ceil(n_out / BN)
  int overwrite;           // wgrad: dW = block (stores; empty groups get zero blocks) instead of dW += block
};

// Zeroes rows [valid, 64) of a 64-row, 128-byte-per-row swizzled box (the swizzle permutes the 16-byte
// chunks inside a row, so whole rows are zeroed alike). `t` in [0, 128): this warpgroup's thread.
__device__ __forceinline__ void zero_box_rows(uint8_t* box, int valid, int t) {
  const int chunks = (64 - valid) * (gg::kRowBytes / 16);
  uint4* p = reinterpret_cast<uint4*>(box + valid * gg::kRowBytes);
  for (int i = t; i < chunks; i += 128) p[i] = make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) | (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16);
}

// kPingpong = false (cooperative): both consumer warpgroups work on every tile of 128 × BN, rows split.
// kPingpong = true: tiles of 64 × BN; the CTA's tiles alternate between the warpgroups (local tile
// index j goes to warpgroup j % 2), so one warpgroup's epilogue runs under the other's wgmmas; each
// warpgroup steps over the other's stages without waiting on them. The mainloops themselves take
// turns (order_bar: warpgroup c starts a tile's mainloop only after the other finished its previous
// one). Without the turns a warpgroup that stepped ahead could wait on a full barrier two phases
// early, where the parity test cannot tell phase q from q - 2 and would pass on the older data; with
// them, every barrier phase of the previous tile has completed before the next tile's waits begin.
// kStaged (cooperative only): blocks that lie inside their group's output rows leave through shared
// memory and TMA stores (fwd/dgrad) or TMA reduce-adds (wgrad) (tmap_out; grouped_gemm_layout.h
// "staged epilogue"); tmap_out is unused otherwise.
template <Op kOp, int kBN, bool kPingpong, bool kStaged>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                        const __grid_constant__ CUtensorMap tmap_out, const Params p) {
  static_assert(!(kStaged && kPingpong), "the staged epilogue is a cooperative configuration");
  constexpr int kTileM = tile_m(kPingpong);
  constexpr int kABytes = gg::a_bytes(kTileM);
  constexpr int kStages = num_stages<kBN, kPingpong, kStaged>();
  constexpr int kStageBytes = stage_bytes<kBN, kPingpong>();
  constexpr int kStageReaders = kPingpong ? 128 : kConsumerThreads;  // arrivals that free a stage
  constexpr int kBBoxes = kBN / 64;                 // MN-major B: boxes of 64 output columns
  constexpr bool kAMn = kOp == Op::kWgrad;          // A = dYᵀ
  constexpr bool kBMn = kOp != Op::kFwd;            // B = W (dgrad) or X (wgrad)
  constexpr int kAccRegs = kBN / 2;
  static_assert(kBN % 64 == 0 && kBN <= 256, "tile N");

  extern __shared__ uint8_t smem_raw[];
  // TMA 128B swizzle and the wgmma descriptors (base offset 0) want 1024-aligned tiles.
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* out_smem = smem + kStages * kStageBytes;  // kStaged: the consumers' output buffers
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(out_smem + out_bytes<kBN, kStaged>());
  uint64_t* empty_bar = full_bar + kStages;
  uint64_t* order_bar = empty_bar + kStages;  // ping-pong: [c] completes when warpgroup c may run a mainloop
  int32_t* row_start = reinterpret_cast<int32_t*>(order_bar + 2);  // [L + 1] clamped offsets
  int32_t* tile_start = row_start + gg::kMaxGroups + 1;                   // [L + 1] tile prefix
  const uint32_t smem_base = smem_addr(smem);

  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int L = p.L;

  for (int l = tid; l <= L; l += kThreads) {
    const int64_t o = p.offsets[l];
    row_start[l] = static_cast<int32_t>(o < 0 ? 0 : (o > p.M ? p.M : o));
  }
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(smem_addr(&full_bar[s]), 1);
      mbar_init(smem_addr(&empty_bar[s]), kStageReaders);
    }
    mbar_init(smem_addr(&order_bar[0]), 128);  // arrivals: the other warpgroup's 128 threads
    mbar_init(smem_addr(&order_bar[1]), 128);
    mbar_init_fence();
  }
  __syncthreads();
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < L; base += 32) {
      const int l = base + lane;
      int v = l < L ? gg::group_tiles(kOp, row_start[l + 1] - row_start[l], p.mo_fixed, p.n_tiles, kTileM,
                                      p.overwrite != 0)
                    : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += t;
      }
      if (l < L) tile_start[l + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
    if (lane == 0) tile_start[0] = 0;
  }
  __syncthreads();
  const int total_tiles = tile_start[L];

  if (warp < 4) {
    // ---- producer warpgroup: one thread issues the TMA loads ----
    setmaxnreg_dec<kProducerRegs>();
    if (warp == 0 && lane == 0) {
      tma_prefetch_desc(&tmap_a);
      tma_prefetch_desc(&tmap_b);
      int stage = 0, group = 0;
      uint32_t phase = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < total_tiles; tile += static_cast<int>(gridDim.x)) {
        const gg::TileCoord tc = gg::decode_tile(tile_start, group, tile, p.n_tiles);
        const int row0 = row_start[tc.group], rows = row_start[tc.group + 1] - row0;
        const int num_k = gg::ceil_div(kOp == Op::kWgrad ? rows : p.red, gg::kBK);
        for (int kt = 0; kt < num_k; ++kt) {
          mbar_wait(smem_addr(&empty_bar[stage]), phase ^ 1u);
          const uint32_t fb = smem_addr(&full_bar[stage]);
          mbar_arrive_expect_tx(fb, kStageBytes);  // out-of-bounds fill counts as delivered bytes
          const uint32_t stage_s = smem_base + static_cast<uint32_t>(stage * kStageBytes);
          gg::BoxLoad loads[gg::kMaxBoxLoads];
          const int num_loads = gg::stage_box_loads(kOp, kBN, kTileM, tc, row0, kt, loads);
#pragma unroll
          for (int i = 0; i < gg::kMaxBoxLoads; ++i) {
            if (i >= num_loads) break;
            const gg::BoxLoad& ld = loads[i];
            if (ld.map == 0) {
              tma_load_2d(stage_s + ld.smem_offset, &tmap_a, fb, ld.c0, ld.c1);
            } else if constexpr (kOp == Op::kWgrad) {
              tma_load_2d(stage_s + ld.smem_offset, &tmap_b, fb, ld.c0, ld.c1);
            } else {
              tma_load_3d(stage_s + ld.smem_offset, &tmap_b, fb, ld.c0, ld.c1, ld.c2);
            }
          }
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1u;
          }
        }
      }
    }
  } else {
    // ---- consumer warpgroups ----
    setmaxnreg_inc<kConsumerRegs>();
    const int c = (tid - 128) / 128;  // cooperative: rows [64c, 64c + 64) of each tile; ping-pong: tiles j % 2 == c
    const int t = (tid - 128) % 128;  // thread in the warpgroup
    const int m_offset = kPingpong ? 0 : 64 * c;  // this warpgroup's rows in the tile (and its A box)
    float acc[kAccRegs];
    int stage = 0, group = 0, local = 0;
    uint32_t phase = 0, turn_phase = 0;
    bool first_own_tile = true;
    for (int tile = static_cast<int>(blockIdx.x); tile < total_tiles;
         tile += static_cast<int>(gridDim.x), ++local) {
      const gg::TileCoord tc = gg::decode_tile(tile_start, group, tile, p.n_tiles);
      const int row0 = row_start[tc.group], rows = row_start[tc.group + 1] - row0;
      const int num_k = gg::ceil_div(kOp == Op::kWgrad ? rows : p.red, gg::kBK);
      if (kPingpong && (local & 1) != c) {  // the other warpgroup's tile: step over its stages
        gg::advance_stage(stage, phase, num_k, kStages);
        continue;
      }
      if constexpr (kPingpong) {  // wait for this warpgroup's turn (warpgroup 0 opens)
        if (c == 1 || !first_own_tile) {
          mbar_wait(smem_addr(&order_bar[c]), turn_phase);
          turn_phase ^= 1u;
        }
        first_own_tile = false;
      }
#pragma unroll
      for (int i = 0; i < kAccRegs; ++i) acc[i] = 0.0f;
      int prev_stage = 0;
      for (int kt = 0; kt < num_k; ++kt) {
        mbar_wait(smem_addr(&full_bar[stage]), phase);
        const uint32_t a_s = smem_base + static_cast<uint32_t>(stage * kStageBytes);
        const uint32_t b_s = a_s + kABytes;
        if constexpr (kOp == Op::kWgrad) {
          const int valid = gg::stage_valid_rows(kOp, rows, kt);
          if (valid < gg::kBK) {  // the group's last stage, partial (same for both warpgroups)
            // Cooperative: each warpgroup zeroes its own A box and every other B box, then both meet.
            // Ping-pong: the warpgroup zeroes the whole stage alone.
            uint8_t* a_g = smem + stage * kStageBytes;
            zero_box_rows(a_g + m_offset * gg::kRowBytes, valid, t);
            for (int j = kPingpong ? 0 : c; j < kBBoxes; j += kPingpong ? 1 : 2) {
              zero_box_rows(a_g + kABytes + j * gg::kBoxMnBytes, valid, t);
            }
            fence_proxy_async_smem();
            if constexpr (kPingpong) {  // one barrier id per warpgroup (compile-time ids)
              if (c == 0) {
                named_barrier_sync(1, 128);
              } else {
                named_barrier_sync(2, 128);
              }
            } else {
              named_barrier_sync(1, kConsumerThreads);
            }
          }
        }
        fence_acc(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < gg::kBK / gg::kWgmmaK; ++kk) {
          const uint64_t da = gg::operand_desc(a_s + static_cast<uint32_t>(m_offset * gg::kRowBytes), kAMn, kk);
          const uint64_t db = gg::operand_desc(b_s, kBMn, kk);
          wgmma_bf16<kBN, kAMn ? 1 : 0, kBMn ? 1 : 0>(acc, da, db, 1);
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous stage's batch has retired: release it to the producer
        fence_acc(acc);
        if (kt > 0) mbar_arrive(smem_addr(&empty_bar[prev_stage]));
        prev_stage = stage;
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1u;
        }
      }
      wgmma_wait<0>();
      fence_acc(acc);
      if (num_k > 0) mbar_arrive(smem_addr(&empty_bar[prev_stage]));
      if constexpr (kPingpong) mbar_arrive(smem_addr(&order_bar[1 - c]));  // the other's turn

      // ---- epilogue ----
      bool staged = false;  // uniform over the warpgroup (tile, group and m_offset only)
      if constexpr (kStaged) staged = gg::staged_block(kOp, kTileM, tc, rows, p.mo_fixed, m_offset);
      if (staged) {
        if constexpr (kStaged && kOp == Op::kWgrad) {
          // dW += block through shared memory and TMA reduce-adds (overwrite mode: dW = block, TMA
          // stores), in two halves of BN/2 columns
          // (grouped_gemm_layout.h "staged wgrad epilogue").
          uint8_t* buf = out_smem + c * gg::out_block_bytes(kBN);
          const int bar = 3 + c;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (t == 0) bulk_wait_group_read<0>();  // the previous reductions have read buf
            named_barrier_sync(bar, 128);
#pragma unroll
            for (int i = h * (kAccRegs / 2); i < (h + 1) * (kAccRegs / 2); i += 2) {
              *reinterpret_cast<float2*>(buf + gg::staged_offset_f32(t, i, h * (kBN / 2))) =
                  make_float2(acc[i], acc[i + 1]);
            }
            fence_proxy_async_smem();
            named_barrier_sync(bar, 128);
            if (t == 0) {
#pragma unroll
              for (int j = 0; j < kBN / 64; ++j) {
                const gg::StoreCoord sc = gg::wgrad_reduce_coord(kBN, kTileM, tc, p.mo_fixed, m_offset, h, j);
                if (sc.c0 >= p.n_out) continue;
                if (p.overwrite) {
                  tma_store_2d(&tmap_out, smem_addr(buf + j * gg::kOutBoxBytes), sc.c0, sc.c1);
                } else {
                  tma_reduce_add_2d(&tmap_out, smem_addr(buf + j * gg::kOutBoxBytes), sc.c0, sc.c1);
                }
              }
              bulk_commit_group();
            }
          }
        } else if constexpr (kStaged) {
          uint8_t* buf = out_smem + c * gg::out_block_bytes(kBN);
          const int bar = 3 + c;  // ids 1, 2: the wgrad zeroing; 3, 4: the consumers' staging
          if (t == 0) bulk_wait_group_read<0>();  // this warpgroup's previous stores have read buf
          named_barrier_sync(bar, 128);
#pragma unroll
          for (int i = 0; i < kAccRegs; i += 2) {
            *reinterpret_cast<uint32_t*>(buf + gg::staged_offset(t, i)) = pack_bf16x2(acc[i], acc[i + 1]);
          }
          fence_proxy_async_smem();  // the writes become visible to the TMA (async proxy)
          named_barrier_sync(bar, 128);
          if (t == 0) {
#pragma unroll
            for (int j = 0; j < kBN / 64; ++j) {
              const gg::StoreCoord sc = gg::staged_store_coord(kBN, kTileM, tc, row0, m_offset, j);
              if (sc.c0 < p.n_out) tma_store_2d(&tmap_out, smem_addr(buf + j * gg::kOutBoxBytes), sc.c0, sc.c1);
            }
            bulk_commit_group();
          }
        }
      } else if constexpr (kOp == Op::kWgrad) {
        // dW += acc in f32. The loads of a chunk of kWgradChunk pairs are all issued before its
        // stores: one load per pair followed by its store would serialise every load behind the
        // previous store (the compiler cannot prove that they do not alias), a global-memory round
        // trip per pair (ncu: 57% of the wgrad kernel's stalls waited on these loads).
        constexpr int kWgradChunk = 8;
        static_assert(kAccRegs % (2 * kWgradChunk) == 0, "accumulator pairs come in whole chunks");
        float* dw = static_cast<float*>(p.out);
#pragma unroll
        for (int i0 = 0; i0 < kAccRegs; i0 += 2 * kWgradChunk) {
          int64_t idx[kWgradChunk];
          float2 v[kWgradChunk];
#pragma unroll
          for (int j = 0; j < kWgradChunk; ++j) {
            idx[j] = gg::epilogue_index(kOp, kBN, kTileM, tc, row0, rows, p.mo_fixed, p.n_out, m_offset, t, i0 + 2 * j);
            v[j] = idx[j] >= 0 && !p.overwrite ? *reinterpret_cast<const float2*>(dw + idx[j]) : make_float2(0.0f, 0.0f);
          }
#pragma unroll
          for (int j = 0; j < kWgradChunk; ++j) {
            if (idx[j] < 0) continue;
            v[j].x += acc[i0 + 2 * j];
            v[j].y += acc[i0 + 2 * j + 1];
            *reinterpret_cast<float2*>(dw + idx[j]) = v[j];
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < kAccRegs; i += 2) {
          const int64_t idx =
              gg::epilogue_index(kOp, kBN, kTileM, tc, row0, rows, p.mo_fixed, p.n_out, m_offset, t, i);
          if (idx >= 0) {
            *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.out) + idx) = pack_bf16x2(acc[i], acc[i + 1]);
          }
        }
      }
    }
    if constexpr (kStaged) {
      if (t == 0) bulk_wait_group<0>();  // the buffers stay valid until the last stores have completed
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------

}  // namespace

// cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda at link time).
static PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult query{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &query) !=
            cudaSuccess ||
        query != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

cudaError_t make_tensor_map(CUtensorMap* map, const void* base, const gg::MapSpec& spec) {
  const int rank = spec.rank;
  const uint64_t* dims = spec.dims;
  const uint32_t* box = spec.box;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  if (rank < 1 || rank > 4) return cudaErrorInvalidValue;
  cuuint64_t g_dims[4] = {1, 1, 1, 1}, g_strides[3] = {0, 0, 0};
  cuuint32_t b_dims[4] = {1, 1, 1, 1}, e_strides[4] = {1, 1, 1, 1};
  const uint64_t elem = spec.f32 ? 4 : 2;
  uint64_t stride = elem;
  for (int d = 0; d < rank; ++d) {
    g_dims[d] = dims[d];
    b_dims[d] = box[d];
    stride *= dims[d];
    if (d + 1 < rank) g_strides[d] = stride;  // packed: dimension d + 1 steps over all of 0..d
  }
  const CUtensorMapDataType dtype = spec.f32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode(map, dtype, static_cast<cuuint32_t>(rank), const_cast<void*>(base),
                            g_dims, g_strides, b_dims, e_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

namespace {

template <Op kOp, int kBN, bool kPingpong, bool kStaged>
cudaError_t launch_config(const CUtensorMap& a, const CUtensorMap& b, const CUtensorMap& out, const Params& p,
                          int64_t tile_bound, cudaStream_t stream) {
  auto* kernel = grouped_gemm_kernel<kOp, kBN, kPingpong, kStaged>;
  constexpr int kSmem = smem_bytes<kBN, kPingpong, kStaged>();
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(sms, tile_bound)));
  kernel<<<grid, kThreads, kSmem, stream>>>(a, b, out, p);
  return cudaGetLastError();
}

// Tiles of the output-row dimension, at most: fwd/dgrad Σ ceil(rows_l / tile_m) <= M / tile_m + L;
// wgrad L · ceil(N / tile_m).
int64_t mo_tile_bound(Op op, int64_t M, int64_t N, int64_t L, int tile_m) {
  return op == Op::kWgrad ? L * ((N + tile_m - 1) / tile_m) : (M + tile_m - 1) / tile_m + L;
}

template <Op kOp>
cudaError_t dispatch(int config, const CUtensorMap& a, const CUtensorMap& b, const CUtensorMap& out, Params p,
                     int64_t M, int64_t N, int64_t L, cudaStream_t stream) {
  const int bn = kGroupedGemmTileN[config];
  const bool pingpong = kGroupedGemmPingpong[config], staged = kGroupedGemmStaged[config];
  p.n_tiles = gg::ceil_div(p.n_out, bn);
  const int64_t bound = mo_tile_bound(kOp, M, N, L, tile_m(pingpong)) * p.n_tiles;
  switch (bn * 4 + (pingpong ? 1 : 0) + (staged ? 2 : 0)) {
    case 512: return launch_config<kOp, 128, false, false>(a, b, out, p, bound, stream);
    case 768: return launch_config<kOp, 192, false, false>(a, b, out, p, bound, stream);
    case 1024: return launch_config<kOp, 256, false, false>(a, b, out, p, bound, stream);
    case 513: return launch_config<kOp, 128, true, false>(a, b, out, p, bound, stream);
    case 769: return launch_config<kOp, 192, true, false>(a, b, out, p, bound, stream);
    case 1025: return launch_config<kOp, 256, true, false>(a, b, out, p, bound, stream);
    case 514: return launch_config<kOp, 128, false, true>(a, b, out, p, bound, stream);
    case 770: return launch_config<kOp, 192, false, true>(a, b, out, p, bound, stream);
    case 1026: return launch_config<kOp, 256, false, true>(a, b, out, p, bound, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool valid_sizes(int64_t M, int64_t N, int64_t K, int64_t L, int config) {
  constexpr int64_t kMax = 0x7fffffff;
  return M >= 1 && M <= kMax && N >= 1 && N <= kMax && K >= 1 && K <= kMax && L >= 1 &&
         L <= kGroupedGemmMaxGroups && N % 8 == 0 && K % 8 == 0 && config < kGroupedGemmConfigs;
}

// The tensor maps of `op` for configuration `config` (A and B operands as in grouped_gemm_layout.h;
// the output map for the staged fwd/dgrad epilogue, else a copy of A that the kernel never reads).
cudaError_t make_maps(Op op, int config, const void* a_base, const void* b_base, void* out_base, int64_t M, int64_t N,
                      int64_t K, int64_t L, CUtensorMap* a, CUtensorMap* b, CUtensorMap* out) {
  const int bn = kGroupedGemmTileN[config];
  const int tm = tile_m(kGroupedGemmPingpong[config]);
  cudaError_t err = make_tensor_map(a, a_base, gg::a_map_spec(op, M, N, K, tm));
  if (err == cudaSuccess) err = make_tensor_map(b, b_base, gg::b_map_spec(op, bn, M, N, K, L));
  if (err != cudaSuccess) return err;
  if (kGroupedGemmStaged[config]) {
    return make_tensor_map(out, out_base,
                           op == Op::kWgrad ? gg::wgrad_out_map_spec(L, N, K) : gg::out_map_spec(M, op == Op::kFwd ? N : K));
  }
  *out = *a;
  return cudaSuccess;
}

}  // namespace

int grouped_gemm_auto_config(int64_t n_out, int64_t m_tiles, int num_sms) {
  // The staged epilogue (fwd/dgrad: TMA stores; wgrad: TMA reduce-adds into dW) for all three
  // products: it won the device sweeps at every shape (H200, grouped_gemm_cuda_bench --sweep,
  // docs/performance.md, Grouped GEMM; ping-pong and tile N 256 never won). Between
  // tile N 192 and 128, a wave model: time ~ waves · N-columns per tile · per-column cost, waves =
  // ceil(tiles / SMs), with 128-wide tiles 5% dearer per column (fewer A-tile reuses; the 192-wide
  // tile won by ~4-5% where waves were many: 2048 and 8192 rows per group). It reproduces the
  // sweeps: 128 wins when the tiles fill one or two waves badly (128 rows per group: 10 of 12
  // shapes 9-27% faster with 128, the two where 192 wins predicted too), 192 at 2048 rows per group
  // everywhere, and it takes 128 for narrow outputs (64, 200) where 192 pads a whole extra tile.
  const auto cost = [&](int64_t bn) {
    const int64_t tiles = std::max<int64_t>(1, m_tiles) * ((n_out + bn - 1) / bn);
    const int64_t waves = (tiles + num_sms - 1) / std::max(1, num_sms);
    return static_cast<double>(waves) * static_cast<double>(bn) * (bn == 128 ? 1.05 : 1.0);
  };
  return cost(192) <= cost(128) ? 7 : 6;
}

int grouped_gemm_auto_config_for(int product, int64_t M, int64_t N, int64_t K, int64_t L) {
  // Output-row tiles of 128: wgrad L · ceil(N / 128) exactly; fwd/dgrad ceil(M / 128), exact when
  // the group sizes are multiples of 128, a lower bound otherwise (the sizes live on the device).
  const int64_t m_tiles = product == 2 ? L * ((N + 127) / 128) : (M + 127) / 128;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return -1;
  }
  return grouped_gemm_auto_config(product == 0 ? N : K, m_tiles, sms);
}

int grouped_gemm_stages(int config) {
  switch (config) {
    case 0: return num_stages<128, false>();
    case 1: return num_stages<192, false>();
    case 2: return num_stages<256, false>();
    case 3: return num_stages<128, true>();
    case 4: return num_stages<192, true>();
    case 5: return num_stages<256, true>();
    case 6: return num_stages<128, false, true>();
    case 7: return num_stages<192, false, true>();
    case 8: return num_stages<256, false, true>();
    default: return 0;
  }
}

namespace {

// One product. The three launchers differ only in their operands and in which of N and K is the
// output width and which the reduction (wgrad's reduction is each group's rows, from the offsets).
template <Op kOp>
cudaError_t run_product(const void* a_src, const void* b_src, const int64_t* offsets, void* out, int64_t M, int64_t N,
                        int64_t K, int64_t L, cudaStream_t stream, int config, bool overwrite = false) {
  if (!valid_sizes(M, N, K, L, config)) return cudaErrorInvalidValue;
  const int64_t n_out = kOp == Op::kFwd ? N : K;
  if (config < 0) {
    config = grouped_gemm_auto_config_for(kOp == Op::kFwd ? 0 : (kOp == Op::kDgrad ? 1 : 2), M, N, K, L);
    if (config < 0) return cudaErrorInvalidDevice;
  }
  CUtensorMap a, b, out_map;
  const cudaError_t err = make_maps(kOp, config, a_src, b_src, out, M, N, K, L, &a, &b, &out_map);
  if (err != cudaSuccess) return err;
  const int64_t mo_fixed = kOp == Op::kWgrad ? N : 0;
  const int64_t red = kOp == Op::kFwd ? K : (kOp == Op::kDgrad ? N : 0);
  const Params p{offsets, out, static_cast<int>(M), static_cast<int>(L), static_cast<int>(mo_fixed),
                 static_cast<int>(n_out), static_cast<int>(red), 0, overwrite ? 1 : 0};
  return dispatch<kOp>(config, a, b, out_map, p, M, N, L, stream);
}

}  // namespace

cudaError_t grouped_gemm_fwd(const uint16_t* x, const uint16_t* w, const int64_t* offsets, uint16_t* y, int64_t M,
                             int64_t N, int64_t K, int64_t L, cudaStream_t stream, int config) {
  return run_product<Op::kFwd>(x, w, offsets, y, M, N, K, L, stream, config);
}

cudaError_t grouped_gemm_dgrad(const uint16_t* dy, const uint16_t* w, const int64_t* offsets, uint16_t* dx, int64_t M,
                               int64_t N, int64_t K, int64_t L, cudaStream_t stream, int config) {
  return run_product<Op::kDgrad>(dy, w, offsets, dx, M, N, K, L, stream, config);
}

cudaError_t grouped_gemm_wgrad(const uint16_t* dy, const uint16_t* x, const int64_t* offsets, float* dw, int64_t M,
                               int64_t N, int64_t K, int64_t L, cudaStream_t stream, int config, bool accumulate) {
  return run_product<Op::kWgrad>(dy, x, offsets, dw, M, N, K, L, stream, config, !accumulate);
}

}  // namespace moetp::cuda::launch
