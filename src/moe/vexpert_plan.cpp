// Host-side `vexpert` planning (contract in vexpert_plan.h). These run on the host in every
// `vexpert` forward of the CUDA layer, so they are linear passes over reused buffers.
#include "moe/vexpert_plan.h"

#include <cstdint>
#include <vector>

#include "core/check.h"

namespace moetp::moe {

void plan_vexpert_send(std::span<const int32_t> idx, std::span<const float> w, int64_t N, int64_t K, int64_t E, int P,
                       int T, VExpertSendPlan& plan) {
  MOETP_CHECK(N >= 0 && K >= 1 && E >= 1 && P >= 1 && T >= 1 && E % P == 0,
              "plan_vexpert_send: bad sizes N = {}, K = {}, E = {}, ep = {}, etp = {} (E % ep must be 0)", N, K, E, P,
              T);
  MOETP_CHECK(static_cast<int64_t>(idx.size()) == N * K, "plan_vexpert_send: topk_idx has {} entries, expected {}",
              idx.size(), N * K);
  MOETP_CHECK(w.empty() || static_cast<int64_t>(w.size()) == N * K,
              "plan_vexpert_send: topk_weight has {} entries, expected {} (or none)", w.size(), N * K);
  for (int64_t f = 0; f < N * K; ++f) {
    MOETP_CHECK(idx[f] >= 0 && idx[f] < E, "plan_vexpert_send: topk_idx[{}, {}] = {} is outside [0, {})", f / K,
                f % K, idx[f], E);
  }
  const int64_t L = E / P, R = static_cast<int64_t>(P) * T;
  plan.num_entries = K;
  plan.send_counts.assign(static_cast<size_t>(R), 0);
  // A token sends one row to each of the T ranks (p, t) of every ep rank p holding one of its
  // experts; rows are ordered by destination, then token. Pass 1: which ep ranks each token needs.
  std::vector<int64_t> per_p(static_cast<size_t>(P), 0);
  std::vector<uint8_t> has(static_cast<size_t>(N * P), 0);  // has[n·P + p]
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t p = idx[n * K + k] / L;
      uint8_t& h = has[static_cast<size_t>(n * P + p)];
      per_p[static_cast<size_t>(p)] += h == 0 ? 1 : 0;
      h = 1;
    }
  }
  int64_t S = 0;
  for (int64_t dst = 0; dst < R; ++dst) {
    plan.send_counts[static_cast<size_t>(dst)] = per_p[static_cast<size_t>(dst / T)];
    S += per_p[static_cast<size_t>(dst / T)];
  }
  // Pass 2: the rows. Entry k of a row to (p, t) is virtual entry k·T + t: owned where slot k's
  // expert lives on ep rank p (the same for every t of p).
  plan.send_token.resize(static_cast<size_t>(S));
  plan.meta.resize(static_cast<size_t>(S * K));
  plan.meta_w.resize(static_cast<size_t>(S * K));
  int64_t row = 0;
  for (int64_t dst = 0; dst < R; ++dst) {
    const int64_t p = dst / T;
    for (int64_t n = 0; n < N; ++n) {
      if (has[static_cast<size_t>(n * P + p)] == 0) continue;
      plan.send_token[static_cast<size_t>(row)] = n;
      int32_t* meta = plan.meta.data() + row * K;
      float* meta_w = plan.meta_w.data() + row * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = idx[n * K + k];
        const bool ours = e / L == p;
        meta[k] = ours ? static_cast<int32_t>(e % L) : -1;
        meta_w[k] = ours && !w.empty() ? w[n * K + k] : 0.0f;
      }
      ++row;
    }
  }
}

VExpertSendPlan plan_vexpert_send(std::span<const int32_t> idx, std::span<const float> w, int64_t N, int64_t K,
                                  int64_t E, int P, int T) {
  VExpertSendPlan plan;
  plan_vexpert_send(idx, w, N, K, E, P, T, plan);
  return plan;
}

