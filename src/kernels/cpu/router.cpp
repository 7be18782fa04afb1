// Router forward/backward and the load-balancing loss. Softmax and the small per-token reductions
// accumulate in double: this is the reference the CUDA kernels are held to.
#include "kernels/cpu/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

namespace {

void check_forward_result(const RouterForward& fwd) {
  check_f32_cpu(fwd.probs_NE, 2, "router fwd.probs_NE");
  const int64_t N = fwd.probs_NE.size(0);
  check_f32_cpu(fwd.topk_weight_NK, 2, "router fwd.topk_weight_NK");
  const int64_t K = fwd.topk_weight_NK.size(1);
  check_shape(fwd.topk_weight_NK, {N, K}, "router fwd.topk_weight_NK");
  check_dtype(fwd.topk_idx_NK, DType::kI32, "router fwd.topk_idx_NK");
  check_contiguous(fwd.topk_idx_NK, "router fwd.topk_idx_NK");
  check_shape(fwd.topk_idx_NK, {N, K}, "router fwd.topk_idx_NK");
}

}  // namespace

RouterForward router_forward(const Tensor& x_NH, const Tensor& wg_EH, int64_t K, bool norm_topk_prob) {
  check_f32_cpu(x_NH, 2, "router x_NH");
  check_f32_cpu(wg_EH, 2, "router wg_EH");
  const int64_t N = x_NH.size(0), H = x_NH.size(1), E = wg_EH.size(0);
  MOETP_CHECK(wg_EH.size(1) == H, "router: wg_EH {} does not match x_NH {} (hidden size H = {})", wg_EH.describe(),
              x_NH.describe(), H);
  MOETP_CHECK(K >= 1 && K <= E, "router: top-k K ({}) must be in [1, num_experts E ({})]", K, E);

  RouterForward fwd;
  fwd.logits_NE = linear(x_NH, wg_EH);
  const float* logits = fwd.logits_NE.data<float>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t e = 0; e < E; ++e) {
      const float v = logits[n * E + e];
      MOETP_CHECK(std::isfinite(v), "router logits contain NaN/Inf at token {}, expert {}: {}", n, e, v);
    }
  }

  fwd.probs_NE = Tensor::empty({N, E}, DType::kF32);
  fwd.topk_idx_NK = Tensor::empty({N, K}, DType::kI32);
  fwd.topk_weight_NK = Tensor::empty({N, K}, DType::kF32);
  float* probs = fwd.probs_NE.data<float>();
  int32_t* topk_idx = fwd.topk_idx_NK.data<int32_t>();
  float* topk_weight = fwd.topk_weight_NK.data<float>();

#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* l = logits + n * E;
    float* p = probs + n * E;
    const double max_logit = *std::max_element(l, l + E);
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(l[e]) - max_logit);
    for (int64_t e = 0; e < E; ++e) p[e] = static_cast<float>(std::exp(static_cast<double>(l[e]) - max_logit) / sum);

    // Top-K over the f32 probabilities: descending, ties to the lower expert id.
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    double selected_sum = 0.0;
    for (int64_t k = 0; k < K; ++k) selected_sum += p[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      topk_idx[n * K + k] = order[k];
      topk_weight[n * K + k] = norm_topk_prob ? static_cast<float>(p[order[k]] / selected_sum) : p[order[k]];
    }
  }
  return fwd;
}

Tensor router_logits_grad(const RouterForward& fwd, bool norm_topk_prob, const Tensor& d_topk_weight_NK,
                          const Tensor& d_probs_NE) {
  check_forward_result(fwd);
  const int64_t N = fwd.probs_NE.size(0), E = fwd.probs_NE.size(1), K = fwd.topk_idx_NK.size(1);
  if (d_topk_weight_NK.defined()) {
    check_f32_cpu(d_topk_weight_NK, 2, "router d_topk_weight_NK");
    check_shape(d_topk_weight_NK, {N, K}, "router d_topk_weight_NK");
  }
  if (d_probs_NE.defined()) {
    check_f32_cpu(d_probs_NE, 2, "router d_probs_NE");
    check_shape(d_probs_NE, {N, E}, "router d_probs_NE");
  }
  const float* probs = fwd.probs_NE.data<float>();
  const int32_t* topk_idx = fwd.topk_idx_NK.data<int32_t>();
  const float* topk_weight = fwd.topk_weight_NK.data<float>();
  const float* d_topk = d_topk_weight_NK.defined() ? d_topk_weight_NK.data<float>() : nullptr;
  const float* d_probs = d_probs_NE.defined() ? d_probs_NE.data<float>() : nullptr;
  Tensor dlogits_NE = Tensor::empty({N, E}, DType::kF32);
  float* dlogits = dlogits_NE.data<float>();

#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* p = probs + n * E;
    std::vector<double> dp(static_cast<size_t>(E), 0.0);
    if (d_probs != nullptr) {
      for (int64_t e = 0; e < E; ++e) dp[e] = d_probs[n * E + e];
    }
    if (d_topk != nullptr) {
      const int32_t* idx = topk_idx + n * K;
      const float* dw = d_topk + n * K;
      if (norm_topk_prob) {
        // w_k = p_k / s, s = Σ_k p_k  =>  dp_j = (dw_j − Σ_k dw_k · w_k) / s.
        double s = 0.0, dot = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          s += p[idx[k]];
          dot += static_cast<double>(dw[k]) * topk_weight[n * K + k];
        }
        for (int64_t k = 0; k < K; ++k) dp[idx[k]] += (dw[k] - dot) / s;
      } else {
        for (int64_t k = 0; k < K; ++k) dp[idx[k]] += dw[k];
      }
    }
    // Softmax backward: dl_e = p_e · (dp_e − Σ_f p_f · dp_f).
    double dot = 0.0;
    for (int64_t e = 0; e < E; ++e) dot += p[e] * dp[e];
    for (int64_t e = 0; e < E; ++e) dlogits[n * E + e] = static_cast<float>(p[e] * (dp[e] - dot));
  }
  return dlogits_NE;
}

