// Attention one (sequence, query head) at a time: an (S, S) score matrix from one OpenBLAS GEMM over
// strided head rows (row stride Q·D or G·D, so no repacking), the causal softmax row by row, and a
// second GEMM for the output. Backward recomputes the probabilities from the saved log-sum-exp (the
// layout a flash-attention kernel saves, so both backends share AttentionSaved) and accumulates the
// key/value gradients of a group's query heads with beta = 1 GEMMs.
#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

namespace {

void check_f32_inputs(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD) {
  check_f32_cpu(q_BSQD, 4, "attention q_BSQD");
  check_f32_cpu(k_BSGD, 4, "attention k_BSGD");
  check_f32_cpu(v_BSGD, 4, "attention v_BSGD");
}

// Output (or gradient) of shape `shape`: allocated when undefined, else checked.
void prepare_output(Tensor& t, const Shape& shape, const char* name) {
  if (!t.defined()) t = Tensor::empty(shape, DType::kF32);
  check_f32_cpu(t, 4, name);
  check_shape(t, shape, name);
}

}  // namespace

AttentionDims check_attention_shapes(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD) {
  MOETP_CHECK(q_BSQD.defined() && q_BSQD.ndim() == 4, "attention: q_BSQD must be (B, S, Q, D), got {}",
              q_BSQD.describe());
  AttentionDims d;
  d.B = q_BSQD.size(0);
  d.S = q_BSQD.size(1);
  d.Q = q_BSQD.size(2);
  d.D = q_BSQD.size(3);
  MOETP_CHECK(k_BSGD.defined() && k_BSGD.ndim() == 4 && k_BSGD.size(0) == d.B && k_BSGD.size(1) == d.S &&
                  k_BSGD.size(3) == d.D,
              "attention: k_BSGD must be (B, S, G, D) = ({}, {}, G, {}) (from q_BSQD {}), got {}", d.B, d.S, d.D,
              q_BSQD.describe(), k_BSGD.describe());
  d.G = k_BSGD.size(2);
  MOETP_CHECK(v_BSGD.defined() && v_BSGD.shape() == k_BSGD.shape(), "attention: v_BSGD {} must match k_BSGD {}",
              v_BSGD.describe(), k_BSGD.describe());
  MOETP_CHECK(d.D >= 1, "attention: head_dim D must be >= 1, got q_BSQD {}", q_BSQD.describe());
  MOETP_CHECK(d.G >= 1 && d.Q % d.G == 0,
              "attention: num_q_heads Q ({}) must be a multiple of num_kv_heads G ({}) (q_BSQD {}, k_BSGD {})", d.Q,
              d.G, q_BSQD.describe(), k_BSGD.describe());
  return d;
}

Tensor attention_forward(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD, AttentionSaved* saved) {
  const AttentionDims d = check_attention_shapes(q_BSQD, k_BSGD, v_BSGD);
  check_f32_inputs(q_BSQD, k_BSGD, v_BSGD);
  const int64_t S = d.S, Q = d.Q, G = d.G, D = d.D, group = d.Q / d.G;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  Tensor out_BSQD = Tensor::empty({d.B, S, Q, D}, DType::kF32);
  Tensor lse_BQS = Tensor::empty({d.B, Q, S}, DType::kF32);
  const float* q = q_BSQD.data<float>();
  const float* k = k_BSGD.data<float>();
  const float* v = v_BSGD.data<float>();
  float* out = out_BSQD.data<float>();
  float* lse = lse_BQS.data<float>();

  std::vector<float> p(static_cast<size_t>(S * S));  // scores, then probabilities, of one head
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t qh = 0; qh < Q; ++qh) {
      const int64_t g = qh / group;
      const float* q_h = q + b * S * Q * D + qh * D;  // row s at q_h + s·Q·D
      const float* k_g = k + b * S * G * D + g * D;   // row s at k_g + s·G·D
      const float* v_g = v + b * S * G * D + g * D;
      float* lse_h = lse + (b * Q + qh) * S;
      gemm(false, true, S, S, D, scale, q_h, Q * D, k_g, G * D, 0.0f, p.data(), S);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < S; ++i) {
        float* row = p.data() + i * S;
        const float row_max = *std::max_element(row, row + i + 1);
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          row[j] = std::exp(row[j] - row_max);
          sum += row[j];
        }
        const float inv_sum = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv_sum;
        std::fill(row + i + 1, row + S, 0.0f);  // causal mask: exp(−inf) = 0
        lse_h[i] = static_cast<float>(row_max + std::log(sum));
      }
      gemm(false, false, S, D, S, 1.0f, p.data(), S, v_g, G * D, 0.0f, out + b * S * Q * D + qh * D, Q * D);
    }
  }
  if (saved != nullptr) saved->lse_BQS = std::move(lse_BQS);
  return out_BSQD;
}

