// moe/all2all_plan.h against a brute-force reference written from etp_spec §6.4 and the row contract
// of moe/dispatcher.h: every rank of a simulated ep × etp mesh labels each row it would hold after
// the all-to-all and the etp all-gather (etp rank, source ep rank, local expert, index) in gathered
// order, sorts the labels into expert order (local expert, source ep rank, etp rank, index), and
// the plan must give the same permutation, offsets and counts. Ragged counts with empty experts.
// Single process.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <tuple>

#include "core/check.h"
#include "moe/all2all_plan.h"
#include "testing.h"

namespace moetp::moe {
namespace {

using testing::expect_error;

struct Case {
  int64_t E;
  int P, T;
};

TEST(All2AllPlan, MatchesBruteForceOnEveryRank) {
  for (const Case c : {Case{4, 1, 1}, Case{8, 2, 1}, Case{8, 1, 2}, Case{8, 2, 2}, Case{12, 3, 2}, Case{16, 4, 2}}) {
    const int64_t L = c.E / c.P;
    std::mt19937 rng(static_cast<uint32_t>(c.E * 100 + c.P * 10 + c.T));
    // counts[q][t][e]: slot rows of rank (q, t) for global expert e; about a third empty.
    std::vector<std::vector<std::vector<int64_t>>> counts(
        c.P, std::vector<std::vector<int64_t>>(c.T, std::vector<int64_t>(c.E)));
    for (auto& per_t : counts) {
      for (auto& per_e : per_t) {
        for (int64_t& n : per_e) n = rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 7);
      }
    }
    for (int p = 0; p < c.P; ++p) {
      for (int t_me = 0; t_me < c.T; ++t_me) {
        SCOPED_TRACE(::testing::Message() << "E " << c.E << " ep " << c.P << " etp " << c.T << " rank (" << p << ", "
                                        << t_me << ")");
        // What the exchange delivers to (p, t_me): cnt[t'][q'][j] = rows of (q', t') for expert p·L + j.
        std::vector<int64_t> cnt;
        using Label = std::tuple<int64_t, int, int, int64_t>;  // (j, q', t', index): expert order
        std::vector<Label> gathered;
        for (int t = 0; t < c.T; ++t) {
          for (int q = 0; q < c.P; ++q) {
            for (int64_t j = 0; j < L; ++j) {
              const int64_t n = counts[q][t][p * L + j];
              cnt.push_back(n);
              for (int64_t i = 0; i < n; ++i) gathered.emplace_back(j, q, t, i);
            }
          }
        }
        All2AllPlan plan;
        plan_all2all(counts[p][t_me], cnt, c.P, c.T, t_me, plan);

        std::vector<Label> expert_order = gathered;
        std::sort(expert_order.begin(), expert_order.end());
        const int64_t R = static_cast<int64_t>(gathered.size());
        ASSERT_EQ(plan.num_rows, R);
        ASSERT_EQ(static_cast<int64_t>(plan.perm.size()), R);
        for (int64_t i = 0; i < R; ++i) {
          EXPECT_EQ(gathered[plan.perm[i]], expert_order[i]) << "expert-order row " << i;
          EXPECT_EQ(plan.inv_perm[plan.perm[i]], i);
        }
        ASSERT_EQ(static_cast<int64_t>(plan.offsets.size()), L + 1);
        for (int64_t j = 0; j <= L; ++j) {
          const auto first = std::lower_bound(expert_order.begin(), expert_order.end(), Label{j, 0, 0, 0});
          EXPECT_EQ(plan.offsets[j], first - expert_order.begin()) << "offset of local expert " << j;
        }
        std::vector<int64_t> send(c.P, 0), recv(c.P, 0), tp(c.T, 0);
        for (int64_t e = 0; e < c.E; ++e) send[e / L] += counts[p][t_me][e];
        for (const auto& [j, q, t, i] : gathered) {
          ++tp[t];
          if (t == t_me) ++recv[q];
        }
        EXPECT_EQ(plan.send_counts, send);
        EXPECT_EQ(plan.recv_counts, recv);
        EXPECT_EQ(plan.tp_counts, tp);
        int64_t before = 0;
        for (int t = 0; t < t_me; ++t) before += tp[t];
        EXPECT_EQ(plan.recv_offset, before);
        EXPECT_EQ(plan.num_recv, tp[t_me]);
      }
    }
  }
}

TEST(All2AllPlan, RejectsInconsistentSizes) {
  All2AllPlan plan;
  const std::vector<int64_t> counts(8, 1);
  expect_error([&] { plan_all2all(counts, std::vector<int64_t>(7, 1), 2, 2, 0, plan); }, {"expected etp 2 x ep 2"});
  expect_error([&] { plan_all2all(std::vector<int64_t>(7, 1), std::vector<int64_t>(8, 1), 2, 1, 0, plan); },
               {"not divisible by ep 2"});
  expect_error([&] { plan_all2all(counts, std::vector<int64_t>(8, 1), 2, 2, 2, plan); }, {"etp rank 2"});
  std::vector<int64_t> negative(8, 1);
  negative[5] = -1;
  expect_error([&] { plan_all2all(counts, negative, 2, 1, 0, plan); }, {"negative row count -1"});
}

}  // namespace
}  // namespace moetp::moe
