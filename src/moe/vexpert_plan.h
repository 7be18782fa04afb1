// Host-side planning of the `vexpert` dispatcher (ETP_SPEC §5.4), shared by the CPU dispatcher
// (dispatch_vexpert.cpp, over MPI) and the CUDA MoE layer (cuda_moe.cpp, over NCCL), so both move
// exactly the same rows in exactly the same order. Pure functions: no communication, no tensors.
//
// Legend: N tokens on this rank, K top-k, E experts, P = ep size, T = etp size, L = E/P local
// experts, R = P·T ranks of the flat ep_etp group, C = K·T virtual entries per token.
// Expert e becomes T virtual experts v(e, t) = (p(e)·T + t)·L + j(e), p(e) = e / L, j(e) = e % L,
// owned by ep_etp rank p(e)·T + t (as local expert j(e)); entry k·T + t of a token is v(topk[n, k], t).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace moetp::moe {

// What a rank sends: one row per (token, destination rank) pair with at least one entry there.
struct VExpertSendPlan {
  int64_t num_entries = 0;           // C = K·T
  std::vector<int64_t> send_token;   // token of each sent row; rows sorted by destination, then token
  std::vector<int64_t> send_counts;  // R: rows to each ep_etp rank
  std::vector<int32_t> meta;         // (rows, C): j(e) where the destination owns entry c, else -1
  std::vector<float> meta_w;         // (rows, C): weight[n, c / T] where owned (no 1/T), else 0
};

// Validates E % P == 0, 1 <= K, ids in [0, E) and the spans' sizes (moetp::Error naming them).
//   topk_idx_NK    [IN] (N, K) global expert ids
//   topk_weight_NK [IN] (N, K), or empty: meta_w is then all zeros (not needed)
VExpertSendPlan plan_vexpert_send(std::span<const int32_t> topk_idx_NK, std::span<const float> topk_weight_NK,
                                  int64_t N, int64_t K, int64_t E, int P, int T);

// The expert-side order of the received rows: sorted by local expert j, then received row q
// (= source rank, then token: the all-to-all order), then entry c (= slot k, then t).
struct VExpertRecvPlan {
  std::vector<int64_t> row_recv;   // expert-order row i is received row row_recv[i] ...
  std::vector<int64_t> row_entry;  // ... entry row_entry[i] of its C entries
  std::vector<int64_t> offsets;    // L + 1: local expert j owns expert-side rows [offsets[j], offsets[j+1])
};

//   meta_QC [IN] (num_recv, C) received meta: local ids in [0, L) or -1 (else moetp::Error)
VExpertRecvPlan plan_vexpert_recv(std::span<const int32_t> meta_QC, int64_t num_recv, int64_t C, int64_t L);

// Backward of the weight repetition: dw[n, k] = Σ over sent rows of n (in row order) Σ_t
// dw_sent[row, k·T + t]; dw_sent is (rows, K·T) in send order. Returns (N, K).
std::vector<float> vexpert_fold_weight_grad(std::span<const float> dw_sent_SC, std::span<const int64_t> send_token,
                                            int64_t N, int64_t K, int T);

// Sent rows grouped by token: the rows of token n are rows[begin[n] .. begin[n+1]) in send order
// (destination ascending). begin has N + 1 entries. For kernels that sum per token without atomics.
struct TokenRows {
  std::vector<int64_t> begin;
  std::vector<int64_t> rows;
};
TokenRows vexpert_token_rows(std::span<const int64_t> send_token, int64_t N);

}  // namespace moetp::moe
