// Every MPI collective checked bit-exactly. Payloads encode their origin so a misplaced row is
// caught: element (row i, col c) sent by rank r to rank q holds
//   origin(r, q, i, c) = r·1e6 + q·1e4 + i·10 + c          (exact in f32 below 2^24 for our sizes)
// Counts are uneven and include zero-length pieces: rank r sends count(r, q) = (r + 2q) % 3 rows to q.
#include <gtest/gtest.h>

#include <numeric>

#include "comm/mpi_comm.h"
#include "dist/mpi_env.h"
#include "testing.h"

namespace moetp {
namespace {

using comm::ReduceOp;
using testing::world;

constexpr int64_t kCols = 3;

template <typename T>
T origin(int64_t r, int64_t q, int64_t i, int64_t c) {
  // Stays below 2^24 for up to 8 ranks, so f32 holds it exactly.
  return static_cast<T>(r * 1000000 + q * 10000 + i * 10 + c);
}

int64_t count(int64_t r, int64_t q) { return (r + 2 * q) % 3; }

template <typename T>
Tensor rows_from(int64_t r, int64_t q, int64_t n) {
  std::vector<T> v;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < kCols; ++c) v.push_back(origin<T>(r, q, i, c));
  }
  return Tensor::from_vector<T>(v, {n, kCols});
}

template <typename T>
class Collectives : public ::testing::Test {};
using PayloadTypes = ::testing::Types<float, int32_t, int64_t>;
TYPED_TEST_SUITE(Collectives, PayloadTypes);

TYPED_TEST(Collectives, BroadcastFromEveryRoot) {
  auto& w = world();
  for (int root = 0; root < w.size(); ++root) {
    Tensor t = rows_from<TypeParam>(w.rank(), root, 2);
    w.broadcast(t, root);
    EXPECT_TRUE(testing::bit_equal(t, rows_from<TypeParam>(root, root, 2))) << "root " << root;
  }
}

TYPED_TEST(Collectives, AllReduceSumAndMax) {
  auto& w = world();
  const int n = w.size();
  Tensor t = rows_from<TypeParam>(w.rank(), 0, 2);
  w.all_reduce(t, ReduceOp::kSum);
  std::vector<TypeParam> expected;
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t c = 0; c < kCols; ++c) {
      int64_t s = 0;
      for (int r = 0; r < n; ++r) s += origin<int64_t>(r, 0, i, c);
      expected.push_back(static_cast<TypeParam>(s));
    }
  }
  EXPECT_TRUE(testing::bit_equal(t, Tensor::from_vector<TypeParam>(expected, {2, kCols})));

  Tensor m = rows_from<TypeParam>(w.rank(), 0, 2);
  w.all_reduce(m, ReduceOp::kMax);
  EXPECT_TRUE(testing::bit_equal(m, rows_from<TypeParam>(n - 1, 0, 2)));
}

TYPED_TEST(Collectives, AllGatherEqualCounts) {
  auto& w = world();
  for (int64_t rows : {int64_t{0}, int64_t{1}, int64_t{3}}) {
    Tensor in = rows_from<TypeParam>(w.rank(), 0, rows);
    Tensor out = Tensor::empty({rows * w.size(), kCols}, DTypeOf<TypeParam>::value);
    w.all_gather(in, out);
    for (int r = 0; r < w.size(); ++r) {
      EXPECT_TRUE(testing::bit_equal(out.narrow_rows(r * rows, rows), rows_from<TypeParam>(r, 0, rows)))
          << "rows " << rows << " block of rank " << r;
    }
  }
}

TYPED_TEST(Collectives, AllGatherVUnevenWithEmptyPieces) {
  auto& w = world();
  std::vector<int64_t> counts(w.size());
  for (int r = 0; r < w.size(); ++r) counts[r] = count(r, 0);  // 0, 1, 2, 0, ...
  Tensor in = rows_from<TypeParam>(w.rank(), 0, counts[w.rank()]);
  Tensor out = Tensor::empty({comm::sum_counts(counts), kCols}, DTypeOf<TypeParam>::value);
  w.all_gather_v(in, out, counts);
  int64_t off = 0;
  for (int r = 0; r < w.size(); ++r) {
    EXPECT_TRUE(testing::bit_equal(out.narrow_rows(off, counts[r]), rows_from<TypeParam>(r, 0, counts[r])))
        << "block of rank " << r;
    off += counts[r];
  }
}

// Input block q (destined to rank q) of rank r holds origin(r, q, ·, ·); the sum over r lands on q.
template <typename T>
Tensor expected_reduced_block(int world_size, int q, int64_t rows) {
  std::vector<T> v;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < kCols; ++c) {
      int64_t s = 0;
      for (int r = 0; r < world_size; ++r) s += origin<int64_t>(r, q, i, c);
      v.push_back(static_cast<T>(s));
    }
  }
  return Tensor::from_vector<T>(v, {rows, kCols});
}

