// The MPI backend's f32 sums are bit-for-bit the rank-order sum ((x_0 + x_1) + x_2) + ... of every
// element, whatever the message size, the split into calls, or the collective (all_reduce,
// reduce_scatter + all_gather, reduce_scatter_v + all_gather_v).
//
// Values: every element mixes magnitudes (1e8, -1e8, 1, 3e-5, ...) that differ per rank, so the
// order of the additions changes the f32 result; OrderMattersForTheseValues checks that it does
// (from 3 ranks on: with 2 ranks, x_0 + x_1 == x_1 + x_0 in any floating-point arithmetic).
#include <gtest/gtest.h>

#include <bit>
#include <numeric>
#include <vector>

#include "comm/mpi_comm.h"
#include "dist/mpi_env.h"
#include "testing.h"

namespace moetp {
namespace {

using comm::ReduceOp;
using testing::world;

float value(int64_t rank, int64_t i) {
  static constexpr float kVals[] = {1e8f, 1.0f, -1e8f, 3e-5f, 1.0f, -1.0f, 7e7f, 0.5f, -3e-5f, 2.5e7f, -7e7f};
  constexpr int64_t n = sizeof(kVals) / sizeof(kVals[0]);
  return kVals[(i + 3 * rank + (i / 7) * (rank + 1)) % n];
}

// This rank's input: n elements.
std::vector<float> input(int64_t rank, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = value(rank, i);
  return v;
}

// The reference: every rank's input is known, so each rank sums in rank order locally.
std::vector<float> rank_order_sum(int ranks, int64_t n) {
  std::vector<float> s = input(0, n);
  for (int r = 1; r < ranks; ++r) {
    for (int64_t i = 0; i < n; ++i) s[i] += value(r, i);
  }
  return s;
}

Tensor as_tensor(const std::vector<float>& v, int64_t cols) {
  return Tensor::from_vector<float>(v, {static_cast<int64_t>(v.size()) / cols, cols});
}

TEST(DeterministicReduce, OrderMattersForTheseValues) {
  const int P = world().size();
  if (P < 3) GTEST_SKIP() << "two addends commute exactly";
  const int64_t n = 1000;
  const std::vector<float> ref = rank_order_sum(P, n);
  int64_t differ_reverse = 0, differ_pairs = 0;
  for (int64_t i = 0; i < n; ++i) {
    float rev = value(P - 1, i);  // ((x_{P-1} + x_{P-2}) + ...)
    for (int r = P - 2; r >= 0; --r) rev += value(r, i);
    float right = value(P - 1, i);  // x_0 + (x_1 + (... + x_{P-1}))
    for (int r = P - 2; r >= 0; --r) right = value(r, i) + right;
    float pairs = 0;  // (x_0 + x_1) + (x_2 + x_3) + ..., as recursive halving would
    for (int r = 0; r < P; r += 2) pairs += r + 1 < P ? value(r, i) + value(r + 1, i) : value(r, i);
    if (std::bit_cast<uint32_t>(rev) != std::bit_cast<uint32_t>(ref[i])) ++differ_reverse;
    if (std::bit_cast<uint32_t>(pairs) != std::bit_cast<uint32_t>(ref[i]) ||
        std::bit_cast<uint32_t>(right) != std::bit_cast<uint32_t>(ref[i])) {
      ++differ_pairs;
    }
  }
  EXPECT_GT(differ_reverse, n / 50);
  EXPECT_GT(differ_pairs, n / 50);
}

// (a) and (d): all_reduce is the rank-order sum, for small messages, messages around MPI's
// algorithm switch points, and messages larger than the backend's 2^21-element exchange round.
TEST(DeterministicReduce, AllReduceIsTheRankOrderSumAtEverySize) {
  auto& w = world();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{4096 + 3}, int64_t{70000},
                    int64_t{(1 << 18) + 11}, int64_t{(3 << 20) + 5}}) {
    Tensor t = as_tensor(input(w.rank(), n), 1);
    w.all_reduce(t, ReduceOp::kSum);
    EXPECT_TRUE(testing::bit_equal(t, as_tensor(rank_order_sum(w.size(), n), 1))) << n << " elements";
  }
}

