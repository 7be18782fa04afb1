// Shard layouts: compute_runs by interval algebra, local shapes, extract/scatter on the host, and
// the expert-weight specs of etp_spec §3.3. gather_full lives in gather.cpp.
#include "shard/layout.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "shard/detail.h"

namespace moetp::shard {
namespace {

// A contiguous range [begin, begin + length) of the rows held so far, in local-row order.
struct Piece {
  int64_t begin;
  int64_t length;
};

std::string placement_str(const MeshDimPlacement& m) {
  switch (m.placement.kind) {
    case Placement::Kind::kReplicate: return fmt::format("{}@{}:replicate", m.size, m.rank);
    case Placement::Kind::kShard: return fmt::format("{}@{}:shard", m.size, m.rank);
    case Placement::Kind::kInterleaved:
      return fmt::format("{}@{}:interleaved({})", m.size, m.rank, m.placement.num_stripes);
  }
  return "?";
}

void check_global_shape(const Shape& shape) {
  MOETP_CHECK(!shape.empty(), "shard spec: global shape must have at least one dim (rows)");
  for (int64_t d : shape) MOETP_CHECK(d >= 0, "shard spec: global shape {} has a negative dim", shape_str(shape));
}

// The pieces of the current `num_rows` rows that mesh dim `dim_idx` keeps, in local order.
std::vector<Piece> select_pieces(const MeshDimPlacement& m, size_t dim_idx, int64_t num_rows) {
  MOETP_CHECK(m.size >= 1, "shard spec: mesh dim {} has size {} (must be >= 1)", dim_idx, m.size);
  MOETP_CHECK(0 <= m.rank && m.rank < m.size, "shard spec: mesh dim {}: rank {} not in [0, {})", dim_idx, m.rank,
              m.size);
  switch (m.placement.kind) {
    case Placement::Kind::kReplicate: return {{0, num_rows}};
    case Placement::Kind::kShard: {
      MOETP_CHECK(num_rows % m.size == 0, "shard spec: mesh dim {}: shard of {} rows over size {} is not exact",
                  dim_idx, num_rows, m.size);
      const int64_t chunk = num_rows / m.size;
      return {{m.rank * chunk, chunk}};
    }
    case Placement::Kind::kInterleaved: {
      const int64_t sf = m.placement.num_stripes;
      MOETP_CHECK(sf >= 1, "shard spec: mesh dim {}: interleaved with {} stripes (must be >= 1)", dim_idx, sf);
      MOETP_CHECK(num_rows % (sf * m.size) == 0,
                  "shard spec: mesh dim {}: {} rows do not split into {} stripes x {} ranks", dim_idx,
                  num_rows, sf, m.size);
      const int64_t chunk = num_rows / (sf * m.size);
      std::vector<Piece> pieces;
      pieces.reserve(static_cast<size_t>(sf));
      for (int64_t j = 0; j < sf; ++j) pieces.push_back({(j * m.size + m.rank) * chunk, chunk});
      return pieces;
    }
  }
  MOETP_FAIL("shard spec: mesh dim {}: unknown placement kind", dim_idx);
}

// Appends run r, merging it into the last one when both local and global rows continue it.
void append_run(std::vector<Run>& runs, Run r) {
  if (r.length == 0) return;
  if (!runs.empty()) {
    Run& last = runs.back();
    if (last.global_row + last.length == r.global_row && last.local_row + last.length == r.local_row) {
      last.length += r.length;
      return;
    }
  }
  runs.push_back(r);
}

// Keeps the given pieces (local-row ranges of `runs`), renumbering local rows from 0.
std::vector<Run> select_rows(const std::vector<Run>& runs, const std::vector<Piece>& pieces) {
  std::vector<Run> out;
  int64_t next_local = 0;
  for (const Piece& piece : pieces) {
    const int64_t end = piece.begin + piece.length;
    // First run whose local range ends after piece.begin.
    auto it = std::upper_bound(runs.begin(), runs.end(), piece.begin,
                               [](int64_t row, const Run& r) { return row < r.local_row + r.length; });
    for (; it != runs.end() && it->local_row < end; ++it) {
      const int64_t from = std::max(piece.begin, it->local_row);
      const int64_t to = std::min(end, it->local_row + it->length);
      append_run(out, {it->global_row + (from - it->local_row), next_local, to - from});
      next_local += to - from;
    }
  }
  return out;
}

void check_expert_dims(const char* what, int64_t E, int64_t I, int64_t H, int P, int p, int T, int t) {
  MOETP_CHECK(E > 0 && I > 0 && H > 0, "{}: num_experts ({}), intermediate ({}) and hidden ({}) must be > 0", what,
              E, I, H);
  MOETP_CHECK(P > 0 && T > 0, "{}: ep ({}) and etp ({}) must be > 0", what, P, T);
  MOETP_CHECK(E % P == 0, "{}: num_experts ({}) % ep ({}) != 0", what, E, P);
  MOETP_CHECK(I % T == 0, "{}: intermediate ({}) % etp ({}) != 0", what, I, T);
  MOETP_CHECK(0 <= p && p < P, "{}: ep rank {} not in [0, {})", what, p, P);
  MOETP_CHECK(0 <= t && t < T, "{}: etp rank {} not in [0, {})", what, t, T);
}

}  // namespace

namespace detail {

void copy_runs(char* global, char* local, const Shape& global_shape, ColumnRange cols, std::span<const Run> runs,
               size_t element_size, bool to_local) {
  int64_t col_numel = 1;  // elements of one dim-1 column: the product of the trailing dims
  for (size_t d = 2; d < global_shape.size(); ++d) col_numel *= global_shape[d];
  const int64_t num_cols = global_shape.size() >= 2 ? global_shape[1] : 1;
  const int64_t col_bytes = col_numel * static_cast<int64_t>(element_size);
  const int64_t global_row_bytes = num_cols * col_bytes;
  const int64_t local_row_bytes = cols.width() * col_bytes;
  // Whole rows are contiguous on both sides: one copy per run instead of one per row.
  const bool whole_rows = local_row_bytes == global_row_bytes;
  for (const Run& r : runs) {
    char* g = global + r.global_row * global_row_bytes + cols.begin * col_bytes;
    char* l = local + r.local_row * local_row_bytes;
    const int64_t num_copies = whole_rows ? 1 : r.length;
    const size_t num_bytes = static_cast<size_t>(whole_rows ? r.length * local_row_bytes : local_row_bytes);
    for (int64_t k = 0; k < num_copies; ++k) {
      char* gk = g + k * global_row_bytes;
      char* lk = l + k * local_row_bytes;
      if (to_local) {
        std::memcpy(lk, gk, num_bytes);
      } else {
        std::memcpy(gk, lk, num_bytes);
      }
    }
  }
}

}  // namespace detail

Placement Placement::interleaved(int64_t num_stripes) {
  MOETP_CHECK(num_stripes >= 1, "Placement::interleaved: num_stripes ({}) must be >= 1", num_stripes);
  return {Kind::kInterleaved, num_stripes};
}

ColumnRange column_range(const ShardSpec& spec) {
  check_global_shape(spec.global_shape);
  if (spec.global_shape.size() < 2) {
    MOETP_CHECK(spec.col_begin == 0 && spec.col_end == -1,
                "shard spec: column slice [{}, {}) needs a tensor of >= 2 dims, global shape is {}", spec.col_begin,
                spec.col_end, shape_str(spec.global_shape));
    return {0, 1};
  }
  const int64_t num_cols = spec.global_shape[1];
  const int64_t end = spec.col_end == -1 ? num_cols : spec.col_end;
  MOETP_CHECK(0 <= spec.col_begin && spec.col_begin <= end && end <= num_cols,
              "shard spec: column slice [{}, {}) out of range for {} columns (global shape {})", spec.col_begin,
              spec.col_end, num_cols, shape_str(spec.global_shape));
  return {spec.col_begin, end};
}

std::vector<Run> compute_runs(const ShardSpec& spec) {
  column_range(spec);  // validates the shape and the column slice
  std::vector<Run> runs;
  append_run(runs, {0, 0, spec.global_shape[0]});
  int64_t num_rows = spec.global_shape[0];
  for (size_t i = 0; i < spec.dims.size(); ++i) {
    const std::vector<Piece> pieces = select_pieces(spec.dims[i], i, num_rows);
    runs = select_rows(runs, pieces);
    num_rows = 0;
    for (const Piece& piece : pieces) num_rows += piece.length;
  }
  return runs;
}

int64_t local_rows(const ShardSpec& spec) {
  int64_t n = 0;
  for (const Run& r : compute_runs(spec)) n += r.length;
  return n;
}

Shape local_shape(const ShardSpec& spec) {
  Shape shape = spec.global_shape;
  shape[0] = local_rows(spec);
  if (shape.size() >= 2) shape[1] = column_range(spec).width();
  return shape;
}

std::string describe(const ShardSpec& spec) {
  std::string s = shape_str(spec.global_shape) + " rows:";
  if (spec.dims.empty()) s += " whole";
  for (size_t i = 0; i < spec.dims.size(); ++i) s += (i ? " > " : " ") + placement_str(spec.dims[i]);
  return s + fmt::format("; cols [{}, {})", spec.col_begin, spec.col_end);
}

Tensor extract_local(const Tensor& global, const ShardSpec& spec) {
  check_shape(global, spec.global_shape, "extract_local global");
  const Tensor src = global.to(Device::kCpu).contiguous();
  Tensor local = Tensor::empty(local_shape(spec), global.dtype());
  detail::copy_runs(static_cast<char*>(src.raw_data()), static_cast<char*>(local.raw_data()), spec.global_shape,
                    column_range(spec), compute_runs(spec), global.element_size(), /*to_local=*/true);
  return local.to(global.device());
}

void scatter_into_global(const Tensor& local, const ShardSpec& spec, Tensor& global) {
  check_shape(global, spec.global_shape, "scatter_into_global global");
  const Shape expected = local_shape(spec);
  check_shape(local, expected, "scatter_into_global local");
  MOETP_CHECK(local.dtype() == global.dtype(), "scatter_into_global: local {} and global {} differ in dtype",
              local.describe(), global.describe());
  const bool direct = global.device() == Device::kCpu && global.is_contiguous();
  Tensor dst = direct ? global : global.to(Device::kCpu).contiguous();  // a host copy unless direct
  const Tensor src = local.to(Device::kCpu).contiguous();
  detail::copy_runs(static_cast<char*>(dst.raw_data()), static_cast<char*>(src.raw_data()), spec.global_shape,
                    column_range(spec), compute_runs(spec), global.element_size(), /*to_local=*/false);
  if (!direct) global.copy_from(dst);
}

ShardSpec w13_spec(int64_t E, int64_t I, int64_t H, int P, int p, int T, int t) {
  check_expert_dims("w13_spec", E, I, H, P, p, T, t);
  const int64_t L = E / P;
  return {{E * 2 * I, H}, {{P, p, Placement::shard()}, {T, t, Placement::interleaved(2 * L)}}};
}

ShardSpec w2_spec(int64_t E, int64_t I, int64_t H, int P, int p, int T, int t) {
  check_expert_dims("w2_spec", E, I, H, P, p, T, t);
  const int64_t i = I / T;
  return {{E * H, I}, {{P, p, Placement::shard()}}, t * i, (t + 1) * i};
}

}  // namespace moetp::shard
