// CUDA causal grouped-query attention against the CPU reference (kernels/cpu/attention.h) run on the
// same bf16-rounded inputs in f32: forward output (bf16) and saved lse (f32, 1e-3 relative).
// Backward: dq, dk, dv (bf16, written over NaN-filled buffers) against an fp64 flash-attention-2
// reference that takes delta = rowsum(dout ⊙ out) from the GPU's bf16 `out`, as the kernel does, and
// against the CPU spec, whose delta is rowsum(P ⊙ dP) of the exact softmax (spec_tolerance).
// Tolerances per kernel: the f32 kernel (D other than 64 / 128) is held to testing::kBF16 and, against
// the spec, kAttnFlashVsSpec; the tensor-core kernels (D = 64, 128) round P and dS to bf16 as mma
// operands, an error of about 2^-9 of each product that does not cancel in near-zero outputs, so they
// get kAttnTensorCore (2% relative, or 0.5% of the tensor's largest element) and kAttnTensorCoreVsSpec (1% of
// the largest element). Every tile configuration of the tensor-core kernels (the benchmark's
// alternatives) is held to the same references. Causality: changing a future key/value leaves every
// earlier output and lse bit-identical. Errors name the unsupported head_dim.
// Label `cuda`: skips with a message where no GPU is visible.
// Cases: both kernels; GQA ratios 1, 2, 4, 8 (MHA, MQA); S = 1, S below, at and past the tiles
// (64 / 128 rows and keys), several tiles with a partial last one (77, 200, 300, 520); B = 1, 2;
// D = 128, 64 (tensor cores), 96, 40, 16 (f32, both of its tile widths; 16 is the tiny preset's
// head_dim).
//
// Shape legend: B sequences, S tokens per sequence, Q query heads, G key/value heads, D head_dim.
#include "kernels/cuda/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/runtime.h"
#include "testing.h"