void router_backward(const Tensor& x_NH, const Tensor& wg_EH, const RouterForward& fwd, bool norm_topk_prob,
                     const Tensor& d_topk_weight_NK, const Tensor& d_probs_NE, Tensor& dx_NH, Tensor& dwg_EH) {
  check_f32_cpu(x_NH, 2, "router x_NH");
  check_f32_cpu(wg_EH, 2, "router wg_EH");
  check_forward_result(fwd);
  const int64_t N = x_NH.size(0), H = x_NH.size(1), E = wg_EH.size(0);
  check_shape(wg_EH, {E, H}, "router wg_EH");
  check_shape(fwd.probs_NE, {N, E}, "router fwd.probs_NE");
  MOETP_CHECK(dwg_EH.defined(), "router_backward: dwg_EH must be defined (it is accumulated into), shape [{}, {}]",
              E, H);
  const Tensor dlogits_NE = router_logits_grad(fwd, norm_topk_prob, d_topk_weight_NK, d_probs_NE);
  linear_backward(dlogits_NE, x_NH, wg_EH, &dx_NH, &dwg_EH);
}

void router_stats(const RouterForward& fwd, Tensor& counts_E, Tensor& prob_sum_E) {
  check_forward_result(fwd);
  const int64_t N = fwd.probs_NE.size(0), E = fwd.probs_NE.size(1), K = fwd.topk_idx_NK.size(1);
  if (!counts_E.defined()) counts_E = Tensor::empty({E}, DType::kF32);
  if (!prob_sum_E.defined()) prob_sum_E = Tensor::empty({E}, DType::kF32);
  check_f32_cpu(counts_E, 1, "router_stats counts_E");
  check_shape(counts_E, {E}, "router_stats counts_E");
  check_f32_cpu(prob_sum_E, 1, "router_stats prob_sum_E");
  check_shape(prob_sum_E, {E}, "router_stats prob_sum_E");

  const float* probs = fwd.probs_NE.data<float>();
  const int32_t* topk_idx = fwd.topk_idx_NK.data<int32_t>();
  std::vector<int64_t> counts(static_cast<size_t>(E), 0);
  std::vector<double> prob_sum(static_cast<size_t>(E), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = topk_idx[n * K + k];
      MOETP_CHECK(e >= 0 && e < E, "router_stats: topk_idx[{}, {}] = {} is not an expert id in [0, {})", n, k, e,
                  E);
      ++counts[e];
    }
    for (int64_t e = 0; e < E; ++e) prob_sum[e] += probs[n * E + e];
  }
  // Counts are integers; f32 represents them exactly up to 2^24 (16.7M (token, slot) pairs per expert).
  for (int64_t e = 0; e < E; ++e) {
    counts_E.data<float>()[e] = static_cast<float>(counts[e]);
    prob_sum_E.data<float>()[e] = static_cast<float>(prob_sum[e]);
  }
}

double aux_loss_from_stats(const Tensor& counts_E, const Tensor& prob_sum_E, int64_t num_layers,
                           int64_t num_tokens) {
  check_f32_cpu(counts_E, 1, "aux_loss counts_E");
  const int64_t E = counts_E.size(0);
  check_f32_cpu(prob_sum_E, 1, "aux_loss prob_sum_E");
  check_shape(prob_sum_E, {E}, "aux_loss prob_sum_E");
  MOETP_CHECK(num_layers >= 1 && num_tokens >= 1, "aux_loss: num_layers ({}) and num_tokens ({}) must be >= 1",
              num_layers, num_tokens);
  const float* c = counts_E.data<float>();
  const float* p = prob_sum_E.data<float>();
  double dot = 0.0;
  for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(c[e]) * p[e];
  const double rows = static_cast<double>(num_layers) * static_cast<double>(num_tokens);
  return static_cast<double>(E) * dot / (rows * rows);
}

Tensor aux_loss_grad_probs(const Tensor& counts_E, int64_t num_experts, int64_t num_layers, int64_t num_tokens,
                           float coef, int64_t N_local) {
  check_f32_cpu(counts_E, 1, "aux_loss_grad counts_E");
  MOETP_CHECK(counts_E.size(0) == num_experts, "aux_loss_grad: counts_E {} does not have num_experts ({}) entries",
              counts_E.describe(), num_experts);
  MOETP_CHECK(num_layers >= 1 && num_tokens >= 1,
              "aux_loss_grad: num_layers ({}) and num_tokens ({}) must be >= 1", num_layers, num_tokens);
  MOETP_CHECK(N_local >= 0, "aux_loss_grad: N_local ({}) must be >= 0", N_local);
  const int64_t E = num_experts;
  const double rows = static_cast<double>(num_layers) * static_cast<double>(num_tokens);
  const double scale = static_cast<double>(coef) * static_cast<double>(E) / (rows * rows);
  std::vector<float> row(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) row[e] = static_cast<float>(scale * counts_E.data<float>()[e]);
  Tensor d_probs_NE = Tensor::empty({N_local, E}, DType::kF32);
  float* d = d_probs_NE.data<float>();
  for (int64_t n = 0; n < N_local; ++n) std::copy(row.begin(), row.end(), d + n * E);
  return d_probs_NE;
}

}  // namespace moetp::cpu
