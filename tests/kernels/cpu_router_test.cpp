// CPU router (etp_spec §5.1): forward by hand (ties to the lower expert id, norm_topk_prob on/off),
// backward against central finite differences of a double-precision re-implementation, the
// load-balancing loss against a direct double-precision port of transformers'
// load_balancing_loss_func, and argument errors.
//
// Shape legend: N tokens, H hidden, E experts, K top-k, L MoE layers.
#include "kernels/cpu/router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
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

// f32 kernel gradient vs central differences of the fp64 function (whose own error is ~1e-10):
// relative 1e-4, or absolute 1e-6 where the gradient is below 1e-2.

// Central differences of loss() w.r.t. every element of p (restored afterwards).
// Row softmax in double.
std::vector<double> softmax_rows(const std::vector<double>& logits, int64_t rows, int64_t E) {
  std::vector<double> p(logits.size());
  for (int64_t r = 0; r < rows; ++r) {
    const double mx = *std::max_element(logits.begin() + r * E, logits.begin() + (r + 1) * E);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += p[r * E + e] = std::exp(logits[r * E + e] - mx);
    for (int64_t e = 0; e < E; ++e) p[r * E + e] /= sum;
  }
  return p;
}

// Top-K per row, descending, ties to the lower id.
std::vector<int32_t> topk_rows(const std::vector<double>& probs, int64_t rows, int64_t E, int64_t K) {
  std::vector<int32_t> idx(rows * K);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    const double* p = probs.data() + r * E;
    std::stable_sort(order.begin(), order.end(), [p](int32_t a, int32_t b) { return p[a] > p[b]; });
    std::copy(order.begin(), order.begin() + K, idx.begin() + r * K);
  }
  return idx;
}

// ---------------------------------------------------------------------------------------------
// Forward by hand. wg = identity, so logits = x exactly.

Tensor identity(int64_t n) {
  Tensor t = Tensor::zeros({n, n}, DType::kF32);
  for (int64_t i = 0; i < n; ++i) t.data<float>()[i * n + i] = 1.0f;
  return t;
}

// Token 0: probs 0.1 0.2 0.3 0.4; token 1: a tie for first between experts 1 and 2; token 2: all
// equal; token 3: one winner and a three-way tie for second place.
Tensor hand_logits() {
  return Tensor::from_vector<float>({std::log(1.0f), std::log(2.0f), std::log(3.0f), std::log(4.0f),  //
                                     1, 3, 3, 0,                                                      //
                                     2, 2, 2, 2,                                                      //
                                     5, 0, 0, 0},
                                    {4, 4});
}

TEST(CpuRouter, ForwardByHandBreaksTiesToLowerExpertId) {
  const Tensor x = hand_logits();
  const cpu::RouterForward fwd = cpu::router_forward(x, identity(4), 2, false);
  EXPECT_TRUE(moetp::testing::bit_equal(fwd.logits_NE, x));
  EXPECT_EQ(fwd.topk_idx_NK.to_vector<int32_t>(), (std::vector<int32_t>{3, 2, 1, 2, 0, 1, 0, 1}));
  const std::vector<double> probs = softmax_rows(to_double(x), 4, 4);
  EXPECT_TRUE(close(fwd.probs_NE, to_tensor(probs, {4, 4}), moetp::testing::kF32Exactish));
  const std::vector<double> weights = {probs[3], probs[2], probs[5], probs[6], 0.25, 0.25, probs[12], probs[13]};
  EXPECT_TRUE(close(fwd.topk_weight_NK, to_tensor(weights, {4, 2}), moetp::testing::kF32Exactish));
  EXPECT_NEAR(weights[0], 0.4, 1e-7);
}

