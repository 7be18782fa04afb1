// CPU causal grouped-query attention: forward and saved log-sum-exp against a naive fp64 softmax over
// masked scores, backward against central differences of the fp64 Σ out ⊙ R (dq, dk, dv overwritten
// over NaN), causality (a later token changes no earlier output, nor another sequence), GQA equal to
// multi-head attention on repeat_kv'd keys/values, S = 1, and errors quoting the shapes.
// Cases: GQA Q=4/G=2, MHA Q=G, MQA G=1, S=1, the smallest sizes and one larger shape.
//
// Shape legend: B sequences, S tokens per sequence, Q query heads, G key/value heads, D head_dim.
#include "kernels/cpu/attention.h"

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

struct AttnCase {
  std::string name;
  int64_t B, S, Q, G, D;
};
void PrintTo(const AttnCase& c, std::ostream* os) { *os << c.name; }

// Naive fp64 attention: scores with −inf above the diagonal, softmax over the whole row, P · v.
// lse_out (when given) receives log Σ exp(scores) per (b, head, i).
std::vector<double> ref_attention(const AttnCase& c, const std::vector<double>& q, const std::vector<double>& k,
                                  const std::vector<double>& v, std::vector<double>* lse_out = nullptr) {
  const int64_t S = c.S, Q = c.Q, G = c.G, D = c.D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> out(c.B * S * Q * D, 0.0), scores(S), p(S);
  if (lse_out) lse_out->assign(c.B * Q * S, 0.0);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t h = 0; h < Q; ++h) {
      const int64_t g = h / (Q / G);  // repeat_kv
      for (int64_t i = 0; i < S; ++i) {
        for (int64_t j = 0; j < S; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += q[((b * S + i) * Q + h) * D + d] * k[((b * S + j) * G + g) * D + d];
          scores[j] = j <= i ? s * scale : -INFINITY;
        }
        const double mx = *std::max_element(scores.begin(), scores.end());
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += p[j] = std::exp(scores[j] - mx);
        if (lse_out) (*lse_out)[(b * Q + h) * S + i] = mx + std::log(sum);
        for (int64_t j = 0; j < S; ++j) {
          for (int64_t d = 0; d < D; ++d) {
            out[((b * S + i) * Q + h) * D + d] += p[j] / sum * v[((b * S + j) * G + g) * D + d];
          }
        }
      }
    }
  }
  return out;
}

// Coordinates checked by finite differences: all of a small tensor, a fixed spread sample of a big one.
std::vector<int64_t> fd_coords(int64_t numel) {
  std::vector<int64_t> coords;
  if (numel <= 512) {
    for (int64_t x = 0; x < numel; ++x) coords.push_back(x);
  } else {
    for (int64_t x = 0; x < 48; ++x) coords.push_back((x * 7919 + 13) % numel);
  }
  return coords;
}

// Compares actual[coords] with d loss / d p[coords] by central differences.
template <typename Loss>
::testing::AssertionResult grad_close(const Tensor& actual, std::vector<double>& p, Loss&& loss) {
  const std::vector<int64_t> coords = fd_coords(static_cast<int64_t>(p.size()));
  const std::vector<float> a = actual.to_vector<float>();
  std::vector<double> got, expected;
  for (int64_t c : coords) {
    const double saved = p[c], h = 1e-6 * std::max(1.0, std::fabs(saved));
    p[c] = saved + h;
    const double plus = loss();
    p[c] = saved - h;
    const double minus = loss();
    p[c] = saved;
    got.push_back(a[c]);
    expected.push_back((plus - minus) / (2 * h));
  }
  const int64_t n = static_cast<int64_t>(coords.size());
  return close(to_tensor(got, {n}), to_tensor(expected, {n}), kGradCheck);
}

class CpuAttentionGrad : public ::testing::TestWithParam<AttnCase> {};

