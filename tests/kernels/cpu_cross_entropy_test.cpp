// CPU cross-entropy: loss sum and target count against an fp64 log-softmax with ignore_index,
// dlogits against central differences of grad_scale · loss_sum (ignored rows exactly zero, output
// overwritten over NaN, aliasing the logits allowed), uniform logits by hand, huge logits staying
// finite, all targets ignored, and errors naming the position and the value.
//
// Shape legend: N tokens, V vocabulary.
#include "kernels/cpu/cross_entropy.h"

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


// fp64 F.cross_entropy(reduction="sum", ignore_index=-100) = −Σ log_softmax(logits)[n, t_n].
double ref_loss_sum(const std::vector<double>& logits, const std::vector<int32_t>& targets, int64_t V) {
  double total = 0;
  for (size_t n = 0; n < targets.size(); ++n) {
    if (targets[n] == -100) continue;
    const double* row = logits.data() + n * V;
    const double mx = *std::max_element(row, row + V);
    double sum = 0;
    for (int64_t c = 0; c < V; ++c) sum += std::exp(row[c] - mx);
    total -= row[targets[n]] - mx - std::log(sum);
  }
  return total;
}

TEST(CpuCrossEntropy, LossAndGradientMatchFp64WithIgnoredTargets) {
  struct Setup {
    int64_t V;
    std::vector<int32_t> targets;
    float grad_scale;
  };
  for (const Setup& s : {Setup{7, {3, -100, 0, 6, 6, -100, 2}, 1.0f / 5}, Setup{2, {1, 0, 1}, 1.0f},
                         Setup{1, {0}, 0.5f}, Setup{300, {299, 17, -100, 0, 150}, 0.25f}}) {
    const int64_t N = static_cast<int64_t>(s.targets.size()), V = s.V;
    SCOPED_TRACE("N=" + std::to_string(N) + " V=" + std::to_string(V));
    const Tensor logits = random_tensor({N, V}, 91, static_cast<uint64_t>(V), -4.0f, 4.0f);
    const Tensor targets = Tensor::from_vector(s.targets, {N});
    std::vector<double> ld = to_double(logits);
    const int64_t expected_count =
        std::count_if(s.targets.begin(), s.targets.end(), [](int32_t t) { return t != cpu::kIgnoreIndex; });

    Tensor dlogits = Tensor::full<float>({N, V}, NAN);  // overwritten, ignored rows included
    const cpu::CrossEntropyResult res = cpu::cross_entropy_forward(logits, targets, &dlogits, s.grad_scale);
    EXPECT_EQ(res.num_targets, expected_count);
    const double ref = ref_loss_sum(ld, s.targets, V);
    EXPECT_NEAR(res.loss_sum, ref, 1e-6 * std::max(1.0, std::fabs(ref)));
    if (V > 1) {
      EXPECT_GT(res.loss_sum, 0.0);
    }

    auto loss = [&] { return s.grad_scale * ref_loss_sum(ld, s.targets, V); };
    const std::vector<double> fd = central_diff(ld, loss);
    if (V > 1) {
      EXPECT_TRUE(close(dlogits, to_tensor(fd, {N, V}), kGradCheck));
    } else {
      EXPECT_EQ(dlogits.to_vector<float>(), std::vector<float>(N * V, 0.0f));  // softmax of one class is 1
    }
    for (int64_t n = 0; n < N; ++n) {
      if (s.targets[n] != -100) continue;
      EXPECT_TRUE(moetp::testing::bit_equal(dlogits.narrow_rows(n, 1), Tensor::zeros({1, V}, DType::kF32)))
          << "ignored row " << n;
    }

    // No gradient requested: the same loss, bit for bit. Undefined dlogits: allocated, same values.
    const cpu::CrossEntropyResult res_only = cpu::cross_entropy_forward(logits, targets, nullptr, s.grad_scale);
    EXPECT_EQ(res_only.loss_sum, res.loss_sum);
    Tensor allocated;
    cpu::cross_entropy_forward(logits, targets, &allocated, s.grad_scale);
    EXPECT_TRUE(moetp::testing::bit_equal(allocated, dlogits));
    // The gradient may overwrite the logits in place.
    Tensor in_place = logits.clone();
    const cpu::CrossEntropyResult res_alias = cpu::cross_entropy_forward(in_place, targets, &in_place, s.grad_scale);
    EXPECT_EQ(res_alias.loss_sum, res.loss_sum);
    EXPECT_TRUE(moetp::testing::bit_equal(in_place, dlogits));
  }
}

