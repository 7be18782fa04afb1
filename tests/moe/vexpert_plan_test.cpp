// moe/vexpert_plan.h against a brute-force reference written from etp_spec §6.5 with the spec's
// expansion (moe::expand_topk_for_tp): the rows sent per destination (sorted by destination, then
// token), the (rows, K) local-entry and weight tables (entry k of a row to rank (p, t) stands for
// virtual entry k·T + t), the expert-side order (local expert, received row, entry) and offsets,
// and the weight-gradient fold. Single process.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <random>

#include "core/check.h"
#include "core/tensor.h"
#include "moe/dispatcher.h"
#include "moe/vexpert_plan.h"

namespace moetp::moe {
namespace {

struct Case {
  int64_t N, K, E;
  int P, T;
};

std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> b;
  for (float x : v) b.push_back(std::bit_cast<uint32_t>(x));
  return b;
}

// Random distinct top-K ids per token (or a skewed routing: slot 0 always expert 0).
std::vector<int32_t> routing(const Case& c, uint32_t seed, bool skewed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> idx;
  for (int64_t n = 0; n < c.N; ++n) {
    std::vector<int32_t> e(static_cast<size_t>(c.E));
    for (int64_t i = 0; i < c.E; ++i) e[static_cast<size_t>(i)] = static_cast<int32_t>(i);
    std::shuffle(e.begin(), e.end(), rng);
    if (skewed) std::iter_swap(e.begin(), std::find(e.begin(), e.end(), 0));
    idx.insert(idx.end(), e.begin(), e.begin() + c.K);
  }
  return idx;
}

TEST(VExpertPlan, SendAndRecvMatchBruteForce) {
  const std::vector<Case> cases = {{7, 3, 8, 1, 1}, {7, 3, 8, 2, 1}, {9, 2, 8, 2, 2},  {11, 3, 8, 4, 2},
                                   {5, 1, 4, 1, 4}, {0, 2, 4, 2, 2}, {13, 4, 16, 4, 2}, {6, 2, 6, 3, 1},
                                   {9, 2, 4, 4, 1}, {8, 3, 4, 4, 2}};  // the last two: L = 1 (E == ep)
  uint32_t seed = 1;
  for (const Case& c : cases) {
    for (bool skewed : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "N " << c.N << " K " << c.K << " E " << c.E << " P " << c.P << " T "
                                        << c.T << (skewed ? " skewed" : ""));
      const std::vector<int32_t> idx = routing(c, seed++, skewed);
      // Weights with negative values, -0 and NaN: the plan must carry their exact bits.
      std::vector<float> w;
      for (int64_t f = 0; f < c.N * c.K; ++f) {
        const float special[4] = {-1.5f, -0.0f, std::numeric_limits<float>::quiet_NaN(), 3.0f};
        w.push_back(f % 5 == 4 ? 0.25f + 0.125f * static_cast<float>(f) : special[f % 5]);
      }
      const int64_t L = c.E / c.P, C = c.K * c.T, R = static_cast<int64_t>(c.P) * c.T;
      const int64_t W = c.K;  // wire entries per row
      const std::vector<int32_t> vid =
          expand_topk_for_tp(Tensor::from_vector<int32_t>(idx, {c.N, c.K}), c.E, c.P, c.T).to_vector<int32_t>();

      // Reference send plan: for each destination, each token with an entry there (any of its K·T
      // virtual entries); the row carries entry k·T + t(dst) as its entry k, and no other entry of
      // the token may belong to dst (so nothing is lost by the K-wide row).
      std::vector<int64_t> ref_token, ref_counts(static_cast<size_t>(R), 0);
      std::vector<int32_t> ref_meta;
      std::vector<float> ref_w;
      for (int64_t dst = 0; dst < R; ++dst) {
        for (int64_t n = 0; n < c.N; ++n) {
          bool any = false;
          for (int64_t e = 0; e < C; ++e) {
            any = any || vid[n * C + e] / L == dst;
            if (vid[n * C + e] / L == dst) {
              ASSERT_EQ(e % c.T, dst % c.T) << "entry " << e << " of token " << n;
            }
          }
          if (!any) continue;
          ++ref_counts[dst];
          ref_token.push_back(n);
          for (int64_t k = 0; k < c.K; ++k) {
            const int64_t e = k * c.T + dst % c.T;
            const bool ours = vid[n * C + e] / L == dst;
            ref_meta.push_back(ours ? static_cast<int32_t>(vid[n * C + e] - dst * L) : -1);
            ref_w.push_back(ours ? w[n * c.K + k] : 0.0f);
          }
        }
      }
      const VExpertSendPlan plan = plan_vexpert_send(idx, w, c.N, c.K, c.E, c.P, c.T);
      EXPECT_EQ(plan.num_entries, W);
      EXPECT_EQ(plan.send_token, ref_token);
      EXPECT_EQ(plan.send_counts, ref_counts);
      EXPECT_EQ(plan.meta, ref_meta);
      EXPECT_EQ(bits(plan.meta_w), bits(ref_w));  // by bit pattern: -0 and NaN included
      // Without weights: the same rows, zero weights.
      const VExpertSendPlan nw = plan_vexpert_send(idx, {}, c.N, c.K, c.E, c.P, c.T);
      EXPECT_EQ(nw.meta, ref_meta);
      EXPECT_TRUE(std::all_of(nw.meta_w.begin(), nw.meta_w.end(), [](float v) { return v == 0.0f; }));

      // Receive side: pretend rank 0 received every rank's meta block for it twice (two sources).
      for (int64_t dst = 0; dst < R; ++dst) {
        std::vector<int32_t> recv;
        int64_t row0 = 0;
        for (int64_t d = 0; d < dst; ++d) row0 += ref_counts[d];
        // Two copies, with a row that owns nothing (every entry -1) before, between and after them.
        const std::vector<int32_t> none(static_cast<size_t>(W), -1);
        recv.insert(recv.end(), none.begin(), none.end());
        for (int rep = 0; rep < 2; ++rep) {
          recv.insert(recv.end(), ref_meta.begin() + row0 * W, ref_meta.begin() + (row0 + ref_counts[dst]) * W);
          recv.insert(recv.end(), none.begin(), none.end());
        }
        const int64_t Q = 2 * ref_counts[dst] + 3;
        std::vector<int64_t> rr, re, off(static_cast<size_t>(L) + 1, 0);
        for (int64_t j = 0; j < L; ++j) {
          for (int64_t q = 0; q < Q; ++q) {
            for (int64_t e = 0; e < W; ++e) {
              if (recv[q * W + e] != j) continue;
              rr.push_back(q);
              re.push_back(e);
            }
          }
          off[j + 1] = static_cast<int64_t>(rr.size());
        }
        const VExpertRecvPlan rp = plan_vexpert_recv(recv, Q, W, L);
        EXPECT_EQ(rp.row_recv, rr);
        EXPECT_EQ(rp.row_entry, re);
        EXPECT_EQ(rp.offsets, off);
      }

      // Weight-gradient fold and the per-token row lists.
      std::vector<float> dws;
      for (size_t i = 0; i < ref_meta.size(); ++i) dws.push_back(ref_meta[i] >= 0 ? 1.0f + static_cast<float>(i % 7) : 0.0f);
      std::vector<float> ref_dw(static_cast<size_t>(c.N * c.K), 0.0f);
      for (size_t row = 0; row < ref_token.size(); ++row) {
        for (int64_t k = 0; k < W; ++k) ref_dw[ref_token[row] * c.K + k] += dws[row * W + k];
      }
      EXPECT_EQ(vexpert_fold_weight_grad(dws, plan.send_token, c.N, c.K), ref_dw);
      const TokenRows tr = vexpert_token_rows(plan.send_token, c.N);
      ASSERT_EQ(tr.begin.size(), static_cast<size_t>(c.N) + 1);
      std::vector<int64_t> seen;
      for (int64_t n = 0; n < c.N; ++n) {
        for (int64_t i = tr.begin[n]; i < tr.begin[n + 1]; ++i) {
          EXPECT_EQ(plan.send_token[tr.rows[i]], n);
          if (i > tr.begin[n]) {
            EXPECT_LT(tr.rows[i - 1], tr.rows[i]);
          }
          seen.push_back(tr.rows[i]);
        }
      }
      std::sort(seen.begin(), seen.end());
      for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], static_cast<int64_t>(i));
      EXPECT_EQ(seen.size(), plan.send_token.size());
    }
  }
}

