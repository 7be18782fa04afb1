// Every NCCL collective checked bit-exactly, against the expected values and against the MPI backend
// (the CPU spec) run on the same host payloads: the CUDA path must move and reduce exactly what the
// CPU path does. Payload formulas (as in collectives_test.cpp):
//   data movement, element (row i, col c) sent by rank r to rank q:
//     f32, i32, i64: origin(r, q, i, c) = r·1e6 + q·1e4 + i·10 + c     (exact in f32)
//     bf16 bits:     r·4096 + q·256 + i·8 + c                           (distinct, never Inf/NaN)
//   reductions: reduce_value(r, q, i, c) = 1 + (7r + 5q + 3i + c) % 32, so with up to 8 ranks every
//     partial sum stays below 256 and is exact in bf16 (and f32), whatever order NCCL adds in.
// Counts are uneven and include zero-length pieces: rank r sends count(r, q) = (r + 2q) % 3 rows to q.
// Outputs start as 0xff bytes (no payload has that pattern) with a guard row after them.
// One GPU per rank (rank r uses device r); every test skips unless each rank sees at least
// world-size GPUs, so a machine without a GPU passes by skipping.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "comm/nccl_comm.h"
#include "core/bf16.h"
#include "dist/mpi_env.h"
#include "dist/nccl_env.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/runtime.h"
#include "testing.h"

namespace moetp {
namespace {

using comm::NcclComm;
using comm::ReduceOp;
using testing::world;

constexpr int64_t kCols = 3;

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override { MOETP_REQUIRE_NCCL(); }
  static NcclComm& nccl() { return *testing::nccl_env().comm(); }
};

// ---- payloads ----

template <typename T>
T origin(int64_t r, int64_t q, int64_t i, int64_t c) {
  if constexpr (std::is_same_v<T, bf16>) {
    return bf16{static_cast<uint16_t>(r * 4096 + q * 256 + i * 8 + c)};
  } else {
    return static_cast<T>(r * 1000000 + q * 10000 + i * 10 + c);
  }
}

int64_t reduce_value(int64_t r, int64_t q, int64_t i, int64_t c) { return 1 + (7 * r + 5 * q + 3 * i + c) % 32; }

template <typename T>
T from_int(int64_t v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return f32_to_bf16(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

int64_t count(int64_t r, int64_t q) { return (r + 2 * q) % 3; }

// Host rows [n, kCols] holding origin(r, q, ·, ·).
template <typename T>
Tensor rows_from(int64_t r, int64_t q, int64_t n) {
  std::vector<T> v;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < kCols; ++c) v.push_back(origin<T>(r, q, i, c));
  }
  return Tensor::from_vector<T>(v, {n, kCols});
}

// Host rows [n, kCols] holding reduce_value(r, q, ·, ·).
template <typename T>
Tensor reduce_rows(int64_t r, int64_t q, int64_t n) {
  std::vector<T> v;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < kCols; ++c) v.push_back(from_int<T>(reduce_value(r, q, i, c)));
  }
  return Tensor::from_vector<T>(v, {n, kCols});
}

// Sum (or max) over ranks of reduce_rows(r, q, n), computed exactly in int64.
template <typename T>
Tensor expected_reduced(int world_size, int64_t q, int64_t n, ReduceOp op) {
  std::vector<T> v;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < kCols; ++c) {
      int64_t acc = op == ReduceOp::kSum ? 0 : INT64_MIN;
      for (int r = 0; r < world_size; ++r) {
        acc = op == ReduceOp::kSum ? acc + reduce_value(r, q, i, c) : std::max(acc, reduce_value(r, q, i, c));
      }
      v.push_back(from_int<T>(acc));
    }
  }
  return Tensor::from_vector<T>(v, {n, kCols});
}

// Concatenation along rows of host tensors (all [*, kCols], same dtype).
Tensor concat_rows(const std::vector<Tensor>& parts, DType dtype) {
  int64_t rows = 0;
  for (const Tensor& p : parts) rows += p.rows();
  Tensor out = Tensor::empty({rows, kCols}, dtype);
  int64_t off = 0;
  for (const Tensor& p : parts) {
    out.narrow_rows(off, p.rows()).copy_from(p);
    off += p.rows();
  }
  return out;
}

