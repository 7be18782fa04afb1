// Host-side planning of the `vexpert` dispatcher (etp_spec §6.5), shared by the CPU dispatcher
// (dispatch_vexpert.cpp, over MPI) and the CUDA MoE layer (cuda_moe.cpp, over NCCL), so both move
// exactly the same rows in exactly the same order. Pure functions: no communication, no tensors.
//
// Legend: N tokens on this rank, K top-k, E experts, P = ep size, T = etp size, L = E/P local
// experts, R = P·T ranks of the flat ep_etp group.
// Expert e becomes T virtual experts v(e, t) = (p(e)·T + t)·L + j(e), p(e) = e / L, j(e) = e % L,
// owned by ep_etp rank p(e)·T + t (as local expert j(e)); entry k·T + t of a token is v(topk[n, k], t).
// Of a token's K·T virtual entries, rank dst = (p, t) owns only entries k·T + t (the slots k whose
// expert lives on ep rank p), so a row sent to dst carries K entries, entry k standing for virtual
// entry k·T + t: the wire tables are (rows, K), not (rows, K·T) (T times fewer bytes to plan, send
// and upload; the expert-side order, (local expert, received row, k), is the order of etp_spec §6.1, since
// within one received row c = k·T + t grows with k).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace moetp::moe {

// What a rank sends: one row per (token, destination rank) pair with at least one entry there.
struct VExpertSendPlan {
  int64_t num_entries = 0;           // entries per row: K (entry k of a row to (p, t) = virtual entry k·T + t)
  std::vector<int64_t> send_token;   // token of each sent row; rows sorted by destination, then token
  std::vector<int64_t> send_counts;  // R: rows to each ep_etp rank
  std::vector<int32_t> meta;         // (rows, K): j(e) where the destination's ep rank holds slot k's expert, else -1
  std::vector<float> meta_w;         // (rows, K): weight[n, k] where owned (no 1/T), else 0
};

// Validates E % P == 0, 1 <= K, ids in [0, E) and the spans' sizes (moetp::Error naming them).
//   topk_idx_NK    [IN] (N, K) global expert ids
//   topk_weight_NK [IN] (N, K), or empty: meta_w is then all zeros (not needed)
VExpertSendPlan plan_vexpert_send(std::span<const int32_t> topk_idx_NK, std::span<const float> topk_weight_NK,
                                  int64_t N, int64_t K, int64_t E, int P, int T);
// The same into `plan`, reusing its vectors' capacity (the CUDA layer plans every forward).
void plan_vexpert_send(std::span<const int32_t> topk_idx_NK, std::span<const float> topk_weight_NK, int64_t N,
                       int64_t K, int64_t E, int P, int T, VExpertSendPlan& plan);

// The expert-side order of the received rows: sorted by local expert j, then received row q
// (= source rank, then token: the all-to-all order), then entry c (= slot k; within one received row
// the destination's t is fixed, so this is etp_spec §6.1's order of virtual entries k·T + t).
struct VExpertRecvPlan {
  std::vector<int64_t> row_recv;   // expert-order row i is received row row_recv[i] ...
  std::vector<int64_t> row_entry;  // ... entry row_entry[i] of its C entries
  std::vector<int64_t> offsets;    // L + 1: local expert j owns expert-side rows [offsets[j], offsets[j+1])
};

//   meta_QC [IN] (num_recv, C) received meta (C = num_entries = K): local ids in [0, L) or -1 (else
//                moetp::Error); row_entry is then the slot k
VExpertRecvPlan plan_vexpert_recv(std::span<const int32_t> meta_QC, int64_t num_recv, int64_t C, int64_t L);
// The same into `plan`, reusing its vectors' capacity.
void plan_vexpert_recv(std::span<const int32_t> meta_QC, int64_t num_recv, int64_t C, int64_t L,
                       VExpertRecvPlan& plan);

// Backward of the weight repetition: dw[n, k] = Σ over the sent rows of n (in row order) of
// dw_sent[row, k] (the T ranks (p, t) of slot k's ep rank each return their copy's gradient; rows
// of other ep ranks return 0 there); dw_sent is (rows, K) in send order. Returns (N, K).
std::vector<float> vexpert_fold_weight_grad(std::span<const float> dw_sent_SK, std::span<const int64_t> send_token,
                                            int64_t N, int64_t K);

// Sent rows grouped by token: the rows of token n are rows[begin[n] .. begin[n+1]) in send order
// (destination ascending). begin has N + 1 entries. For kernels that sum per token without atomics.
struct TokenRows {
  std::vector<int64_t> begin;
  std::vector<int64_t> rows;
};
TokenRows vexpert_token_rows(std::span<const int64_t> send_token, int64_t N);

}  // namespace moetp::moe