// The whole vexpert exchange in one process, as the CUDA layer composes it (cuda_moe.cpp
// vexpert_forward / vexpert_backward): R = P·T simulated ranks with ragged token counts, the send
// plan, the all-to-all by blocks in source order, the receive plan, mock experts (the partial of
// rank (p, t) for expert e is y_t = (e + 1)·x + 100·t), the fold with the received weights, the
// reverse all-to-all summed into tokens; backward: the routing-weight gradient table back and the
// T copies summed per slot through vexpert_token_rows (the GPU kernel's order). The tables are K
// wide (vexpert_plan.h); the expected values below come from the definition, over all K·T entries. Every value is a
// small integer or half-integer, so the results are exact in any order and compared with ==
// against out[n] = Σ_k w[n, k] Σ_t y_t(x_n, e) and dw[n, k] = Σ_t <dout_n, y_t(x_n, e)>.
TEST(VExpertPlan, WholeExchangeEmulated) {
  const std::vector<Case> layouts = {{0, 2, 8, 2, 1}, {0, 2, 8, 1, 2}, {0, 3, 8, 2, 2}, {0, 2, 8, 4, 1},
                                     {0, 1, 4, 1, 4}, {0, 4, 16, 2, 4}};
  constexpr int64_t H = 3;
  uint32_t seed = 100;
  for (const Case& lay : layouts) {
    const int R = lay.P * lay.T;
    const int64_t K = lay.K, E = lay.E, L = E / lay.P, T = lay.T, C = K;  // C: wire entries per row
    SCOPED_TRACE(::testing::Message() << "K " << K << " E " << E << " P " << lay.P << " T " << lay.T);
    std::vector<int64_t> Nr;
    std::vector<std::vector<int32_t>> idx;
    std::vector<std::vector<float>> w, x, dout;
    std::vector<VExpertSendPlan> send;
    for (int r = 0; r < R; ++r) {
      Nr.push_back(r == 1 ? 0 : 3 + 2 * r);  // rank 1 has no tokens
      idx.push_back(routing({Nr[r], K, E, lay.P, lay.T}, seed++, r % 2 == 0));
      std::vector<float> wr, xr, dr;
      for (int64_t f = 0; f < Nr[r] * K; ++f) wr.push_back(0.5f * static_cast<float>(f % K + 1));
      for (int64_t f = 0; f < Nr[r] * H; ++f) {
        xr.push_back(static_cast<float>((7 * r + 3 * f) % 11) - 5.0f);
        dr.push_back(static_cast<float>((5 * r + f) % 7) - 3.0f);
      }
      w.push_back(wr);
      x.push_back(xr);
      dout.push_back(dr);
      send.push_back(plan_vexpert_send(idx[r], w[r], Nr[r], K, E, lay.P, lay.T));
    }
    // First sent row of source src for destination dst.
    auto first_row = [&](int src, int dst) {
      int64_t o = 0;
      for (int d = 0; d < dst; ++d) o += send[src].send_counts[d];
      return o;
    };
    std::vector<std::vector<float>> out(R), dw(R);
    std::vector<std::vector<std::vector<float>>> back(R), dw_back(R);  // [src][dst]: rows for dst, in order
    for (int r = 0; r < R; ++r) {
      back[r].resize(R);
      dw_back[r].resize(R);
    }
    for (int dst = 0; dst < R; ++dst) {
      // The all-to-all: blocks in source order.
      std::vector<int32_t> meta;
      std::vector<float> rw, rx, rd;
      std::vector<int64_t> from_src;
      for (int src = 0; src < R; ++src) {
        const int64_t r0 = first_row(src, dst);
        for (int64_t row = r0; row < r0 + send[src].send_counts[dst]; ++row) {
          const int64_t n = send[src].send_token[row];
          meta.insert(meta.end(), send[src].meta.begin() + row * C, send[src].meta.begin() + (row + 1) * C);
          rw.insert(rw.end(), send[src].meta_w.begin() + row * C, send[src].meta_w.begin() + (row + 1) * C);
          rx.insert(rx.end(), x[src].begin() + n * H, x[src].begin() + (n + 1) * H);
          rd.insert(rd.end(), dout[src].begin() + n * H, dout[src].begin() + (n + 1) * H);
          from_src.push_back(src);
        }
      }
      const int64_t Q = static_cast<int64_t>(from_src.size());
      const VExpertRecvPlan rp = plan_vexpert_recv(meta, Q, C, L);
      const int64_t p = dst / T, t = dst % T;
      std::vector<float> z(static_cast<size_t>(Q * H), 0.0f), dwq(static_cast<size_t>(Q * C), 0.0f);
      for (int64_t j = 0; j < L; ++j) {
        for (int64_t i = rp.offsets[j]; i < rp.offsets[j + 1]; ++i) {
          const int64_t q = rp.row_recv[i], c = rp.row_entry[i];
          const float e = static_cast<float>(p * L + j);
          float dot = 0.0f;
          for (int64_t h = 0; h < H; ++h) {
            const float y = (e + 1.0f) * rx[q * H + h] + 100.0f * static_cast<float>(t);
            z[q * H + h] += rw[q * C + c] * y;
            dot += rd[q * H + h] * y;
          }
          dwq[q * C + c] = dot;
        }
      }
      // The reverse all-to-all: each source gets its rows back, in its send order.
      for (int64_t q = 0; q < Q; ++q) {
        const int src = static_cast<int>(from_src[q]);
        back[src][dst].insert(back[src][dst].end(), z.begin() + q * H, z.begin() + (q + 1) * H);
        dw_back[src][dst].insert(dw_back[src][dst].end(), dwq.begin() + q * C, dwq.begin() + (q + 1) * C);
      }
    }
    for (int src = 0; src < R; ++src) {
      std::vector<float> back_SH, dw_SC;
      for (int dst = 0; dst < R; ++dst) {
        back_SH.insert(back_SH.end(), back[src][dst].begin(), back[src][dst].end());
        dw_SC.insert(dw_SC.end(), dw_back[src][dst].begin(), dw_back[src][dst].end());
      }
      const VExpertSendPlan& sp = send[src];
      ASSERT_EQ(back_SH.size(), sp.send_token.size() * H);
      std::vector<float> o(static_cast<size_t>(Nr[src] * H), 0.0f);
      for (size_t row = 0; row < sp.send_token.size(); ++row) {
        for (int64_t h = 0; h < H; ++h) o[sp.send_token[row] * H + h] += back_SH[row * H + h];
      }
      // The GPU kernel's order: per (n, k), the token's rows in send order, then t.
      const TokenRows tr = vexpert_token_rows(sp.send_token, Nr[src]);
      std::vector<float> g(static_cast<size_t>(Nr[src] * K), 0.0f);
      for (int64_t n = 0; n < Nr[src]; ++n) {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t b = tr.begin[n]; b < tr.begin[n + 1]; ++b) g[n * K + k] += dw_SC[tr.rows[b] * C + k];
        }
      }
      EXPECT_EQ(g, vexpert_fold_weight_grad(dw_SC, sp.send_token, Nr[src], K));
      // Expected, straight from the definition.
      for (int64_t n = 0; n < Nr[src]; ++n) {
        for (int64_t h = 0; h < H; ++h) {
          float want = 0.0f;
          for (int64_t k = 0; k < K; ++k) {
            const float e = static_cast<float>(idx[src][n * K + k]);
            for (int64_t t = 0; t < T; ++t) {
              want += w[src][n * K + k] * ((e + 1.0f) * x[src][n * H + h] + 100.0f * static_cast<float>(t));
            }
          }
          EXPECT_EQ(o[n * H + h], want) << "out[" << n << ", " << h << "] on rank " << src;
        }
        for (int64_t k = 0; k < K; ++k) {
          const float e = static_cast<float>(idx[src][n * K + k]);
          float want = 0.0f;
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t h = 0; h < H; ++h) {
              want += dout[src][n * H + h] * ((e + 1.0f) * x[src][n * H + h] + 100.0f * static_cast<float>(t));
            }
          }
          EXPECT_EQ(g[n * K + k], want) << "dw[" << n << ", " << k << "] on rank " << src;
        }
      }
    }
  }
}