// (b): all_reduce == reduce_scatter + all_gather == reduce_scatter_v (uneven, with an empty block)
// + all_gather_v, bit for bit, and each equals the reference.
TEST(DeterministicReduce, AllReduceEqualsReduceScatterThenAllGather) {
  auto& w = world();
  const int P = w.size();
  constexpr int64_t kCols = 5;
  // 250000 rows: blocks of 1.25M elements, more than one 2^21 / P exchange round per block.
  for (int64_t rows_per_rank : {int64_t{3}, int64_t{250000}}) {
    const int64_t rows = rows_per_rank * P;
    const std::vector<float> in = input(w.rank(), rows * kCols);
    const Tensor ref = as_tensor(rank_order_sum(P, rows * kCols), kCols);
    SCOPED_TRACE(fmt::format("{} rows", rows));

    Tensor ar = as_tensor(in, kCols);
    w.all_reduce(ar, ReduceOp::kSum);
    EXPECT_TRUE(testing::bit_equal(ar, ref)) << "all_reduce";

    Tensor mine = Tensor::empty({rows_per_rank, kCols}, DType::kF32);
    w.reduce_scatter(as_tensor(in, kCols), mine);
    Tensor rs_ag = Tensor::empty({rows, kCols}, DType::kF32);
    w.all_gather(mine, rs_ag);
    EXPECT_TRUE(testing::bit_equal(rs_ag, ref)) << "reduce_scatter + all_gather";

    // Uneven counts: rank 0 owns nothing, the others share the rows unevenly.
    std::vector<int64_t> counts(static_cast<size_t>(P), 0);
    int64_t left = rows;
    for (int q = P - 1; q >= 1; --q) {
      counts[q] = q == 1 ? left : std::min(left, rows_per_rank + q);
      left -= counts[q];
    }
    if (P == 1) counts[0] = rows;
    Tensor mine_v = Tensor::empty({counts[w.rank()], kCols}, DType::kF32);
    w.reduce_scatter_v(as_tensor(in, kCols), mine_v, counts);
    Tensor rsv_agv = Tensor::empty({rows, kCols}, DType::kF32);
    w.all_gather_v(mine_v, rsv_agv, counts);
    EXPECT_TRUE(testing::bit_equal(rsv_agv, ref)) << "reduce_scatter_v + all_gather_v";
  }
}

// (c): one all_reduce of a buffer == all_reduces of its buckets, for buckets of different sizes
// (MPI_Allreduce, which the backend no longer uses for f32 sums, adds the two in different orders at
// 3 ranks).
TEST(DeterministicReduce, BucketingDoesNotChangeTheBits) {
  auto& w = world();
  const int64_t n = 300000;
  const std::vector<float> in = input(w.rank(), n);
  Tensor whole = as_tensor(in, 1);
  w.all_reduce(whole, ReduceOp::kSum);
  Tensor bucketed = as_tensor(in, 1);
  int64_t off = 0;
  for (int64_t len : {int64_t{1}, int64_t{17}, int64_t{1000}, int64_t{4099}, int64_t{262155}}) {
    Tensor b = bucketed.narrow_rows(off, len);
    w.all_reduce(b, ReduceOp::kSum);
    off += len;
  }
  Tensor rest = bucketed.narrow_rows(off, n - off);
  w.all_reduce(rest, ReduceOp::kSum);
  EXPECT_TRUE(testing::bit_equal(bucketed, whole));
  EXPECT_TRUE(testing::bit_equal(whole, as_tensor(rank_order_sum(w.size(), n), 1)));
}

// Sub-groups sum in their own rank order (the order of Comm::rank() within the group).
TEST(DeterministicReduce, SplitGroupsSumInGroupRankOrder) {
  auto& w = world();
  if (w.size() < 3) GTEST_SKIP() << "needs a group of 2+ after splitting off rank 0";
  // Everyone but rank 0, in reverse world order: group rank g is world rank P - 1 - g.
  auto g = w.split(w.rank() == 0 ? 1 : 0, w.size() - w.rank(), "rest");
  if (w.rank() == 0) return;
  const int64_t n = 5000;
  Tensor t = as_tensor(input(g->rank(), n), 1);
  g->all_reduce(t, ReduceOp::kSum);
  EXPECT_TRUE(testing::bit_equal(t, as_tensor(rank_order_sum(g->size(), n), 1)));
}

}  // namespace
}  // namespace moetp