TEST_P(CpuAttentionGrad, ForwardMatchesNaiveFp64AndBackwardMatchesFiniteDifferences) {
  const AttnCase c = GetParam();
  const Tensor q = random_tensor({c.B, c.S, c.Q, c.D}, 81, 1, -2.0f, 2.0f);
  const Tensor k = random_tensor({c.B, c.S, c.G, c.D}, 81, 2, -2.0f, 2.0f);
  const Tensor v = random_tensor({c.B, c.S, c.G, c.D}, 81, 3);
  const Tensor dout = random_tensor({c.B, c.S, c.Q, c.D}, 81, 4);  // loss = Σ out ⊙ dout

  cpu::AttentionSaved saved;
  const Tensor out = cpu::attention_forward(q, k, v, &saved);
  std::vector<double> qd = to_double(q), kd = to_double(k), vd = to_double(v), lse_ref;
  EXPECT_TRUE(close(out, to_tensor(ref_attention(c, qd, kd, vd, &lse_ref), q.shape()), kF32Dot));
  EXPECT_TRUE(close(saved.lse_BQS, to_tensor(lse_ref, {c.B, c.Q, c.S}), kF32Dot));
  EXPECT_TRUE(moetp::testing::bit_equal(cpu::attention_forward(q, k, v, nullptr), out));

  Tensor dq = Tensor::full<float>(q.shape(), NAN);  // all three overwritten
  Tensor dk = Tensor::full<float>(k.shape(), NAN);
  Tensor dv = Tensor::full<float>(v.shape(), NAN);
  cpu::attention_backward(dout, q, k, v, saved, dq, dk, dv);
  const std::vector<double> r = to_double(dout);
  auto loss = [&] {
    const std::vector<double> o = ref_attention(c, qd, kd, vd);
    double total = 0;
    for (size_t x = 0; x < o.size(); ++x) total += o[x] * r[x];
    return total;
  };
  if (c.S == 1) {
    // A softmax over one key is constant 1: q and k get no gradient (checked exactly, over NaN).
    EXPECT_TRUE(moetp::testing::bit_equal(dq, Tensor::zeros(q.shape(), DType::kF32))) << "dq";
    EXPECT_TRUE(moetp::testing::bit_equal(dk, Tensor::zeros(k.shape(), DType::kF32))) << "dk";
  } else {
    EXPECT_TRUE(grad_close(dq, qd, loss)) << "dq";
    EXPECT_TRUE(grad_close(dk, kd, loss)) << "dk";
  }
  EXPECT_TRUE(grad_close(dv, vd, loss)) << "dv";

  Tensor dq2, dk2, dv2;  // undefined outputs are allocated; same numbers
  cpu::attention_backward(dout, q, k, v, saved, dq2, dk2, dv2);
  EXPECT_TRUE(moetp::testing::bit_equal(dq2, dq));
  EXPECT_TRUE(moetp::testing::bit_equal(dk2, dk));
  EXPECT_TRUE(moetp::testing::bit_equal(dv2, dv));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuAttentionGrad,
                         ::testing::Values(AttnCase{"gqa_B2_S5_Q4_G2_D3", 2, 5, 4, 2, 3},
                                           AttnCase{"mha_B1_S4_Q2_G2_D4", 1, 4, 2, 2, 4},
                                           AttnCase{"mha_B2_S3_Q4_G4_D2", 2, 3, 4, 4, 2},
                                           AttnCase{"mqa_B1_S6_Q4_G1_D2", 1, 6, 4, 1, 2},
                                           AttnCase{"single_token_B2_S1_Q4_G2_D3", 2, 1, 4, 2, 3},
                                           AttnCase{"smallest_B1_S1_Q1_G1_D1", 1, 1, 1, 1, 1},
                                           AttnCase{"larger_B2_S37_Q8_G2_D16", 2, 37, 8, 2, 16}),
                         [](const ::testing::TestParamInfo<AttnCase>& info) { return info.param.name; });