void attention_backward(const Tensor& dout_BSQD, const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD,
                        const AttentionSaved& saved, Tensor& dq_BSQD, Tensor& dk_BSGD, Tensor& dv_BSGD) {
  const AttentionDims d = check_attention_shapes(q_BSQD, k_BSGD, v_BSGD);
  check_f32_inputs(q_BSQD, k_BSGD, v_BSGD);
  const int64_t S = d.S, Q = d.Q, G = d.G, D = d.D, group = d.Q / d.G;
  check_f32_cpu(dout_BSQD, 4, "attention dout_BSQD");
  check_shape(dout_BSQD, q_BSQD.shape(), "attention dout_BSQD");
  check_f32_cpu(saved.lse_BQS, 3, "attention saved.lse_BQS (from attention_forward)");
  check_shape(saved.lse_BQS, {d.B, Q, S}, "attention saved.lse_BQS");
  prepare_output(dq_BSQD, q_BSQD.shape(), "attention dq_BSQD");
  prepare_output(dk_BSGD, k_BSGD.shape(), "attention dk_BSGD");
  prepare_output(dv_BSGD, v_BSGD.shape(), "attention dv_BSGD");
  dk_BSGD.zero_();  // the group's query heads accumulate into it
  dv_BSGD.zero_();

  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const float* dout = dout_BSQD.data<float>();
  const float* q = q_BSQD.data<float>();
  const float* k = k_BSGD.data<float>();
  const float* v = v_BSGD.data<float>();
  const float* lse = saved.lse_BQS.data<float>();
  float* dq = dq_BSQD.data<float>();
  float* dk = dk_BSGD.data<float>();
  float* dv = dv_BSGD.data<float>();

  std::vector<float> p(static_cast<size_t>(S * S)), ds(static_cast<size_t>(S * S));
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t qh = 0; qh < Q; ++qh) {
      const int64_t g = qh / group;
      const int64_t q_off = b * S * Q * D + qh * D, kv_off = b * S * G * D + g * D;
      const float* lse_h = lse + (b * Q + qh) * S;
      gemm(false, true, S, S, D, scale, q + q_off, Q * D, k + kv_off, G * D, 0.0f, p.data(), S);
      gemm(false, true, S, S, D, 1.0f, dout + q_off, Q * D, v + kv_off, G * D, 0.0f, ds.data(), S);  // dP
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < S; ++i) {
        float* p_row = p.data() + i * S;
        float* ds_row = ds.data() + i * S;
        double p_dot_dp = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          p_row[j] = std::exp(p_row[j] - lse_h[i]);
          p_dot_dp += static_cast<double>(p_row[j]) * ds_row[j];
        }
        const float row_term = static_cast<float>(p_dot_dp);
        for (int64_t j = 0; j <= i; ++j) ds_row[j] = p_row[j] * (ds_row[j] - row_term);
        std::fill(p_row + i + 1, p_row + S, 0.0f);
        std::fill(ds_row + i + 1, ds_row + S, 0.0f);
      }
      gemm(false, false, S, D, S, scale, ds.data(), S, k + kv_off, G * D, 0.0f, dq + q_off, Q * D);
      gemm(true, false, S, D, S, scale, ds.data(), S, q + q_off, Q * D, 1.0f, dk + kv_off, G * D);
      gemm(true, false, S, D, S, 1.0f, p.data(), S, dout + q_off, Q * D, 1.0f, dv + kv_off, G * D);
    }
  }
}

}  // namespace moetp::cpu
