// cuBLAS GEMM wrappers (kernels/cuda/gemm.h) against the CPU reference (cpu::linear,
// cpu::linear_backward, applied per group for the grouped GEMMs) on the same bf16-rounded inputs:
// bf16 outputs within testing::kBF16, f32 weight-gradient accumulation within testing::kF32Parallel
// (f32 sums in a different order). Integer-valued inputs make the products exact, so those cases
// compare bit for bit. Grouped cases: empty groups, all rows in one group, M = 0, sizes that are not
// tile multiples, and one real expert shape (M = 2048 over 16 groups, K = 2048, N = 384).
// Label `cuda`: skips with a message where no GPU is visible.
//
// Shape legend: M rows, N output features, K input features, L groups.
#include "kernels/cuda/gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/cpu/gemm.h"
#include "kernels/cuda/runtime.h"
#include "testing.h"

namespace moetp {
namespace {

using moetp::testing::close;
using moetp::testing::random_tensor;

Tensor round_bf16(const Tensor& t) { return t.to(DType::kBF16).to(DType::kF32); }
Tensor to_gpu_bf16(const Tensor& t) { return t.to(DType::kBF16).to(Device::kCuda); }
Tensor nan_gpu_bf16(Shape shape) {
  return to_gpu_bf16(Tensor::full<float>(std::move(shape), std::numeric_limits<float>::quiet_NaN()));
}

// Integers in [-r, r], exactly representable in bf16.
Tensor random_ints(Shape shape, uint64_t seed, uint64_t stream, int r) {
  Tensor t = random_tensor(std::move(shape), seed, stream, -static_cast<float>(r) - 0.5f, static_cast<float>(r) + 0.5f);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = std::nearbyint(p[i]);
  return t;
}

class CudaGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

struct LinearCase {
  int64_t M, N, K;
};

TEST_F(CudaGemm, LinearMatchesCpu) {
  for (const LinearCase c : {LinearCase{1, 1, 1}, LinearCase{37, 19, 24}, LinearCase{33, 17, 40},
                             LinearCase{256, 384, 2048}, LinearCase{1000, 72, 136}}) {
    const std::string name = "M" + std::to_string(c.M) + "_N" + std::to_string(c.N) + "_K" + std::to_string(c.K);
    const Tensor x = round_bf16(random_tensor({c.M, c.K}, 1, 1));
    const Tensor w = round_bf16(random_tensor({c.N, c.K}, 1, 2));
    const Tensor dy = round_bf16(random_tensor({c.M, c.N}, 1, 3));
    const Tensor dw0 = random_tensor({c.N, c.K}, 1, 4);

    const Tensor y_ref = cpu::linear(x, w);
    const Tensor y = cuda::linear(to_gpu_bf16(x), to_gpu_bf16(w));
    ASSERT_EQ(y.dtype(), DType::kBF16);
    EXPECT_TRUE(close(y, y_ref, testing::kBF16)) << name << " y";

    Tensor dx_ref, dw_ref = dw0.clone();
    cpu::linear_backward(dy, x, w, &dx_ref, &dw_ref);
    Tensor dx = nan_gpu_bf16({c.M, c.K});
    Tensor dw = dw0.to(Device::kCuda);
    cuda::linear_backward(to_gpu_bf16(dy), to_gpu_bf16(x), to_gpu_bf16(w), &dx, &dw);
    EXPECT_TRUE(close(dx, dx_ref, testing::kBF16)) << name << " dx";
    EXPECT_TRUE(close(dw, dw_ref, testing::kF32Parallel)) << name << " dw";

    // Null outputs are skipped; an undefined dx is allocated.
    Tensor dx2;
    cuda::linear_backward(to_gpu_bf16(dy), to_gpu_bf16(x), to_gpu_bf16(w), &dx2, nullptr);
    EXPECT_TRUE(testing::bit_equal(dx2, dx)) << name;
    Tensor dw2 = dw0.to(Device::kCuda);
    cuda::linear_backward(to_gpu_bf16(dy), to_gpu_bf16(x), to_gpu_bf16(w), nullptr, &dw2);
    EXPECT_TRUE(close(dw2, dw_ref, testing::kF32Parallel)) << name << " dw only";
  }
}

// |y| <= K·4 = 96 and |dx| <= N·4 = 80: integers bf16 holds exactly, so results are exact.
TEST_F(CudaGemm, LinearIntegerInputsAreExact) {
  const int64_t M = 45, N = 20, K = 24;
  const Tensor x = random_ints({M, K}, 7, 1, 2), w = random_ints({N, K}, 7, 2, 2), dy = random_ints({M, N}, 7, 3, 2);
  const Tensor dw0 = random_ints({N, K}, 7, 4, 50);
  const Tensor y_ref = cpu::linear(x, w);
  ASSERT_FALSE(testing::all_zero(y_ref.to_vector<float>()));
  EXPECT_TRUE(testing::bit_equal(cuda::linear(to_gpu_bf16(x), to_gpu_bf16(w)), y_ref.to(DType::kBF16)));

  Tensor dx_ref, dw_ref = dw0.clone();
  cpu::linear_backward(dy, x, w, &dx_ref, &dw_ref);
  Tensor dx, dw = dw0.to(Device::kCuda);
  cuda::linear_backward(to_gpu_bf16(dy), to_gpu_bf16(x), to_gpu_bf16(w), &dx, &dw);
  EXPECT_TRUE(testing::bit_equal(dx, dx_ref.to(DType::kBF16)));
  EXPECT_TRUE(testing::bit_equal(dw, dw_ref));
}

TEST_F(CudaGemm, LinearRejectsMismatchedShapes) {
  const Tensor x = Tensor::zeros({4, 8}, DType::kBF16, Device::kCuda);
  const Tensor w = Tensor::zeros({3, 9}, DType::kBF16, Device::kCuda);
  try {
    cuda::linear(x, w);
    ADD_FAILURE() << "expected moetp::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("K = 8"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cuda::linear(Tensor::zeros({4, 8}, DType::kF32, Device::kCuda), x.view({8, 4})), Error);
}

struct GroupedCase {
  std::string name;
  std::vector<int64_t> counts;  // rows per group; L = counts.size()
  int64_t N, K;
};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  return offsets;
}

// 16 ragged groups summing to 2048, one of them empty.
std::vector<int64_t> real_counts() {
  std::vector<int64_t> counts = {211, 97, 0, 160, 128, 64, 301, 5, 122, 130, 90, 177, 140, 1, 200, 0};
  const int64_t sum = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  counts.back() = 2048 - sum;
  return counts;
}

class CudaGroupedGemm : public ::testing::TestWithParam<GroupedCase> {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};
void PrintTo(const GroupedCase& c, std::ostream* os) { *os << c.name; }

TEST_P(CudaGroupedGemm, ForwardAndBackwardMatchCpuPerGroup) {
  const GroupedCase c = GetParam();
  const std::vector<int64_t> offsets = offsets_of(c.counts);
  const int64_t L = static_cast<int64_t>(c.counts.size()), M = offsets.back(), N = c.N, K = c.K;
  const Tensor x = round_bf16(random_tensor({M, K}, 3, 1));
  const Tensor w = round_bf16(random_tensor({L, N, K}, 3, 2));
  const Tensor dy = round_bf16(random_tensor({M, N}, 3, 3));
  const Tensor dw0 = random_tensor({L, N, K}, 3, 4);

  Tensor y_ref = Tensor::zeros({M, N}, DType::kF32);
  Tensor dx_ref = Tensor::zeros({M, K}, DType::kF32);
  Tensor dw_ref = dw0.clone();
  for (int64_t l = 0; l < L; ++l) {
    const int64_t rows = c.counts[l];
    if (rows == 0) continue;
    const Tensor x_l = x.narrow_rows(offsets[l], rows);
    const Tensor w_l = w.slice(0, l, l + 1).view({N, K});
    y_ref.narrow_rows(offsets[l], rows).copy_from(cpu::linear(x_l, w_l));
    Tensor dx_l = dx_ref.narrow_rows(offsets[l], rows);
    Tensor dw_l = dw_ref.slice(0, l, l + 1).view({N, K});
    cpu::linear_backward(dy.narrow_rows(offsets[l], rows), x_l, w_l, &dx_l, &dw_l);
  }

  const Tensor x_g = to_gpu_bf16(x), w_g = to_gpu_bf16(w), dy_g = to_gpu_bf16(dy);
  Tensor y = nan_gpu_bf16({M, N});
  cuda::grouped_linear(x_g, offsets, w_g, y);
  Tensor dx = nan_gpu_bf16({M, K});
  Tensor dw = dw0.to(Device::kCuda);
  cuda::grouped_linear_backward(dy_g, x_g, offsets, w_g, &dx, &dw);
  if (M == 0) {
    EXPECT_EQ(y.numel(), 0);
    EXPECT_TRUE(testing::bit_equal(dw, dw0)) << c.name << ": no rows, no gradient";
    return;
  }
  EXPECT_TRUE(close(y, y_ref, testing::kBF16)) << c.name << " y";
  EXPECT_TRUE(close(dx, dx_ref, testing::kBF16)) << c.name << " dx";
  EXPECT_TRUE(close(dw, dw_ref, testing::kF32Parallel)) << c.name << " dw";
  const Tensor dw_cpu = dw.to(Device::kCpu);
  for (int64_t l = 0; l < L; ++l) {
    if (c.counts[l] != 0) continue;
    EXPECT_TRUE(testing::bit_equal(dw_cpu.slice(0, l, l + 1), dw0.slice(0, l, l + 1)))
        << c.name << ": empty group " << l << " must be untouched";
  }

  // An undefined y / dx is allocated.
  Tensor y2, dx2;
  cuda::grouped_linear(x_g, offsets, w_g, y2);
  cuda::grouped_linear_backward(dy_g, x_g, offsets, w_g, &dx2, nullptr);
  EXPECT_TRUE(testing::bit_equal(y2, y)) << c.name;
  EXPECT_TRUE(testing::bit_equal(dx2, dx)) << c.name;
}

INSTANTIATE_TEST_SUITE_P(
    Groups, CudaGroupedGemm,
    ::testing::Values(GroupedCase{"L5_ragged_with_empty_N24_K40", {0, 7, 0, 13, 3}, 24, 40},
                      GroupedCase{"L4_all_rows_in_one_N16_K8", {0, 0, 29, 0}, 16, 8},
                      GroupedCase{"L3_no_rows_N8_K8", {0, 0, 0}, 8, 8},
                      GroupedCase{"L1_single_row_N1_K1", {1}, 1, 1},
                      GroupedCase{"L16_M2048_N384_K2048", real_counts(), 384, 2048}),
    [](const ::testing::TestParamInfo<GroupedCase>& info) { return info.param.name; });

TEST_F(CudaGemm, GroupedIntegerInputsAreExact) {
  const std::vector<int64_t> counts = {5, 0, 11, 2};
  const std::vector<int64_t> offsets = offsets_of(counts);
  const int64_t L = 4, M = 18, N = 20, K = 24;
  const Tensor x = random_ints({M, K}, 9, 1, 2), w = random_ints({L, N, K}, 9, 2, 2), dy = random_ints({M, N}, 9, 3, 2);
  Tensor y_ref = Tensor::zeros({M, N}, DType::kF32);
  for (int64_t l = 0; l < L; ++l) {
    if (counts[l] == 0) continue;
    y_ref.narrow_rows(offsets[l], counts[l])
        .copy_from(cpu::linear(x.narrow_rows(offsets[l], counts[l]), w.slice(0, l, l + 1).view({N, K})));
  }
  ASSERT_FALSE(testing::all_zero(y_ref.to_vector<float>()));
  Tensor y;
  cuda::grouped_linear(to_gpu_bf16(x), offsets, to_gpu_bf16(w), y);
  EXPECT_TRUE(testing::bit_equal(y, y_ref.to(DType::kBF16)));
}

TEST_F(CudaGemm, GroupedRejectsBadOffsets) {
  const Tensor x = Tensor::zeros({6, 8}, DType::kBF16, Device::kCuda);
  const Tensor w = Tensor::zeros({2, 4, 8}, DType::kBF16, Device::kCuda);
  Tensor y;
  const std::vector<int64_t> short_offsets = {0, 6};
  const std::vector<int64_t> wrong_end = {0, 3, 5};
  const std::vector<int64_t> decreasing = {0, 7, 6};
  EXPECT_THROW(cuda::grouped_linear(x, short_offsets, w, y), Error);
  EXPECT_THROW(cuda::grouped_linear(x, wrong_end, w, y), Error);
  EXPECT_THROW(cuda::grouped_linear(x, decreasing, w, y), Error);
}

}  // namespace
}  // namespace moetp
