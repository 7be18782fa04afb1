// CPU embedding: forward gathers table rows bit-exactly (repeated ids, first and last id), backward
// scatter-adds into a prefilled table gradient (checked against central differences of an fp64
// re-implementation of Σ y ⊙ R), and out-of-range ids name the position, the id and V.
//
// Shape legend: N tokens, V vocabulary, H hidden.
#include "kernels/cpu/embedding.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/grad_check.h"
#include "testing.h"

namespace moetp {
namespace {

using moetp::testing::close;
using moetp::testing::random_tensor;
using moetp::testing::Tolerance;
using moetp::testing::central_diff;
using moetp::testing::expect_error;
using moetp::testing::kGradCheck;
using moetp::testing::to_double;
using moetp::testing::to_tensor;


TEST(CpuEmbedding, ForwardGathersRowsBitExactly) {
  const int64_t V = 7, H = 5;
  const Tensor table = random_tensor({V, H}, 51, 1);
  const std::vector<int32_t> ids = {3, 0, 6, 3, 3, 1};  // first and last id, one id three times
  const int64_t N = static_cast<int64_t>(ids.size());
  const Tensor y = cpu::embedding_forward(Tensor::from_vector(ids, {N}), table);
  Tensor expected = Tensor::empty({N, H}, DType::kF32);
  for (int64_t n = 0; n < N; ++n) expected.narrow_rows(n, 1).copy_from(table.narrow_rows(ids[n], 1));
  EXPECT_TRUE(moetp::testing::bit_equal(y, expected));
  EXPECT_FALSE(moetp::testing::all_zero(y.to_vector<float>()));
}

TEST(CpuEmbedding, BackwardScatterAddsAndMatchesFiniteDifferences) {
  for (const int64_t H : {1, 5, 64}) {
    SCOPED_TRACE("H=" + std::to_string(H));
    const int64_t V = 9;
    const std::vector<int32_t> ids = {2, 8, 2, 0, 5, 2, 8};  // rows 1, 3, 4, 6, 7 untouched
    const int64_t N = static_cast<int64_t>(ids.size());
    const Tensor ids_N = Tensor::from_vector(ids, {N});
    const Tensor table = random_tensor({V, H}, 52, 1);
    const Tensor dy = random_tensor({N, H}, 52, 2);  // loss = Σ y ⊙ dy
    const Tensor dtable0 = random_tensor({V, H}, 52, 3);

    std::vector<double> td = to_double(table);
    const std::vector<double> r = to_double(dy);
    auto loss = [&] {
      double total = 0;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < H; ++c) total += td[ids[n] * H + c] * r[n * H + c];
      }
      return total;
    };
    std::vector<double> expected = central_diff(td, loss);
    const std::vector<float> base = dtable0.to_vector<float>();
    for (size_t k = 0; k < expected.size(); ++k) expected[k] += base[k];

    Tensor dtable = dtable0.clone();
    cpu::embedding_backward(ids_N, dy, dtable);
    EXPECT_TRUE(close(dtable, to_tensor(expected, {V, H}), kGradCheck));
    for (int64_t v : {1, 3, 4, 6, 7}) {
      EXPECT_TRUE(moetp::testing::bit_equal(dtable.narrow_rows(v, 1), dtable0.narrow_rows(v, 1))) << "row " << v;
    }
  }
}

TEST(CpuEmbedding, EmptyBatchIsLegal) {
  const Tensor table = random_tensor({4, 3}, 53, 1);
  const Tensor ids = Tensor::empty({0}, DType::kI32);
  EXPECT_EQ(cpu::embedding_forward(ids, table).shape(), (Shape{0, 3}));
  Tensor dtable = table.clone();
  cpu::embedding_backward(ids, Tensor::empty({0, 3}, DType::kF32), dtable);
  EXPECT_TRUE(moetp::testing::bit_equal(dtable, table));
}

TEST(CpuEmbedding, RejectsOutOfRangeIdsNamingPositionIdAndVocab) {
  const Tensor table = random_tensor({10, 3}, 54, 1);
  expect_error([&] { cpu::embedding_forward(Tensor::from_vector<int32_t>({1, 2, 3, 10}, {4}), table); },
               {"token id 10 at position 3", "vocab size V = 10"});
  expect_error([&] { cpu::embedding_forward(Tensor::from_vector<int32_t>({-1, 2}, {2}), table); },
               {"token id -1 at position 0", "vocab size V = 10"});
  // A bad id leaves the accumulated gradient untouched.
  Tensor dtable = random_tensor({10, 3}, 54, 2);
  const Tensor before = dtable.clone();
  expect_error([&] {
    cpu::embedding_backward(Tensor::from_vector<int32_t>({4, 12}, {2}), random_tensor({2, 3}, 54, 3), dtable);
  }, {"embedding_backward", "token id 12 at position 1", "vocab size V = 10"});
  EXPECT_TRUE(moetp::testing::bit_equal(dtable, before));
}

TEST(CpuEmbedding, RejectsBadArguments) {
  const Tensor table = random_tensor({10, 3}, 55, 1);
  const Tensor ids = Tensor::from_vector<int32_t>({1, 2}, {2});
  expect_error([&] { cpu::embedding_forward(Tensor::from_vector<int64_t>({1, 2}, {2}), table); },
               {"ids_N", "i32"});
  expect_error([&] { cpu::embedding_forward(ids, random_tensor({10}, 55, 2)); }, {"table_VH", "f32[10]"});
  Tensor dtable = Tensor::zeros({10, 3}, DType::kF32), none;
  expect_error([&] { cpu::embedding_backward(ids, random_tensor({2, 4}, 55, 3), dtable); },
               {"dy_NH", "[2, 3]", "f32[2, 4]"});
  expect_error([&] { cpu::embedding_backward(ids, random_tensor({2, 3}, 55, 4), none); },
               {"dtable_VH", "undefined"});
}

}  // namespace
}  // namespace moetp