TEST(CpuAttention, LaterTokensDoNotChangeEarlierOutputsOrOtherSequences) {
  const int64_t B = 2, S = 6, Q = 4, G = 2, D = 3, t = 3;
  const Tensor q = random_tensor({B, S, Q, D}, 82, 1), k = random_tensor({B, S, G, D}, 82, 2);
  const Tensor v = random_tensor({B, S, G, D}, 82, 3);
  const Tensor out = cpu::attention_forward(q, k, v, nullptr);
  // Replace token t of sequence 0 in q, k and v.
  Tensor q2 = q.clone(), k2 = k.clone(), v2 = v.clone();
  q2.narrow_rows(0, 1).view({S, Q * D}).narrow_rows(t, 1).copy_from(random_tensor({1, Q * D}, 82, 4));
  k2.narrow_rows(0, 1).view({S, G * D}).narrow_rows(t, 1).copy_from(random_tensor({1, G * D}, 82, 5));
  v2.narrow_rows(0, 1).view({S, G * D}).narrow_rows(t, 1).copy_from(random_tensor({1, G * D}, 82, 6, 2.0f, 3.0f));
  const Tensor out2 = cpu::attention_forward(q2, k2, v2, nullptr);
  auto tokens = [&](const Tensor& o, int64_t b, int64_t s0, int64_t s1) {
    return o.narrow_rows(b, 1).view({S, Q * D}).slice(0, s0, s1).contiguous();
  };
  EXPECT_TRUE(moetp::testing::bit_equal(tokens(out2, 0, 0, t), tokens(out, 0, 0, t))) << "earlier tokens";
  EXPECT_TRUE(moetp::testing::bit_equal(tokens(out2, 1, 0, S), tokens(out, 1, 0, S))) << "other sequence";
  for (int64_t s = t; s < S; ++s) {
    EXPECT_FALSE(close(tokens(out2, 0, s, s + 1), tokens(out, 0, s, s + 1), Tolerance{1e-3, 1e-3}))
        << "token " << s << " must see the change";
  }
}

// repeat_kv: kv head g of (B, S, G, D) becomes heads g·rep … g·rep + rep − 1 of (B, S, G·rep, D).
Tensor repeat_kv(const Tensor& x_BSGD, int64_t rep) {
  const int64_t B = x_BSGD.size(0), S = x_BSGD.size(1), G = x_BSGD.size(2), D = x_BSGD.size(3);
  Tensor out = Tensor::empty({B, S, G * rep, D}, DType::kF32);
  for (int64_t bs = 0; bs < B * S; ++bs) {
    for (int64_t h = 0; h < G * rep; ++h) {
      std::copy_n(x_BSGD.data<float>() + (bs * G + h / rep) * D, D, out.data<float>() + (bs * G * rep + h) * D);
    }
  }
  return out;
}

// Σ over each group of rep heads: the adjoint of repeat_kv.
Tensor sum_groups(const Tensor& x_BSQD, int64_t rep) {
  const int64_t B = x_BSQD.size(0), S = x_BSQD.size(1), Q = x_BSQD.size(2), D = x_BSQD.size(3);
  Tensor out = Tensor::zeros({B, S, Q / rep, D}, DType::kF32);
  for (int64_t bs = 0; bs < B * S; ++bs) {
    for (int64_t h = 0; h < Q; ++h) {
      for (int64_t d = 0; d < D; ++d) {
        out.data<float>()[(bs * (Q / rep) + h / rep) * D + d] += x_BSQD.data<float>()[(bs * Q + h) * D + d];
      }
    }
  }
  return out;
}

TEST(CpuAttention, GroupedQueryEqualsMultiHeadOnRepeatedKeysAndValues) {
  const int64_t B = 2, S = 7, Q = 4, G = 2, D = 5, rep = Q / G;
  const Tensor q = random_tensor({B, S, Q, D}, 83, 1), k = random_tensor({B, S, G, D}, 83, 2);
  const Tensor v = random_tensor({B, S, G, D}, 83, 3), dout = random_tensor({B, S, Q, D}, 83, 4);
  const Tensor k_rep = repeat_kv(k, rep), v_rep = repeat_kv(v, rep);
  cpu::AttentionSaved saved, saved_rep;
  const Tensor out = cpu::attention_forward(q, k, v, &saved);
  const Tensor out_rep = cpu::attention_forward(q, k_rep, v_rep, &saved_rep);
  EXPECT_TRUE(close(out, out_rep, moetp::testing::kF32Exactish));
  Tensor dq, dk, dv, dq_rep, dk_rep, dv_rep;
  cpu::attention_backward(dout, q, k, v, saved, dq, dk, dv);
  cpu::attention_backward(dout, q, k_rep, v_rep, saved_rep, dq_rep, dk_rep, dv_rep);
  EXPECT_TRUE(close(dq, dq_rep, moetp::testing::kF32Exactish));
  EXPECT_TRUE(close(dk, sum_groups(dk_rep, rep), Tolerance{1e-5, 1e-6, 1e-3}));
  EXPECT_TRUE(close(dv, sum_groups(dv_rep, rep), Tolerance{1e-5, 1e-6, 1e-3}));
}

