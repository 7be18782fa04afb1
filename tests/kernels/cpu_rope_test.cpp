// CPU RoPE: forward against a literal fp64 port of Hugging Face's apply_rotary_pos_emb (cos/sin of
// cat(freqs, freqs), rotate_half), backward against central differences of the fp64 Σ y ⊙ R,
// backward ∘ forward = identity, position 0 = identity, scores depend only on relative positions,
// and errors quoting the values.
//
// Shape legend: N tokens, h heads, D head_dim.
#include "kernels/cpu/rope.h"

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


// Hugging Face, in fp64:
//   inv_freq = 1 / theta ** (arange(0, D, 2) / D);  freqs = pos ⊗ inv_freq;  emb = cat(freqs, freqs)
//   rotate_half(x) = cat(−x[D/2:], x[:D/2]);         y = x · cos(emb) + rotate_half(x) · sin(emb)
std::vector<double> hf_apply_rotary_pos_emb(const std::vector<double>& x, const std::vector<int32_t>& pos, int64_t h,
                                            int64_t D, double theta) {
  const int64_t N = static_cast<int64_t>(pos.size()), half = D / 2;
  std::vector<double> y(x.size());
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> emb(D);
    for (int64_t j = 0; j < half; ++j) emb[j] = emb[j + half] = pos[n] * (1.0 / std::pow(theta, (2.0 * j) / D));
    for (int64_t head = 0; head < h; ++head) {
      const double* xv = x.data() + (n * h + head) * D;
      std::vector<double> rot(D);
      for (int64_t d = 0; d < D; ++d) rot[d] = d < half ? -xv[d + half] : xv[d - half];
      for (int64_t d = 0; d < D; ++d) y[(n * h + head) * D + d] = xv[d] * std::cos(emb[d]) + rot[d] * std::sin(emb[d]);
    }
  }
  return y;
}

struct RopeCase {
  std::string name;
  int64_t h, D;
  double theta;
  std::vector<int32_t> positions;
  int64_t N() const { return static_cast<int64_t>(positions.size()); }
};
void PrintTo(const RopeCase& c, std::ostream* os) { *os << c.name; }

class CpuRopeCase : public ::testing::TestWithParam<RopeCase> {};

TEST_P(CpuRopeCase, ForwardMatchesHfAndBackwardMatchesFiniteDifferences) {
  const RopeCase c = GetParam();
  const int64_t N = c.N();
  const Tensor pos = Tensor::from_vector(c.positions, {N});
  const Tensor x = random_tensor({N, c.h, c.D}, 71, 1);
  const Tensor dy = random_tensor({N, c.h, c.D}, 71, 2);  // loss = Σ y ⊙ dy

  Tensor y = x.clone();
  cpu::rope_forward(y, pos, c.theta);
  std::vector<double> xd = to_double(x);
  EXPECT_TRUE(close(y, to_tensor(hf_apply_rotary_pos_emb(xd, c.positions, c.h, c.D, c.theta), {N, c.h, c.D}),
                    moetp::testing::kF32Exactish));

  const std::vector<double> r = to_double(dy);
  auto loss = [&] {
    const std::vector<double> yd = hf_apply_rotary_pos_emb(xd, c.positions, c.h, c.D, c.theta);
    double total = 0;
    for (size_t k = 0; k < yd.size(); ++k) total += yd[k] * r[k];
    return total;
  };
  const std::vector<double> dx_fd = central_diff(xd, loss);
  Tensor dx = dy.clone();
  cpu::rope_backward(dx, pos, c.theta);
  EXPECT_TRUE(close(dx, to_tensor(dx_fd, {N, c.h, c.D}), kGradCheck));

  // The rotation is orthogonal: backward undoes forward.
  Tensor back = y.clone();
  cpu::rope_backward(back, pos, c.theta);
  EXPECT_TRUE(close(back, x, Tolerance{1e-5, 1e-6, 1e-2}));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CpuRopeCase,
    ::testing::Values(RopeCase{"N5_h3_D8", 3, 8, 10000.0, {0, 1, 2, 7, 3}},
                      RopeCase{"smallest_N1_h1_D2", 1, 2, 10000.0, {5}},
                      RopeCase{"qwen3_h4_D128_theta1e6", 4, 128, 1e6, {0, 1, 17, 4095, 32767, 40959}}),
    [](const ::testing::TestParamInfo<RopeCase>& info) { return info.param.name; });

