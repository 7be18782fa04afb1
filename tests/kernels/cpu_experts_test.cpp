// CPU grouped SwiGLU experts (etp_spec §4): forward against an fp64 re-implementation, backward
// against central finite differences of it (dx overwritten over NaN, weight gradients accumulated
// over random prefills), T-way sharded experts summing to the unsharded one, SwiGLU by hand, and
// argument errors. Cases: an empty expert, all rows on one expert, sizes that are multiples of
// nothing, the smallest legal sizes and one real-ish shape.
//
// Shape legend: M rows, H hidden, L local experts, I full FFN width, i = I/T this shard's width.
#include "kernels/cpu/experts.h"

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

constexpr Tolerance kF32Dot = testing::kF32ChainVsF64;
// f32 kernel gradient vs central differences of the fp64 function (whose own error is ~1e-9):
// relative 1e-4, or absolute 1e-6 where the gradient is below 1e-2.

struct ExpertsCase {
  std::string name;
  int64_t H, i;
  std::vector<int64_t> offsets;
  int64_t L() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t M() const { return offsets.back(); }
};
void PrintTo(const ExpertsCase& c, std::ostream* os) { *os << c.name; }

// fp64 forward: y = (silu(x·gateᵀ) ⊙ (x·upᵀ)) · w2ᵀ per local expert.
std::vector<double> ref_forward(const ExpertsCase& c, const std::vector<double>& x, const std::vector<double>& w13,
                                const std::vector<double>& w2) {
  const int64_t H = c.H, i = c.i;
  std::vector<double> y(c.M() * H, 0.0), a(i);
  for (int64_t j = 0; j < c.L(); ++j) {
    for (int64_t m = c.offsets[j]; m < c.offsets[j + 1]; ++m) {
      for (int64_t col = 0; col < i; ++col) {
        double gate = 0, up = 0;
        for (int64_t h = 0; h < H; ++h) {
          gate += x[m * H + h] * w13[(j * 2 * i + col) * H + h];
          up += x[m * H + h] * w13[(j * 2 * i + i + col) * H + h];
        }
        a[col] = gate / (1.0 + std::exp(-gate)) * up;
      }
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t col = 0; col < i; ++col) y[m * H + h] += a[col] * w2[(j * H + h) * i + col];
      }
    }
  }
  return y;
}

// Coordinates checked by finite differences: all of a small tensor, a fixed spread sample of a big one.
std::vector<int64_t> fd_coords(int64_t numel) {
  std::vector<int64_t> coords;
  if (numel <= 512) {
    for (int64_t k = 0; k < numel; ++k) coords.push_back(k);
  } else {
    for (int64_t k = 0; k < 48; ++k) coords.push_back((k * 7919 + 13) % numel);
  }
  return coords;
}

// Compares actual[coords] with prefill[coords] + d loss / d p[coords] by central differences.
template <typename Loss>
::testing::AssertionResult grad_close(const Tensor& actual, const Tensor& prefill, std::vector<double>& p,
                                      Loss&& loss) {
  const std::vector<int64_t> coords = fd_coords(static_cast<int64_t>(p.size()));
  const std::vector<float> a = actual.to_vector<float>();
  const std::vector<float> base = prefill.defined() ? prefill.to_vector<float>() : std::vector<float>(p.size(), 0);
  std::vector<double> got, expected;
  for (int64_t c : coords) {
    const double saved = p[c], h = 1e-6 * std::max(1.0, std::fabs(saved));
    p[c] = saved + h;
    const double plus = loss();
    p[c] = saved - h;
    const double minus = loss();
    p[c] = saved;
    got.push_back(a[c]);
    expected.push_back(base[c] + (plus - minus) / (2 * h));
  }
  const int64_t n = static_cast<int64_t>(coords.size());
  return close(to_tensor(got, {n}), to_tensor(expected, {n}), kGradCheck);
}

class CpuExpertsGrad : public ::testing::TestWithParam<ExpertsCase> {};