// A CUDA output of `rows` rows followed by one guard row, every byte 0xff.
struct GuardedOut {
  Tensor full;  // [rows + 1, kCols]
  Tensor out;   // [rows, kCols] view of full, what the collective writes
};

GuardedOut guarded_out(int64_t rows, DType dtype) {
  Tensor full = Tensor::empty({rows + 1, kCols}, dtype, Device::kCuda);
  CUDA_CHECK(cudaMemset(full.raw_data(), 0xff, full.num_bytes()));
  return {full, full.narrow_rows(0, rows)};
}

::testing::AssertionResult guard_intact(const GuardedOut& g) {
  const Tensor guard = g.full.narrow_rows(g.full.rows() - 1, 1).to(Device::kCpu).contiguous();
  const auto* p = static_cast<const unsigned char*>(guard.raw_data());
  for (size_t b = 0; b < guard.num_bytes(); ++b) {
    if (p[b] != 0xff) return ::testing::AssertionFailure() << "guard row overwritten at byte " << b;
  }
  return ::testing::AssertionSuccess();
}

// ---- typed cases: f32, i32, i64, bf16 ----

template <typename T>
class NcclCollectives : public NcclTest {};
using PayloadTypes = ::testing::Types<float, int32_t, int64_t, bf16>;
struct DTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::string(dtype_name(DTypeOf<T>::value));
  }
};
TYPED_TEST_SUITE(NcclCollectives, PayloadTypes, DTypeNames);

TYPED_TEST(NcclCollectives, BroadcastFromEveryRootMatchesMpi) {
  auto& w = world();
  auto& n = this->nccl();
  for (int root = 0; root < n.size(); ++root) {
    const Tensor host = rows_from<TypeParam>(n.rank(), root, 2);
    Tensor t = host.to(Device::kCuda);
    n.broadcast(t, root);
    Tensor m = host.clone();
    w.broadcast(m, root);
    EXPECT_TRUE(testing::bit_equal(t, rows_from<TypeParam>(root, root, 2))) << "root " << root;
    EXPECT_TRUE(testing::bit_equal(t, m)) << "root " << root << ": NCCL vs MPI";
  }
}

TYPED_TEST(NcclCollectives, AllReduceSumAndMax) {
  auto& w = world();
  auto& n = this->nccl();
  constexpr bool kMpiReduces = !std::is_same_v<TypeParam, bf16>;  // MPI has no bf16 reductions
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
    const Tensor host = reduce_rows<TypeParam>(n.rank(), 0, 2);
    Tensor t = host.to(Device::kCuda);
    n.all_reduce(t, op);
    EXPECT_TRUE(testing::bit_equal(t, expected_reduced<TypeParam>(n.size(), 0, 2, op)))
        << (op == ReduceOp::kSum ? "sum" : "max");
    if constexpr (kMpiReduces) {
      Tensor m = host.clone();
      w.all_reduce(m, op);
      EXPECT_TRUE(testing::bit_equal(t, m)) << "NCCL vs MPI";
    }
  }
}

TYPED_TEST(NcclCollectives, AllGatherEqualCountsMatchesMpi) {
  auto& w = world();
  auto& n = this->nccl();
  const DType dtype = DTypeOf<TypeParam>::value;
  for (int64_t rows : {int64_t{0}, int64_t{1}, int64_t{3}}) {
    const Tensor host = rows_from<TypeParam>(n.rank(), 0, rows);
    GuardedOut g = guarded_out(rows * n.size(), dtype);
    n.all_gather(host.to(Device::kCuda), g.out);
    std::vector<Tensor> expected;
    for (int r = 0; r < n.size(); ++r) expected.push_back(rows_from<TypeParam>(r, 0, rows));
    EXPECT_TRUE(testing::bit_equal(g.out, concat_rows(expected, dtype))) << "rows " << rows;
    EXPECT_TRUE(guard_intact(g)) << "rows " << rows;
    Tensor m = Tensor::empty({rows * w.size(), kCols}, dtype);
    w.all_gather(host, m);
    EXPECT_TRUE(testing::bit_equal(g.out, m)) << "rows " << rows << ": NCCL vs MPI";
  }
}

