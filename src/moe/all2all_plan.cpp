#include "moe/all2all_plan.h"

#include "core/check.h"
#include "core/tensor.h"

namespace moetp::moe {

void plan_all2all(std::span<const int64_t> counts_E, std::span<const int64_t> cnt_TPL, int P, int T, int t_me,
                  All2AllPlan& plan) {
  const int64_t E = static_cast<int64_t>(counts_E.size());
  MOETP_CHECK(P >= 1 && T >= 1 && t_me >= 0 && t_me < T, "plan_all2all: ep {} / etp {} / etp rank {} out of range",
              P, T, t_me);
  MOETP_CHECK(E % P == 0, "plan_all2all: {} experts not divisible by ep {}", E, P);
  const int64_t L = E / P;
  MOETP_CHECK(static_cast<int64_t>(cnt_TPL.size()) == T * P * L,
              "plan_all2all: gathered counts have {} entries, expected etp {} x ep {} x local experts {} = {}",
              cnt_TPL.size(), T, P, L, T * P * L);

  plan.send_counts.assign(static_cast<size_t>(P), 0);
  for (int64_t e = 0; e < E; ++e) plan.send_counts[static_cast<size_t>(e / L)] += counts_E[static_cast<size_t>(e)];
  plan.recv_counts.assign(static_cast<size_t>(P), 0);
  plan.tp_counts.assign(static_cast<size_t>(T), 0);
  for (int t = 0; t < T; ++t) {
    for (int q = 0; q < P; ++q) {
      for (int64_t j = 0; j < L; ++j) {
        const int64_t c = cnt_TPL[static_cast<size_t>((static_cast<int64_t>(t) * P + q) * L + j)];
        MOETP_CHECK(c >= 0, "plan_all2all: negative row count {} (etp rank {}, ep rank {}, local expert {})", c, t, q,
                    j);
        plan.tp_counts[static_cast<size_t>(t)] += c;
        if (t == t_me) plan.recv_counts[static_cast<size_t>(q)] += c;
      }
    }
  }
  plan.num_recv = comm::sum_counts(plan.recv_counts);
  plan.num_rows = comm::sum_counts(plan.tp_counts);
  plan.recv_offset = 0;
  for (int t = 0; t < t_me; ++t) plan.recv_offset += plan.tp_counts[static_cast<size_t>(t)];

  // Gathered blocks (t', q', j) in that nesting; expert order (j, q', t').
  std::vector<int64_t> block_off(cnt_TPL.size() + 1, 0);
  for (size_t b = 0; b < cnt_TPL.size(); ++b) block_off[b + 1] = block_off[b] + cnt_TPL[b];
  const int64_t R = plan.num_rows;
  plan.perm.resize(static_cast<size_t>(R));
  plan.inv_perm.resize(static_cast<size_t>(R));
  plan.offsets.assign(static_cast<size_t>(L) + 1, 0);
  int64_t row = 0;
  for (int64_t j = 0; j < L; ++j) {
    for (int q = 0; q < P; ++q) {
      for (int t = 0; t < T; ++t) {
        const size_t b = static_cast<size_t>((static_cast<int64_t>(t) * P + q) * L + j);
        for (int64_t g = block_off[b]; g < block_off[b + 1]; ++g) {
          plan.perm[static_cast<size_t>(row)] = g;
          plan.inv_perm[static_cast<size_t>(g)] = row;
          ++row;
        }
      }
    }
    plan.offsets[static_cast<size_t>(j) + 1] = row;
  }
}

void plan_all2all(const comm::Mesh& mesh, std::span<const int64_t> counts_E, All2AllPlan& plan) {
  const int P = mesh.ep_size(), T = mesh.etp_size();
  const int64_t E = static_cast<int64_t>(counts_E.size());
  MOETP_CHECK(E % P == 0, "plan_all2all: {} experts not divisible by ep {}", E, P);
  const int64_t L = E / P;
  // Per (source ep rank, local expert), then gathered over etp: cnt[t'][q'][j].
  Tensor cnt_send = Tensor::from_vector<int64_t>(std::vector<int64_t>(counts_E.begin(), counts_E.end()), {E, 1});
  Tensor cnt_recv = Tensor::empty({P * L, 1}, DType::kI64);
  const std::vector<int64_t> l_each(static_cast<size_t>(P), L);
  mesh.ep().host().all_to_all_v(cnt_send, l_each, cnt_recv, l_each);
  Tensor cnt_all = Tensor::empty({T * P * L, 1}, DType::kI64);
  mesh.etp().host().all_gather(cnt_recv, cnt_all);
  plan_all2all(counts_E, std::span<const int64_t>(cnt_all.data<int64_t>(), static_cast<size_t>(T * P * L)), P, T,
               mesh.coords().t, plan);
}

}  // namespace moetp::moe