TEST(CpuRouter, NormTopkProbRenormalisesSelectedWeights) {
  const cpu::RouterForward off = cpu::router_forward(hand_logits(), identity(4), 2, false);
  const cpu::RouterForward on = cpu::router_forward(hand_logits(), identity(4), 2, true);
  EXPECT_TRUE(moetp::testing::bit_equal(on.topk_idx_NK, off.topk_idx_NK));
  EXPECT_TRUE(moetp::testing::bit_equal(on.probs_NE, off.probs_NE));
  const std::vector<double> expected = {4.0 / 7, 3.0 / 7, 0.5, 0.5, 0.5, 0.5, 0, 0};
  std::vector<float> w = on.topk_weight_NK.to_vector<float>();
  for (int k = 0; k < 6; ++k) EXPECT_NEAR(w[k], expected[k], 1e-6) << "slot " << k;
  const std::vector<float> raw = off.topk_weight_NK.to_vector<float>();
  EXPECT_NEAR(w[6], raw[6] / (raw[6] + raw[7]), 1e-7);
  for (int n = 0; n < 4; ++n) EXPECT_NEAR(w[2 * n] + w[2 * n + 1], 1.0, 1e-6) << "token " << n;
}

TEST(CpuRouter, StatsCountTokenSlotsAndSumProbabilities) {
  const cpu::RouterForward fwd = cpu::router_forward(hand_logits(), identity(4), 2, true);
  Tensor counts, prob_sum;
  cpu::router_stats(fwd, counts, prob_sum);
  EXPECT_EQ(counts.to_vector<float>(), (std::vector<float>{2, 3, 2, 1}));  // Σ = N·K = 8
  const std::vector<double> probs = softmax_rows(to_double(hand_logits()), 4, 4);
  std::vector<double> col(4, 0.0);
  for (int n = 0; n < 4; ++n) {
    for (int e = 0; e < 4; ++e) col[e] += probs[n * 4 + e];
  }
  EXPECT_TRUE(close(prob_sum, to_tensor(col, {4}), moetp::testing::kF32Exactish));
}

// ---------------------------------------------------------------------------------------------
// Backward vs finite differences. Loss = Σ topk_weight ⊙ R1 (+ Σ probs ⊙ R2), the selection held
// at the forward's top-k (the gradient of a piecewise-constant choice is zero).

struct RouterCase {
  int64_t N, H, E, K;
  bool norm, with_dprobs;
};

std::string router_case_name(const ::testing::TestParamInfo<RouterCase>& info) {
  const RouterCase& c = info.param;
  return "N" + std::to_string(c.N) + "_H" + std::to_string(c.H) + "_E" + std::to_string(c.E) + "_K" +
         std::to_string(c.K) + "_norm" + std::to_string(c.norm) + "_dprobs" + std::to_string(c.with_dprobs);
}

void PrintTo(const RouterCase& c, std::ostream* os) {
  *os << router_case_name(::testing::TestParamInfo<RouterCase>(c, 0));
}

class CpuRouterGrad : public ::testing::TestWithParam<RouterCase> {};