namespace moetp {
namespace {

using moetp::testing::close;
using moetp::testing::random_tensor;
using moetp::testing::Tolerance;

using testing::kAttnFlashVsSpec;
using testing::kAttnLse;
using testing::kAttnTensorCore;
using testing::kAttnTensorCoreVsSpec;

Tolerance kernel_tolerance(int64_t D) {
  return cuda::launch::attention_uses_tensor_cores(D) ? kAttnTensorCore : testing::kBF16;
}
Tolerance spec_tolerance(int64_t D) {
  return cuda::launch::attention_uses_tensor_cores(D) ? kAttnTensorCoreVsSpec : kAttnFlashVsSpec;
}

struct AttnCase {
  std::string name;
  int64_t B, S, Q, G, D;
};
void PrintTo(const AttnCase& c, std::ostream* os) { *os << c.name; }

// f32 CPU tensor -> the same values rounded through bf16 (what the GPU sees), still f32.
Tensor round_bf16(const Tensor& t) { return t.to(DType::kBF16).to(DType::kF32); }
Tensor to_gpu_bf16(const Tensor& t) { return t.to(DType::kBF16).to(Device::kCuda); }
Tensor nan_gpu_bf16(Shape shape) {
  return to_gpu_bf16(Tensor::full<float>(std::move(shape), std::numeric_limits<float>::quiet_NaN()));
}

struct Inputs {
  Tensor q, k, v, dout;  // f32 CPU, already bf16-rounded
};

Inputs make_inputs(const AttnCase& c, uint64_t seed) {
  Inputs in;
  // Scores q·k·scale of standard deviation ~1.3: softmax rows that are neither flat nor one-hot.
  in.q = round_bf16(random_tensor({c.B, c.S, c.Q, c.D}, seed, 1, -2.0f, 2.0f));
  in.k = round_bf16(random_tensor({c.B, c.S, c.G, c.D}, seed, 2, -2.0f, 2.0f));
  in.v = round_bf16(random_tensor({c.B, c.S, c.G, c.D}, seed, 3));
  in.dout = round_bf16(random_tensor({c.B, c.S, c.Q, c.D}, seed, 4));
  return in;
}

struct Grads {
  Tensor dq, dk, dv;  // f32 CPU, shapes of q, k, v
};

// fp64 flash-attention-2 backward on f32 inputs: the exact causal softmax P, dP = dout · vᵀ, and
// dS = P ⊙ (dP − delta) with delta = rowsum(dout ⊙ out) taken from the given `out_BSQD` (the GPU's
// bf16 forward output), as the CUDA kernel computes it.
Grads fa2_reference(const AttnCase& c, const Inputs& in, const Tensor& out_BSQD) {
  const int64_t B = c.B, S = c.S, Q = c.Q, G = c.G, D = c.D, group = c.Q / c.G;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const std::vector<float> q = in.q.to_vector<float>(), k = in.k.to_vector<float>(), v = in.v.to_vector<float>();
  const std::vector<float> dout = in.dout.to_vector<float>();
  const std::vector<float> out = out_BSQD.to(Device::kCpu).to(DType::kF32).to_vector<float>();
  std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
  auto qi_at = [&](int64_t b, int64_t s, int64_t h) { return ((b * S + s) * Q + h) * D; };
  auto kj_at = [&](int64_t b, int64_t s, int64_t g) { return ((b * S + s) * G + g) * D; };
  std::vector<double> p(static_cast<size_t>(S)), dp(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Q; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t qo = qi_at(b, i, h);
        double row_max = -INFINITY, sum = 0.0, delta = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          const int64_t ko = kj_at(b, j, g);
          double s_ij = 0.0, dp_ij = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            s_ij += static_cast<double>(q[qo + d]) * k[ko + d];
            dp_ij += static_cast<double>(dout[qo + d]) * v[ko + d];
          }
          p[j] = s_ij * scale;
          dp[j] = dp_ij;
          row_max = std::max(row_max, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - row_max));
        for (int64_t d = 0; d < D; ++d) delta += static_cast<double>(dout[qo + d]) * out[qo + d];
        for (int64_t j = 0; j <= i; ++j) {
          const int64_t ko = kj_at(b, j, g);
          const double p_ij = p[j] / sum;
          const double ds = p_ij * (dp[j] - delta);
          for (int64_t d = 0; d < D; ++d) {
            dq[qo + d] += scale * ds * k[ko + d];
            dk[ko + d] += scale * ds * q[qo + d];
            dv[ko + d] += p_ij * dout[qo + d];
          }
        }
      }
    }
  }
  auto to_f32 = [](const std::vector<double>& x, const Shape& shape) {
    return Tensor::from_vector(std::vector<float>(x.begin(), x.end()), shape);
  };
  return {to_f32(dq, in.q.shape()), to_f32(dk, in.k.shape()), to_f32(dv, in.v.shape())};
}

// close(), except that an all-zero reference (dq and dk when S = 1: one key, P = 1, dS = 0) asks for
// |actual| <= 1e-4 instead.
::testing::AssertionResult close_or_zero(const Tensor& actual, const Tensor& expected, Tolerance tol) {
  if (!testing::all_zero(expected.to_vector<float>())) return close(actual, expected, tol);
  const std::vector<float> a = actual.to(Device::kCpu).to(DType::kF32).to_vector<float>();
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(std::fabs(a[i]) <= 1e-4f)) {
      return ::testing::AssertionFailure() << "reference is zero but element " << i << " is " << a[i];
    }
  }
  return ::testing::AssertionSuccess();
}