TYPED_TEST(NcclCollectives, AllGatherVUnevenWithEmptyPiecesMatchesMpi) {
  auto& w = world();
  auto& n = this->nccl();
  const DType dtype = DTypeOf<TypeParam>::value;
  std::vector<int64_t> counts(n.size());
  for (int r = 0; r < n.size(); ++r) counts[r] = count(r, 0);  // 0, 1, 2, 0, ...
  const Tensor host = rows_from<TypeParam>(n.rank(), 0, counts[n.rank()]);
  GuardedOut g = guarded_out(comm::sum_counts(counts), dtype);
  n.all_gather_v(host.to(Device::kCuda), g.out, counts);
  std::vector<Tensor> expected;
  for (int r = 0; r < n.size(); ++r) expected.push_back(rows_from<TypeParam>(r, 0, counts[r]));
  EXPECT_TRUE(testing::bit_equal(g.out, concat_rows(expected, dtype)));
  EXPECT_TRUE(guard_intact(g));
  Tensor m = Tensor::empty({comm::sum_counts(counts), kCols}, dtype);
  w.all_gather_v(host, m, counts);
  EXPECT_TRUE(testing::bit_equal(g.out, m)) << "NCCL vs MPI";
}

TYPED_TEST(NcclCollectives, ReduceScatterEqualCounts) {
  auto& w = world();
  auto& n = this->nccl();
  const DType dtype = DTypeOf<TypeParam>::value;
  constexpr int64_t kRows = 2;
  std::vector<Tensor> blocks;
  for (int q = 0; q < n.size(); ++q) blocks.push_back(reduce_rows<TypeParam>(n.rank(), q, kRows));
  const Tensor host = concat_rows(blocks, dtype);
  GuardedOut g = guarded_out(kRows, dtype);
  n.reduce_scatter(host.to(Device::kCuda), g.out);
  EXPECT_TRUE(testing::bit_equal(g.out, expected_reduced<TypeParam>(n.size(), n.rank(), kRows, ReduceOp::kSum)));
  EXPECT_TRUE(guard_intact(g));
  if constexpr (!std::is_same_v<TypeParam, bf16>) {
    Tensor m = Tensor::empty({kRows, kCols}, dtype);
    w.reduce_scatter(host, m);
    EXPECT_TRUE(testing::bit_equal(g.out, m)) << "NCCL vs MPI";
  }
}

TYPED_TEST(NcclCollectives, ReduceScatterVUnevenWithEmptyPieces) {
  auto& w = world();
  auto& n = this->nccl();
  const DType dtype = DTypeOf<TypeParam>::value;
  std::vector<int64_t> counts(n.size());
  for (int q = 0; q < n.size(); ++q) counts[q] = count(0, q);  // 0, 2, 1, 0, 2, ...
  std::vector<Tensor> blocks;
  for (int q = 0; q < n.size(); ++q) blocks.push_back(reduce_rows<TypeParam>(n.rank(), q, counts[q]));
  const Tensor host = concat_rows(blocks, dtype);
  const Tensor in = host.to(Device::kCuda);
  GuardedOut g = guarded_out(counts[n.rank()], dtype);
  n.reduce_scatter_v(in, g.out, counts);
  EXPECT_TRUE(testing::bit_equal(g.out,
                                 expected_reduced<TypeParam>(n.size(), n.rank(), counts[n.rank()], ReduceOp::kSum)));
  EXPECT_TRUE(guard_intact(g));
  EXPECT_TRUE(testing::bit_equal(in, host)) << "the input was modified";
  if constexpr (!std::is_same_v<TypeParam, bf16>) {
    Tensor m = Tensor::empty({counts[n.rank()], kCols}, dtype);
    w.reduce_scatter_v(host, m, counts);
    EXPECT_TRUE(testing::bit_equal(g.out, m)) << "NCCL vs MPI";
  }
}

