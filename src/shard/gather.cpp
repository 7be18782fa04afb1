// gather_full: every member of a group rebuilds the full global tensor from the members' shards
// (etp_spec §3.3; XTuner's reconstruct_full_tensor, etp_spec §10). Used by HF save, checkpoint
// conversion and tests; not on the training hot path, so placement runs on the host.
//
// Instead of undoing placements mesh dim by mesh dim (XTuner gathers TP first, then EP), each
// member publishes its runs and column range, so the placement is one pass "by (run, column
// range)" that works for any spec, including members that hold the same rows with different
// column slices (w2's row parallelism).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "shard/detail.h"
#include "shard/layout.h"

namespace moetp::shard {
namespace {

// What one member holds, as published to the group.
struct MemberShard {
  Shape global_shape;
  int64_t dtype = 0;
  ColumnRange cols;
  std::vector<Run> runs;
  int64_t numel = 0;  // elements of its local tensor
};

// The reason this member's arguments are unusable, or "" when they are fine.
std::string local_error(const Tensor& local, const ShardSpec& spec, const comm::Comm& group) {
  try {
    const Shape expected = local_shape(spec);
    if (local.shape() != expected) {
      return fmt::format("local tensor {} does not have the local shape {} of spec {}", local.describe(),
                         shape_str(expected), describe(spec));
    }
    if (local.device() != group.device()) {
      return fmt::format("local tensor {} is not on the group's device ({})", local.describe(),
                         device_name(group.device()));
    }
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

// Throws on every member when any member's arguments are unusable (so nobody waits on it).
void agree_or_throw(comm::Comm& group, const std::string& error) {
  const std::vector<int64_t> bad = group.all_gather_scalar(error.empty() ? 0 : 1);
  std::vector<int> bad_ranks;
  for (size_t r = 0; r < bad.size(); ++r) {
    if (bad[r] != 0) bad_ranks.push_back(static_cast<int>(r));
  }
  if (bad_ranks.empty()) return;
  MOETP_FAIL("gather_full on {}: invalid shard on member(s) {}{}", group.name(), fmt::join(bad_ranks, ", "),
             error.empty() ? std::string() : " (this member: " + error + ")");
}

// [ndim, shape..., dtype, col_begin, col_end, num_runs, (global_row, local_row, length)...]
std::vector<int64_t> encode(const Tensor& local, const ShardSpec& spec) {
  const ColumnRange cols = column_range(spec);
  const std::vector<Run> runs = compute_runs(spec);
  std::vector<int64_t> words = {static_cast<int64_t>(spec.global_shape.size())};
  words.insert(words.end(), spec.global_shape.begin(), spec.global_shape.end());
  words.insert(words.end(), {static_cast<int64_t>(local.dtype()), cols.begin, cols.end,
                             static_cast<int64_t>(runs.size())});
  for (const Run& r : runs) words.insert(words.end(), {r.global_row, r.local_row, r.length});
  return words;
}

MemberShard decode(const int64_t*& p) {
  MemberShard m;
  const int64_t ndim = *p++;
  m.global_shape.assign(p, p + ndim);
  p += ndim;
  m.dtype = *p++;
  m.cols.begin = *p++;
  m.cols.end = *p++;
  const int64_t num_runs = *p++;
  int64_t num_rows = 0;
  for (int64_t i = 0; i < num_runs; ++i, p += 3) {
    m.runs.push_back({p[0], p[1], p[2]});
    num_rows += p[2];
  }
  int64_t col_numel = 1;
  for (size_t d = 2; d < m.global_shape.size(); ++d) col_numel *= m.global_shape[d];
  m.numel = num_rows * m.cols.width() * col_numel;
  return m;
}

std::vector<MemberShard> publish(const Tensor& local, const ShardSpec& spec, comm::Comm& group) {
  const std::vector<int64_t> mine = encode(local, spec);
  const std::vector<int64_t> counts = group.all_gather_scalar(static_cast<int64_t>(mine.size()));
  const Tensor in = Tensor::from_vector<int64_t>(mine, {static_cast<int64_t>(mine.size())}).to(group.device());
  Tensor out = Tensor::empty({comm::sum_counts(counts)}, DType::kI64, group.device());
  group.all_gather_v(in, out, counts);
  const std::vector<int64_t> words = out.to_vector<int64_t>();
  std::vector<MemberShard> members;
  const int64_t* p = words.data();
  for (int r = 0; r < group.size(); ++r) members.push_back(decode(p));
  return members;
}

// Every member agrees on the global shape and dtype (members all see the same data, so they all
// throw alike).
void check_agreement(const std::vector<MemberShard>& members, const comm::Comm& group) {
  for (size_t r = 1; r < members.size(); ++r) {
    MOETP_CHECK(members[r].global_shape == members[0].global_shape,
                "gather_full on {}: member {} has global shape {}, member 0 has {}", group.name(), r,
                shape_str(members[r].global_shape), shape_str(members[0].global_shape));
    MOETP_CHECK(members[r].dtype == members[0].dtype, "gather_full on {}: member {} has dtype {}, member 0 has {}",
                group.name(), r, dtype_name(static_cast<DType>(members[r].dtype)),
                dtype_name(static_cast<DType>(members[0].dtype)));
  }
}

// Every (row, column) is owned by exactly one member. Columns are cut at every member's range
// bounds into segments, and ownership is counted per (row, segment): memory rows x segments.
void check_partition(const std::vector<MemberShard>& members, const comm::Comm& group) {
  const Shape& shape = members[0].global_shape;
  const int64_t num_rows = shape[0];
  const int64_t num_cols = shape.size() >= 2 ? shape[1] : 1;
  if (num_rows == 0 || num_cols == 0) return;
  std::vector<int64_t> bounds = {0, num_cols};
  for (const MemberShard& m : members) bounds.insert(bounds.end(), {m.cols.begin, m.cols.end});
  std::sort(bounds.begin(), bounds.end());
  bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
  const int64_t num_segments = static_cast<int64_t>(bounds.size()) - 1;
  auto segment_of = [&](int64_t col) { return std::lower_bound(bounds.begin(), bounds.end(), col) - bounds.begin(); };
  std::vector<int32_t> owners(static_cast<size_t>(num_rows * num_segments), 0);
  for (const MemberShard& m : members) {
    const int64_t s0 = segment_of(m.cols.begin), s1 = segment_of(m.cols.end);
    for (const Run& r : m.runs) {
      for (int64_t row = r.global_row; row < r.global_row + r.length; ++row) {
        for (int64_t s = s0; s < s1; ++s) ++owners[static_cast<size_t>(row * num_segments + s)];
      }
    }
  }
  for (int64_t i = 0; i < num_rows * num_segments; ++i) {
    const int64_t row = i / num_segments, s = i % num_segments;
    MOETP_CHECK(owners[static_cast<size_t>(i)] == 1,
                "gather_full on {} ({} members): global row {}, columns [{}, {}) owned by {} members, expected "
                "exactly 1 (do the specs describe this group?)",
                group.name(), group.size(), row, bounds[s], bounds[s + 1], owners[static_cast<size_t>(i)]);
  }
}

}  // namespace

Tensor gather_full(const Tensor& local, const ShardSpec& spec, comm::Comm& group) {
  agree_or_throw(group, local_error(local, spec, group));
  const std::vector<MemberShard> members = publish(local, spec, group);
  check_agreement(members, group);
  check_partition(members, group);

  std::vector<int64_t> counts;
  for (const MemberShard& m : members) counts.push_back(m.numel);
  const Tensor flat = local.contiguous().view({local.numel()});
  Tensor gathered = Tensor::empty({comm::sum_counts(counts)}, local.dtype(), group.device());
  group.all_gather_v(flat, gathered, counts);

  const Tensor host = gathered.to(Device::kCpu);
  Tensor full = Tensor::empty(spec.global_shape, local.dtype());
  char* src = static_cast<char*>(host.raw_data());
  for (const MemberShard& m : members) {
    detail::copy_runs(static_cast<char*>(full.raw_data()), src, m.global_shape, m.cols, m.runs,
                      local.element_size(), /*to_local=*/false);
    src += m.numel * static_cast<int64_t>(local.element_size());
  }
  return full.to(local.device());
}

}  // namespace moetp::shard