TEST_P(CpuExpertsGrad, ForwardMatchesFp64AndBackwardMatchesFiniteDifferences) {
  const ExpertsCase c = GetParam();
  const int64_t M = c.M(), H = c.H, L = c.L(), i = c.i;
  const Tensor x = random_tensor({M, H}, 41, 1);
  const Tensor w13 = random_tensor({L, 2 * i, H}, 41, 2, -0.5f, 0.5f);
  const Tensor w2 = random_tensor({L, H, i}, 41, 3, -0.5f, 0.5f);
  const Tensor dy = random_tensor({M, H}, 41, 4);  // loss = Σ y ⊙ dy
  const Tensor dw13_0 = random_tensor({L, 2 * i, H}, 41, 5);
  const Tensor dw2_0 = random_tensor({L, H, i}, 41, 6);

  cpu::ExpertsSaved saved;
  const Tensor y = cpu::experts_forward(x, c.offsets, w13, w2, &saved);
  std::vector<double> xd = to_double(x), w13d = to_double(w13), w2d = to_double(w2);
  EXPECT_TRUE(close(y, to_tensor(ref_forward(c, xd, w13d, w2d), {M, H}), kF32Dot));
  EXPECT_EQ(saved.h_M2i.shape(), (Shape{M, 2 * i}));
  EXPECT_EQ(saved.a_Mi.shape(), (Shape{M, i}));
  EXPECT_TRUE(moetp::testing::bit_equal(cpu::experts_forward(x, c.offsets, w13, w2, nullptr), y));

  Tensor dx = Tensor::full<float>({M, H}, NAN);  // overwritten
  Tensor dw13 = dw13_0.clone(), dw2 = dw2_0.clone();
  cpu::experts_backward(dy, x, c.offsets, w13, w2, saved, dx, dw13, dw2);

  const std::vector<double> r = to_double(dy);
  auto loss = [&] {
    const std::vector<double> yd = ref_forward(c, xd, w13d, w2d);
    double total = 0;
    for (size_t k = 0; k < yd.size(); ++k) total += yd[k] * r[k];
    return total;
  };
  EXPECT_TRUE(grad_close(dx, Tensor(), xd, loss)) << "dx";
  EXPECT_TRUE(grad_close(dw13, dw13_0, w13d, loss)) << "dw13";
  EXPECT_TRUE(grad_close(dw2, dw2_0, w2d, loss)) << "dw2";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CpuExpertsGrad,
    ::testing::Values(ExpertsCase{"ragged_with_empty_expert_M7_H5_i3_L4", 5, 3, {0, 2, 2, 6, 7}},
                      ExpertsCase{"all_rows_on_one_expert_M7_H5_i3_L3", 5, 3, {0, 0, 7, 7}},
                      ExpertsCase{"single_expert_M7_H5_i3_L1", 5, 3, {0, 7}},
                      ExpertsCase{"smallest_M1_H1_i1_L1", 1, 1, {0, 1}},
                      ExpertsCase{"real_M100_H64_i48_L4", 64, 48, {0, 23, 60, 60, 100}}),
    [](const ::testing::TestParamInfo<ExpertsCase>& info) { return info.param.name; });

TEST(CpuExperts, EmptyBatchIsLegal) {
  const std::vector<int64_t> offsets = {0, 0};  // M = 0, L = 1
  const Tensor x = Tensor::zeros({0, 3}, DType::kF32);
  const Tensor w13 = random_tensor({1, 4, 3}, 42, 1);
  const Tensor w2 = random_tensor({1, 3, 2}, 42, 2);
  cpu::ExpertsSaved saved;
  const Tensor y = cpu::experts_forward(x, offsets, w13, w2, &saved);
  EXPECT_EQ(y.shape(), (Shape{0, 3}));
  const Tensor dw13_0 = random_tensor({1, 4, 3}, 42, 3);
  const Tensor dw2_0 = random_tensor({1, 3, 2}, 42, 4);
  Tensor dx, dw13 = dw13_0.clone(), dw2 = dw2_0.clone();
  cpu::experts_backward(Tensor::zeros({0, 3}, DType::kF32), x, offsets, w13, w2, saved, dx, dw13, dw2);
  EXPECT_EQ(dx.shape(), (Shape{0, 3}));
  EXPECT_TRUE(moetp::testing::bit_equal(dw13, dw13_0));
  EXPECT_TRUE(moetp::testing::bit_equal(dw2, dw2_0));
}

// ---------------------------------------------------------------------------------------------
// Expert tensor parallelism: rank t holds gate rows [t·i, (t+1)·i) then up rows over the same range
// (InterleavedShard), and w2 columns [t·i, (t+1)·i). Σ_t y_t is the full expert's output.

Tensor shard_w13(const Tensor& w13_L2IH, int64_t T, int64_t t, bool fused_block_slicing) {
  const int64_t L = w13_L2IH.size(0), I = w13_L2IH.size(1) / 2, H = w13_L2IH.size(2), i = I / T;
  Tensor out = Tensor::empty({L, 2 * i, H}, DType::kF32);
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t r = 0; r < 2 * i; ++r) {
      // The wrong layout slices the fused [2I] block as one piece: rank 0 gets only gate rows.
      const int64_t src = fused_block_slicing ? t * 2 * i + r : (r < i ? t * i + r : I + t * i + (r - i));
      out.narrow_rows(j, 1).view({2 * i, H}).narrow_rows(r, 1).copy_from(
          w13_L2IH.narrow_rows(j, 1).view({2 * I, H}).narrow_rows(src, 1));
    }
  }
  return out;
}

