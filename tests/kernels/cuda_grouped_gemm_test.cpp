// Hopper grouped GEMM (kernels/cuda/grouped_gemm.h), in two parts.
//
// GroupedGemmLayout.* run on any machine (no GPU): a host emulator of the layout arithmetic the kernel
// relies on (kernels/cuda/grouped_gemm_layout.h). TMA's 128B-swizzled box writes are simulated into a
// byte array, then every element each wgmma k-step reads is fetched through the canonical layout that
// the 64-bit smem descriptor describes (PTX ISA "Matrix Descriptor Format"; CUTLASS make_gmma_desc:
// K-major SW128 ((8,m),(T,2)):((8T,SBO),(1,T)), MN-major SW128 ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)),
// T = 8 bf16) decoded from the descriptor bits, and compared with the matrix element the product
// needs; the accumulator fragment mapping is compared with CUTLASS's CLayout_64xN formula; the tile
// scheduler is walked as the kernel walks it and must cover every output element exactly once.
//
// CudaGroupedGemm.* need a GPU (label cuda; they skip without one): every product and every tile
// configuration against the CPU reference (cpu::linear / cpu::linear_backward per group) and against
// the cuBLAS per-group path (cuda::grouped_linear*), on the same bf16-rounded random inputs: bf16
// outputs within testing::kBF16, the f32 weight gradient within testing::kF32Parallel; guard rows
// around y and dx must stay untouched and empty groups' dW bit-identical; integer-valued inputs make
// all three products exact. Cases: ragged groups with empty ones, all rows in one group, M = 0, one
// row, sizes that are not tile multiples (N = 200, K = 136), and the real expert shapes (16 groups,
// K = 2048, N = 384; N = 2048, K = 192).
//
// Shape legend: M rows, N output features, K input features, L groups.
#include "kernels/cuda/grouped_gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/cpu/gemm.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/grouped_gemm_launch.h"
#include "kernels/cuda/grouped_gemm_layout.h"
#include "kernels/cuda/runtime.h"
#include "testing.h"

namespace moetp {
namespace {

namespace gg = cuda::ggemm;
using moetp::testing::close;
using moetp::testing::random_tensor;

// ---- host emulator of the layouts -----------------------------------------------------------------

// Independent statement of the 128B swizzle: within each 1024-byte block, the 16-byte chunk c of the
// 128-byte row r is stored at chunk c XOR r.
uint32_t swizzle_reference(uint32_t offset) {
  const uint32_t block = offset / 1024, row = (offset % 1024) / 128, chunk = (offset % 128) / 16, byte = offset % 16;
  return block * 1024 + row * 128 + ((chunk ^ row) * 16) + byte;
}

TEST(GroupedGemmLayout, SwizzleIsTheDocumented128BPattern) {
  std::vector<int> seen(8192, 0);
  for (uint32_t off = 0; off < 8192; ++off) {
    ASSERT_EQ(gg::swizzle128(off), swizzle_reference(off)) << off;
    ++seen[gg::swizzle128(off)];
  }
  for (int n : seen) ASSERT_EQ(n, 1);  // a permutation
}

TEST(GroupedGemmLayout, DescriptorFields) {
  const uint64_t d = gg::make_smem_desc(0x1C400, 8192, 1024);
  EXPECT_EQ(d & 0x3FFF, 0x1C400u >> 4);
  EXPECT_EQ((d >> 16) & 0x3FFF, 8192u >> 4);
  EXPECT_EQ((d >> 32) & 0x3FFF, 1024u >> 4);
  EXPECT_EQ((d >> 49) & 0x7, 0u);
  EXPECT_EQ(d >> 62, 1u);  // 128B swizzle
  EXPECT_EQ((d >> 14) & 0x3, 0u);
  EXPECT_EQ((d >> 30) & 0x3, 0u);
  EXPECT_EQ((d >> 46) & 0x7, 0u);
}

// Shared-memory byte address wgmma reads for element (mn, k) of a 16-deep operand slice, from the
// descriptor alone (canonical SW128 layouts, then the address-based swizzle).
uint32_t wgmma_operand_address(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  EXPECT_EQ(desc >> 62, 1u);
  uint32_t a = 0;
  if (mn_major) {
    a = start + static_cast<uint32_t>(mn / 64) * lbo + static_cast<uint32_t>(mn % 64) * 2 +
        static_cast<uint32_t>(k / 8) * sbo + static_cast<uint32_t>(k % 8) * 128;
  } else {
    EXPECT_LT(k, 16);
    a = start + static_cast<uint32_t>(mn / 8) * sbo + static_cast<uint32_t>(mn % 8) * 128 + static_cast<uint32_t>(k) * 2;
  }
  return swizzle_reference(a);
}

// One stage as the kernel fills it: A (tile_m × kBK) then B (bn × kBK), element values = their logical
// coordinates encoded as id(operand, mn, r), written where TMA (SWIZZLE_128B) would put them.
struct StageEmulator {
  static constexpr uint32_t kBase = 0x4000;  // a 1024-aligned shared address, as in the kernel
  int bn, tile_m;
  bool a_mn, b_mn;
  std::vector<uint16_t> smem;  // indexed by (address - kBase) / 2

  static uint16_t id(int operand, int mn, int r) { return static_cast<uint16_t>((operand << 15) | (mn << 6) | r); }