class CudaAttention : public ::testing::TestWithParam<AttnCase> {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

TEST_P(CudaAttention, ForwardMatchesCpu) {
  const AttnCase c = GetParam();
  const Inputs in = make_inputs(c, 11);
  cpu::AttentionSaved saved;
  const Tensor ref = cpu::attention_forward(in.q, in.k, in.v, &saved);

  Tensor lse;
  const Tensor out = cuda::attention_forward(to_gpu_bf16(in.q), to_gpu_bf16(in.k), to_gpu_bf16(in.v), &lse);
  ASSERT_EQ(out.dtype(), DType::kBF16);
  ASSERT_EQ(out.device(), Device::kCuda);
  EXPECT_TRUE(close(out, ref, kernel_tolerance(c.D))) << c.name << " out";
  ASSERT_TRUE(lse.defined());
  EXPECT_TRUE(close(lse, saved.lse_BQS, kAttnLse)) << c.name << " lse";

  // lse may be omitted.
  const Tensor out2 = cuda::attention_forward(to_gpu_bf16(in.q), to_gpu_bf16(in.k), to_gpu_bf16(in.v), nullptr);
  EXPECT_TRUE(testing::bit_equal(out2, out)) << c.name;
}

TEST_P(CudaAttention, BackwardMatchesCpu) {
  const AttnCase c = GetParam();
  const Inputs in = make_inputs(c, 23);
  cpu::AttentionSaved saved;
  cpu::attention_forward(in.q, in.k, in.v, &saved);
  Tensor dq_ref, dk_ref, dv_ref;
  cpu::attention_backward(in.dout, in.q, in.k, in.v, saved, dq_ref, dk_ref, dv_ref);

  const Tensor q = to_gpu_bf16(in.q), k = to_gpu_bf16(in.k), v = to_gpu_bf16(in.v), dout = to_gpu_bf16(in.dout);
  Tensor lse;
  const Tensor out = cuda::attention_forward(q, k, v, &lse);
  // Preallocated outputs full of NaN: every element must be overwritten.
  Tensor dq = nan_gpu_bf16(q.shape()), dk = nan_gpu_bf16(k.shape()), dv = nan_gpu_bf16(v.shape());
  cuda::attention_backward(dout, q, k, v, out, lse, dq, dk, dv);
  const Grads fa2 = fa2_reference(c, in, out);
  const Tolerance tol = kernel_tolerance(c.D);
  EXPECT_TRUE(close_or_zero(dq, fa2.dq, tol)) << c.name << " dq vs fa2_reference";
  EXPECT_TRUE(close_or_zero(dk, fa2.dk, tol)) << c.name << " dk vs fa2_reference";
  EXPECT_TRUE(close(dv, fa2.dv, tol)) << c.name << " dv vs fa2_reference";
  EXPECT_TRUE(close_or_zero(dq, dq_ref, spec_tolerance(c.D))) << c.name << " dq vs cpu";
  EXPECT_TRUE(close_or_zero(dk, dk_ref, spec_tolerance(c.D))) << c.name << " dk vs cpu";
  EXPECT_TRUE(close(dv, dv_ref, tol)) << c.name << " dv vs cpu";

  // Undefined outputs are allocated; dk and dv (no atomics) are reproducible bit for bit.
  Tensor dq2, dk2, dv2;
  cuda::attention_backward(dout, q, k, v, out, lse, dq2, dk2, dv2);
  ASSERT_TRUE(dq2.defined() && dk2.defined() && dv2.defined());
  EXPECT_EQ(dq2.dtype(), DType::kBF16);
  EXPECT_TRUE(close_or_zero(dq2, fa2.dq, tol)) << c.name << " dq (allocated)";
  EXPECT_TRUE(testing::bit_equal(dk2, dk)) << c.name;
  EXPECT_TRUE(testing::bit_equal(dv2, dv)) << c.name;

  // Deterministic (key tiles add dq in order): the same bits on every run, the same references.
  Tensor dq3, dk3, dv3, dq4, dk4, dv4;
  cuda::attention_backward(dout, q, k, v, out, lse, dq3, dk3, dv3, nullptr, true);
  for (int run = 0; run < 3; ++run) {
    cuda::attention_backward(dout, q, k, v, out, lse, dq4, dk4, dv4, nullptr, true);
    EXPECT_TRUE(testing::bit_equal(dq4, dq3)) << c.name << " deterministic dq, run " << run;
  }
  EXPECT_TRUE(close_or_zero(dq3, fa2.dq, tol)) << c.name << " deterministic dq vs fa2_reference";
  EXPECT_TRUE(testing::bit_equal(dk3, dk)) << c.name << " deterministic dk";
  EXPECT_TRUE(testing::bit_equal(dv3, dv)) << c.name << " deterministic dv";
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaAttention,
                         ::testing::Values(  // tensor cores, head_dim 128
                             AttnCase{"B2_S77_Q8_G1_D128", 2, 77, 8, 1, 128},
                             AttnCase{"B1_S128_Q8_G8_D128", 1, 128, 8, 8, 128},
                             AttnCase{"B1_S1_Q8_G1_D128", 1, 1, 8, 1, 128},
                             AttnCase{"B2_S200_Q4_G1_D128", 2, 200, 4, 1, 128},
                             AttnCase{"B1_S300_Q8_G2_D128", 1, 300, 8, 2, 128},
                             // tensor cores, head_dim 64
                             AttnCase{"B2_S37_Q4_G2_D64", 2, 37, 4, 2, 64},
                             AttnCase{"B1_S1_Q2_G1_D64", 1, 1, 2, 1, 64},
                             AttnCase{"B2_S200_Q4_G4_D64", 2, 200, 4, 4, 64},
                             AttnCase{"B2_S77_Q8_G1_D64", 2, 77, 8, 1, 64},
                             AttnCase{"B1_S520_Q4_G1_D64", 1, 520, 4, 1, 64},
                             // f32 kernel
                             AttnCase{"B1_S70_Q2_G1_D40", 1, 70, 2, 1, 40},
                             AttnCase{"B2_S77_Q8_G1_D40", 2, 77, 8, 1, 40},
                             AttnCase{"B1_S150_Q4_G2_D96", 1, 150, 4, 2, 96},
                             AttnCase{"B2_S200_Q4_G2_D16", 2, 200, 4, 2, 16},
                             AttnCase{"B1_S1_Q2_G2_D16", 1, 1, 2, 2, 16}),
                         [](const ::testing::TestParamInfo<AttnCase>& info) { return info.param.name; });

// Every tile configuration of the tensor-core kernels (launch::attention_{forward,backward}_tc; the
// benchmark compares them and the fastest is the default) against the same references, through the
// launchers on NaN-filled outputs. The backward reads out and lse of the default forward.
class CudaAttentionTileConfigs : public ::testing::TestWithParam<AttnCase> {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

const uint16_t* bits(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data<bf16>()); }
uint16_t* bits(Tensor& t) { return reinterpret_cast<uint16_t*>(t.data<bf16>()); }

TEST_P(CudaAttentionTileConfigs, EveryConfigMatchesReferences) {
  namespace launch = cuda::launch;
  const AttnCase c = GetParam();
  ASSERT_TRUE(launch::attention_uses_tensor_cores(c.D));
  const Inputs in = make_inputs(c, 31);
  cpu::AttentionSaved saved;
  const Tensor ref = cpu::attention_forward(in.q, in.k, in.v, &saved);
  const Tensor q = to_gpu_bf16(in.q), k = to_gpu_bf16(in.k), v = to_gpu_bf16(in.v), dout = to_gpu_bf16(in.dout);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.D)));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int config = 0; config < launch::kAttentionForwardTcConfigs; ++config) {
    Tensor out = nan_gpu_bf16(q.shape());
    Tensor lse = Tensor::full<float>({c.B, c.Q, c.S}, nan).to(Device::kCuda);
    ASSERT_EQ(launch::attention_forward_tc(bits(q), bits(k), bits(v), bits(out), lse.data<float>(), c.B, c.S, c.Q,
                                           c.G, c.D, scale, nullptr, config),
              cudaSuccess);
    EXPECT_TRUE(close(out, ref, kAttnTensorCore)) << c.name << " out, forward config " << config;
    EXPECT_TRUE(close(lse, saved.lse_BQS, kAttnLse)) << c.name << " lse, forward config " << config;
  }
  Tensor lse;
  const Tensor out = cuda::attention_forward(q, k, v, &lse);
  const Grads fa2 = fa2_reference(c, in, out);
  for (int config = 0; config < launch::kAttentionBackwardTcConfigs; ++config) {
    Tensor delta = Tensor::full<float>({c.B, c.Q, c.S}, nan).to(Device::kCuda);
    Tensor dq_accum = Tensor::zeros(q.shape(), DType::kF32, Device::kCuda);
    Tensor dk = nan_gpu_bf16(k.shape()), dv = nan_gpu_bf16(v.shape());
    ASSERT_EQ(launch::attention_backward_delta(bits(dout), bits(out), delta.data<float>(), c.B, c.S, c.Q, c.D, nullptr),
              cudaSuccess);
    ASSERT_EQ(launch::attention_backward_tc(bits(dout), bits(q), bits(k), bits(v), lse.data<float>(),
                                            delta.data<float>(), dq_accum.data<float>(), bits(dk), bits(dv), c.B, c.S,
                                            c.Q, c.G, c.D, scale, nullptr, config),
              cudaSuccess);
    EXPECT_TRUE(close_or_zero(dq_accum, fa2.dq, kAttnTensorCore)) << c.name << " dq, backward config " << config;
    EXPECT_TRUE(close_or_zero(dk, fa2.dk, kAttnTensorCore)) << c.name << " dk, backward config " << config;
    EXPECT_TRUE(close(dv, fa2.dv, kAttnTensorCore)) << c.name << " dv, backward config " << config;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaAttentionTileConfigs,
                         ::testing::Values(AttnCase{"B2_S200_Q4_G2_D64", 2, 200, 4, 2, 64},
                                           AttnCase{"B1_S300_Q8_G1_D128", 1, 300, 8, 1, 128},
                                           AttnCase{"B1_S1_Q4_G1_D64", 1, 1, 4, 1, 64}),
                         [](const ::testing::TestParamInfo<AttnCase>& info) { return info.param.name; });