// In place, as CudaMoeLayer's etp exchange runs them: all_gather_v's input is this rank's own block
// of the output, reduce_scatter_v's output is this rank's own block of the input.
TYPED_TEST(NcclCollectives, AllGatherVAndReduceScatterVInPlace) {
  auto& n = this->nccl();
  const DType dtype = DTypeOf<TypeParam>::value;
  std::vector<int64_t> counts(n.size());
  for (int r = 0; r < n.size(); ++r) counts[r] = count(r, 0);  // 0, 1, 2, 0, ...
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  for (size_t r = 0; r < counts.size(); ++r) offsets[r + 1] = offsets[r] + counts[r];
  const int64_t me = n.rank(), total = comm::sum_counts(counts);

  GuardedOut g = guarded_out(total, dtype);
  Tensor own = g.out.narrow_rows(offsets[me], counts[me]);
  own.copy_from(rows_from<TypeParam>(n.rank(), 0, counts[me]));
  n.all_gather_v(own, g.out, counts);
  std::vector<Tensor> expected;
  for (int r = 0; r < n.size(); ++r) expected.push_back(rows_from<TypeParam>(r, 0, counts[r]));
  EXPECT_TRUE(testing::bit_equal(g.out, concat_rows(expected, dtype))) << "all_gather_v in place";
  EXPECT_TRUE(guard_intact(g));

  std::vector<Tensor> blocks;
  for (int q = 0; q < n.size(); ++q) blocks.push_back(reduce_rows<TypeParam>(n.rank(), q, counts[q]));
  const Tensor host = concat_rows(blocks, dtype);
  Tensor in = host.to(Device::kCuda);
  Tensor out = in.narrow_rows(offsets[me], counts[me]);
  n.reduce_scatter_v(in, out, counts);
  EXPECT_TRUE(testing::bit_equal(out, expected_reduced<TypeParam>(n.size(), n.rank(), counts[me], ReduceOp::kSum)))
      << "reduce_scatter_v in place";
  // The other ranks' blocks were only sent.
  for (int q = 0; q < n.size(); ++q) {
    if (q == me) continue;
    EXPECT_TRUE(testing::bit_equal(in.narrow_rows(offsets[q], counts[q]), blocks[static_cast<size_t>(q)]))
        << "block of rank " << q << " modified";
  }
}

TYPED_TEST(NcclCollectives, AllToAllVUnevenWithEmptyPiecesMatchesMpi) {
  auto& w = world();
  auto& n = this->nccl();
  const DType dtype = DTypeOf<TypeParam>::value;
  const int me = n.rank();
  // count() never sends a rank rows of its own ((r + 2r) % 3 == 0); the second pattern does.
  const auto shifted = [](int64_t r, int64_t q) { return (r + q + 1) % 3; };
  for (int pattern = 0; pattern < 2; ++pattern) {
    const auto rows_to = [&](int64_t r, int64_t q) { return pattern == 0 ? count(r, q) : shifted(r, q); };
    std::vector<int64_t> send(n.size()), recv(n.size());
    std::vector<Tensor> blocks, expected;
    for (int q = 0; q < n.size(); ++q) {
      send[q] = rows_to(me, q);
      recv[q] = rows_to(q, me);
      blocks.push_back(rows_from<TypeParam>(me, q, send[q]));
      expected.push_back(rows_from<TypeParam>(q, me, recv[q]));
    }
    const Tensor host = concat_rows(blocks, dtype);
    const Tensor in = host.to(Device::kCuda);
    GuardedOut g = guarded_out(comm::sum_counts(recv), dtype);
    n.all_to_all_v(in, send, g.out, recv);
    EXPECT_TRUE(testing::bit_equal(g.out, concat_rows(expected, dtype))) << "pattern " << pattern;
    EXPECT_TRUE(guard_intact(g)) << "pattern " << pattern;
    EXPECT_TRUE(testing::bit_equal(in, host)) << "pattern " << pattern << ": the input was modified";
    Tensor m = Tensor::empty({comm::sum_counts(recv), kCols}, dtype);
    w.all_to_all_v(host, send, m, recv);
    EXPECT_TRUE(testing::bit_equal(g.out, m)) << "pattern " << pattern << ": NCCL vs MPI";
    EXPECT_EQ(n.exchange_counts(send), recv) << "pattern " << pattern;
  }
}

