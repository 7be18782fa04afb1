// cpu::adamw_step with bf16 moments (optim.state_dtype = bf16) against the f32-moment update: from
// the same moment values, one step of the bf16 path gives the same master weights bit for bit (the
// step uses the moments unrounded) and moments equal to the f32 path's rounded to nearest even; over
// many steps the weights stay close to the f32 run. Mixed moment dtypes are refused.
#include "kernels/cpu/optim.h"

#include <gtest/gtest.h>

#include "core/bf16.h"
#include "testing.h"

namespace moetp {
namespace {

using testing::random_tensor;

Tensor as_bf16_values(const Tensor& t) { return t.to(DType::kBF16).to(DType::kF32); }

TEST(CpuAdamW, Bf16MomentsAreTheF32UpdateRoundedOnStore) {
  const Shape shape{37, 29};
  const Tensor g = random_tensor(shape, 3, 1);
  // Moments that bf16 holds exactly, so both paths start from the same values.
  const Tensor m0 = as_bf16_values(random_tensor(shape, 3, 2, -0.1f, 0.1f));
  const Tensor v0 = as_bf16_values(random_tensor(shape, 3, 3, 0.0f, 0.01f));
  const Tensor w0 = random_tensor(shape, 3, 4);
  for (int64_t step : {1, 7}) {
    Tensor w32 = w0.clone(), m32 = m0.clone(), v32 = v0.clone();
    cpu::adamw_step(w32, g, m32, v32, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
    Tensor w16 = w0.clone(), m16 = m0.to(DType::kBF16), v16 = v0.to(DType::kBF16);
    cpu::adamw_step(w16, g, m16, v16, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
    EXPECT_TRUE(testing::bit_equal(w16, w32)) << "weights, step " << step;
    EXPECT_TRUE(testing::bit_equal(m16, m32.to(DType::kBF16))) << "exp_avg, step " << step;
    EXPECT_TRUE(testing::bit_equal(v16, v32.to(DType::kBF16))) << "exp_avg_sq, step " << step;
  }
}

TEST(CpuAdamW, Bf16MomentsTrackF32OverManySteps) {
  const Shape shape{64, 48};
  Tensor w32 = random_tensor(shape, 5, 1), w16 = w32.clone();
  Tensor m32 = Tensor::zeros(shape, DType::kF32), v32 = m32.clone();
  Tensor m16 = Tensor::zeros(shape, DType::kBF16), v16 = m16.clone();
  for (int64_t step = 1; step <= 200; ++step) {
    const Tensor g = random_tensor(shape, 6, static_cast<uint64_t>(step), -1.0f, 1.0f);
    cpu::adamw_step(w32, g, m32, v32, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
    cpu::adamw_step(w16, g, m16, v16, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
  }
  // 200 steps of at most lr each: the weights moved by up to 0.2; the bf16 moments' rounding (2^-9
  // relative per step) keeps them within a small fraction of that.
  double max_diff = 0;
  for (int64_t i = 0; i < w32.numel(); ++i) {
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(w16.data<float>()[i]) - w32.data<float>()[i]));
  }
  EXPECT_LT(max_diff, 5e-3);
  EXPECT_FALSE(testing::bit_equal(w16, w32)) << "the rounding of the moments does not show";
}

TEST(CpuAdamW, MixedMomentDtypesAreRefused) {
  Tensor w = Tensor::zeros({4}, DType::kF32), g = w.clone(), m = w.clone(), v = Tensor::zeros({4}, DType::kBF16);
  testing::expect_error([&] { cpu::adamw_step(w, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1); },
                        {"must both be f32 or both bf16", "f32[4]", "bf16[4]"});
}

}  // namespace
}  // namespace moetp