class CudaAttentionRules : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

// Packed documents (cu_seqlens over the flat B·S stream): lengths 1 to a few key tiles, tile-aligned
// and not, one continuing from row 0 into row 1, against the CPU reference with the same documents;
// the deterministic backward gives the same bits on every run. Tensor-core head dims only; the f32
// kernels refuse packed documents.
TEST_F(CudaAttentionRules, PackedDocumentsMatchCpu) {
  for (const int64_t D : {int64_t{128}, int64_t{64}}) {
    const AttnCase c{"packed_D" + std::to_string(D), 2, 300, 8, 2, D};
    SCOPED_TRACE(c.name);
    const std::vector<int64_t> docs = {0, 1, 64, 65, 200, 371, 372, 500, 600};
    const Inputs in = make_inputs(c, 31);
    cpu::AttentionSaved saved;
    const Tensor ref = cpu::attention_forward(in.q, in.k, in.v, &saved, docs);
    Tensor dq_ref, dk_ref, dv_ref;
    cpu::attention_backward(in.dout, in.q, in.k, in.v, saved, dq_ref, dk_ref, dv_ref, docs);

    const Tensor docs_gpu = Tensor::from_vector<int64_t>(docs, {static_cast<int64_t>(docs.size())}).to(Device::kCuda);
    const Tensor q = to_gpu_bf16(in.q), k = to_gpu_bf16(in.k), v = to_gpu_bf16(in.v), dout = to_gpu_bf16(in.dout);
    Tensor lse;
    const Tensor out = cuda::attention_forward(q, k, v, &lse, nullptr, docs_gpu);
    EXPECT_TRUE(close(out, ref, kernel_tolerance(D))) << "out";
    EXPECT_TRUE(close(lse, saved.lse_BQS, kAttnLse)) << "lse";
    Tensor dq = nan_gpu_bf16(q.shape()), dk = nan_gpu_bf16(k.shape()), dv = nan_gpu_bf16(v.shape());
    cuda::attention_backward(dout, q, k, v, out, lse, dq, dk, dv, nullptr, false, docs_gpu);
    EXPECT_TRUE(close_or_zero(dq, dq_ref, spec_tolerance(D))) << "dq";
    EXPECT_TRUE(close_or_zero(dk, dk_ref, spec_tolerance(D))) << "dk";
    EXPECT_TRUE(close(dv, dv_ref, kernel_tolerance(D))) << "dv";
    Tensor dq1, dk1, dv1, dq2, dk2, dv2;
    cuda::attention_backward(dout, q, k, v, out, lse, dq1, dk1, dv1, nullptr, true, docs_gpu);
    cuda::attention_backward(dout, q, k, v, out, lse, dq2, dk2, dv2, nullptr, true, docs_gpu);
    EXPECT_TRUE(testing::bit_equal(dq2, dq1)) << "deterministic dq";
    EXPECT_TRUE(close_or_zero(dq1, dq_ref, spec_tolerance(D))) << "deterministic dq vs cpu";
  }
  // The f32 kernels (other head dims) refuse packed documents.
  const Tensor q = to_gpu_bf16(random_tensor({1, 8, 2, 16}, 32, 1)), kv = to_gpu_bf16(random_tensor({1, 8, 1, 16}, 32, 2));
  const Tensor docs = Tensor::from_vector<int64_t>({0, 3, 8}, {3}).to(Device::kCuda);
  testing::expect_error([&] { cuda::attention_forward(q, kv, kv, nullptr, nullptr, docs); },
                        {"packed documents need the tensor-core kernels", "head_dim is 16"});
}