// ---- untyped cases ----

TEST_F(NcclTest, Bf16NanAndDenormalBitsMoveUntouched) {
  auto& n = nccl();
  std::vector<bf16> v = {bf16{static_cast<uint16_t>(0x7fc1 + n.rank())}, bf16{0x0001},
                         bf16{static_cast<uint16_t>(0xff81 + n.rank())}};  // quiet NaN, denormal, -NaN
  Tensor in = Tensor::from_vector<bf16>(v, {1, 3}).to(Device::kCuda);
  Tensor out = Tensor::empty({n.size(), 3}, DType::kBF16, Device::kCuda);
  n.all_gather(in, out);
  Tensor out_v = Tensor::empty({n.size(), 3}, DType::kBF16, Device::kCuda);
  n.all_gather_v(in, out_v, std::vector<int64_t>(n.size(), 1));
  for (const Tensor& t : {out, out_v}) {
    for (int r = 0; r < n.size(); ++r) {
      const std::vector<bf16> row = t.narrow_rows(r, 1).to_vector<bf16>();
      EXPECT_EQ(row[0].bits, 0x7fc1 + r);
      EXPECT_EQ(row[1].bits, 0x0001);
      EXPECT_EQ(row[2].bits, 0xff81 + r);
    }
  }
}

TEST_F(NcclTest, SplitByParityOrdersByKeyAndMatchesMpi) {
  auto& w = world();
  auto& n = nccl();
  const int color = n.rank() % 2;
  auto sub = n.split(color, -n.rank(), "parity");  // reversed order via key
  auto mpi_sub = w.split(color, -w.rank(), "parity");
  EXPECT_EQ(sub->name(), "parity");
  EXPECT_EQ(sub->device(), Device::kCuda);
  std::vector<int64_t> expected;
  for (int r = n.size() - 1; r >= 0; --r) {
    if (r % 2 == color) expected.push_back(r);
  }
  EXPECT_EQ(sub->all_gather_scalar(n.rank()), expected);
  EXPECT_EQ(sub->rank(), mpi_sub->rank());
  ASSERT_EQ(sub->size(), mpi_sub->size());

  // An uneven all-to-all inside the subgroup, payloads tagged with world ranks.
  const int me = sub->rank();
  std::vector<int64_t> send(sub->size()), recv(sub->size());
  std::vector<Tensor> blocks;
  for (int q = 0; q < sub->size(); ++q) {
    send[q] = count(me, q);
    recv[q] = count(q, me);
    blocks.push_back(rows_from<float>(w.rank(), q, send[q]));
  }
  const Tensor host = concat_rows(blocks, DType::kF32);
  Tensor out = Tensor::empty({comm::sum_counts(recv), kCols}, DType::kF32, Device::kCuda);
  sub->all_to_all_v(host.to(Device::kCuda), send, out, recv);
  Tensor m = Tensor::empty({comm::sum_counts(recv), kCols}, DType::kF32);
  mpi_sub->all_to_all_v(host, send, m, recv);
  EXPECT_TRUE(testing::bit_equal(out, m)) << "NCCL vs MPI in the subgroup";
  EXPECT_EQ(sub->all_reduce_scalar(int64_t{1}, ReduceOp::kSum), sub->size());
}

TEST_F(NcclTest, ScalarHelpersAreExactAndIdenticalOnAllRanks) {
  auto& n = nccl();
  EXPECT_EQ(n.all_reduce_scalar(int64_t{n.rank() + 1}, ReduceOp::kSum), int64_t{n.size()} * (n.size() + 1) / 2);
  const double v = 0.1 * (n.rank() + 1);
  double expected = 0.1;
  for (int r = 1; r < n.size(); ++r) expected += 0.1 * (r + 1);
  EXPECT_EQ(n.all_reduce_scalar(v, ReduceOp::kSum), expected);
  EXPECT_EQ(n.all_reduce_scalar(v, ReduceOp::kMax), 0.1 * n.size());
  n.barrier();
}

