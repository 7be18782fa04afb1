// Layout arithmetic of the Hopper grouped GEMM (grouped_gemm.cu), shared by the device code and by a
// host-side emulator test (tests/kernels/cuda_grouped_gemm_test.cpp, GroupedGemmLayout.*), so that the
// swizzle, the wgmma shared-memory descriptors, the accumulator fragment mapping and the tile
// scheduler are checked on a machine without a GPU. Plain C++ (no CUDA headers): nvcc sees the
// functions as __host__ __device__, g++ as ordinary inline functions.
//
// Vocabulary. Every product is computed as per-group problems C[Mo, No] (+)= A[Mo, R] · B[R, No]:
//   forward  Y_l  = X_l · W_lᵀ  : Mo = rows of group l, No = N, R = K; A = X (K-major), B = W_l (K-major)
//   dgrad    dX_l = dY_l · W_l  : Mo = rows of group l, No = K, R = N; A = dY (K-major), B = W_l (MN-major)
//   wgrad    dW_l += dY_lᵀ · X_l: Mo = N, No = K, R = rows of group l; A = dY (MN-major), B = X (MN-major)
// "K-major" = the reduction index is contiguous in memory; "MN-major" = the output index is (wgmma's
// "transposed" operands, imm-trans = 1).
//
// Shared-memory tiles (one pipeline stage): A is tile_m × kBK (tile_m = 128 for the cooperative
// kernel, 64 for ping-pong), B is BN × kBK, bf16, written by TMA with
// CU_TENSOR_MAP_SWIZZLE_128B in boxes whose inner dimension is 64 elements = 128 bytes:
//   K-major operand (box {64 (R), rows (MN)}): MN row r at byte r·128, swizzled in 1024-byte atoms of
//     8 rows. wgmma descriptor: SBO = 1024 (next 8 MN rows), LBO = 16 (unused with 128B swizzle, the
//     CUTLASS value), k-step of 16 advances the start address by 32 bytes inside the 128-byte row.
//   MN-major operand (boxes {64 (MN), 64 (R)}, one per 64 MN columns, 8 KiB apart): R row r of box j at
//     byte j·8192 + r·128. Descriptor (CUTLASS canonical ((8,n),(8,k)):((1,LBO),(8,SBO)) in 16-byte
//     units): LBO = 8192 (next 64 MN elements), SBO = 1024 (next 8 R rows); a k-step of 16 advances
//     the start address by 2048 bytes (two 8-row groups).
// Both start addresses of a consumer warpgroup's 64-row part of A are A + 8192·c for either major.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOETP_GG_FN __host__ __device__ __forceinline__
#else
#define MOETP_GG_FN inline
#endif

namespace moetp::cuda::ggemm {

enum class Op : int32_t { kFwd = 0, kDgrad = 1, kWgrad = 2 };

constexpr int kBM = 128;          // tile rows of C, cooperative: two consumer warpgroups of 64 rows (wgmma m64)
constexpr int kBMPingpong = 64;   // tile rows of C, ping-pong: one warpgroup per tile, tiles alternate
constexpr int kBK = 64;           // reduction per pipeline stage: one 128-byte swizzle row of bf16
constexpr int kWgmmaK = 16;       // reduction per wgmma instruction (bf16)
constexpr int kRowBytes = 128;    // one swizzle row
constexpr int kAtomBytes = 1024;  // 8 swizzle rows: the 128B swizzle pattern repeats here
constexpr int kBoxMnBytes = 64 * kBK * 2;  // an MN-major box: 64 MN elements × kBK rows = 8 KiB
constexpr int kMaxGroups = 1024;  // groups per launch (the scheduler's tables live in shared memory)

// 128B swizzle (TMA CU_TENSOR_MAP_SWIZZLE_128B and wgmma swizzle mode 1): the 16-byte chunk index,
// bits [4, 7) of the byte offset from a 1024-aligned base, is XORed with the row index in the atom,
// bits [7, 10). CUTLASS: Swizzle<3, 4, 3>.
MOETP_GG_FN uint32_t swizzle128(uint32_t byte_offset) { return byte_offset ^ (((byte_offset >> 7) & 7u) << 4); }

// Byte offset where TMA (SWIZZLE_128B) stores element (row, col) of a box of 64-element rows.
MOETP_GG_FN uint32_t tma_box_offset(int row, int col) {
  return swizzle128(static_cast<uint32_t>(row * kRowBytes + col * 2));
}

// wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 start
// address >> 4, 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4,
// 49-51 base offset (0: tiles are 1024-aligned), 62-63 swizzle mode (1 = 128B).
MOETP_GG_FN uint64_t make_smem_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t{1} << 62);
}
constexpr uint32_t kKMajorLbo = 16, kKMajorSbo = kAtomBytes;
constexpr uint32_t kMnMajorLbo = kBoxMnBytes, kMnMajorSbo = kAtomBytes;
// Start-address advance per wgmma k-step (16 reduction elements).
constexpr uint32_t kKMajorKStepBytes = kWgmmaK * 2;                    // 32: along the 128-byte row
constexpr uint32_t kMnMajorKStepBytes = (kWgmmaK / 8) * kAtomBytes;   // 2048: two 8-row groups

