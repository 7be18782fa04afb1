// Shard layouts (etp_spec §3.3): which rows (and columns) of a global tensor a rank holds, and where
// they sit in its local tensor. compute_runs is the one answer to "which global rows do I own and
// where are they locally"; HF load/save, native checkpoints, resharding and parameter init all go
// through it. This layer sits between comm (below) and moe/model/io (above): it knows placements
// and meshes, nothing of models beyond the expert-weight convenience specs at the bottom.
//
// Model. Sharding is always along dim 0 ("rows"); a spec applies a chain of mesh-dim placements,
// outer to inner, each to the rows left by the previous ones (XTuner's compute_runs without FSDP,
// etp_spec §10):
//   replicate()        keep all current rows;
//   shard()            contiguous equal chunks: rank r of M keeps rows [r·n/M, (r+1)·n/M);
//   interleaved(sf)    torch _StridedShard: cut the n current rows into M·sf equal chunks, rank r
//                      keeps chunks r, r+M, …, r+(sf−1)·M in that order (the r-th 1/M slice of
//                      every one of sf stripes; XTuner's InterleavedShard).
// Sizes must divide exactly (no ceil-chunking); errors name the values. An optional column slice
// [col_begin, col_end) of dim 1 applies to every owned row (row parallelism of w2, etp_spec §3.2).
//
// Legend for tensor shapes: E experts, I expert FFN width, H hidden, P ep, T etp, L = E/P,
// lowercase = this rank's shard (i = I/T).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/comm.h"
#include "core/tensor.h"

namespace moetp::shard {

// How the rows of a tensor are placed along ONE mesh dimension.
struct Placement {
  enum class Kind { kReplicate, kShard, kInterleaved };
  Kind kind = Kind::kReplicate;
  int64_t num_stripes = 1;  // kInterleaved only: equal stripes of the rows left by the outer dims

  static Placement replicate() { return {Kind::kReplicate, 1}; }
  static Placement shard() { return {Kind::kShard, 1}; }
  // Throws when num_stripes < 1.
  static Placement interleaved(int64_t num_stripes);
};

// One mesh dimension of a spec: its size, this rank's coordinate on it, and the placement.
struct MeshDimPlacement {
  int size = 1;
  int rank = 0;
  Placement placement;
};

// A tensor's sharding over a sequence of mesh dims, applied in order (outer first). E.g. w13
// flattened to [E·2I, H]: { {P, p, shard()}, {T, t, interleaved(2·L)} }.
struct ShardSpec {
  Shape global_shape;                  // ndim >= 1; sharding always along dim 0 (rows)
  std::vector<MeshDimPlacement> dims;  // outer to inner; empty = whole tensor
  // Column slice [col_begin, col_end) of dim 1, applied to every owned row. col_end = -1 means
  // global_shape[1] (all columns). A slice other than all columns needs ndim >= 2.
  int64_t col_begin = 0;
  int64_t col_end = -1;
};

// etp_spec §3.3: global rows [global_row, global_row + length) sit at local rows
// [local_row, local_row + length). The column slice of the spec applies to every run.
struct Run {
  int64_t global_row = 0;
  int64_t local_row = 0;
  int64_t length = 0;
  bool operator==(const Run&) const = default;
};

// The runs this rank owns, in local-row order: local rows are consecutive from 0 and runs that
// are consecutive in global rows are merged (so no two neighbours touch in global rows).
// Validates the spec (sizes > 0, 0 <= rank < size, divisibility, column range); throws
// moetp::Error naming the values otherwise. A spec owning no rows returns an empty list.
std::vector<Run> compute_runs(const ShardSpec& spec);

// Resolved column slice [begin, end) of dim 1 (the full range for 1-D tensors). Validates it.
struct ColumnRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t width() const { return end - begin; }
};
ColumnRange column_range(const ShardSpec& spec);

// Number of owned rows (sum of run lengths).
int64_t local_rows(const ShardSpec& spec);
// global_shape with dim 0 = local_rows(spec) and dim 1 = the column slice width.
Shape local_shape(const ShardSpec& spec);
// "[16, 8] rows: 2@0:shard > 2@1:interleaved(2); cols [0, -1)" (size@rank:placement), for messages.
std::string describe(const ShardSpec& spec);

// Copies the owned rows (and columns) of `global` into a new contiguous local tensor.
//   global  [IN]  global_shape, any dtype, any device, any strides
//   return        local_shape(spec), same dtype and device as global
// Placement runs on the host: device tensors are staged through host memory (I/O path, not hot).
Tensor extract_local(const Tensor& global, const ShardSpec& spec);

// The reverse: writes `local` into the owned rows (and columns) of `global`; every other element
// of `global` is left untouched.
//   local   [IN]     local_shape(spec), same dtype as global; must not alias global
//   global  [IN/OUT] global_shape, any device, any strides
void scatter_into_global(const Tensor& local, const ShardSpec& spec, Tensor& global);

// Convenience specs for the expert weights of etp_spec §3.2 (rank (p, t) of a P x T expert mesh).
// Check E % P == 0, I % T == 0, sizes > 0 and coordinates in range, naming the values.
// w13: global [E·2I, H] (stripes gate_0, up_0, gate_1, …), dims {{P, p, shard()},
// {T, t, interleaved(2L)}}; local [L·2·i, H] = per local expert, gate rows [t·i, (t+1)·i) then up
// rows over the same range.
ShardSpec w13_spec(int64_t E, int64_t I, int64_t H, int P, int p, int T, int t);
// w2: global [E·H, I] (down_proj of expert e = rows [e·H, (e+1)·H)), dims {{P, p, shard()}},
// columns [t·i, (t+1)·i); local [L·H, i].
ShardSpec w2_spec(int64_t E, int64_t I, int64_t H, int P, int p, int T, int t);

// Collective over `group`: every member passes a spec describing the same global tensor (each
// with its own coordinates) and its local shard; every member receives the full global tensor.
// The members' shards must partition it: each element owned by exactly one member.
//   local   [IN]  local_shape(spec), on group.device(); same dtype on every member
//   return        global_shape, same dtype and device as local
// Implementation: all_gather_v of each member's runs and column range, then of the local data
// (flattened, so column widths may differ), then placement by (run, column range) on the host.
// Errors (a member's bad spec or local shape, members disagreeing on the global shape or dtype,
// shards that leave an element uncovered or cover it twice) are detected before the data moves
// and thrown on every member alike, so no member hangs.
Tensor gather_full(const Tensor& local, const ShardSpec& spec, comm::Comm& group);

}  // namespace moetp::shard