// Work enqueued on the compute stream before a collective is seen by it, and work enqueued after
// sees its result, with no host synchronisation in between.
TEST_F(NcclTest, CollectivesAreOrderedOnTheComputeStream) {
  auto& n = nccl();
  EXPECT_NE(n.stream(), nullptr);
  cudaStream_t compute = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking), cudaSuccess);
  n.set_compute_stream(compute);
  constexpr int64_t kN = 1 << 20;  // large enough that an unordered read would see stale data
  const Tensor ones = Tensor::full<int32_t>({kN}, n.rank() + 1).to(Device::kCuda);
  Tensor t = Tensor::zeros({kN}, DType::kI32, Device::kCuda);
  // Tensor::to and zeros ran on the legacy default stream, which a non-blocking stream ignores.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(t.raw_data(), ones.raw_data(), t.num_bytes(), cudaMemcpyDeviceToDevice, compute),
            cudaSuccess);
  n.all_reduce(t, ReduceOp::kSum);
  std::vector<int32_t> host(kN, -1);
  EXPECT_EQ(cudaMemcpyAsync(host.data(), t.raw_data(), t.num_bytes(), cudaMemcpyDeviceToHost, compute), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(compute), cudaSuccess);
  n.set_compute_stream(nullptr);
  const int32_t expected = n.size() * (n.size() + 1) / 2;
  int64_t wrong = 0;
  for (int32_t x : host) wrong += x != expected;
  EXPECT_EQ(wrong, 0) << "expected every element to be " << expected;
  EXPECT_EQ(cudaStreamDestroy(compute), cudaSuccess);
}

