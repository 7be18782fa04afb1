// CPU RMSNorm (Qwen3RMSNorm): forward and saved rstd against an fp64 re-implementation, one row by
// hand, backward against central differences of the fp64 Σ y ⊙ R (dx overwritten over NaN, dw
// accumulated over a random prefill), on the layer-norm and per-head q/k-norm shapes, and errors.
//
// Shape legend: R rows, D normalised size.
#include "kernels/cpu/rmsnorm.h"

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

constexpr Tolerance kF32Elementwise = testing::kF32ElementwiseVsF64;

// fp64 Qwen3RMSNorm; rstd_out (when given) receives the per-row rstd.
std::vector<double> ref_rmsnorm(const std::vector<double>& x, const std::vector<double>& w, int64_t R, int64_t D,
                                double eps, std::vector<double>* rstd_out = nullptr) {
  std::vector<double> y(x.size());
  if (rstd_out) rstd_out->assign(R, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    double ms = 0;
    for (int64_t d = 0; d < D; ++d) ms += x[r * D + d] * x[r * D + d];
    const double rstd = 1.0 / std::sqrt(ms / D + eps);
    if (rstd_out) (*rstd_out)[r] = rstd;
    for (int64_t d = 0; d < D; ++d) y[r * D + d] = w[d] * x[r * D + d] * rstd;
  }
  return y;
}

struct RmsCase {
  std::string name;
  int64_t R, D;
  float eps;
};
void PrintTo(const RmsCase& c, std::ostream* os) { *os << c.name; }

class CpuRmsNormGrad : public ::testing::TestWithParam<RmsCase> {};

TEST_P(CpuRmsNormGrad, ForwardMatchesFp64AndBackwardMatchesFiniteDifferences) {
  const RmsCase c = GetParam();
  const Tensor x = random_tensor({c.R, c.D}, 61, 1, -2.0f, 2.0f);
  const Tensor w = random_tensor({c.D}, 61, 2, 0.5f, 1.5f);
  const Tensor dy = random_tensor({c.R, c.D}, 61, 3);  // loss = Σ y ⊙ dy
  const Tensor dw0 = random_tensor({c.D}, 61, 4);

  Tensor rstd;
  const Tensor y = cpu::rmsnorm_forward(x, w, c.eps, &rstd);
  std::vector<double> xd = to_double(x), wd = to_double(w), rstd_ref;
  EXPECT_TRUE(close(y, to_tensor(ref_rmsnorm(xd, wd, c.R, c.D, c.eps, &rstd_ref), {c.R, c.D}), kF32Elementwise));
  EXPECT_TRUE(close(rstd, to_tensor(rstd_ref, {c.R}), kF32Elementwise));
  EXPECT_TRUE(moetp::testing::bit_equal(cpu::rmsnorm_forward(x, w, c.eps, nullptr), y));

  const std::vector<double> r = to_double(dy);
  auto loss = [&] {
    const std::vector<double> yd = ref_rmsnorm(xd, wd, c.R, c.D, c.eps);
    double total = 0;
    for (size_t k = 0; k < yd.size(); ++k) total += yd[k] * r[k];
    return total;
  };
  const std::vector<double> dx_fd = central_diff(xd, loss);
  std::vector<double> dw_fd = central_diff(wd, loss);
  const std::vector<float> base = dw0.to_vector<float>();
  for (int64_t d = 0; d < c.D; ++d) dw_fd[d] += base[d];

  Tensor dx = Tensor::full<float>({c.R, c.D}, NAN);  // overwritten
  Tensor dw = dw0.clone();
  cpu::rmsnorm_backward(dy, x, w, rstd, dx, dw);
  EXPECT_TRUE(close(dx, to_tensor(dx_fd, {c.R, c.D}), kGradCheck)) << "dx";
  EXPECT_TRUE(close(dw, to_tensor(dw_fd, {c.D}), kGradCheck)) << "dw";

  Tensor dx_alloc, dw2 = dw0.clone();  // undefined dx is allocated; same numbers
  cpu::rmsnorm_backward(dy, x, w, rstd, dx_alloc, dw2);
  EXPECT_TRUE(moetp::testing::bit_equal(dx_alloc, dx));
  EXPECT_TRUE(moetp::testing::bit_equal(dw2, dw));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuRmsNormGrad,
                         ::testing::Values(RmsCase{"layer_norm_R5_D7", 5, 7, 1e-6f},
                                           RmsCase{"qk_norm_N3_heads4_R12_D8", 12, 8, 1e-6f},
                                           RmsCase{"large_eps_R4_D6", 4, 6, 0.5f},
                                           RmsCase{"smallest_R1_D1", 1, 1, 1e-6f},
                                           RmsCase{"head_dim_R6_D128", 6, 128, 1e-6f}),
                         [](const ::testing::TestParamInfo<RmsCase>& info) { return info.param.name; });