// Descriptor of k-step kk (0..kBK/16-1) of an operand tile at shared address `tile`.
MOETP_GG_FN uint64_t operand_desc(uint32_t tile, bool mn_major, int kk) {
  return mn_major ? make_smem_desc(tile + static_cast<uint32_t>(kk) * kMnMajorKStepBytes, kMnMajorLbo, kMnMajorSbo)
                  : make_smem_desc(tile + static_cast<uint32_t>(kk) * kKMajorKStepBytes, kKMajorLbo, kKMajorSbo);
}

// Accumulator fragment of wgmma m64nNk16 with f32 D (PTX ISA "Register Fragments" for wgmma
// D matrices; CUTLASS CLayout_64xN): thread t of the warpgroup (warp w = t / 32, lane = 4·gid + tig)
// holds N/2 floats; register i covers row 16w + gid + 8·((i / 2) % 2), column 8·(i / 4) + 2·tig + i % 2.
struct RowCol {
  int row, col;
};
MOETP_GG_FN RowCol acc_row_col(int thread, int reg) {
  const int warp = thread / 32, lane = thread % 32;
  return RowCol{16 * warp + lane / 4 + 8 * ((reg / 2) % 2), 8 * (reg / 4) + 2 * (lane % 4) + reg % 2};
}

// ---- tile scheduler ------------------------------------------------------------------------------
// Tiles are numbered group by group; inside a group, m-tile major, n-tile minor. A CTA walks tiles
// blockIdx.x, blockIdx.x + gridDim.x, ... (persistent grid); tile_start[l] is the number of tiles of
// the groups before l (tile_start[L] = total).
MOETP_GG_FN int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Tiles of one group with `rows` rows (fwd/dgrad: ragged Mo; wgrad: ragged R, fixed Mo = mo_fixed).
// wgrad_overwrite: wgrad stores dW_l = block instead of adding, so an empty group gets its tiles too
// (no mainloop, a zero block) and its dW_l becomes zero.
MOETP_GG_FN int group_tiles(Op op, int64_t rows, int64_t mo_fixed, int n_tiles, int tile_m,
                            bool wgrad_overwrite = false) {
  if (rows <= 0 && !(wgrad_overwrite && op == Op::kWgrad)) return 0;
  const int64_t mo = op == Op::kWgrad ? mo_fixed : rows;
  return ceil_div(mo, tile_m) * n_tiles;
}

struct TileCoord {
  int group;   // l
  int m_tile;  // rows [m_tile·tile_m, ...) of C_l
  int n_tile;  // columns [n_tile·BN, ...) of C_l
};
// Moves `group` forward to the group holding tile `tile` (tiles arrive in increasing order, so the
// cursor only advances) and returns its coordinates.
MOETP_GG_FN TileCoord decode_tile(const int32_t* tile_start, int& group, int tile, int n_tiles) {
  while (tile_start[group + 1] <= tile) ++group;
  const int local = tile - tile_start[group];
  return TileCoord{group, local / n_tiles, local % n_tiles};
}