TEST_P(CpuRouterGrad, BackwardMatchesFiniteDifferences) {
  const RouterCase c = GetParam();
  const Tensor x = random_tensor({c.N, c.H}, 11, 1);
  const Tensor wg = random_tensor({c.E, c.H}, 11, 2);
  const Tensor r1 = random_tensor({c.N, c.K}, 11, 3);
  const Tensor r2 = random_tensor({c.N, c.E}, 11, 4);
  const Tensor dwg0 = random_tensor({c.E, c.H}, 11, 5);
  const cpu::RouterForward fwd = cpu::router_forward(x, wg, c.K, c.norm);
  const std::vector<int32_t> idx = fwd.topk_idx_NK.to_vector<int32_t>();

  std::vector<double> xd = to_double(x), wd = to_double(wg);
  const std::vector<double> r1d = to_double(r1), r2d = to_double(r2);
  auto loss = [&] {
    std::vector<double> logits(c.N * c.E, 0.0);
    for (int64_t n = 0; n < c.N; ++n) {
      for (int64_t e = 0; e < c.E; ++e) {
        for (int64_t h = 0; h < c.H; ++h) logits[n * c.E + e] += xd[n * c.H + h] * wd[e * c.H + h];
      }
    }
    const std::vector<double> p = softmax_rows(logits, c.N, c.E);
    double total = 0;
    for (int64_t n = 0; n < c.N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < c.K; ++k) s += p[n * c.E + idx[n * c.K + k]];
      for (int64_t k = 0; k < c.K; ++k) {
        const double w = p[n * c.E + idx[n * c.K + k]] / (c.norm ? s : 1.0);
        total += w * r1d[n * c.K + k];
      }
      if (c.with_dprobs) {
        for (int64_t e = 0; e < c.E; ++e) total += p[n * c.E + e] * r2d[n * c.E + e];
      }
    }
    return total;
  };
  // The fp64 re-implementation computes the same forward.
  EXPECT_TRUE(close(fwd.probs_NE, to_tensor(softmax_rows(to_double(fwd.logits_NE), c.N, c.E), {c.N, c.E}),
                    moetp::testing::kF32Exactish));
  const std::vector<double> dx_fd = central_diff(xd, loss);
  std::vector<double> dwg_fd = central_diff(wd, loss);
  const std::vector<float> dwg0v = dwg0.to_vector<float>();
  for (size_t j = 0; j < dwg_fd.size(); ++j) dwg_fd[j] += dwg0v[j];  // dwg accumulates

  Tensor dx = Tensor::full<float>({c.N, c.H}, NAN);  // overwritten
  Tensor dwg = dwg0.clone();
  cpu::router_backward(x, wg, fwd, c.norm, r1, c.with_dprobs ? r2 : Tensor(), dx, dwg);
  EXPECT_TRUE(close(dx, to_tensor(dx_fd, {c.N, c.H}), kGradCheck));
  EXPECT_TRUE(close(dwg, to_tensor(dwg_fd, {c.E, c.H}), kGradCheck));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuRouterGrad,
                         ::testing::Values(RouterCase{5, 6, 7, 3, false, false}, RouterCase{5, 6, 7, 3, true, false},
                                           RouterCase{5, 6, 7, 3, false, true}, RouterCase{5, 6, 7, 3, true, true},
                                           RouterCase{3, 4, 5, 1, true, true}, RouterCase{3, 4, 5, 5, true, true},
                                           RouterCase{1, 1, 2, 1, false, false}),
                         router_case_name);

// ---------------------------------------------------------------------------------------------
// Load-balancing loss.

// transformers' load_balancing_loss_func (attention_mask = None), ported to fp64: concatenate the
// layers' gate logits, softmax, top-K, one_hot, means over rows. topk_fixed, when given, replaces the
// top-K of these logits (used by finite differences, where the selection must not move).
double hf_load_balancing_loss(const std::vector<std::vector<double>>& layer_logits, int64_t N, int64_t E, int64_t K,
                              const std::vector<int32_t>* topk_fixed) {
  std::vector<double> cat;  // [L·N, E]
  for (const auto& l : layer_logits) cat.insert(cat.end(), l.begin(), l.end());
  const int64_t rows = static_cast<int64_t>(layer_logits.size()) * N;
  const std::vector<double> routing_weights = softmax_rows(cat, rows, E);
  const std::vector<int32_t> selected = topk_fixed ? *topk_fixed : topk_rows(routing_weights, rows, E, K);
  std::vector<double> tokens_per_expert(K * E, 0.0);  // mean over rows of one_hot [rows, K, E]
  std::vector<double> router_prob_per_expert(E, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < K; ++k) tokens_per_expert[k * E + selected[r * K + k]] += 1.0 / rows;
    for (int64_t e = 0; e < E; ++e) router_prob_per_expert[e] += routing_weights[r * E + e] / rows;
  }
  double overall = 0;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t e = 0; e < E; ++e) overall += tokens_per_expert[k * E + e] * router_prob_per_expert[e];
  }
  return overall * E;
}