// Rows before `t` (in a tile shared with t, and in earlier tiles) must not see key/value t; for
// each kernel (D = 64, 128: tensor cores; 40: f32).
TEST_F(CudaAttentionRules, FutureKeysDoNotChangeEarlierRows) {
  for (const int64_t D : {int64_t{64}, int64_t{128}, int64_t{40}}) {
    const AttnCase c{"B2_S150_Q4_G2_D" + std::to_string(D), 2, 150, 4, 2, D};
    const int64_t t = 100;
    Inputs in = make_inputs(c, 5);
    Tensor lse1, lse2;
    const Tensor q = to_gpu_bf16(in.q);
    const Tensor out1 = cuda::attention_forward(q, to_gpu_bf16(in.k), to_gpu_bf16(in.v), &lse1).to(Device::kCpu);
    float* kp = in.k.data<float>();
    float* vp = in.v.data<float>();
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t e = 0; e < c.G * c.D; ++e) {
        kp[(b * c.S + t) * c.G * c.D + e] = 3.0f;
        vp[(b * c.S + t) * c.G * c.D + e] = -5.0f;
      }
    }
    const Tensor out2 = cuda::attention_forward(q, to_gpu_bf16(in.k), to_gpu_bf16(in.v), &lse2).to(Device::kCpu);
    for (int64_t b = 0; b < c.B; ++b) {
      EXPECT_TRUE(testing::bit_equal(out2.slice(0, b, b + 1).slice(1, 0, t).contiguous(),
                                     out1.slice(0, b, b + 1).slice(1, 0, t).contiguous()))
          << c.name << " b=" << b;
      EXPECT_FALSE(testing::bit_equal(out2.slice(0, b, b + 1).slice(1, t, c.S).contiguous(),
                                      out1.slice(0, b, b + 1).slice(1, t, c.S).contiguous()))
          << c.name << " b=" << b << ": rows >= t should see the change";
    }
    const Tensor l1 = lse1.to(Device::kCpu), l2 = lse2.to(Device::kCpu);
    EXPECT_TRUE(testing::bit_equal(l2.slice(2, 0, t).contiguous(), l1.slice(2, 0, t).contiguous())) << c.name;
  }
}