// Advances a pipeline position (stage in [0, stages), phase parity of that stage's barriers) by n
// stages: what n single steps (stage + 1, wrapping with a phase flip) do. Ping-pong consumers use it
// to step over the other warpgroup's tiles.
MOETP_GG_FN void advance_stage(int& stage, uint32_t& phase, int n, int stages) {
  const int next = stage + n;
  phase ^= static_cast<uint32_t>((next / stages) & 1);
  stage = next % stages;
}

// ---- what each pipeline stage loads -----------------------------------------------------------------
// Tensor maps (dims innermost first; bf16, 128B swizzle, zero fill out of bounds):
//   fwd   A = X  {K, M}     box {64, tile_m}     B = W {K, N, L} box {64, BN, 1}   (both K-major)
//   dgrad A = dY {N, M}     box {64, tile_m}     B = W {K, N, L} box {64, 64, 1}   (B MN-major)
//   wgrad A = dY {N, M}     box {64, 64}         B = X {K, M}    box {64, 64}      (both MN-major)
// W is 3-D so that a box never reads the next expert's rows (zero fill at the N edge instead).
struct MapSpec {
  int rank;
  uint64_t dims[4];  // the first `rank` are used (at most 4)
  uint32_t box[4];
  bool f32 = false;  // element type: bf16, or f32 (the staged wgrad's dW map)
};
MOETP_GG_FN MapSpec a_map_spec(Op op, int64_t M, int64_t N, int64_t K, int tile_m) {
  const uint64_t inner = static_cast<uint64_t>(op == Op::kFwd ? K : N);
  const uint32_t box_rows = op == Op::kWgrad ? 64u : static_cast<uint32_t>(tile_m);
  return MapSpec{2, {inner, static_cast<uint64_t>(M), 1}, {64u, box_rows, 1u}};
}
MOETP_GG_FN MapSpec b_map_spec(Op op, int bn, int64_t M, int64_t N, int64_t K, int64_t L) {
  if (op == Op::kWgrad) return MapSpec{2, {static_cast<uint64_t>(K), static_cast<uint64_t>(M), 1}, {64u, 64u, 1u}};
  const uint32_t box_n = op == Op::kFwd ? static_cast<uint32_t>(bn) : 64u;
  return MapSpec{3, {static_cast<uint64_t>(K), static_cast<uint64_t>(N), static_cast<uint64_t>(L)}, {64u, box_n, 1u}};
}

// One TMA box load of a stage: map 0 (A) or 1 (B), element coordinates (c0 innermost, c1, c2), into
// the stage at byte offset smem_offset (A at 0, B at a_bytes(tile_m)).
struct BoxLoad {
  int map;
  uint32_t smem_offset;
  int c0, c1, c2;
};
constexpr int a_bytes(int tile_m) { return tile_m * kBK * 2; }
// Bytes of one stage = the bytes its boxes deliver (the producer's expect_tx; out-of-bounds fill counts).
constexpr int stage_bytes(int bn, int tile_m) { return a_bytes(tile_m) + bn * kBK * 2; }
constexpr int kMaxBoxLoads = 2 + 4;
// The loads of reduction stage kt of tile tc (its group's first row: row0); returns how many.
MOETP_GG_FN int stage_box_loads(Op op, int bn, int tile_m, const TileCoord& tc, int row0, int kt,
                                BoxLoad (&out)[kMaxBoxLoads]) {
  const int r0 = kt * kBK, mo0 = tc.m_tile * tile_m, no0 = tc.n_tile * bn;
  const uint32_t b0 = static_cast<uint32_t>(a_bytes(tile_m));
  int n = 0;
  if (op == Op::kFwd) {
    out[n++] = BoxLoad{0, 0u, r0, row0 + mo0, 0};                              // X rows of the tile, k slice
    out[n++] = BoxLoad{1, b0, r0, no0, tc.group};  // W_l rows no0.., k slice
  } else if (op == Op::kDgrad) {
    out[n++] = BoxLoad{0, 0u, r0, row0 + mo0, 0};  // dY rows of the tile, n slice
    for (int j = 0; j < bn / 64; ++j) {            // W_l: n slice × 64 output columns (k) per box
      out[n++] = BoxLoad{1, b0 + static_cast<uint32_t>(j * kBoxMnBytes), no0 + 64 * j, r0, tc.group};
    }
  } else {
    for (int j = 0; j < tile_m / 64; ++j) {  // dY: the group's rows r0.. × 64 output rows (n) per box
      out[n++] = BoxLoad{0, static_cast<uint32_t>(j * kBoxMnBytes), mo0 + 64 * j, row0 + r0, 0};
    }
    for (int j = 0; j < bn / 64; ++j) {  // X: the group's rows r0.. × 64 output columns (k) per box
      out[n++] = BoxLoad{1, b0 + static_cast<uint32_t>(j * kBoxMnBytes), no0 + 64 * j, row0 + r0, 0};
    }
  }
  return n;
}