TEST(CpuRope, PositionZeroIsIdentity) {
  const Tensor x = random_tensor({3, 2, 6}, 72, 1);
  Tensor y = x.clone();
  cpu::rope_forward(y, Tensor::from_vector<int32_t>({0, 0, 0}, {3}), 1e6);
  EXPECT_TRUE(moetp::testing::bit_equal(y, x));
}

TEST(CpuRope, PairsElementWithElementPlusHalf) {
  // D = 4, theta = 1: every inv_freq is 1, so at position 1 both pairs (0, 2) and (1, 3) rotate by
  // one radian. x = e_0 goes to cos(1)·e_0 + sin(1)·e_2 (not to e_1, as adjacent pairing would).
  Tensor x = Tensor::from_vector<float>({1, 0, 0, 0}, {1, 1, 4});
  cpu::rope_forward(x, Tensor::from_vector<int32_t>({1}, {1}), 1.0);
  const std::vector<float> v = x.to_vector<float>();
  EXPECT_NEAR(v[0], std::cos(1.0), 1e-7);
  EXPECT_EQ(v[1], 0.0f);
  EXPECT_NEAR(v[2], std::sin(1.0), 1e-7);
  EXPECT_EQ(v[3], 0.0f);
}

TEST(CpuRope, ScoresDependOnlyOnRelativePosition) {
  const int64_t D = 16;
  const Tensor q = random_tensor({1, 1, D}, 73, 1), k = random_tensor({1, 1, D}, 73, 2);
  auto score = [&](int32_t m, int32_t n) {
    Tensor qr = q.clone(), kr = k.clone();
    cpu::rope_forward(qr, Tensor::from_vector<int32_t>({m}, {1}), 10000.0);
    cpu::rope_forward(kr, Tensor::from_vector<int32_t>({n}, {1}), 10000.0);
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += static_cast<double>(qr.data<float>()[d]) * kr.data<float>()[d];
    return s;
  };
  const double base = score(7, 3);
  EXPECT_NEAR(score(4, 0), base, 1e-5);
  EXPECT_NEAR(score(1007, 1003), base, 1e-5);
  EXPECT_GT(std::fabs(score(7, 4) - base), 1e-3);  // a different offset gives a different score
}

TEST(CpuRope, RejectsBadArguments) {
  Tensor x = random_tensor({3, 2, 6}, 74, 1);
  const Tensor pos = Tensor::from_vector<int32_t>({0, 1, 2}, {3});
  Tensor odd = random_tensor({3, 2, 5}, 74, 2);
  expect_error([&] { cpu::rope_forward(odd, pos, 1e4); }, {"head_dim D (5) must be even"});
  expect_error([&] { cpu::rope_forward(x, Tensor::from_vector<int32_t>({0, 1}, {2}), 1e4); },
               {"positions_N must be (N) = (3)", "i32[2]"});
  expect_error([&] { cpu::rope_backward(x, Tensor::from_vector<int32_t>({0, -4, 2}, {3}), 1e4); },
               {"position -4 at token 1"});
  expect_error([&] { cpu::rope_forward(x, Tensor::from_vector<int64_t>({0, 1, 2}, {3}), 1e4); },
               {"positions_N", "i32"});
  expect_error([&] { cpu::rope_forward(x, pos, 0.0); }, {"theta (0)"});
  Tensor flat = random_tensor({3, 12}, 74, 3);
  expect_error([&] { cpu::rope_forward(flat, pos, 1e4); }, {"x_NhD", "3 dimensions"});
}

}  // namespace
}  // namespace moetp
