// Host-side `vexpert` planning (contract in vexpert_plan.h).
#include "moe/vexpert_plan.h"

#include "core/check.h"

namespace moetp::moe {

VExpertSendPlan plan_vexpert_send(std::span<const int32_t> idx, std::span<const float> w, int64_t N, int64_t K,
                                  int64_t E, int P, int T) {
  MOETP_CHECK(N >= 0 && K >= 1 && E >= 1 && P >= 1 && T >= 1 && E % P == 0,
              "plan_vexpert_send: bad sizes N = {}, K = {}, E = {}, ep = {}, etp = {} (E % ep must be 0)", N, K, E, P,
              T);
  MOETP_CHECK(static_cast<int64_t>(idx.size()) == N * K, "plan_vexpert_send: topk_idx has {} entries, expected {}",
              idx.size(), N * K);
  MOETP_CHECK(w.empty() || static_cast<int64_t>(w.size()) == N * K,
              "plan_vexpert_send: topk_weight has {} entries, expected {} (or none)", w.size(), N * K);
  const int64_t L = E / P, C = K * T, R = static_cast<int64_t>(P) * T;
  for (int64_t f = 0; f < N * K; ++f) {
    MOETP_CHECK(idx[f] >= 0 && idx[f] < E, "plan_vexpert_send: topk_idx[{}, {}] = {} is outside [0, {})", f / K,
                f % K, idx[f], E);
  }
  VExpertSendPlan plan;
  plan.num_entries = C;
  plan.send_counts.assign(static_cast<size_t>(R), 0);
  // Entry c = k·T + t of token n lives on rank dst(n, c) = p(e)·T + t as local expert j(e).
  for (int64_t dst = 0; dst < R; ++dst) {
    for (int64_t n = 0; n < N; ++n) {
      bool has = false;
      for (int64_t k = 0; k < K && !has; ++k) has = idx[n * K + k] / L == dst / T;  // p(e) == p(dst)
      if (!has) continue;
      ++plan.send_counts[static_cast<size_t>(dst)];
      plan.send_token.push_back(n);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = idx[n * K + c / T];
        const bool ours = (e / L) * T + c % T == dst;
        plan.meta.push_back(ours ? static_cast<int32_t>(e % L) : -1);
        plan.meta_w.push_back(ours && !w.empty() ? w[n * K + c / T] : 0.0f);
      }
    }
  }
  return plan;
}

VExpertRecvPlan plan_vexpert_recv(std::span<const int32_t> meta, int64_t num_recv, int64_t C, int64_t L) {
  MOETP_CHECK(num_recv >= 0 && C >= 1 && L >= 1 && static_cast<int64_t>(meta.size()) == num_recv * C,
              "plan_vexpert_recv: meta has {} entries, expected {} x {} (L = {})", meta.size(), num_recv, C, L);
  VExpertRecvPlan plan;
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
  for (int64_t f = 0; f < num_recv * C; ++f) {
    if (meta[f] < 0) continue;
    const int64_t i = next[static_cast<size_t>(meta[f])]++;
    plan.row_recv[static_cast<size_t>(i)] = f / C;
    plan.row_entry[static_cast<size_t>(i)] = f % C;
  }
  return plan;
}

std::vector<float> vexpert_fold_weight_grad(std::span<const float> dw_sent, std::span<const int64_t> send_token,
                                            int64_t N, int64_t K, int T) {
  const int64_t C = K * T, rows = static_cast<int64_t>(send_token.size());
  MOETP_CHECK(static_cast<int64_t>(dw_sent.size()) == rows * C,
              "vexpert_fold_weight_grad: dw_sent has {} entries, expected {} x {}", dw_sent.size(), rows, C);
  std::vector<float> dw(static_cast<size_t>(N * K), 0.0f);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = send_token[static_cast<size_t>(row)];
    MOETP_CHECK(n >= 0 && n < N, "vexpert_fold_weight_grad: send_token[{}] = {} is outside [0, {})", row, n, N);
    for (int64_t c = 0; c < C; ++c) dw[static_cast<size_t>(n * K + c / T)] += dw_sent[static_cast<size_t>(row * C + c)];
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