void plan_vexpert_recv(std::span<const int32_t> meta, int64_t num_recv, int64_t C, int64_t L, VExpertRecvPlan& plan) {
  MOETP_CHECK(num_recv >= 0 && C >= 1 && L >= 1 && static_cast<int64_t>(meta.size()) == num_recv * C,
              "plan_vexpert_recv: meta has {} entries, expected {} x {} (L = {})", meta.size(), num_recv, C, L);
  plan.offsets.assign(static_cast<size_t>(L) + 1, 0);
  for (int64_t f = 0; f < num_recv * C; ++f) {
    MOETP_CHECK(meta[f] >= -1 && meta[f] < L, "plan_vexpert_recv: meta[{}, {}] = {} is outside [-1, {})", f / C,
                f % C, meta[f], L);
    if (meta[f] >= 0) ++plan.offsets[static_cast<size_t>(meta[f]) + 1];
  }
  for (int64_t j = 0; j < L; ++j) plan.offsets[j + 1] += plan.offsets[j];
  // A stable counting sort by local expert: (q, c) ascending within each expert.
  const int64_t rows = plan.offsets[static_cast<size_t>(L)];
  plan.row_recv.resize(static_cast<size_t>(rows));
  plan.row_entry.resize(static_cast<size_t>(rows));
  std::vector<int64_t> next(plan.offsets.begin(), plan.offsets.end() - 1);
  for (int64_t q = 0; q < num_recv; ++q) {
    const int32_t* row = meta.data() + q * C;
    for (int64_t c = 0; c < C; ++c) {
      if (row[c] < 0) continue;
      const int64_t i = next[static_cast<size_t>(row[c])]++;
      plan.row_recv[static_cast<size_t>(i)] = q;
      plan.row_entry[static_cast<size_t>(i)] = c;
    }
  }
}

VExpertRecvPlan plan_vexpert_recv(std::span<const int32_t> meta, int64_t num_recv, int64_t C, int64_t L) {
  VExpertRecvPlan plan;
  plan_vexpert_recv(meta, num_recv, C, L, plan);
  return plan;
}

std::vector<float> vexpert_fold_weight_grad(std::span<const float> dw_sent, std::span<const int64_t> send_token,
                                            int64_t N, int64_t K) {
  const int64_t rows = static_cast<int64_t>(send_token.size());
  MOETP_CHECK(static_cast<int64_t>(dw_sent.size()) == rows * K,
              "vexpert_fold_weight_grad: dw_sent has {} entries, expected {} x {}", dw_sent.size(), rows, K);
  std::vector<float> dw(static_cast<size_t>(N * K), 0.0f);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = send_token[static_cast<size_t>(row)];
    MOETP_CHECK(n >= 0 && n < N, "vexpert_fold_weight_grad: send_token[{}] = {} is outside [0, {})", row, n, N);
    for (int64_t k = 0; k < K; ++k) dw[static_cast<size_t>(n * K + k)] += dw_sent[static_cast<size_t>(row * K + k)];
  }
  return dw;
}

TokenRows vexpert_token_rows(std::span<const int64_t> send_token, int64_t N) {
  TokenRows tr;
  tr.begin.assign(static_cast<size_t>(N) + 1, 0);
  for (int64_t n : send_token) {
    MOETP_CHECK(n >= 0 && n < N, "vexpert_token_rows: token {} is outside [0, {})", n, N);
    ++tr.begin[static_cast<size_t>(n) + 1];
  }
  for (int64_t n = 0; n < N; ++n) tr.begin[n + 1] += tr.begin[n];
  tr.rows.resize(send_token.size());
  std::vector<int64_t> next(tr.begin.begin(), tr.begin.end() - 1);
  for (size_t row = 0; row < send_token.size(); ++row) tr.rows[static_cast<size_t>(next[send_token[row]]++)] = static_cast<int64_t>(row);
  return tr;
}

}  // namespace moetp::moe