  StageEmulator(int bn_, int tile_m_, bool a_mn_, bool b_mn_) : bn(bn_), tile_m(tile_m_), a_mn(a_mn_), b_mn(b_mn_) {
    smem.assign(static_cast<size_t>((tile_m + bn) * gg::kBK), 0xFFFF);
    fill(0, 0, tile_m, a_mn);
    fill(1, static_cast<uint32_t>(gg::a_bytes(tile_m)), bn, b_mn);
  }
  // K-major: one box {64 (r), rows (mn)}: element (mn, r) at box offset (row mn, col r).
  // MN-major: boxes {64 (mn), 64 (r)} 8 KiB apart: element (mn, r) in box mn / 64 at (row r, col mn % 64).
  void fill(int operand, uint32_t byte0, int rows, bool mn_major) {
    for (int mn = 0; mn < rows; ++mn) {
      for (int r = 0; r < gg::kBK; ++r) {
        const uint32_t off = mn_major ? static_cast<uint32_t>(mn / 64) * gg::kBoxMnBytes + gg::tma_box_offset(r, mn % 64)
                                      : gg::tma_box_offset(mn, r);
        uint16_t& slot = smem[(byte0 + off) / 2];
        ASSERT_EQ(slot, 0xFFFF) << "two elements in one slot";
        slot = id(operand, mn, r);
      }
    }
  }
  uint16_t read(uint32_t address) const { return smem[(address - kBase) / 2]; }
};

void check_stage_reads(int bn, int tile_m, bool a_mn, bool b_mn) {
  const StageEmulator st(bn, tile_m, a_mn, b_mn);
  const uint32_t a_s = StageEmulator::kBase, b_s = a_s + static_cast<uint32_t>(gg::a_bytes(tile_m));
  for (int c = 0; c < tile_m / 64; ++c) {  // consumer warpgroup: rows 64c .. 64c + 63 of A
    for (int kk = 0; kk < gg::kBK / gg::kWgmmaK; ++kk) {
      const uint64_t da = gg::operand_desc(a_s + static_cast<uint32_t>(c * gg::kBoxMnBytes), a_mn, kk);
      const uint64_t db = gg::operand_desc(b_s, b_mn, kk);
      for (int k = 0; k < gg::kWgmmaK; ++k) {
        const int r = gg::kWgmmaK * kk + k;
        for (int m = 0; m < 64; ++m) {
          ASSERT_EQ(st.read(wgmma_operand_address(da, a_mn, m, k)), StageEmulator::id(0, 64 * c + m, r))
              << "A c=" << c << " kk=" << kk << " m=" << m << " k=" << k;
        }
        for (int n = 0; n < bn; ++n) {
          ASSERT_EQ(st.read(wgmma_operand_address(db, b_mn, n, k)), StageEmulator::id(1, n, r))
              << "B kk=" << kk << " n=" << n << " k=" << k;
        }
      }
    }
  }
}

TEST(GroupedGemmLayout, WgmmaReadsWhatTmaWroteForward) {  // A, B K-major
  for (int bn : {128, 192, 256}) {
    for (int tile_m : {gg::kBM, gg::kBMPingpong}) check_stage_reads(bn, tile_m, false, false);
  }
}
TEST(GroupedGemmLayout, WgmmaReadsWhatTmaWroteDgrad) {  // A K-major, B MN-major
  for (int bn : {128, 192, 256}) {
    for (int tile_m : {gg::kBM, gg::kBMPingpong}) check_stage_reads(bn, tile_m, false, true);
  }
}
TEST(GroupedGemmLayout, WgmmaReadsWhatTmaWroteWgrad) {  // A, B MN-major
  for (int bn : {128, 192, 256}) {
    for (int tile_m : {gg::kBM, gg::kBMPingpong}) check_stage_reads(bn, tile_m, true, true);
  }
}

// CUTLASS CLayout_64xN: ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)) maps (thread, value) to m + 64·n.
TEST(GroupedGemmLayout, AccumulatorFragmentMatchesCutlassCLayout) {
  for (int n_tile : {128, 192, 256}) {
    std::vector<int> seen(64 * n_tile, 0);
    for (int t = 0; t < 128; ++t) {
      for (int v = 0; v < n_tile / 2; ++v) {
        const int idx = 128 * (t % 4) + 1 * ((t / 4) % 8) + 16 * (t / 32) + 64 * (v % 2) + 8 * ((v / 2) % 2) +
                        512 * (v / 4);
        const gg::RowCol rc = gg::acc_row_col(t, v);
        ASSERT_EQ(rc.row, idx % 64) << "t=" << t << " v=" << v;
        ASSERT_EQ(rc.col, idx / 64) << "t=" << t << " v=" << v;
        ++seen[idx];
      }
    }
    for (int s : seen) ASSERT_EQ(s, 1);
  }
}

// The kernel's tile walk (tables, grid-stride loop, cursor) covers each output element once.
TEST(GroupedGemmLayout, SchedulerCoversEveryOutputOnce) {
  const std::vector<int64_t> counts = {0, 7, 300, 0, 128, 129, 1, 0, 64};
  const int64_t N = 200, K = 136, L = static_cast<int64_t>(counts.size());
  std::vector<int32_t> row_start(counts.size() + 1, 0);
  for (size_t l = 0; l < counts.size(); ++l) row_start[l + 1] = row_start[l] + static_cast<int32_t>(counts[l]);
  const int M = row_start.back();
  // overwrite: wgrad's store mode, where empty groups get their tiles too (a zero block each).
  for (const bool overwrite : {false, true})
  for (gg::Op op : {gg::Op::kFwd, gg::Op::kDgrad, gg::Op::kWgrad}) {
    for (int cfg = 0; cfg < 6; ++cfg) {
      const int bn = 128 + 64 * (cfg % 3), tile_m = cfg < 3 ? gg::kBM : gg::kBMPingpong;
      const int64_t n_out = op == gg::Op::kFwd ? N : K;
      const int n_tiles = gg::ceil_div(n_out, bn);
      std::vector<int32_t> tile_start(counts.size() + 1, 0);
      for (size_t l = 0; l < counts.size(); ++l) {
        tile_start[l + 1] = tile_start[l] + gg::group_tiles(op, counts[l], N, n_tiles, tile_m, overwrite);
      }
      // Outputs: fwd/dgrad (M, n_out), wgrad (L, N, K).
      const int64_t out_rows = op == gg::Op::kWgrad ? L * N : M;
      std::vector<int> seen(static_cast<size_t>(out_rows * n_out), 0);
      const int grid = 7;
      for (int b = 0; b < grid; ++b) {
        int group = 0;
        for (int tile = b; tile < tile_start[L]; tile += grid) {
          const gg::TileCoord tc = gg::decode_tile(tile_start.data(), group, tile, n_tiles);
          const int rows = row_start[tc.group + 1] - row_start[tc.group];
          if (!(overwrite && op == gg::Op::kWgrad)) {
            ASSERT_GT(rows, 0) << "a tile of an empty group";
          }
          const int mo_limit = op == gg::Op::kWgrad ? static_cast<int>(N) : rows;
          for (int i = 0; i < tile_m; ++i) {
            const int mo = tc.m_tile * tile_m + i;
            if (mo >= mo_limit) continue;
            for (int j = 0; j < bn; ++j) {
              const int no = tc.n_tile * bn + j;
              if (no >= n_out) continue;
              const int64_t row = op == gg::Op::kWgrad ? tc.group * N + mo : row_start[tc.group] + mo;
              ++seen[static_cast<size_t>(row * n_out + no)];
            }
          }
        }
      }
      for (int64_t i = 0; i < out_rows * n_out; ++i) {
        const int64_t row = i / n_out;
        const bool empty_group_dw =
            op == gg::Op::kWgrad && !overwrite && counts[static_cast<size_t>(row / N)] == 0;
        ASSERT_EQ(seen[static_cast<size_t>(i)], empty_group_dw ? 0 : 1)
            << "op " << static_cast<int>(op) << " bn " << bn << " tile_m " << tile_m << " overwrite " << overwrite
            << " element " << i;
      }
    }
  }
}

// ---- whole-kernel emulation: the kernel's data flow on the host -------------------------------------
// For every tile, in the kernel's order: the stage's TMA boxes (gg::stage_box_loads, the tensor maps of
// gg::a_map_spec / b_map_spec, zero fill out of bounds, 128B swizzle) are written into an emulated
// stage that starts as NaN; the wgrad tail rows are zeroed as the consumers do; each consumer
// warpgroup's wgmma k-steps read their operands through the descriptors (gg::operand_desc, decoded by
// wgmma_operand_address) into the accumulator fragments (gg::acc_row_col); the epilogue stores through
// gg::epilogue_index. Integer inputs make the sums exact, so the result must equal the per-group
// reference exactly; rows of neighbouring groups carry non-zero data, so a missing mask shows.
struct EmuTensor {
  std::vector<float> v;  // row-major, as the kernel's operand (dims innermost first in the map)
};

void emu_tma_load(const gg::MapSpec& spec, const std::vector<float>& g, const gg::BoxLoad& ld,
                  std::vector<float>& stage) {
  const int c[3] = {ld.c0, ld.c1, ld.c2};
  for (uint32_t i2 = 0; i2 < spec.box[2]; ++i2) {
    for (uint32_t i1 = 0; i1 < spec.box[1]; ++i1) {
      for (uint32_t i0 = 0; i0 < spec.box[0]; ++i0) {
        const int64_t x0 = c[0] + static_cast<int64_t>(i0), x1 = c[1] + static_cast<int64_t>(i1),
                      x2 = c[2] + static_cast<int64_t>(i2);
        const bool in = x0 >= 0 && x0 < static_cast<int64_t>(spec.dims[0]) && x1 >= 0 &&
                        x1 < static_cast<int64_t>(spec.dims[1]) && x2 >= 0 && x2 < static_cast<int64_t>(spec.dims[2]);
        const float value =
            in ? g.at(static_cast<size_t>((x2 * static_cast<int64_t>(spec.dims[1]) + x1) * static_cast<int64_t>(spec.dims[0]) + x0))
               : 0.0f;
        const uint32_t linear = ((i2 * spec.box[1] + i1) * spec.box[0] + i0) * 2;
        ASSERT_EQ(spec.box[0], 64u) << "128-byte box rows";
        stage.at((ld.smem_offset + gg::swizzle128(linear)) / 2) = value;
      }
    }
  }
}

// The staged epilogue of one warpgroup's block: fragments into the shared-memory buffer at
// staged_offset (every slot written once), then the TMA store of each box (columns past n_out
// clipped, as TMA does).
void emulate_staged_block(int bn, int tile_m, const gg::TileCoord& tc, int row0, int rows, int m_offset, int n_out,
                          const float* acc_wg, std::vector<float>& out) {
  std::vector<float> buf(static_cast<size_t>(gg::out_block_bytes(bn) / 2), std::numeric_limits<float>::quiet_NaN());
  std::vector<int> writes(buf.size(), 0);
  for (int t = 0; t < 128; ++t) {
    for (int reg = 0; reg < bn / 2; reg += 2) {
      const uint32_t off = gg::staged_offset(t, reg);
      ASSERT_EQ(off % 4, 0u) << "a bf16 pair must be 4-byte aligned";
      for (int h = 0; h < 2; ++h) {
        buf.at(off / 2 + h) = acc_wg[t * (bn / 2) + reg + h];
        ++writes.at(off / 2 + h);
      }
    }
  }
  for (size_t i = 0; i < writes.size(); ++i) ASSERT_EQ(writes[i], 1) << "staging slot " << i;
  for (int j = 0; j < bn / 64; ++j) {
    const gg::StoreCoord sc = gg::staged_store_coord(bn, tile_m, tc, row0, m_offset, j);
    if (sc.c0 >= n_out) continue;
    // The box's 64 rows are the group's own (another CTA owns the next group's rows).
    ASSERT_GE(sc.c1, row0);
    ASSERT_LE(sc.c1 + 64, row0 + rows);
    for (int r = 0; r < 64; ++r) {
      for (int c = 0; c < 64 && sc.c0 + c < n_out; ++c) {
        out.at(static_cast<size_t>(static_cast<int64_t>(sc.c1 + r) * n_out + sc.c0 + c)) =
            buf.at((j * gg::kOutBoxBytes + gg::tma_box_offset(r, c)) / 2);
      }
    }
  }
}

// The staged wgrad epilogue of one warpgroup's block: each half of BN/2 columns into the buffer at
// staged_offset_f32 (every slot written once per half), then the TMA reduce-add of each box into dW
// (columns past K clipped; the box's rows inside the group's N rows of dW).
void emulate_staged_wgrad_block(int bn, int tile_m, const gg::TileCoord& tc, int mo_fixed, int m_offset, int n_out,
                                const float* acc_wg, std::vector<float>& dw) {
  for (int h = 0; h < 2; ++h) {
    std::vector<float> buf(static_cast<size_t>(gg::out_block_bytes(bn) / 4), std::numeric_limits<float>::quiet_NaN());
    std::vector<int> writes(buf.size(), 0);
    for (int t = 0; t < 128; ++t) {
      for (int reg = h * (bn / 4); reg < (h + 1) * (bn / 4); reg += 2) {
        const uint32_t off = gg::staged_offset_f32(t, reg, h * (bn / 2));
        ASSERT_EQ(off % 8, 0u) << "an f32 pair must be 8-byte aligned";
        ASSERT_LT(off / 4 + 1, buf.size()) << "thread " << t << " register " << reg;
        for (int e = 0; e < 2; ++e) {
          buf.at(off / 4 + e) = acc_wg[t * (bn / 2) + reg + e];
          ++writes.at(off / 4 + e);
        }
      }
    }
    for (size_t i = 0; i < writes.size(); ++i) ASSERT_EQ(writes[i], 1) << "half " << h << " staging slot " << i;
    for (int j = 0; j < bn / 64; ++j) {
      const gg::StoreCoord sc = gg::wgrad_reduce_coord(bn, tile_m, tc, mo_fixed, m_offset, h, j);
      if (sc.c0 >= n_out) continue;
      ASSERT_GE(sc.c1, tc.group * mo_fixed);
      ASSERT_LE(sc.c1 + 64, (tc.group + 1) * mo_fixed) << "a reduce box must stay inside dW_l";
      for (int r = 0; r < 64; ++r) {
        for (int c = 0; c < gg::kOutBoxColsF32 && sc.c0 + c < n_out; ++c) {
          const uint32_t byte = static_cast<uint32_t>(j * gg::kOutBoxBytes) + gg::swizzle128(static_cast<uint32_t>(r * 128 + c * 4));
          dw.at(static_cast<size_t>(static_cast<int64_t>(sc.c1 + r) * n_out + sc.c0 + c)) += buf.at(byte / 4);
        }
      }
    }
  }
}

// Runs op with tile N = bn over groups `counts`; x (M, K), w (L, N, K), dy (M, N); out as the kernel's
// output (y (M, N), dx (M, K) or dw (L, N, K), accumulated for wgrad).
// `staged`: the staged-epilogue configurations (cooperative tiles; blocks inside their group's output
// rows go through emulate_staged_block, wgrad's through emulate_staged_wgrad_block).
void emulate_kernel(gg::Op op, int bn, int tile_m, const std::vector<int64_t>& counts, int64_t N, int64_t K,
                    const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& dy,
                    std::vector<float>& out, bool staged = false) {
  const int64_t L = static_cast<int64_t>(counts.size());
  std::vector<int32_t> row_start(counts.size() + 1, 0), tile_start(counts.size() + 1, 0);
  for (size_t l = 0; l < counts.size(); ++l) row_start[l + 1] = row_start[l] + static_cast<int32_t>(counts[l]);
  const int64_t M = row_start.back();
  const bool a_mn = op == gg::Op::kWgrad, b_mn = op != gg::Op::kFwd;
  const int n_out = static_cast<int>(op == gg::Op::kFwd ? N : K), red = static_cast<int>(op == gg::Op::kFwd ? K : N);
  const int n_tiles = gg::ceil_div(n_out, bn);
  for (size_t l = 0; l < counts.size(); ++l) {
    tile_start[l + 1] = tile_start[l] + gg::group_tiles(op, row_start[l + 1] - row_start[l], N, n_tiles, tile_m);
  }
  const gg::MapSpec a_spec = gg::a_map_spec(op, M, N, K, tile_m), b_spec = gg::b_map_spec(op, bn, M, N, K, L);
  const std::vector<float>& a_data = op == gg::Op::kFwd ? x : dy;
  const std::vector<float>& b_data = op == gg::Op::kWgrad ? x : w;
  const uint32_t base = StageEmulator::kBase;
  const int stage_floats = (tile_m + bn) * gg::kBK, consumers = tile_m / 64;
  const int b_bytes0 = gg::a_bytes(tile_m);
  std::vector<float> stage;
  std::vector<float> acc(static_cast<size_t>(consumers * 128 * (bn / 2)));
  int group = 0;
  for (int tile = 0; tile < tile_start.back(); ++tile) {
    const gg::TileCoord tc = gg::decode_tile(tile_start.data(), group, tile, n_tiles);
    const int row0 = row_start[tc.group], rows = row_start[tc.group + 1] - row0;
    const int num_k = gg::ceil_div(op == gg::Op::kWgrad ? rows : red, gg::kBK);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int kt = 0; kt < num_k; ++kt) {
      stage.assign(static_cast<size_t>(stage_floats), std::numeric_limits<float>::quiet_NaN());
      gg::BoxLoad loads[gg::kMaxBoxLoads] = {};
      const int num_loads = gg::stage_box_loads(op, bn, tile_m, tc, row0, kt, loads);
      uint32_t tx_bytes = 0;  // what the producer's expect_tx announces must be what the boxes deliver
      for (int i = 0; i < num_loads; ++i) {
        const gg::MapSpec& spec = loads[i].map == 0 ? a_spec : b_spec;
        tx_bytes += spec.box[0] * spec.box[1] * spec.box[2] * 2;
      }
      ASSERT_EQ(tx_bytes, static_cast<uint32_t>(gg::stage_bytes(bn, tile_m)));
      for (int i = 0; i < num_loads; ++i) {
        emu_tma_load(loads[i].map == 0 ? a_spec : b_spec, loads[i].map == 0 ? a_data : b_data, loads[i], stage);
      }
      const int valid = gg::stage_valid_rows(op, rows, kt);
      if (valid < gg::kBK) {  // zero_box_rows of the consumer warpgroup(s): every box of the stage
        for (int c = 0; c < consumers; ++c) {
          std::vector<int> boxes = {c * gg::kBoxMnBytes};
          for (int j = c; j < bn / 64; j += consumers) boxes.push_back(b_bytes0 + j * gg::kBoxMnBytes);
          for (int box : boxes) {
            for (int r = valid; r < 64; ++r) {
              for (int e = 0; e < 64; ++e) stage.at(static_cast<size_t>((box + r * gg::kRowBytes) / 2 + e)) = 0.0f;
            }
          }
        }
      }
      for (int c = 0; c < consumers; ++c) {
        for (int kk = 0; kk < gg::kBK / gg::kWgmmaK; ++kk) {
          const uint64_t da = gg::operand_desc(base + static_cast<uint32_t>(64 * c * gg::kRowBytes), a_mn, kk);
          const uint64_t db = gg::operand_desc(base + static_cast<uint32_t>(b_bytes0), b_mn, kk);
          for (int t = 0; t < 128; ++t) {
            for (int reg = 0; reg < bn / 2; ++reg) {
              const gg::RowCol rc = gg::acc_row_col(t, reg);
              float sum = 0.0f;
              for (int k = 0; k < gg::kWgmmaK; ++k) {
                sum += stage.at((wgmma_operand_address(da, a_mn, rc.row, k) - base) / 2) *
                       stage.at((wgmma_operand_address(db, b_mn, rc.col, k) - base) / 2);
              }
              acc[static_cast<size_t>((c * 128 + t) * (bn / 2) + reg)] += sum;
            }
          }
        }
      }
    }
    for (int c = 0; c < consumers; ++c) {
      if (staged && gg::staged_block(op, tile_m, tc, rows, static_cast<int>(N), 64 * c)) {
        const float* acc_wg = &acc[static_cast<size_t>(c * 128 * (bn / 2))];
        if (op == gg::Op::kWgrad) {
          emulate_staged_wgrad_block(bn, tile_m, tc, static_cast<int>(N), 64 * c, n_out, acc_wg, out);
        } else {
          emulate_staged_block(bn, tile_m, tc, row0, rows, 64 * c, n_out, acc_wg, out);
        }
        continue;
      }
      for (int t = 0; t < 128; ++t) {
        for (int reg = 0; reg < bn / 2; reg += 2) {
          const int64_t idx =
              gg::epilogue_index(op, bn, tile_m, tc, row0, rows, static_cast<int>(N), n_out, 64 * c, t, reg);
          if (idx < 0) continue;
          for (int h = 0; h < 2; ++h) {
            const float v = acc[static_cast<size_t>((c * 128 + t) * (bn / 2) + reg + h)];
            float& o = out.at(static_cast<size_t>(idx + h));
            o = op == gg::Op::kWgrad ? o + v : v;
          }
        }
      }
    }
  }
}

std::vector<float> small_ints(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t s = seed;
  for (float& e : v) {
    s = s * 1664525u + 1013904223u;
    e = static_cast<float>(static_cast<int>((s >> 16) % 5) - 2);  // -2 .. 2
  }
  return v;
}

TEST(GroupedGemmLayout, EmulatedKernelMatchesReference) {
  const std::vector<int64_t> counts = {0, 7, 0, 130, 3, 70, 0};
  const int64_t N = 136, K = 136, L = static_cast<int64_t>(counts.size());
  const int64_t M = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  const std::vector<float> x = small_ints(static_cast<size_t>(M * K), 1), w = small_ints(static_cast<size_t>(L * N * K), 2);
  const std::vector<float> dy = small_ints(static_cast<size_t>(M * N), 3), dw0 = small_ints(static_cast<size_t>(L * N * K), 4);
  std::vector<double> y_ref(static_cast<size_t>(M * N), 0.0), dx_ref(static_cast<size_t>(M * K), 0.0);
  std::vector<double> dw_ref(dw0.begin(), dw0.end());
  int64_t row0 = 0;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t m = row0; m < row0 + counts[l]; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k) {
          const double xv = x[m * K + k], wv = w[(l * N + n) * K + k], dyv = dy[m * N + n];
          y_ref[m * N + n] += xv * wv;
          dx_ref[m * K + k] += dyv * wv;
          dw_ref[(l * N + n) * K + k] += dyv * xv;
        }
      }
    }
    row0 += counts[l];
  }
  // Configurations 0-2 cooperative, 3-5 ping-pong, 6-8 cooperative with the staged epilogue (the
  // 130- and 70-row groups have blocks on both sides of the staged/direct split).
  for (int cfg = 0; cfg < 9; ++cfg) {
    const int bn = 128 + 64 * (cfg % 3), tile_m = cfg >= 3 && cfg < 6 ? gg::kBMPingpong : gg::kBM;
    const bool staged = cfg >= 6;
    SCOPED_TRACE("config " + std::to_string(cfg));
    std::vector<float> y(y_ref.size(), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> dx(dx_ref.size(), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> dw = dw0;
    emulate_kernel(gg::Op::kFwd, bn, tile_m, counts, N, K, x, w, dy, y, staged);
    emulate_kernel(gg::Op::kDgrad, bn, tile_m, counts, N, K, x, w, dy, dx, staged);
    // wgrad stages too (TMA reduce-adds into dW) in configurations 6-8: N = 136 gives blocks inside
    // dW_l (rows 0-127) and past it (128-191: direct), K = 136 a reduce box clipped at the K edge.
    emulate_kernel(gg::Op::kWgrad, bn, tile_m, counts, N, K, x, w, dy, dw, staged);
    int64_t bad = 0;
    for (size_t i = 0; i < y.size(); ++i) bad += y[i] != y_ref[i];
    EXPECT_EQ(bad, 0) << "fwd bn " << bn << " tile_m " << tile_m;
    bad = 0;
    for (size_t i = 0; i < dx.size(); ++i) bad += dx[i] != dx_ref[i];
    EXPECT_EQ(bad, 0) << "dgrad bn " << bn << " tile_m " << tile_m;
    bad = 0;
    for (size_t i = 0; i < dw.size(); ++i) bad += dw[i] != dw_ref[i];
    EXPECT_EQ(bad, 0) << "wgrad bn " << bn << " tile_m " << tile_m;
  }
}

// Ping-pong: the producer fills stages in tile order; each consumer warpgroup steps over the other's
// tiles with advance_stage and must land on exactly the (stage, phase) the producer used for its own.
TEST(GroupedGemmLayout, PingpongConsumersFollowTheProducer) {
  const std::vector<int> num_k = {3, 1, 7, 4, 4, 2, 9, 1, 1, 5, 6, 3, 8};  // stages per tile of one CTA
  for (int stages : {3, 4, 5, 6, 8}) {
    std::vector<std::vector<std::pair<int, uint32_t>>> produced(num_k.size());
    int stage = 0;
    uint32_t phase = 0;
    for (size_t j = 0; j < num_k.size(); ++j) {
      for (int kt = 0; kt < num_k[j]; ++kt) {
        produced[j].push_back({stage, phase});
        if (++stage == stages) {  // the kernel's single step
          stage = 0;
          phase ^= 1u;
        }
      }
    }
    for (int c = 0; c < 2; ++c) {
      int s = 0;
      uint32_t ph = 0;
      for (size_t j = 0; j < num_k.size(); ++j) {
        if (static_cast<int>(j % 2) != c) {
          gg::advance_stage(s, ph, num_k[j], stages);
          continue;
        }
        for (int kt = 0; kt < num_k[j]; ++kt) {
          ASSERT_EQ(s, produced[j][static_cast<size_t>(kt)].first) << "stages " << stages << " c " << c << " tile " << j;
          ASSERT_EQ(ph, produced[j][static_cast<size_t>(kt)].second) << "stages " << stages << " c " << c << " tile " << j;
          if (++s == stages) {
            s = 0;
            ph ^= 1u;
          }
        }
      }
    }
  }
}

TEST(GroupedGemmLayout, AutoConfigFollowsTheMeasuredTable) {
  namespace L = cuda::launch;
  // Staged epilogue, tile N 192 or 128 by the wave model, on 132 SMs (an H200), at the cases of the
  // device sweeps (docs/performance.md, Grouped GEMM), {n_out, m_tiles, tile N}:
  struct Case {
    int64_t n_out, m_tiles;
    int bn;
  };
  const std::vector<Case> cases = {
      // 16 groups x 128 rows (16 row tiles): 128 won these by 9-27% ...
      {384, 16, 128}, {2048, 16, 128}, {768, 16, 128}, {192, 16, 128},
      // ... and lost this one (128 output tiles fill one wave with 192, 192 tiles need two with 128).
      {1536, 16, 192},
      // 16 x 512 rows: 192 won (384, 2048) fwd by 17%; 128 ahead at n_out 2048.
      {384, 64, 192}, {2048, 64, 128},
      // 16 x 2048 rows: 192 at every shape.
      {2048, 256, 192}, {384, 256, 192}, {768, 256, 192}, {1536, 256, 192}, {192, 256, 192},
      // wgrad (m_tiles = 16 · ceil(N / 128)): (1536, 2048), (384, 2048), (2048, 192): 192.
      {2048, 192, 192}, {2048, 48, 192}, {192, 256, 192},
      // Narrow outputs: 192 would pad a whole extra tile.
      {64, 256, 128}, {200, 256, 128}};
  for (const Case& c : cases) {
    const int cfg = L::grouped_gemm_auto_config(c.n_out, c.m_tiles, 132);
    EXPECT_TRUE(L::kGroupedGemmStaged[cfg]) << c.n_out << " x " << c.m_tiles;
    EXPECT_FALSE(L::kGroupedGemmPingpong[cfg]) << c.n_out << " x " << c.m_tiles;
    EXPECT_EQ(L::kGroupedGemmTileN[cfg], c.bn) << "n_out " << c.n_out << ", m_tiles " << c.m_tiles;
  }
  for (int c = 0; c < cuda::launch::kGroupedGemmConfigs; ++c) EXPECT_GE(cuda::launch::grouped_gemm_stages(c), 3);
}

// ---- GPU: against the CPU reference and cuBLAS -----------------------------------------------------
#if !defined(MOETP_GGEMM_LAYOUT_ONLY)  // the cuda_grouped_gemm_layout_test target has the part above only

Tensor round_bf16(const Tensor& t) { return t.to(DType::kBF16).to(DType::kF32); }
Tensor to_gpu_bf16(const Tensor& t) { return t.to(DType::kBF16).to(Device::kCuda); }

// Integers in [-r, r], exactly representable in bf16.
Tensor random_ints(Shape shape, uint64_t seed, uint64_t stream, int r) {
  Tensor t = random_tensor(std::move(shape), seed, stream, -static_cast<float>(r) - 0.5f, static_cast<float>(r) + 0.5f);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = std::nearbyint(p[i]);
  return t;
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  return offsets;
}
Tensor device_offsets(const std::vector<int64_t>& offsets) {
  return Tensor::from_vector(offsets, {static_cast<int64_t>(offsets.size())}).to(Device::kCuda);
}

// A (rows + 2, cols) bf16 buffer of NaNs; the middle `rows` rows are the output, the first and last
// are guards that must survive the kernel.
struct Guarded {
  Tensor full, inner;
  Guarded(int64_t rows, int64_t cols) {
    full = to_gpu_bf16(Tensor::full<float>({rows + 2, cols}, std::numeric_limits<float>::quiet_NaN()));
    inner = full.narrow_rows(1, rows);
  }
  bool guards_intact() const {
    const Tensor f = full.to(Device::kCpu).to(DType::kF32);
    const int64_t rows = f.size(0), cols = f.size(1);
    const float* p = f.data<float>();
    for (int64_t j = 0; j < cols; ++j) {
      if (!std::isnan(p[j]) || !std::isnan(p[(rows - 1) * cols + j])) return false;
    }
    return true;
  }
};

class CudaGroupedGemmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

struct Case {
  std::string name;
  std::vector<int64_t> counts;  // rows per group; L = counts.size()
  int64_t N, K;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// 16 ragged groups summing to `total`, two of them empty.
std::vector<int64_t> ragged16(int64_t total) {
  std::vector<int64_t> counts = {211, 97, 0, 160, 128, 64, 301, 5, 122, 130, 90, 177, 140, 1, 200, 0};
  const int64_t sum = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  counts[6] += total - sum;
  return counts;
}

class CudaGroupedGemm : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

TEST_P(CudaGroupedGemm, AllProductsMatchCpuAndCublas) {
  const Case c = GetParam();
  const std::vector<int64_t> offsets = offsets_of(c.counts);
  const int64_t L = static_cast<int64_t>(c.counts.size()), M = offsets.back(), N = c.N, K = c.K;
  const Tensor x = round_bf16(random_tensor({M, K}, 5, 1));
  const Tensor w = round_bf16(random_tensor({L, N, K}, 5, 2));
  const Tensor dy = round_bf16(random_tensor({M, N}, 5, 3));
  const Tensor dw0 = random_tensor({L, N, K}, 5, 4);

  Tensor y_ref = Tensor::zeros({M, N}, DType::kF32), dx_ref = Tensor::zeros({M, K}, DType::kF32);
  Tensor dw_ref = dw0.clone();
  Tensor dw_fresh = Tensor::zeros({L, N, K}, DType::kF32);  // wgrad's overwrite mode: the products alone
  for (int64_t l = 0; l < L; ++l) {
    const int64_t rows = c.counts[l];
    if (rows == 0) continue;
    const Tensor x_l = x.narrow_rows(offsets[l], rows);
    const Tensor w_l = w.slice(0, l, l + 1).view({N, K});
    y_ref.narrow_rows(offsets[l], rows).copy_from(cpu::linear(x_l, w_l));
    Tensor dx_l = dx_ref.narrow_rows(offsets[l], rows);
    Tensor dw_l = dw_ref.slice(0, l, l + 1).view({N, K});
    cpu::linear_backward(dy.narrow_rows(offsets[l], rows), x_l, w_l, &dx_l, &dw_l);
    Tensor dw_fresh_l = dw_fresh.slice(0, l, l + 1).view({N, K});
    cpu::linear_backward(dy.narrow_rows(offsets[l], rows), x_l, w_l, nullptr, &dw_fresh_l);
  }
  const Tensor x_g = to_gpu_bf16(x), w_g = to_gpu_bf16(w), dy_g = to_gpu_bf16(dy), off_g = device_offsets(offsets);

  // The cuBLAS per-group path on the same data.
  Tensor y_blas, dx_blas, dw_blas = dw0.to(Device::kCuda);
  cuda::grouped_linear(x_g, offsets, w_g, y_blas);
  cuda::grouped_linear_backward(dy_g, x_g, offsets, w_g, &dx_blas, &dw_blas);

  for (int config = -1; config < cuda::launch::kGroupedGemmConfigs; ++config) {
    const std::string what = c.name + " config " + std::to_string(config);
    Guarded y(M, N), dx(M, K);
    Tensor dw = dw0.to(Device::kCuda);
    cuda::grouped_gemm_fwd(x_g, off_g, w_g, y.inner, nullptr, config);
    cuda::grouped_gemm_dgrad(dy_g, off_g, w_g, dx.inner, nullptr, config);
    cuda::grouped_gemm_wgrad(dy_g, x_g, off_g, dw, nullptr, config);
    // Overwrite mode from a non-zero dw: the products alone, empty groups exactly zero (many tiles
    // per block at the L16 cases, two of them empty; staged blocks where N >= 64).
    Tensor dw_over = dw0.to(Device::kCuda);
    cuda::grouped_gemm_wgrad(dy_g, x_g, off_g, dw_over, nullptr, config, /*accumulate=*/false);
    // With no rows at all every group is empty: the loop below checks that all of dw_over is zero
    // (close() refuses an all-zero reference, which would compare nothing).
    if (M > 0) {
      EXPECT_TRUE(close(dw_over, dw_fresh, testing::kF32Parallel)) << what << " dw overwrite vs cpu";
    }
    {
      const Tensor over_cpu = dw_over.to(Device::kCpu);
      for (int64_t l = 0; l < L; ++l) {
        if (c.counts[l] != 0) continue;
        EXPECT_TRUE(testing::all_zero(over_cpu.slice(0, l, l + 1).contiguous().to_vector<float>()))
            << what << ": empty group " << l << " must be zero after an overwrite";
      }
    }
    EXPECT_TRUE(y.guards_intact()) << what << ": y guard rows written";
    EXPECT_TRUE(dx.guards_intact()) << what << ": dx guard rows written";
    if (M == 0) {
      EXPECT_TRUE(testing::bit_equal(dw, dw0)) << what << ": no rows, no gradient";
      continue;
    }
    EXPECT_TRUE(close(y.inner, y_ref, testing::kBF16)) << what << " y vs cpu";
    EXPECT_TRUE(close(dx.inner, dx_ref, testing::kBF16)) << what << " dx vs cpu";
    EXPECT_TRUE(close(dw, dw_ref, testing::kF32Parallel)) << what << " dw vs cpu";
    EXPECT_TRUE(close(y.inner, y_blas, testing::kBF16)) << what << " y vs cublas";
    EXPECT_TRUE(close(dx.inner, dx_blas, testing::kBF16)) << what << " dx vs cublas";
    EXPECT_TRUE(close(dw, dw_blas, testing::kF32Parallel)) << what << " dw vs cublas";
    const Tensor dw_cpu = dw.to(Device::kCpu);
    for (int64_t l = 0; l < L; ++l) {
      if (c.counts[l] != 0) continue;
      EXPECT_TRUE(testing::bit_equal(dw_cpu.slice(0, l, l + 1), dw0.slice(0, l, l + 1)))
          << what << ": empty group " << l << " must be untouched";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Groups, CudaGroupedGemm,
    ::testing::Values(Case{"L5_ragged_with_empty_N64_K72", {0, 7, 0, 130, 3}, 64, 72},
                      Case{"L4_all_rows_in_one_N200_K136", {0, 0, 300, 0}, 200, 136},
                      Case{"L3_no_rows_N8_K8", {0, 0, 0}, 8, 8},
                      Case{"L1_single_row_N8_K8", {1}, 8, 8},
                      Case{"L9_tile_edges_N128_K64", {127, 128, 129, 0, 63, 64, 65, 1, 256}, 128, 64},
                      Case{"L16_M2048_N384_K2048", ragged16(2048), 384, 2048},
                      Case{"L16_M2048_N2048_K192", ragged16(2048), 2048, 192}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// |y| <= K = 136 and |dx| <= N = 24 (integers bf16 holds exactly); |dw| <= 150 + 50 (exact in f32):
// every product is exact, whatever the summation order, so the comparisons are bit for bit.
TEST_F(CudaGroupedGemmTest, IntegerInputsAreExact) {
  const std::vector<int64_t> counts = {5, 0, 150, 2, 70};
  const std::vector<int64_t> offsets = offsets_of(counts);
  const int64_t L = 5, M = offsets.back(), N = 24, K = 136;
  const Tensor x = random_ints({M, K}, 11, 1, 1), w = random_ints({L, N, K}, 11, 2, 1);
  const Tensor dy = random_ints({M, N}, 11, 3, 1), dw0 = random_ints({L, N, K}, 11, 4, 50);
  Tensor y_ref = Tensor::zeros({M, N}, DType::kF32), dx_ref = Tensor::zeros({M, K}, DType::kF32);
  Tensor dw_ref = dw0.clone();
  for (int64_t l = 0; l < L; ++l) {
    if (counts[l] == 0) continue;
    const Tensor x_l = x.narrow_rows(offsets[l], counts[l]);
    const Tensor w_l = w.slice(0, l, l + 1).view({N, K});
    y_ref.narrow_rows(offsets[l], counts[l]).copy_from(cpu::linear(x_l, w_l));
    Tensor dx_l = dx_ref.narrow_rows(offsets[l], counts[l]);
    Tensor dw_l = dw_ref.slice(0, l, l + 1).view({N, K});
    cpu::linear_backward(dy.narrow_rows(offsets[l], counts[l]), x_l, w_l, &dx_l, &dw_l);
  }
  ASSERT_FALSE(testing::all_zero(y_ref.to_vector<float>()));
  ASSERT_FALSE(testing::all_zero(dx_ref.to_vector<float>()));
  const Tensor off_g = device_offsets(offsets);
  for (int config = 0; config < cuda::launch::kGroupedGemmConfigs; ++config) {
    Tensor y, dx, dw = dw0.to(Device::kCuda);
    cuda::grouped_gemm_fwd(to_gpu_bf16(x), off_g, to_gpu_bf16(w), y, nullptr, config);
    cuda::grouped_gemm_dgrad(to_gpu_bf16(dy), off_g, to_gpu_bf16(w), dx, nullptr, config);
    cuda::grouped_gemm_wgrad(to_gpu_bf16(dy), to_gpu_bf16(x), off_g, dw, nullptr, config);
    EXPECT_TRUE(testing::bit_equal(y, y_ref.to(DType::kBF16))) << "config " << config;
    EXPECT_TRUE(testing::bit_equal(dx, dx_ref.to(DType::kBF16))) << "config " << config;
    EXPECT_TRUE(testing::bit_equal(dw, dw_ref)) << "config " << config;
  }
  // Overwrite mode (accumulate = false): dw starts as dw0 (not zero) and must end as the products
  // alone, with the empty group's slice zero, whatever the configuration (direct, staged, ping-pong).
  Tensor fresh_ref = Tensor::zeros({L, N, K}, DType::kF32);
  for (int64_t l = 0; l < L; ++l) {
    if (counts[l] == 0) continue;
    Tensor dw_l = fresh_ref.slice(0, l, l + 1).view({N, K});
    cpu::linear_backward(dy.narrow_rows(offsets[l], counts[l]), x.narrow_rows(offsets[l], counts[l]),
                         w.slice(0, l, l + 1).view({N, K}), nullptr, &dw_l);
  }
  for (int config = 0; config < cuda::launch::kGroupedGemmConfigs; ++config) {
    Tensor dw = dw0.to(Device::kCuda);
    cuda::grouped_gemm_wgrad(to_gpu_bf16(dy), to_gpu_bf16(x), off_g, dw, nullptr, config, /*accumulate=*/false);
    EXPECT_TRUE(testing::bit_equal(dw, fresh_ref)) << "overwrite, config " << config;
  }
  // No rows at all: overwriting gives zeros.
  Tensor dw_none = dw0.to(Device::kCuda);
  cuda::grouped_gemm_wgrad(to_gpu_bf16(dy.narrow_rows(0, 0)), to_gpu_bf16(x.narrow_rows(0, 0)),
                           device_offsets(std::vector<int64_t>(static_cast<size_t>(L) + 1, 0)), dw_none, nullptr, -1,
                           false);
  EXPECT_TRUE(testing::all_zero(dw_none.to(Device::kCpu).to_vector<float>()));
}

// Two calls accumulate: dw = dw0 + 2 · dyᵀx per group, and the kernel is deterministic.
TEST_F(CudaGroupedGemmTest, WgradAccumulatesAndIsDeterministic) {
  const std::vector<int64_t> counts = {100, 0, 37};
  const std::vector<int64_t> offsets = offsets_of(counts);
  const int64_t L = 3, M = 137, N = 64, K = 64;
  const Tensor dy_g = to_gpu_bf16(random_tensor({M, N}, 13, 1)), x_g = to_gpu_bf16(random_tensor({M, K}, 13, 2));
  const Tensor off_g = device_offsets(offsets);
  Tensor once = Tensor::zeros({L, N, K}, DType::kF32, Device::kCuda);
  cuda::grouped_gemm_wgrad(dy_g, x_g, off_g, once);
  Tensor twice = Tensor::zeros({L, N, K}, DType::kF32, Device::kCuda), again = twice.clone();
  cuda::grouped_gemm_wgrad(dy_g, x_g, off_g, twice);
  cuda::grouped_gemm_wgrad(dy_g, x_g, off_g, twice);
  cuda::grouped_gemm_wgrad(dy_g, x_g, off_g, again);
  cuda::grouped_gemm_wgrad(dy_g, x_g, off_g, again);
  EXPECT_TRUE(testing::bit_equal(twice, again));
  const Tensor o = once.to(Device::kCpu), t = twice.to(Device::kCpu);
  ASSERT_FALSE(testing::all_zero(o.to_vector<float>()));
  const float* po = o.data<float>();
  const float* pt = t.data<float>();
  for (int64_t i = 0; i < o.numel(); ++i) ASSERT_EQ(pt[i], 2.0f * po[i]) << i;  // 0 + a + a = 2a exactly
}

TEST_F(CudaGroupedGemmTest, RejectsBadArguments) {
  const Tensor x = Tensor::zeros({6, 8}, DType::kBF16, Device::kCuda);
  const Tensor w = Tensor::zeros({2, 16, 8}, DType::kBF16, Device::kCuda);
  const Tensor off = device_offsets({0, 3, 6});
  Tensor y;
  EXPECT_THROW(cuda::grouped_gemm_fwd(x, device_offsets({0, 6}), w, y), Error);                    // L + 1 entries
  EXPECT_THROW(cuda::grouped_gemm_fwd(x, Tensor::from_vector<int64_t>({0, 3, 6}, {3}), w, y), Error);  // host offsets
  EXPECT_THROW(cuda::grouped_gemm_fwd(x, off, w, y, nullptr, cuda::launch::kGroupedGemmConfigs), Error);                            // config
  const Tensor x12 = Tensor::zeros({6, 12}, DType::kBF16, Device::kCuda);
  const Tensor w12 = Tensor::zeros({2, 16, 12}, DType::kBF16, Device::kCuda);
  try {
    cuda::grouped_gemm_fwd(x12, off, w12, y);
    ADD_FAILURE() << "expected moetp::Error for K = 12";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("K (12)"), std::string::npos) << e.what();
  }
}

#endif  // !MOETP_GGEMM_LAYOUT_ONLY

}  // namespace
}  // namespace moetp