TEST(CpuAttention, SingleTokenOutputIsItsValue) {
  const int64_t B = 3, Q = 4, G = 2, D = 3;
  const Tensor q = random_tensor({B, 1, Q, D}, 84, 1), k = random_tensor({B, 1, G, D}, 84, 2);
  const Tensor v = random_tensor({B, 1, G, D}, 84, 3);
  const Tensor out = cpu::attention_forward(q, k, v, nullptr);
  EXPECT_TRUE(close(out, repeat_kv(v, Q / G), moetp::testing::kF32Exactish));
}

// Packed documents (cu_seqlens over the flat B·S stream, one of them continuing from row 0 into row
// 1): every document's output, lse and gradients are the bits of that document run alone.
TEST(CpuAttention, PackedDocumentsEqualEachDocumentAlone) {
  const int64_t B = 2, S = 10, Q = 4, G = 2, D = 8, N = B * S;
  const std::vector<int64_t> docs = {0, 3, 7, 14, 15, N};
  const Tensor q = random_tensor({B, S, Q, D}, 86, 1), k = random_tensor({B, S, G, D}, 86, 2);
  const Tensor v = random_tensor({B, S, G, D}, 86, 3), dout = random_tensor({B, S, Q, D}, 86, 4);
  cpu::AttentionSaved saved;
  const Tensor out = cpu::attention_forward(q, k, v, &saved, docs);
  Tensor dq, dk, dv;
  cpu::attention_backward(dout, q, k, v, saved, dq, dk, dv, docs);
  // Tokens [t0, t1) of a (B, S, h, D) tensor as (1, L, h, D).
  auto part = [&](const Tensor& x, int64_t t0, int64_t t1) {
    const int64_t h = x.size(2);
    return x.view({N, h * D}).slice(0, t0, t1).contiguous().view({1, t1 - t0, h, D});
  };
  const std::vector<float> lse = saved.lse_BQS.to_vector<float>();  // (B, Q, S)
  for (size_t d = 0; d + 1 < docs.size(); ++d) {
    const int64_t t0 = docs[d], t1 = docs[d + 1], L = t1 - t0;
    SCOPED_TRACE(::testing::Message() << "document " << d << " [" << t0 << ", " << t1 << ")");
    cpu::AttentionSaved s1;
    const Tensor o1 = cpu::attention_forward(part(q, t0, t1), part(k, t0, t1), part(v, t0, t1), &s1);
    EXPECT_TRUE(moetp::testing::bit_equal(part(out, t0, t1), o1));
    const std::vector<float> lse1 = s1.lse_BQS.to_vector<float>();  // (1, Q, L)
    for (int64_t h = 0; h < Q; ++h) {
      for (int64_t i = 0; i < L; ++i) {
        const int64_t t = t0 + i;
        EXPECT_EQ(lse[static_cast<size_t>((t / S * Q + h) * S + t % S)], lse1[static_cast<size_t>(h * L + i)]);
      }
    }
    Tensor dq1, dk1, dv1;
    cpu::attention_backward(part(dout, t0, t1), part(q, t0, t1), part(k, t0, t1), part(v, t0, t1), s1, dq1, dk1, dv1);
    EXPECT_TRUE(moetp::testing::bit_equal(part(dq, t0, t1), dq1));
    EXPECT_TRUE(moetp::testing::bit_equal(part(dk, t0, t1), dk1));
    EXPECT_TRUE(moetp::testing::bit_equal(part(dv, t0, t1), dv1));
  }
  // One document per row spelled out is the unpacked computation.
  EXPECT_TRUE(moetp::testing::bit_equal(cpu::attention_forward(q, k, v, nullptr, std::vector<int64_t>{0, S, N}),
                                        cpu::attention_forward(q, k, v, nullptr)));
}

