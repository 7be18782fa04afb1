// Host-side planning of the `all2all` dispatcher (etp_spec §6.4), shared by the CPU dispatcher
// (dispatch_all2all.cpp, over MPI) and the CUDA MoE layer (cuda_moe.cpp, over NCCL), so both move
// the same rows in the same order (the row contract of moe/dispatcher.h).
//
// Legend: E experts, P = ep size, T = etp size, L = E/P local experts, R rows on the expert side.
// A rank's slot rows are sorted by global expert; experts [q·L, (q+1)·L) live on ep rank q, so the
// rows to ep rank q are one contiguous block. After the ep all-to-all and the etp all-gather, the
// gathered rows come as blocks (t', q', j) (etp rank, source ep rank, local expert) in that nesting;
// the expert order is (j, q', t').
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "comm/mesh.h"

namespace moetp::moe {

struct All2AllPlan {
  std::vector<int64_t> send_counts;  // P: slot rows to each ep rank
  std::vector<int64_t> recv_counts;  // P: rows from each ep rank
  std::vector<int64_t> tp_counts;    // T: rows each etp rank received (the all-gather counts)
  int64_t num_recv = 0;              // Σ recv_counts
  int64_t num_rows = 0;              // R = Σ tp_counts
  int64_t recv_offset = 0;           // Σ tp_counts[t' < t]: this rank's block of the gathered rows
  std::vector<int64_t> perm;         // R: expert-order row i is gathered row perm[i]
  std::vector<int64_t> inv_perm;     // R: gathered row g is expert-order row inv_perm[g]
  std::vector<int64_t> offsets;      // L + 1: local expert j owns expert-order rows [offsets[j], offsets[j+1])
};

// The plan from this rank's slot rows per global expert and the counts every rank of its etp group
// received: cnt_TPL[(t'·P + q')·L + j] = rows that etp rank t' received from ep rank q' for local
// expert j. Pure; reuses `plan`'s vectors. Validates the sizes (moetp::Error naming them).
void plan_all2all(std::span<const int64_t> counts_E, std::span<const int64_t> cnt_TPL, int P, int T, int t_me,
                  All2AllPlan& plan);

// Exchanges the counts over the host groups of the mesh's ep and etp communicators (an all-to-all
// of P·L and an all-gather of T·P·L integers), then plans. Collective over ep and etp.
void plan_all2all(const comm::Mesh& mesh, std::span<const int64_t> counts_E, All2AllPlan& plan);

}  // namespace moetp::moe