TEST_F(NcclTest, ValidationOffGivesTheSameResults) {
  auto& n = nccl();
  n.set_validate(false);
  const int me = n.rank();
  std::vector<int64_t> send(n.size()), recv(n.size());
  std::vector<Tensor> blocks, expected;
  for (int q = 0; q < n.size(); ++q) {
    send[q] = count(me, q);
    recv[q] = count(q, me);
    blocks.push_back(rows_from<float>(me, q, send[q]));
    expected.push_back(rows_from<float>(q, me, recv[q]));
  }
  Tensor out = Tensor::empty({comm::sum_counts(recv), kCols}, DType::kF32, Device::kCuda);
  n.all_to_all_v(concat_rows(blocks, DType::kF32).to(Device::kCuda), send, out, recv);
  EXPECT_TRUE(testing::bit_equal(out, concat_rows(expected, DType::kF32)));
  // A local error is still caught before NCCL is entered (every rank makes it here, so none waits).
  Tensor cpu_in = Tensor::zeros({1, kCols}, DType::kF32);
  Tensor gathered = Tensor::empty({n.size(), kCols}, DType::kF32, Device::kCuda);
  std::string err;
  try {
    n.all_gather(cpu_in, gathered);
  } catch (const Error& e) {
    err = e.what();
  }
  n.set_validate(true);
  EXPECT_NE(err.find(fmt::format("rank {}: input is f32[1, 3] cpu, but the NCCL backend takes CUDA tensors", me)),
            std::string::npos)
      << err;
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

// "file:line: message" -> "message"
std::string message_of(const std::string& error) {
  const size_t colon = error.find(": ");
  return colon == std::string::npos ? error : error.substr(colon + 2);
}

// Every rank's string, gathered over MPI.
std::vector<std::string> gather_strings(const std::string& s) {
  auto& w = world();
  const std::vector<int64_t> lens = w.all_gather_scalar(static_cast<int64_t>(s.size()));
  Tensor in = Tensor::from_vector<int32_t>(std::vector<int32_t>(s.begin(), s.end()), {static_cast<int64_t>(s.size())});
  Tensor out = Tensor::empty({comm::sum_counts(lens)}, DType::kI32);
  w.all_gather_v(in, out, lens);
  const std::vector<int32_t> chars = out.to_vector<int32_t>();
  std::vector<std::string> all;
  int64_t off = 0;
  for (int64_t len : lens) {
    all.emplace_back(chars.begin() + off, chars.begin() + off + len);
    off += len;
  }
  return all;
}

class NcclBadInput : public NcclTest {};

TEST_F(NcclBadInput, MismatchedAllToAllCountsFailAlikeOnEveryRankAndAsOnMpi) {
  auto& w = world();
  auto& n = nccl();
  if (n.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int64_t> send(n.size(), 1), recv(n.size(), 1);
  if (n.rank() == 1) recv[0] = 2;  // rank 1 expects 2 rows from rank 0, which sends 1
  Tensor in = Tensor::zeros({n.size(), 2}, DType::kF32, Device::kCuda);
  Tensor out = Tensor::zeros({comm::sum_counts(recv), 2}, DType::kF32, Device::kCuda);
  const std::string err = error_of([&] { n.all_to_all_v(in, send, out, recv); });
  EXPECT_NE(err.find("rank 0 sends 1 rows to rank 1, which expects 2"), std::string::npos) << err;
  for (const std::string& other : gather_strings(err)) EXPECT_EQ(other, err) << "errors differ between ranks";

  Tensor in_cpu = Tensor::zeros({w.size(), 2}, DType::kF32);
  Tensor out_cpu = Tensor::zeros({comm::sum_counts(recv), 2}, DType::kF32);
  const std::string mpi_err = error_of([&] { w.all_to_all_v(in_cpu, send, out_cpu, recv); });
  // Same words apart from the group's name.
  std::string expected = message_of(mpi_err);
  const std::string world_name = "group '" + w.name() + "'";
  expected.replace(expected.find(world_name), world_name.size(), "group '" + n.name() + "'");
  EXPECT_EQ(message_of(err), expected);

  // The communicator still works.
  n.barrier();
  EXPECT_EQ(n.all_reduce_scalar(int64_t{1}, ReduceOp::kSum), n.size());
  std::vector<int64_t> ones(n.size(), 1);
  Tensor good_out = Tensor::empty({n.size(), 2}, DType::kF32, Device::kCuda);
  n.all_to_all_v(Tensor::full<float>({n.size(), 2}, static_cast<float>(n.rank())).to(Device::kCuda), ones, good_out,
                 ones);
  const std::vector<float> got = good_out.to_vector<float>();
  for (int r = 0; r < n.size(); ++r) EXPECT_EQ(got[2 * r], static_cast<float>(r));
}

TEST_F(NcclBadInput, LocalErrorOnOneRankIsReportedEverywhere) {
  auto& n = nccl();
  Tensor in = Tensor::zeros({1, 4}, DType::kF32, Device::kCuda);
  Tensor out = n.rank() == 0 ? Tensor::zeros({n.size(), 4}, DType::kF32)  // rank 0: a host tensor
                             : Tensor::zeros({n.size(), 4}, DType::kF32, Device::kCuda);
  const std::string err = error_of([&] { n.all_gather(in, out); });
  EXPECT_NE(err.find("rank 0: output is f32[" + std::to_string(n.size()) +
                     ", 4] cpu, but the NCCL backend takes CUDA tensors"),
            std::string::npos)
      << err;
  for (const std::string& other : gather_strings(err)) EXPECT_EQ(other, err) << "errors differ between ranks";
}

TEST_F(NcclBadInput, NonContiguousTensorIsNamed) {
  auto& n = nccl();
  Tensor in = Tensor::zeros({4, 2}, DType::kF32, Device::kCuda).transpose(0, 1);  // [2, 4], not contiguous
  Tensor out = Tensor::zeros({2 * n.size(), 4}, DType::kF32, Device::kCuda);
  const std::string err = error_of([&] { n.all_gather(in, out); });
  EXPECT_NE(err.find("input (f32[2, 4] cuda) is not contiguous"), std::string::npos) << err;
}

TEST_F(NcclBadInput, DisagreeingDtypesFailEverywhere) {
  auto& n = nccl();
  if (n.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int64_t> counts(n.size(), 1);
  Tensor in = Tensor::zeros({1, 2}, n.rank() == 1 ? DType::kI32 : DType::kF32, Device::kCuda);
  Tensor out = Tensor::zeros({n.size(), 2}, in.dtype(), Device::kCuda);
  const std::string err = error_of([&] { n.all_gather_v(in, out, counts); });
  EXPECT_NE(err.find("ranks disagree on dtype"), std::string::npos) << err;
}

}  // namespace
}  // namespace moetp