// wgrad: rows of reduction stage kt that belong to the group (the rest, [valid, kBK), are zeroed in
// shared memory before the wgmmas); kBK when the stage is whole. fwd/dgrad never mask the reduction
// (its edge is a tensor edge, where TMA fills zeros).
MOETP_GG_FN int stage_valid_rows(Op op, int rows, int kt) {
  const int valid = rows - kt * kBK;
  return op == Op::kWgrad && valid < kBK ? valid : kBK;
}

// Epilogue: the flat output index of accumulator register `reg` of thread `t` of the consumer
// warpgroup that owns rows [m_offset, m_offset + 64) of the tile (y / dx: (row0 + mo)·n_out + no; dw: (group·N + mo)·K + no with N = mo_fixed, K = n_out), or -1
// where the element lies past the group's rows (fwd/dgrad), past N (wgrad) or past n_out. Registers
// come in pairs (reg even): columns no, no + 1, both valid or both not (n_out is even).
MOETP_GG_FN int64_t epilogue_index(Op op, int bn, int tile_m, const TileCoord& tc, int row0, int rows, int mo_fixed,
                                   int n_out, int m_offset, int t, int reg) {
  const RowCol rc = acc_row_col(t, reg);
  const int mo = tc.m_tile * tile_m + m_offset + rc.row, no = tc.n_tile * bn + rc.col;
  const int mo_limit = op == Op::kWgrad ? mo_fixed : rows;
  if (mo >= mo_limit || no >= n_out) return -1;
  const int64_t out_row =
      op == Op::kWgrad ? static_cast<int64_t>(tc.group) * mo_fixed + mo : static_cast<int64_t>(row0) + mo;
  return out_row * n_out + no;
}

// ---- staged epilogue (the "cs" configurations; fwd and dgrad) ------------------------------------
// A consumer warpgroup writes its 64 × BN block of bf16 outputs into shared memory as BN/64 boxes of
// 64 rows × 64 columns in the TMA SWIZZLE_128B layout (8 KiB each, box j = columns [64j, 64j + 64)),
// then one thread stores the boxes with TMA (cp.async.bulk.tensor, asynchronous: the warpgroup goes
// on to its next tile while the copy engine writes; before it writes the buffer again it waits
// until the previous stores have read it). Each warp's 4-byte shared-memory writes hit 32 distinct
// banks: the swizzle puts the 8 rows of a warp's fragment in 8 different 16-byte chunks. Only
// blocks whose 64 rows all belong to the tile's group go this way (a TMA box would also write the
// next group's rows, which another CTA owns); the others store from the registers as before.
// Output tensor map: {n_out, M} bf16, box {64, 64}, SWIZZLE_128B; TMA clips columns past n_out.
constexpr int kOutBoxBytes = 64 * 64 * 2;
constexpr int out_block_bytes(int bn) { return (bn / 64) * kOutBoxBytes; }  // one warpgroup's buffer

// Byte offset in the warpgroup's buffer of the bf16 pair of accumulator registers (reg, reg + 1),
// reg even, of thread t: columns col, col + 1 of one row, 4-byte aligned inside one 16-byte chunk.
MOETP_GG_FN uint32_t staged_offset(int t, int reg) {
  const RowCol rc = acc_row_col(t, reg);
  return static_cast<uint32_t>((rc.col / 64) * kOutBoxBytes) + tma_box_offset(rc.row, rc.col % 64);
}