TYPED_TEST(Collectives, ReduceScatterEqualCounts) {
  auto& w = world();
  constexpr int64_t kRows = 2;
  Tensor in = Tensor::empty({kRows * w.size(), kCols}, DTypeOf<TypeParam>::value);
  for (int q = 0; q < w.size(); ++q) in.narrow_rows(q * kRows, kRows).copy_from(rows_from<TypeParam>(w.rank(), q, kRows));
  Tensor out = Tensor::empty({kRows, kCols}, DTypeOf<TypeParam>::value);
  w.reduce_scatter(in, out);
  EXPECT_TRUE(testing::bit_equal(out, expected_reduced_block<TypeParam>(w.size(), w.rank(), kRows)));
}

TYPED_TEST(Collectives, ReduceScatterVUnevenWithEmptyPieces) {
  auto& w = world();
  std::vector<int64_t> counts(w.size());
  for (int q = 0; q < w.size(); ++q) counts[q] = count(0, q);  // 0, 2, 1, 0, 2, ...
  Tensor in = Tensor::empty({comm::sum_counts(counts), kCols}, DTypeOf<TypeParam>::value);
  int64_t off = 0;
  for (int q = 0; q < w.size(); ++q) {
    in.narrow_rows(off, counts[q]).copy_from(rows_from<TypeParam>(w.rank(), q, counts[q]));
    off += counts[q];
  }
  Tensor out = Tensor::empty({counts[w.rank()], kCols}, DTypeOf<TypeParam>::value);
  w.reduce_scatter_v(in, out, counts);
  EXPECT_TRUE(testing::bit_equal(out, expected_reduced_block<TypeParam>(w.size(), w.rank(), counts[w.rank()])));
}

TYPED_TEST(Collectives, AllToAllVUnevenWithEmptyPieces) {
  auto& w = world();
  const int me = w.rank();
  std::vector<int64_t> send(w.size()), recv(w.size());
  for (int q = 0; q < w.size(); ++q) {
    send[q] = count(me, q);
    recv[q] = count(q, me);
  }
  Tensor in = Tensor::empty({comm::sum_counts(send), kCols}, DTypeOf<TypeParam>::value);
  int64_t off = 0;
  for (int q = 0; q < w.size(); ++q) {
    in.narrow_rows(off, send[q]).copy_from(rows_from<TypeParam>(me, q, send[q]));
    off += send[q];
  }
  Tensor out = Tensor::empty({comm::sum_counts(recv), kCols}, DTypeOf<TypeParam>::value);
  w.all_to_all_v(in, send, out, recv);
  off = 0;
  for (int r = 0; r < w.size(); ++r) {
    EXPECT_TRUE(testing::bit_equal(out.narrow_rows(off, recv[r]), rows_from<TypeParam>(r, me, recv[r])))
        << "rows from rank " << r;
    off += recv[r];
  }
  EXPECT_EQ(w.exchange_counts(send), recv);
}

TEST(Collectives, Bf16MovesBitExactly) {
  auto& w = world();
  // Payload bits include a NaN pattern and a denormal: movement must not touch them.
  std::vector<bf16> v = {bf16{static_cast<uint16_t>(0x7fc1 + w.rank())}, bf16{0x0001}, bf16{static_cast<uint16_t>(w.rank())}};
  Tensor in = Tensor::from_vector<bf16>(v, {1, 3});
  Tensor out = Tensor::empty({w.size(), 3}, DType::kBF16);
  w.all_gather(in, out);
  for (int r = 0; r < w.size(); ++r) {
    const std::vector<bf16> row = out.narrow_rows(r, 1).to_vector<bf16>();
    EXPECT_EQ(row[0].bits, 0x7fc1 + r);
    EXPECT_EQ(row[1].bits, 0x0001);
    EXPECT_EQ(row[2].bits, r);
  }
}

TEST(Collectives, SplitFormsGroupsByColorOrderedByKey) {
  auto& w = world();
  const int color = w.rank() % 2;
  auto sub = w.split(color, -w.rank(), "parity");  // reversed order via key
  std::vector<int64_t> members = sub->all_gather_scalar(w.rank());
  std::vector<int64_t> expected;
  for (int r = w.size() - 1; r >= 0; --r) {
    if (r % 2 == color) expected.push_back(r);
  }
  EXPECT_EQ(members, expected);
  EXPECT_EQ(sub->name(), "parity");
}