TEST(CpuCrossEntropy, UniformLogitsByHand) {
  // Every row uniform over V = 4: loss log 4 per target; dlogits = scale · (1/4 − one_hot).
  const Tensor logits = Tensor::full<float>({3, 4}, 2.5f);
  Tensor dlogits;
  const cpu::CrossEntropyResult res =
      cpu::cross_entropy_forward(logits, Tensor::from_vector<int32_t>({1, -100, 3}, {3}), &dlogits, 0.5f);
  EXPECT_EQ(res.num_targets, 2);
  EXPECT_NEAR(res.loss_sum, 2 * std::log(4.0), 1e-12);
  EXPECT_EQ(dlogits.to_vector<float>(),
            (std::vector<float>{0.125f, -0.375f, 0.125f, 0.125f, 0, 0, 0, 0, 0.125f, 0.125f, 0.125f, -0.375f}));
}

TEST(CpuCrossEntropy, HugeLogitsStayFinite) {
  // exp(1e4) overflows without the max subtraction.
  const Tensor logits = Tensor::from_vector<float>({1e4f, 1e4f - 1.0f, -1e4f, 0.0f}, {1, 4});
  Tensor dlogits;
  const cpu::CrossEntropyResult res =
      cpu::cross_entropy_forward(logits, Tensor::from_vector<int32_t>({1}, {1}), &dlogits, 1.0f);
  const double expected = 1.0 + std::log(1.0 + std::exp(-1.0));  // −log softmax at the second logit
  EXPECT_NEAR(res.loss_sum, expected, 1e-9);
  for (float g : dlogits.to_vector<float>()) EXPECT_TRUE(std::isfinite(g));
  EXPECT_NEAR(dlogits.to_vector<float>()[0], 1.0 / (1.0 + std::exp(-1.0)), 1e-7);
}

TEST(CpuCrossEntropy, AllTargetsIgnoredGiveZeroLossAndGradient) {
  const Tensor logits = random_tensor({3, 5}, 92, 1);
  Tensor dlogits = Tensor::full<float>({3, 5}, NAN);
  const cpu::CrossEntropyResult res =
      cpu::cross_entropy_forward(logits, Tensor::from_vector<int32_t>({-100, -100, -100}, {3}), &dlogits, 1.0f);
  EXPECT_EQ(res.num_targets, 0);
  EXPECT_EQ(res.loss_sum, 0.0);
  EXPECT_TRUE(moetp::testing::bit_equal(dlogits, Tensor::zeros({3, 5}, DType::kF32)));
  const cpu::CrossEntropyResult empty = cpu::cross_entropy_forward(
      Tensor::empty({0, 5}, DType::kF32), Tensor::empty({0}, DType::kI32), nullptr, 1.0f);
  EXPECT_EQ(empty.num_targets, 0);
  EXPECT_EQ(empty.loss_sum, 0.0);
}

TEST(CpuCrossEntropy, RejectsBadTargetsNamingPositionAndValue) {
  const Tensor logits = random_tensor({4, 10}, 93, 1);
  expect_error(
      [&] { cpu::cross_entropy_forward(logits, Tensor::from_vector<int32_t>({1, 2, 10, 3}, {4}), nullptr, 1); },
      {"target 10 at position 2", "[0, 10)", "-100"});
  Tensor dlogits = Tensor::full<float>({4, 10}, 7.0f);
  expect_error([&] {
    cpu::cross_entropy_forward(logits, Tensor::from_vector<int32_t>({1, -1, 3, 3}, {4}), &dlogits, 1);
  }, {"target -1 at position 1"});
  EXPECT_TRUE(moetp::testing::bit_equal(dlogits, Tensor::full<float>({4, 10}, 7.0f))) << "untouched on error";
  expect_error([&] { cpu::cross_entropy_forward(logits, Tensor::from_vector<int32_t>({1, 2, 3}, {3}), nullptr, 1); },
               {"targets_N must be (N) = (4)", "i32[3]"});
  expect_error([&] { cpu::cross_entropy_forward(logits, Tensor::from_vector<int64_t>({1, 2, 3, 4}, {4}), nullptr, 1); },
               {"targets_N", "i32"});
  Tensor bad = Tensor::zeros({4, 9}, DType::kF32);
  expect_error([&] { cpu::cross_entropy_forward(logits, Tensor::from_vector<int32_t>({1, 2, 3, 4}, {4}), &bad, 1); },
               {"dlogits_NV", "[4, 10]", "f32[4, 9]"});
}

}  // namespace
}  // namespace moetp