struct AuxSetup {
  static constexpr int64_t kLayers = 2, N = 6, H = 4, E = 5, K = 2;
  std::vector<Tensor> x, wg;
  std::vector<cpu::RouterForward> fwd;
  AuxSetup() {
    for (int64_t l = 0; l < kLayers; ++l) {
      x.push_back(random_tensor({N, H}, 21, 10 + l, -2.0f, 2.0f));
      wg.push_back(random_tensor({E, H}, 21, 20 + l));
      fwd.push_back(cpu::router_forward(x[l], wg[l], K, true));
    }
  }
  std::vector<std::vector<double>> logits() const {
    std::vector<std::vector<double>> out;
    for (const auto& f : fwd) out.push_back(to_double(f.logits_NE));
    return out;
  }
  std::vector<int32_t> topk_cat() const {
    std::vector<int32_t> out;
    for (const auto& f : fwd) {
      const std::vector<int32_t> v = f.topk_idx_NK.to_vector<int32_t>();
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }
};

TEST(CpuRouter, AuxLossFromStatsMatchesTransformersFormula) {
  const AuxSetup s;
  const int64_t E = AuxSetup::E;
  Tensor counts = Tensor::zeros({E}, DType::kF32), prob_sum = Tensor::zeros({E}, DType::kF32);
  Tensor counts_split = Tensor::zeros({E}, DType::kF32), prob_sum_split = Tensor::zeros({E}, DType::kF32);
  for (int64_t l = 0; l < AuxSetup::kLayers; ++l) {
    Tensor c, p;
    cpu::router_stats(s.fwd[l], c, p);
    for (int64_t e = 0; e < E; ++e) {
      counts.data<float>()[e] += c.data<float>()[e];
      prob_sum.data<float>()[e] += p.data<float>()[e];
    }
    // The same tokens on two "ranks" of 2 and 4 tokens: global stats are sums of local ones.
    for (auto [start, len] : {std::pair<int64_t, int64_t>{0, 2}, {2, 4}}) {
      Tensor cr, pr;
      cpu::router_stats(cpu::router_forward(s.x[l].narrow_rows(start, len), s.wg[l], AuxSetup::K, true), cr, pr);
      for (int64_t e = 0; e < E; ++e) {
        counts_split.data<float>()[e] += cr.data<float>()[e];
        prob_sum_split.data<float>()[e] += pr.data<float>()[e];
      }
    }
  }
  const std::vector<std::vector<double>> logits = s.logits();
  const double expected = hf_load_balancing_loss(logits, AuxSetup::N, E, AuxSetup::K, nullptr);
  const std::vector<double> cat(logits[0].begin(), logits[0].end());
  EXPECT_EQ(topk_rows(softmax_rows(cat, AuxSetup::N, E), AuxSetup::N, E, AuxSetup::K),
            s.fwd[0].topk_idx_NK.to_vector<int32_t>());
  const double aux = cpu::aux_loss_from_stats(counts, prob_sum, AuxSetup::kLayers, AuxSetup::N);
  EXPECT_NEAR(aux, expected, 1e-6 * expected);
  EXPECT_NEAR(cpu::aux_loss_from_stats(counts_split, prob_sum_split, AuxSetup::kLayers, AuxSetup::N), expected,
              1e-6 * expected);
  EXPECT_GT(expected, 0.5);  // ≈ K when balanced; a real value, not zero
}

TEST(CpuRouter, AuxLossGradientMatchesFiniteDifferencesThroughSoftmax) {
  const AuxSetup s;
  const int64_t E = AuxSetup::E, N = AuxSetup::N;
  Tensor counts = Tensor::zeros({E}, DType::kF32);
  for (const auto& f : s.fwd) {
    Tensor c, p;
    cpu::router_stats(f, c, p);
    for (int64_t e = 0; e < E; ++e) counts.data<float>()[e] += c.data<float>()[e];
  }
  std::vector<std::vector<double>> logits = s.logits();
  const std::vector<int32_t> topk = s.topk_cat();
  for (int64_t l = 0; l < AuxSetup::kLayers; ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const Tensor d_probs = cpu::aux_loss_grad_probs(counts, E, AuxSetup::kLayers, N, 1.0f, N);
    const Tensor dlogits = cpu::router_logits_grad(s.fwd[l], true, Tensor(), d_probs);
    const std::vector<double> fd =
        central_diff(logits[l], [&] { return hf_load_balancing_loss(logits, N, E, AuxSetup::K, &topk); });
    EXPECT_TRUE(close(dlogits, to_tensor(fd, {N, E}), kGradCheck));
  }
}

TEST(CpuRouter, AuxLossGradProbsScalesGlobalCountsForLocalRows) {
  const Tensor counts = Tensor::from_vector<float>({3, 0, 9, 12}, {4});
  const int64_t L = 3, N = 8, N_local = 3;  // Σ counts = L·N·K with K = 1
  const Tensor d = cpu::aux_loss_grad_probs(counts, 4, L, N, 0.01f, N_local);
  ASSERT_EQ(d.shape(), (Shape{N_local, 4}));
  const double scale = 0.01 * 4 / (24.0 * 24.0);
  std::vector<double> expected;
  for (int64_t n = 0; n < N_local; ++n) {
    for (double c : {3.0, 0.0, 9.0, 12.0}) expected.push_back(scale * c);
  }
  EXPECT_TRUE(close(d, to_tensor(expected, {N_local, 4}), moetp::testing::kF32Exactish));
  EXPECT_EQ(cpu::aux_loss_grad_probs(counts, 4, L, N, 0.01f, 0).shape(), (Shape{0, 4}));
}

// ---------------------------------------------------------------------------------------------
// Errors quote the values.

TEST(CpuRouter, RejectsBadArguments) {
  const Tensor x = random_tensor({3, 4}, 31, 1);
  const Tensor wg = random_tensor({4, 4}, 31, 2);
  expect_error([&] { cpu::router_forward(x, wg, 5, true); }, {"K (5)", "E (4)"});
  expect_error([&] { cpu::router_forward(x, wg, 0, true); }, {"K (0)", "E (4)"});
  expect_error([&] { cpu::router_forward(x, random_tensor({4, 3}, 31, 3), 2, true); },
               {"f32[4, 3]", "f32[3, 4]", "H = 4"});
  Tensor x_nan = x.clone();
  x_nan.data<float>()[1 * 4 + 0] = NAN;  // poisons every logit of token 1; expert 0 is found first
  expect_error([&] { cpu::router_forward(x_nan, wg, 2, true); },
               {"router logits contain NaN/Inf at token 1, expert 0: nan"});
  // Overflow to +inf at token 1, expert 2 only.
  const Tensor x_big = Tensor::from_vector<float>({0.5f, -0.5f, 1, 1}, {2, 2});
  const Tensor wg_big = Tensor::from_vector<float>({1, 0, 0, 1, 3e38f, 3e38f}, {3, 2});
  expect_error([&] { cpu::router_forward(x_big, wg_big, 2, true); },
               {"router logits contain NaN/Inf at token 1, expert 2: inf"});

  const cpu::RouterForward fwd = cpu::router_forward(x, wg, 2, true);
  Tensor dx, dwg = Tensor::zeros({4, 4}, DType::kF32);
  expect_error([&] { cpu::router_backward(x, wg, fwd, true, random_tensor({3, 3}, 31, 4), Tensor(), dx, dwg); },
               {"d_topk_weight_NK", "[3, 2]", "f32[3, 3]"});
  Tensor undefined;
  expect_error([&] { cpu::router_backward(x, wg, fwd, true, Tensor(), Tensor(), dx, undefined); },
               {"dwg_EH must be defined", "[4, 4]"});
  expect_error([&] { cpu::aux_loss_grad_probs(Tensor::zeros({3}, DType::kF32), 4, 1, 1, 1.0f, 1); },
               {"f32[3]", "num_experts (4)"});
}

}  // namespace
}  // namespace moetp