TEST(CpuRmsNorm, OneRowByHand) {
  // x = [3, 4]: mean square 12.5, rstd = 1 / sqrt(12.5) (eps negligible); w = [1, 2].
  Tensor rstd;
  const Tensor y = cpu::rmsnorm_forward(Tensor::from_vector<float>({3, 4}, {1, 2}),
                                        Tensor::from_vector<float>({1, 2}, {2}), 1e-12f, &rstd);
  const double inv = 1.0 / std::sqrt(12.5);
  EXPECT_TRUE(close(y, to_tensor({3 * inv, 8 * inv}, {1, 2}), moetp::testing::kF32Exactish));
  EXPECT_TRUE(close(rstd, to_tensor({inv}, {1}), moetp::testing::kF32Exactish));
}

TEST(CpuRmsNorm, QkNormRowsAreIndependentHeads) {
  // Normalising (N, heads, D) viewed as (N·heads, D) equals normalising each head on its own.
  const int64_t N = 3, heads = 4, D = 8;
  const Tensor x = random_tensor({N, heads, D}, 62, 1);
  const Tensor w = random_tensor({D}, 62, 2, 0.5f, 1.5f);
  const Tensor y = cpu::rmsnorm_forward(x.view({N * heads, D}), w, 1e-6f, nullptr);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < heads; ++h) {
      const Tensor row = x.view({N * heads, D}).narrow_rows(n * heads + h, 1).contiguous();
      EXPECT_TRUE(moetp::testing::bit_equal(cpu::rmsnorm_forward(row, w, 1e-6f, nullptr),
                                            y.narrow_rows(n * heads + h, 1).contiguous()));
    }
  }
}

TEST(CpuRmsNorm, EmptyBatchIsLegal) {
  const Tensor w = random_tensor({4}, 63, 1);
  Tensor rstd;
  const Tensor x = Tensor::empty({0, 4}, DType::kF32);
  EXPECT_EQ(cpu::rmsnorm_forward(x, w, 1e-6f, &rstd).shape(), (Shape{0, 4}));
  Tensor dx, dw = w.clone();
  cpu::rmsnorm_backward(x, x, w, rstd, dx, dw);
  EXPECT_EQ(dx.shape(), (Shape{0, 4}));
  EXPECT_TRUE(moetp::testing::bit_equal(dw, w));
}

TEST(CpuRmsNorm, RejectsBadArguments) {
  const Tensor x = random_tensor({5, 7}, 64, 1);
  const Tensor w = random_tensor({7}, 64, 2);
  expect_error([&] { cpu::rmsnorm_forward(x, random_tensor({6}, 64, 3), 1e-6f, nullptr); },
               {"w_D f32[6]", "x_RD f32[5, 7]", "D = 7"});
  expect_error([&] { cpu::rmsnorm_forward(x, w, 0.0f, nullptr); }, {"eps (0)"});
  expect_error([&] { cpu::rmsnorm_forward(random_tensor({5, 1, 7}, 64, 4), w, 1e-6f, nullptr); },
               {"x_RD", "2 dimensions"});
  Tensor rstd, dx, dw = Tensor::zeros({7}, DType::kF32), none;
  cpu::rmsnorm_forward(x, w, 1e-6f, &rstd);
  expect_error([&] { cpu::rmsnorm_backward(x, x, w, Tensor(), dx, dw); }, {"rstd_R", "undefined"});
  expect_error([&] { cpu::rmsnorm_backward(x, x, w, random_tensor({4}, 64, 5), dx, dw); },
               {"rstd_R", "[5]", "f32[4]"});
  expect_error([&] { cpu::rmsnorm_backward(random_tensor({5, 6}, 64, 6), x, w, rstd, dx, dw); },
               {"dy_RD", "[5, 7]", "f32[5, 6]"});
  expect_error([&] { cpu::rmsnorm_backward(x, x, w, rstd, dx, none); }, {"dw_D", "undefined"});
}

}  // namespace
}  // namespace moetp