Tensor shard_w2(const Tensor& w2_LHI, int64_t T, int64_t t) {
  const int64_t i = w2_LHI.size(2) / T;
  return w2_LHI.slice(2, t * i, (t + 1) * i).contiguous();
}

// kF32Parallel's 1e-5 relative bound for parallel layouts (docs/moe.md, Tolerances), relative to
// the reference's scale (its max |value|):
// summing T partials reorders f32 sums, so entries near zero carry absolute, not relative, error.
Tolerance scale_relative(double rel, const Tensor& reference) {
  double scale = 0;
  for (float v : reference.to_vector<float>()) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  return Tolerance{rel, scale};
}

void add_into(Tensor& acc, const Tensor& v) {
  for (int64_t k = 0; k < acc.numel(); ++k) acc.data<float>()[k] += v.data<float>()[k];
}

TEST(CpuExperts, TensorParallelShardsSumToFullExpert) {
  struct Setup {
    int64_t H, I, T;
    std::vector<int64_t> offsets;
  };
  for (const Setup& s : {Setup{5, 6, 2, {0, 4, 4, 9}}, Setup{5, 6, 3, {0, 4, 4, 9}},
                         Setup{64, 96, 2, {0, 23, 60, 60, 100}}}) {
    SCOPED_TRACE("H=" + std::to_string(s.H) + " I=" + std::to_string(s.I) + " T=" + std::to_string(s.T));
    const int64_t L = static_cast<int64_t>(s.offsets.size()) - 1, M = s.offsets.back(), H = s.H, I = s.I;
    const Tensor x = random_tensor({M, H}, 43, 1);
    const Tensor w13 = random_tensor({L, 2 * I, H}, 43, 2, -0.5f, 0.5f);
    const Tensor w2 = random_tensor({L, H, I}, 43, 3, -0.5f, 0.5f);
    const Tensor dy = random_tensor({M, H}, 43, 4);
    cpu::ExpertsSaved saved;
    const Tensor y = cpu::experts_forward(x, s.offsets, w13, w2, &saved);
    Tensor dx, dw13 = Tensor::zeros({L, 2 * I, H}, DType::kF32), dw2 = Tensor::zeros({L, H, I}, DType::kF32);
    cpu::experts_backward(dy, x, s.offsets, w13, w2, saved, dx, dw13, dw2);

    Tensor y_sum = Tensor::zeros({M, H}, DType::kF32), y_wrong = Tensor::zeros({M, H}, DType::kF32);
    Tensor dx_sum = Tensor::zeros({M, H}, DType::kF32);
    for (int64_t t = 0; t < s.T; ++t) {
      const Tensor w13_t = shard_w13(w13, s.T, t, false), w2_t = shard_w2(w2, s.T, t);
      cpu::ExpertsSaved saved_t;
      add_into(y_sum, cpu::experts_forward(x, s.offsets, w13_t, w2_t, &saved_t));
      add_into(y_wrong, cpu::experts_forward(x, s.offsets, shard_w13(w13, s.T, t, true), w2_t, nullptr));
      Tensor dx_t, dw13_t = Tensor::zeros(w13_t.shape(), DType::kF32), dw2_t = Tensor::zeros(w2_t.shape(), DType::kF32);
      cpu::experts_backward(dy, x, s.offsets, w13_t, w2_t, saved_t, dx_t, dw13_t, dw2_t);
      add_into(dx_sum, dx_t);
      // Each shard's weight gradients are the matching slices of the full ones.
      const Tensor dw13_slice = shard_w13(dw13, s.T, t, false), dw2_slice = shard_w2(dw2, s.T, t);
      EXPECT_TRUE(close(dw13_t, dw13_slice, scale_relative(1e-5, dw13_slice))) << "dw13 t=" << t;
      EXPECT_TRUE(close(dw2_t, dw2_slice, scale_relative(1e-5, dw2_slice))) << "dw2 t=" << t;
    }
    EXPECT_TRUE(close(y_sum, y, scale_relative(1e-5, y)));
    EXPECT_TRUE(close(dx_sum, dx, scale_relative(1e-5, dx)));
    EXPECT_FALSE(close(y_wrong, y, scale_relative(1e-2, y))) << "fused-block slicing must not match";
  }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU by hand.

TEST(CpuExperts, SwigluByHandAndFiniteForLargeInputs) {
  // One row, i = 4: gate = [0, 1, -100, 100], up = [2, 3, 5, 1].
  const Tensor h = Tensor::from_vector<float>({0, 1, -100, 100, 2, 3, 5, 1}, {1, 8});
  const double s1 = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT_TRUE(close(cpu::swiglu_forward(h), to_tensor({0.0, 3.0 * s1, -500.0 / (1.0 + std::exp(100.0)), 100.0}, {1, 4}),
                    moetp::testing::kF32Exactish));
  const Tensor dh = cpu::swiglu_backward(h, Tensor::from_vector<float>({1, 1, 1, 1}, {1, 4}));
  // dgate = up · s · (1 + g · (1 − s)), dup = g · s.
  const std::vector<double> expected = {2.0 * 0.5, 3.0 * s1 * (1.0 + (1.0 - s1)), 0.0, 1.0, 0.0, s1, 0.0, 100.0};
  const std::vector<float> got = dh.to_vector<float>();
  for (size_t k = 0; k < expected.size(); ++k) {
    EXPECT_TRUE(std::isfinite(got[k])) << k;
    EXPECT_NEAR(got[k], expected[k], 1e-6 * std::max(1.0, std::fabs(expected[k]))) << k;
  }
}

TEST(CpuExperts, SwigluBackwardMatchesFiniteDifferences) {
  const int64_t M = 3, i = 4;
  const Tensor h = random_tensor({M, 2 * i}, 44, 1, -4.0f, 4.0f);
  const Tensor da = random_tensor({M, i}, 44, 2);
  std::vector<double> hd = to_double(h);
  const std::vector<double> r = to_double(da);
  auto loss = [&] {
    double total = 0;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < i; ++c) {
        const double g = hd[m * 2 * i + c], u = hd[m * 2 * i + i + c];
        total += g / (1.0 + std::exp(-g)) * u * r[m * i + c];
      }
    }
    return total;
  };
  EXPECT_TRUE(grad_close(cpu::swiglu_backward(h, da), Tensor(), hd, loss));
}