// Which D take which kernel (attention.h): tensor cores for 64 and 128, f32 for the rest.
TEST_F(CudaAttentionRules, KernelChoiceByHeadDim) {
  for (int64_t D = 8; D <= 128; D += 8) {
    EXPECT_EQ(cuda::launch::attention_uses_tensor_cores(D), D == 64 || D == 128) << "D=" << D;
    EXPECT_FALSE(cuda::launch::attention_uses_tensor_cores(D, cuda::launch::AttentionKernel::kF32)) << "D=" << D;
  }
}

TEST_F(CudaAttentionRules, RejectsUnsupportedHeadDim) {
  for (int64_t D : {int64_t{136}, int64_t{12}, int64_t{4}}) {
    const Tensor q = Tensor::zeros({1, 4, 2, D}, DType::kBF16, Device::kCuda);
    const Tensor kv = Tensor::zeros({1, 4, 1, D}, DType::kBF16, Device::kCuda);
    try {
      cuda::attention_forward(q, kv, kv, nullptr);
      ADD_FAILURE() << "D=" << D << ": expected moetp::Error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("head_dim D = " + std::to_string(D)), std::string::npos) << e.what();
    }
  }
}

TEST_F(CudaAttentionRules, RejectsF32AndMismatchedHeads) {
  const Tensor q32 = Tensor::zeros({1, 4, 2, 64}, DType::kF32, Device::kCuda);
  const Tensor kv = Tensor::zeros({1, 4, 1, 64}, DType::kBF16, Device::kCuda);
  EXPECT_THROW(cuda::attention_forward(q32, kv, kv, nullptr), Error);
  const Tensor q3 = Tensor::zeros({1, 4, 3, 64}, DType::kBF16, Device::kCuda);
  const Tensor kv2 = Tensor::zeros({1, 4, 2, 64}, DType::kBF16, Device::kCuda);
  try {
    cuda::attention_forward(q3, kv2, kv2, nullptr);
    ADD_FAILURE() << "expected moetp::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Q (3) must be a multiple of num_kv_heads G (2)"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace moetp