TEST(CpuAttention, RejectsBadDocumentOffsets) {
  const Tensor q = random_tensor({2, 5, 2, 3}, 87, 1), k = random_tensor({2, 5, 1, 3}, 87, 2);
  expect_error([&] { cpu::attention_forward(q, k, k, nullptr, std::vector<int64_t>{0, 4, 9}); },
               {"must start at 0 and end at N = B·S = 10", "last 9"});
  expect_error([&] { cpu::attention_forward(q, k, k, nullptr, std::vector<int64_t>{0, 4, 4, 10}); },
               {"document 1 is empty or reversed (offsets 4 -> 4)"});
}

TEST(CpuAttention, EmptyBatchIsLegal) {
  const Tensor q = Tensor::empty({0, 4, 2, 3}, DType::kF32), kv = Tensor::empty({0, 4, 1, 3}, DType::kF32);
  cpu::AttentionSaved saved;
  const Tensor out = cpu::attention_forward(q, kv, kv, &saved);
  EXPECT_EQ(out.shape(), (Shape{0, 4, 2, 3}));
  Tensor dq, dk, dv;
  cpu::attention_backward(out, q, kv, kv, saved, dq, dk, dv);
  EXPECT_EQ(dk.shape(), (Shape{0, 4, 1, 3}));
}

TEST(CpuAttention, RejectsBadArguments) {
  const Tensor q = random_tensor({2, 5, 6, 3}, 85, 1);
  const Tensor k4 = random_tensor({2, 5, 4, 3}, 85, 2);
  expect_error([&] { cpu::attention_forward(q, k4, k4, nullptr); },
               {"num_q_heads Q (6) must be a multiple of num_kv_heads G (4)"});
  const Tensor k = random_tensor({2, 5, 2, 3}, 85, 3);
  expect_error([&] { cpu::attention_forward(q, random_tensor({2, 5, 2, 4}, 85, 4), k, nullptr); },
               {"k_BSGD must be (B, S, G, D) = (2, 5, G, 3)", "f32[2, 5, 2, 4]"});
  expect_error([&] { cpu::attention_forward(q, random_tensor({2, 4, 2, 3}, 85, 5), k, nullptr); },
               {"k_BSGD must be (B, S, G, D) = (2, 5, G, 3)", "f32[2, 4, 2, 3]"});
  expect_error([&] { cpu::attention_forward(q, k, random_tensor({2, 5, 3, 3}, 85, 6), nullptr); },
               {"v_BSGD f32[2, 5, 3, 3]", "must match k_BSGD f32[2, 5, 2, 3]"});
  expect_error([&] { cpu::attention_forward(random_tensor({10, 6, 3}, 85, 7), k, k, nullptr); },
               {"q_BSQD must be (B, S, Q, D)", "f32[10, 6, 3]"});
  cpu::AttentionSaved saved;
  Tensor dq, dk, dv;
  expect_error([&] { cpu::attention_backward(q, q, k, k, saved, dq, dk, dv); }, {"saved.lse_BQS", "undefined"});
  cpu::attention_forward(q, k, k, &saved);
  expect_error([&] { cpu::attention_backward(random_tensor({2, 5, 6, 2}, 85, 8), q, k, k, saved, dq, dk, dv); },
               {"dout_BSQD", "[2, 5, 6, 3]", "f32[2, 5, 6, 2]"});
  Tensor bad_dk = Tensor::zeros({2, 5, 6, 3}, DType::kF32);
  expect_error([&] { cpu::attention_backward(q, q, k, k, saved, dq, bad_dk, dv); },
               {"dk_BSGD", "[2, 5, 2, 3]", "f32[2, 5, 6, 3]"});
}

}  // namespace
}  // namespace moetp