// ---------------------------------------------------------------------------------------------
// Errors quote the values.

TEST(CpuExperts, RejectsBadArguments) {
  const Tensor x = random_tensor({7, 5}, 45, 1);
  const Tensor w13 = random_tensor({2, 6, 5}, 45, 2);
  const Tensor w2 = random_tensor({2, 5, 3}, 45, 3);
  const std::vector<int64_t> good = {0, 3, 7};
  expect_error([&] { cpu::experts_forward(x, std::vector<int64_t>{0, 2, 6}, w13, w2, nullptr); },
               {"offsets end at 6 (offsets[2])", "M = 7"});
  expect_error([&] { cpu::experts_forward(x, std::vector<int64_t>{1, 2, 7}, w13, w2, nullptr); },
               {"offsets[0] = 1"});
  expect_error([&] { cpu::experts_forward(x, std::vector<int64_t>{0, 5, 2, 7}, random_tensor({3, 6, 5}, 45, 4),
                                          random_tensor({3, 5, 3}, 45, 5), nullptr); },
               {"local expert 1: 5 > 2"});
  expect_error([&] { cpu::experts_forward(x, good, random_tensor({2, 5, 5}, 45, 6), w2, nullptr); },
               {"w13_L2iH must be (L, 2i, H) = [2, 6, 5]", "i = 3", "got f32[2, 5, 5]"});
  expect_error([&] { cpu::experts_forward(x, good, w13, random_tensor({2, 4, 3}, 45, 7), nullptr); },
               {"w2_LHi must be (L, H, i) = (2, 5, i)", "got f32[2, 4, 3]"});
  Tensor dx, dw13 = Tensor::zeros({2, 6, 5}, DType::kF32), dw2 = Tensor::zeros({2, 5, 3}, DType::kF32), none;
  cpu::ExpertsSaved saved;
  expect_error([&] { cpu::experts_backward(x, x, good, w13, w2, saved, dx, dw13, dw2); }, {"saved.h_M2i"});
  cpu::experts_forward(x, good, w13, w2, &saved);
  expect_error([&] { cpu::experts_backward(x, x, good, w13, w2, saved, dx, none, dw2); }, {"dw13_L2iH", "undefined"});
  expect_error([&] { cpu::experts_backward(random_tensor({7, 4}, 45, 8), x, good, w13, w2, saved, dx, dw13, dw2); },
               {"dy_MH", "[7, 5]", "f32[7, 4]"});
}

}  // namespace
}  // namespace moetp