// Whether the warpgroup owning rows [m_offset, m_offset + 64) of tile tc stores through the buffer:
// when all 64 rows lie inside the group's output rows (fwd/dgrad: the group's `rows`; wgrad: N =
// mo_fixed, the rows of dW_l; a box past them would write the next group's rows).
MOETP_GG_FN bool staged_block(Op op, int tile_m, const TileCoord& tc, int rows, int mo_fixed, int m_offset) {
  return tc.m_tile * tile_m + m_offset + 64 <= (op == Op::kWgrad ? mo_fixed : rows);
}

MOETP_GG_FN MapSpec out_map_spec(int64_t M, int64_t n_out) {
  return MapSpec{2, {static_cast<uint64_t>(n_out), static_cast<uint64_t>(M), 1}, {64u, 64u, 1u}};
}

// TMA store coordinates (column, row) of box j of a staged block; box j is skipped when its first
// column is past n_out.
struct StoreCoord {
  int c0, c1;
};
MOETP_GG_FN StoreCoord staged_store_coord(int bn, int tile_m, const TileCoord& tc, int row0, int m_offset, int j) {
  return StoreCoord{tc.n_tile * bn + 64 * j, row0 + tc.m_tile * tile_m + m_offset};
}

// ---- staged wgrad epilogue: TMA reduce-add of f32 boxes into dW --------------------------------
// wgrad accumulates into f32 dW (or, in overwrite mode, stores: the same boxes leave by plain TMA
// stores, cp.async.bulk.tensor, instead of reduce-adds). Staged, a consumer warpgroup's 64 × BN block leaves in two halves
// of BN/2 columns (the buffer holds 64 × BN bf16 = 64 × BN/2 f32): each half is written into the
// buffer as BN/64 boxes of 64 rows × 32 f32 columns in the SWIZZLE_128B layout (128-byte rows,
// 8 KiB per box), then one thread issues cp.reduce.async.bulk.tensor .add per box: the dW += block
// happens in L2, asynchronously, with no load in the SM (the direct epilogue's read-modify-write
// waits on a global load per register pair). Each dW element has one owner tile, so no two
// reductions meet. The second half waits until the first half's reductions have read the buffer.
// dW map: {K, L·N} f32, box {32, 64}, SWIZZLE_128B; TMA clips columns past K.
constexpr int kOutBoxColsF32 = 32;
static_assert(64 * kOutBoxColsF32 * 4 == kOutBoxBytes, "an f32 box is as large as a bf16 box");

// Byte offset in the warpgroup's buffer of the f32 pair of accumulator registers (reg, reg + 1),
// reg even, of thread t, for the half that starts at column col_base (0 or BN/2): columns col,
// col + 1 of one row, 8-byte aligned inside one 16-byte chunk.
MOETP_GG_FN uint32_t staged_offset_f32(int t, int reg, int col_base) {
  const RowCol rc = acc_row_col(t, reg);
  const int col = rc.col - col_base;
  return static_cast<uint32_t>((col / kOutBoxColsF32) * kOutBoxBytes) +
         swizzle128(static_cast<uint32_t>(rc.row * kRowBytes + (col % kOutBoxColsF32) * 4));
}

MOETP_GG_FN MapSpec wgrad_out_map_spec(int64_t L, int64_t N, int64_t K) {
  return MapSpec{2,
                 {static_cast<uint64_t>(K), static_cast<uint64_t>(L * N), 1},
                 {static_cast<uint32_t>(kOutBoxColsF32), 64u, 1u},
                 true};
}

// TMA reduce coordinates (column, row of the {K, L·N} view) of box j of half h of a staged wgrad
// block; the box is skipped when its first column is past K = n_out.
MOETP_GG_FN StoreCoord wgrad_reduce_coord(int bn, int tile_m, const TileCoord& tc, int mo_fixed, int m_offset, int h,
                                          int j) {
  return StoreCoord{tc.n_tile * bn + h * (bn / 2) + kOutBoxColsF32 * j,
                    tc.group * mo_fixed + tc.m_tile * tile_m + m_offset};
}

}  // namespace moetp::cuda::ggemm