TEST(Collectives, ScalarHelpersAreExactAndIdenticalOnAllRanks) {
  auto& w = world();
  EXPECT_EQ(w.all_reduce_scalar(int64_t{w.rank() + 1}, ReduceOp::kSum), int64_t{w.size()} * (w.size() + 1) / 2);
  const double v = 0.1 * (w.rank() + 1);
  double expected = 0.1;
  for (int r = 1; r < w.size(); ++r) expected += 0.1 * (r + 1);
  EXPECT_EQ(w.all_reduce_scalar(v, ReduceOp::kSum), expected);  // rank-ordered: bit-identical
  EXPECT_EQ(w.all_reduce_scalar(v, ReduceOp::kMax), 0.1 * w.size());
}

// ---- bad input: every rank gets the same error, nobody hangs, and the group stays usable ----

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Every rank of a test job runs on this one machine: the node-local rank is the group rank.
TEST(Collectives, NodeLocalRankOnOneHost) {
  auto& w = world();
  const comm::NodeLocal local = comm::node_local(w);
  EXPECT_EQ(local.rank, w.rank());
  EXPECT_EQ(local.size, w.size());
  // A split group counts its own members only.
  auto half = w.split(w.rank() % 2, w.rank(), "half");
  const comm::NodeLocal sub = comm::node_local(*half);
  EXPECT_EQ(sub.rank, half->rank());
  EXPECT_EQ(sub.size, half->size());
  // A host backend is its own host communicator and has no compute stream.
  EXPECT_EQ(&w.host(), &w);
  EXPECT_EQ(w.compute_stream(), nullptr);
  testing::expect_error([&] { w.set_compute_stream(reinterpret_cast<CUstream_st*>(0x10)); },
                        {"group 'world' (cpu backend) runs its collectives on the host"});
}

TEST(CollectivesBadInput, MismatchedAllToAllCountsFailOnEveryRank) {
  auto& w = world();
  if (w.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int64_t> send(w.size(), 1), recv(w.size(), 1);
  if (w.rank() == 1) recv[0] = 2;  // rank 1 expects 2 rows from rank 0, which sends 1
  Tensor in = Tensor::zeros({w.size(), 2}, DType::kF32);
  Tensor out = Tensor::zeros({comm::sum_counts(recv), 2}, DType::kF32);
  const std::string err = error_of([&] { w.all_to_all_v(in, send, out, recv); });
  EXPECT_NE(err.find("rank 0 sends 1 rows to rank 1, which expects 2"), std::string::npos) << err;
  w.barrier();  // the group still works
  EXPECT_EQ(w.all_reduce_scalar(int64_t{1}, ReduceOp::kSum), w.size());
}

TEST(CollectivesBadInput, LocalErrorOnOneRankIsReportedEverywhere) {
  auto& w = world();
  Tensor in = Tensor::zeros({1, 4}, DType::kF32);
  Tensor out = Tensor::zeros({w.size(), w.rank() == 0 ? 5 : 4}, DType::kF32);  // rank 0: wrong row width
  const std::string err = error_of([&] { w.all_gather(in, out); });
  EXPECT_NE(err.find("rank 0: input f32[1, 4] cpu and output f32[" + std::to_string(w.size()) +
                     ", 5] cpu differ in row width (4 vs 5 elements)"),
            std::string::npos)
      << err;
}

TEST(CollectivesBadInput, DisagreeingGatherCountsAndDtypes) {
  auto& w = world();
  if (w.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int64_t> counts(w.size(), 1);
  if (w.rank() == 1) counts[0] = 1;  // consistent locally...
  Tensor in = Tensor::zeros({1, 2}, w.rank() == 1 ? DType::kI32 : DType::kF32);  // ...but dtype differs
  Tensor out = Tensor::zeros({w.size(), 2}, in.dtype());
  const std::string err = error_of([&] { w.all_gather_v(in, out, counts); });
  EXPECT_NE(err.find("ranks disagree on dtype"), std::string::npos) << err;
}

TEST(CollectivesBadInput, ReductionOnBf16IsRejected) {
  auto& w = world();
  Tensor t = Tensor::zeros({4}, DType::kBF16);
  const std::string err = error_of([&] { w.all_reduce(t, ReduceOp::kSum); });
  EXPECT_NE(err.find("all_reduce on bf16 is not supported by the MPI backend"), std::string::npos) << err;
}

TEST(CollectivesBadInput, WrongCountsLengthNamesTheValues) {
  auto& w = world();
  std::vector<int64_t> counts(w.size() + 1, 0);
  counts[w.rank()] = 1;
  Tensor in = Tensor::zeros({1, 2}, DType::kF32);
  Tensor out = Tensor::zeros({1, 2}, DType::kF32);
  const std::string err = error_of([&] { w.reduce_scatter_v(in, out, counts); });
  EXPECT_NE(err.find("counts has " + std::to_string(w.size() + 1) + " entries for a group of " +
                     std::to_string(w.size())),
            std::string::npos)
      << err;
}

}  // namespace
}  // namespace moetp