// The in-place overloads refill a plan of another size (larger, smaller, empty) exactly as a fresh
// plan would: every field, sizes included (the CUDA layer keeps one plan across forwards).
TEST(VExpertPlan, RefilledPlansEqualFreshOnes) {
  const std::vector<Case> seq = {{13, 4, 16, 4, 2}, {5, 4, 16, 4, 2}, {0, 4, 16, 4, 2}, {20, 4, 16, 4, 2},
                                 {3, 2, 16, 2, 1}, {11, 4, 16, 1, 4}};
  VExpertSendPlan send;
  VExpertRecvPlan recv;
  uint32_t seed = 300;
  for (const Case& c : seq) {
    SCOPED_TRACE(::testing::Message() << "N " << c.N << " K " << c.K << " P " << c.P << " T " << c.T);
    const std::vector<int32_t> idx = routing(c, seed++, false);
    std::vector<float> w;
    for (int64_t f = 0; f < c.N * c.K; ++f) w.push_back(static_cast<float>(f) - 7.5f);
    plan_vexpert_send(idx, w, c.N, c.K, c.E, c.P, c.T, send);
    const VExpertSendPlan fresh = plan_vexpert_send(idx, w, c.N, c.K, c.E, c.P, c.T);
    EXPECT_EQ(send.num_entries, fresh.num_entries);
    EXPECT_EQ(send.send_token, fresh.send_token);
    EXPECT_EQ(send.send_counts, fresh.send_counts);
    EXPECT_EQ(send.meta, fresh.meta);
    EXPECT_EQ(bits(send.meta_w), bits(fresh.meta_w));
    const int64_t L = c.E / c.P, Q = static_cast<int64_t>(fresh.send_token.size());
    plan_vexpert_recv(fresh.meta, Q, fresh.num_entries, L, recv);
    const VExpertRecvPlan fresh_recv = plan_vexpert_recv(fresh.meta, Q, fresh.num_entries, L);
    EXPECT_EQ(recv.row_recv, fresh_recv.row_recv);
    EXPECT_EQ(recv.row_entry, fresh_recv.row_entry);
    EXPECT_EQ(recv.offsets, fresh_recv.offsets);
  }
}

TEST(VExpertPlan, RejectsBadInput) {
  const std::vector<int32_t> idx = {0, 8};
  EXPECT_THROW(plan_vexpert_send(idx, {}, 1, 2, 8, 2, 1), Error);          // id 8 >= E
  EXPECT_THROW(plan_vexpert_send(idx, {}, 1, 2, 6, 4, 1), Error);          // E % P != 0
  EXPECT_THROW(plan_vexpert_send(idx, {}, 2, 2, 8, 2, 1), Error);          // size
  const std::vector<int32_t> meta = {0, -1, 4, -1};
  EXPECT_THROW(plan_vexpert_recv(meta, 2, 2, 4), Error);                   // 4 >= L
  EXPECT_NO_THROW(plan_vexpert_recv(meta, 2, 2, 5));
  EXPECT_THROW(plan_vexpert_recv(std::vector<int32_t>{-2, 0}, 1, 2, 4), Error);  // below -1
}

}  // namespace
}  // namespace moetp::moe
