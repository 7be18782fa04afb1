// Attention one (document, query head) at a time: an (L, L) score matrix from one OpenBLAS GEMM over
// strided head rows (row stride Q·D or G·D, so no repacking), the causal softmax row by row, and a
// second GEMM for the output. Backward recomputes the probabilities from the saved log-sum-exp (the
// layout a flash-attention kernel saves, so both backends share AttentionSaved) and accumulates the
// key/value gradients of a group's query heads with beta = 1 GEMMs.
#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <span>
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

void check_document_offsets(std::span<const int64_t> doc_offsets, int64_t N, const char* what) {
  MOETP_CHECK(!doc_offsets.empty() && doc_offsets.front() == 0 && doc_offsets.back() == N,
              "{}: document offsets must start at 0 and end at N = B·S = {} (got {} offsets, first {}, last {})", what,
              N, doc_offsets.size(), doc_offsets.empty() ? -1 : doc_offsets.front(),
              doc_offsets.empty() ? -1 : doc_offsets.back());
  for (size_t i = 1; i < doc_offsets.size(); ++i) {
    MOETP_CHECK(doc_offsets[i] > doc_offsets[i - 1], "{}: document {} is empty or reversed (offsets {} -> {})", what,
                i - 1, doc_offsets[i - 1], doc_offsets[i]);
  }
}

bool documents_are_rows(std::span<const int64_t> doc_offsets, int64_t B, int64_t S) {
  if (static_cast<int64_t>(doc_offsets.size()) != B + 1) return false;
  for (int64_t b = 0; b <= B; ++b) {
    if (doc_offsets[static_cast<size_t>(b)] != b * S) return false;
  }
  return true;
}

std::vector<int64_t> attention_documents(const AttentionDims& d, std::span<const int64_t> doc_offsets) {
  if (doc_offsets.empty()) {
    std::vector<int64_t> rows(static_cast<size_t>(d.B + 1));
    for (int64_t b = 0; b <= d.B; ++b) rows[static_cast<size_t>(b)] = b * d.S;
    return rows;
  }
  check_document_offsets(doc_offsets, d.B * d.S, "attention");
  return {doc_offsets.begin(), doc_offsets.end()};
}

Tensor attention_forward(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD, AttentionSaved* saved,
                         std::span<const int64_t> doc_offsets) {
  const AttentionDims d = check_attention_shapes(q_BSQD, k_BSGD, v_BSGD);
  check_f32_inputs(q_BSQD, k_BSGD, v_BSGD);
  const std::vector<int64_t> docs = attention_documents(d, doc_offsets);
  const int64_t S = d.S, Q = d.Q, G = d.G, D = d.D, group = d.Q / d.G;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  Tensor out_BSQD = Tensor::empty({d.B, S, Q, D}, DType::kF32);
  Tensor lse_BQS = Tensor::empty({d.B, Q, S}, DType::kF32);
  const float* q = q_BSQD.data<float>();
  const float* k = k_BSGD.data<float>();
  const float* v = v_BSGD.data<float>();
  float* out = out_BSQD.data<float>();
  float* lse = lse_BQS.data<float>();

  std::vector<float> p;  // scores, then probabilities, of one (document, head)
  for (size_t doc = 0; doc + 1 < docs.size(); ++doc) {
    const int64_t t0 = docs[doc], L = docs[doc + 1] - t0;  // tokens t0 .. t0 + L - 1 of the flat (B·S) stream
    p.resize(static_cast<size_t>(L * L));
    for (int64_t qh = 0; qh < Q; ++qh) {
      const int64_t g = qh / group;
      const float* q_h = q + t0 * Q * D + qh * D;  // row i at q_h + i·Q·D
      const float* k_g = k + t0 * G * D + g * D;   // row j at k_g + j·G·D
      const float* v_g = v + t0 * G * D + g * D;
      gemm(false, true, L, L, D, scale, q_h, Q * D, k_g, G * D, 0.0f, p.data(), L);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < L; ++i) {
        float* row = p.data() + i * L;
        const float row_max = *std::max_element(row, row + i + 1);
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          row[j] = std::exp(row[j] - row_max);
          sum += row[j];
        }
        const float inv_sum = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv_sum;
        std::fill(row + i + 1, row + L, 0.0f);  // causal mask: exp(−inf) = 0
        const int64_t t = t0 + i;
        lse[(t / S * Q + qh) * S + t % S] = static_cast<float>(row_max + std::log(sum));
      }
      gemm(false, false, L, D, L, 1.0f, p.data(), L, v_g, G * D, 0.0f, out + t0 * Q * D + qh * D, Q * D);
    }
  }
  if (saved != nullptr) saved->lse_BQS = std::move(lse_BQS);
  return out_BSQD;
}

void attention_backward(const Tensor& dout_BSQD, const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD,
                        const AttentionSaved& saved, Tensor& dq_BSQD, Tensor& dk_BSGD, Tensor& dv_BSGD,
                        std::span<const int64_t> doc_offsets) {
  const AttentionDims d = check_attention_shapes(q_BSQD, k_BSGD, v_BSGD);
  check_f32_inputs(q_BSQD, k_BSGD, v_BSGD);
  const std::vector<int64_t> docs = attention_documents(d, doc_offsets);
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

  std::vector<float> p, ds;
  for (size_t doc = 0; doc + 1 < docs.size(); ++doc) {
    const int64_t t0 = docs[doc], L = docs[doc + 1] - t0;
    p.resize(static_cast<size_t>(L * L));
    ds.resize(static_cast<size_t>(L * L));
    for (int64_t qh = 0; qh < Q; ++qh) {
      const int64_t g = qh / group;
      const int64_t q_off = t0 * Q * D + qh * D, kv_off = t0 * G * D + g * D;
      gemm(false, true, L, L, D, scale, q + q_off, Q * D, k + kv_off, G * D, 0.0f, p.data(), L);
      gemm(false, true, L, L, D, 1.0f, dout + q_off, Q * D, v + kv_off, G * D, 0.0f, ds.data(), L);  // dP
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < L; ++i) {
        float* p_row = p.data() + i * L;
        float* ds_row = ds.data() + i * L;
        const int64_t t = t0 + i;
        const float row_lse = lse[(t / S * Q + qh) * S + t % S];
        double p_dot_dp = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          p_row[j] = std::exp(p_row[j] - row_lse);
          p_dot_dp += static_cast<double>(p_row[j]) * ds_row[j];
        }
        const float row_term = static_cast<float>(p_dot_dp);
        for (int64_t j = 0; j <= i; ++j) ds_row[j] = p_row[j] * (ds_row[j] - row_term);
        std::fill(p_row + i + 1, p_row + L, 0.0f);
        std::fill(ds_row + i + 1, ds_row + L, 0.0f);
      }
      gemm(false, false, L, D, L, scale, ds.data(), L, k + kv_off, G * D, 0.0f, dq + q_off, Q * D);
      gemm(true, false, L, D, L, scale, ds.data(), L, q + q_off, Q * D, 1.0f, dk + kv_off, G * D);
      gemm(true, false, L, D, L, 1.0f, p.data(), L, dout + q_off, Q * D, 1.0f, dv + kv_off, G * D);
    }
  }
}

}  // namespace moetp::cpu
