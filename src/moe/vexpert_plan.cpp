// Host-side `vexpert` planning (contract in vexpert_plan.h). These run on the host in every
// `vexpert` forward of the CUDA layer, so they make passes of O(N·(K + P) + rows·K) without
// divisions or data-dependent branches, into the plan's reused vectors.
#include "moe/vexpert_plan.h"

#include <algorithm>
#include <bit>
#include <climits>
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
  MOETP_CHECK(N <= INT32_MAX, "plan_vexpert_send: N = {} tokens is more than the planner's 32-bit token ids hold", N);
  const int64_t L = E / P, R = static_cast<int64_t>(P) * T;
  plan.num_entries = K;
  plan.send_counts.assign(static_cast<size_t>(R), 0);
  // p(e) and j(e) from tables (no 64-bit division per entry).
  std::vector<int32_t> p_of(static_cast<size_t>(E)), j_of(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    p_of[static_cast<size_t>(e)] = static_cast<int32_t>(e / L);
    j_of[static_cast<size_t>(e)] = static_cast<int32_t>(e % L);
  }
  // A token sends one row to each of the T ranks (p, t) of every ep rank p holding one of its
  // experts; rows are ordered by destination, then token. Pass 1: the tokens of each ep rank, in
  // order (written branch-free: with random routing "does token n need ep rank p" is a coin flip,
  // and a mispredicted branch per (token, destination) and per entry cost milliseconds per forward).
  std::vector<int32_t> tokens(static_cast<size_t>(P) * static_cast<size_t>(N));  // tokens[p·N + i]
  std::vector<int64_t> per_p(static_cast<size_t>(P), 0);
  std::vector<uint8_t> has(static_cast<size_t>(P), 0);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(has.begin(), has.end(), uint8_t{0});
    for (int64_t k = 0; k < K; ++k) has[static_cast<size_t>(p_of[static_cast<size_t>(idx[n * K + k])])] = 1;
    for (int64_t p = 0; p < P; ++p) {
      tokens[static_cast<size_t>(p * N + per_p[p])] = static_cast<int32_t>(n);
      per_p[static_cast<size_t>(p)] += has[static_cast<size_t>(p)];
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
    const int32_t* toks = tokens.data() + p * N;
    for (int64_t i = 0; i < per_p[static_cast<size_t>(p)]; ++i, ++row) {
      const int64_t n = toks[i];
      plan.send_token[static_cast<size_t>(row)] = n;
      int32_t* meta = plan.meta.data() + row * K;
      float* meta_w = plan.meta_w.data() + row * K;
      // Selects by masks: whether an entry is ours is a coin flip under random routing.
      for (int64_t k = 0; k < K; ++k) {
        const auto e = static_cast<size_t>(idx[n * K + k]);
        const int32_t mask = -static_cast<int32_t>(p_of[e] == p);  // all ones where ours
        meta[k] = j_of[e] | ~mask;                                  // j(e), or -1
        const uint32_t wbits = w.empty() ? 0u : std::bit_cast<uint32_t>(w[n * K + k]);
        meta_w[k] = std::bit_cast<float>(wbits & static_cast<uint32_t>(mask));  // weight, or +0
      }
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
  // Counts per local expert, and of the entries that are not ours (-1) in a last bucket: no branch
  // on the (random) sign.
  // Two sets of counters (even and odd entries) so that runs of -1 do not chain every increment
  // through one memory location.
  const auto bucket = [L](int32_t j) {  // j, or L for -1, without a branch
    const int64_t neg = static_cast<int64_t>(j >> 31);  // all ones for -1
    return static_cast<size_t>((static_cast<int64_t>(j) & ~neg) | (L & neg));
  };
  std::vector<int64_t> count(2 * (static_cast<size_t>(L) + 1), 0);
  for (int64_t f = 0; f < num_recv * C; ++f) {
    MOETP_CHECK(meta[f] >= -1 && meta[f] < L, "plan_vexpert_recv: meta[{}, {}] = {} is outside [-1, {})", f / C,
                f % C, meta[f], L);
    ++count[static_cast<size_t>(f & 1) * (static_cast<size_t>(L) + 1) + bucket(meta[f])];
  }
  plan.offsets.assign(static_cast<size_t>(L) + 1, 0);
  for (int64_t j = 0; j < L; ++j) {
    plan.offsets[static_cast<size_t>(j) + 1] = count[static_cast<size_t>(j)] + count[static_cast<size_t>(L + 1 + j)];
  }
  for (int64_t j = 0; j < L; ++j) plan.offsets[j + 1] += plan.offsets[j];
  // A stable counting sort by local expert: (q, c) ascending within each expert. Branch-free (the
  // -1 entries are random): an entry that is not ours writes to a scratch slot past the end and
  // advances nothing.
  const int64_t rows = plan.offsets[static_cast<size_t>(L)];
  plan.row_recv.resize(static_cast<size_t>(rows) + 1);
  plan.row_entry.resize(static_cast<size_t>(rows) + 1);
  std::vector<int64_t> next(plan.offsets.begin(), plan.offsets.end());  // next[L] = rows: the scratch slot
  for (int64_t q = 0; q < num_recv; ++q) {
    const int32_t* row = meta.data() + q * C;
    for (int64_t c = 0; c < C; ++c) {
      const size_t j = bucket(row[c]);
      const int64_t i = next[j];
      plan.row_recv[static_cast<size_t>(i)] = q;
      plan.row_entry[static_cast<size_t>(i)] = c;
      next[j] = i + 1 + (row[c] >> 31);  // + 0 for -1
    }
  }
  plan.row_recv.resize(static_cast<size_t>(rows));
  plan.row_entry.resize(static_cast<size_t>(rows));
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
