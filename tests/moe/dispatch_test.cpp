// Dispatchers checked for exact data movement at every layout of this job's world size.
//
// Routing (a formula, so every rank can rebuild every other rank's routing without talking):
//   tokens on world rank g:   N_g = (2 + 5g) % 7          (rank 1 has none)
//   payload:                  x_g[n, c] = 1000·g + 10·n + c
//   random routing:           K distinct experts drawn by CounterRng(seed 11, stream g)
//   skewed routing:           slot 0 -> expert 0 for every token, other slots from {1, 2, 3};
//                             experts 4..7 receive nothing
//   weights:                  w[n, k] = 0.5·(k + 1)
// Mock expert on rank (p, t): y = x + 100·e + 10000·t (so partials of different TP ranks differ).
// Every quantity is a small integer or half-integer, so sums are exact in any order: dispatch,
// combine and both backward moves are compared bit-exactly; the routing-weight gradient (a dot
// product) within a tolerance.
#include <gtest/gtest.h>

#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "moe/dispatcher.h"
#include "testing.h"

namespace moetp {
namespace {

using comm::Mesh;
using testing::world;

constexpr int64_t kE = 8, kK = 3, kH = 4;

struct Layout {
  int D, P, T;
};
const Layout kLayouts[] = {{1, 1, 1}, {1, 2, 1}, {1, 4, 1}, {1, 1, 2}, {1, 2, 2},
                           {1, 1, 4}, {1, 2, 4}, {2, 2, 2}, {2, 1, 1}};

enum class Routing { kRandom, kSkewed };

int64_t num_tokens(int g) { return (2 + 5 * g) % 7; }

Tensor payload(int g) {
  const int64_t n = num_tokens(g);
  Tensor x = Tensor::empty({n, kH}, DType::kF32);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < kH; ++c) x.data<float>()[i * kH + c] = static_cast<float>(1000 * g + 10 * i + c);
  }
  return x;
}

std::vector<int32_t> routing(int g, Routing kind) {
  const int64_t n = num_tokens(g);
  CounterRng rng(11, static_cast<uint64_t>(g));
  std::vector<int32_t> idx;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int32_t> chosen;
    uint64_t draw = static_cast<uint64_t>(i) * 64;
    if (kind == Routing::kSkewed) chosen.push_back(0);
    while (static_cast<int64_t>(chosen.size()) < kK) {
      const int32_t e = kind == Routing::kSkewed ? 1 + static_cast<int32_t>(rng.uniform(draw++) * 3)
                                                 : static_cast<int32_t>(rng.uniform(draw++) * kE);
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    idx.insert(idx.end(), chosen.begin(), chosen.end());
  }
  return idx;
}

Tensor weights(int g) {
  std::vector<float> w;
  for (int64_t i = 0; i < num_tokens(g); ++i) {
    for (int64_t k = 0; k < kK; ++k) w.push_back(0.5f * static_cast<float>(k + 1));
  }
  return Tensor::from_vector<float>(w, {num_tokens(g), kK});
}

// A dispatched row's identity.
struct RowId {
  int g;      // source world rank
  int64_t n;  // token
  int64_t k;  // slot
  int32_t e;  // global expert
};

// etp_spec §6.1 order on rank (d, p, ·): local expert, source rank, token, slot.
std::vector<RowId> expected_rows(const Mesh& mesh, Routing kind, std::vector<int64_t>& offsets) {
  const int64_t L = kE / mesh.ep_size();
  const int group = mesh.ep_size() * mesh.etp_size();
  std::vector<RowId> rows;
  offsets.assign(1, 0);
  for (int64_t j = 0; j < L; ++j) {
    const int32_t e = static_cast<int32_t>(mesh.coords().p * L + j);
    for (int r = 0; r < group; ++r) {
      const int g = mesh.coords().d * group + r;
      const std::vector<int32_t> idx = routing(g, kind);
      for (int64_t n = 0; n < num_tokens(g); ++n) {
        for (int64_t k = 0; k < kK; ++k) {
          if (idx[n * kK + k] == e) rows.push_back({g, n, k, e});
        }
      }
    }
    offsets.push_back(static_cast<int64_t>(rows.size()));
  }
  return rows;
}

float mock_shift(int32_t e, int t) { return 100.0f * static_cast<float>(e) + 10000.0f * static_cast<float>(t); }

struct Case {
  Layout layout;
  std::string dispatcher;
  Routing routing;
  std::string label() const {
    return fmt::format("{}_D{}P{}T{}_{}", dispatcher, layout.D, layout.P, layout.T,
                       routing == Routing::kRandom ? "random" : "skewed");
  }
};

std::vector<Case> cases_for_world(int w) {
  std::vector<Case> out;
  for (const Layout& l : kLayouts) {
    if (l.D * l.P * l.T != w) continue;
    for (const DispatcherKind kind : moe::kDispatchers) {
      if (kind == DispatcherKind::kLocal && (l.P != 1 || l.T != 1)) continue;
      for (Routing r : {Routing::kRandom, Routing::kSkewed}) out.push_back({l, std::string(option_name(kind)), r});
    }
  }
  return out;
}

void run_case(const Case& c) {
  SCOPED_TRACE(c.label());
  auto& w = world();
  Mesh mesh(w, c.layout.P, c.layout.T);
  auto disp = moe::make_dispatcher(parse_option<DispatcherKind>(c.dispatcher, "dispatcher"), mesh, {kE, kK});
  const int g = w.rank();
  const int t = mesh.coords().t;
  const Tensor x = payload(g);
  const std::vector<int32_t> idx_v = routing(g, c.routing);
  const Tensor idx = Tensor::from_vector<int32_t>(idx_v, {num_tokens(g), kK});
  const Tensor wts = weights(g);

  // dispatch: bit-exact rows and offsets
  std::unique_ptr<moe::DispatchState> state;
  moe::Dispatched d = disp->dispatch(x, idx, wts, state);
  std::vector<int64_t> offsets;
  const std::vector<RowId> rows = expected_rows(mesh, c.routing, offsets);
  Tensor expected_x = Tensor::empty({static_cast<int64_t>(rows.size()), kH}, DType::kF32);
  for (size_t i = 0; i < rows.size(); ++i) {
    expected_x.narrow_rows(static_cast<int64_t>(i), 1).copy_from(payload(rows[i].g).narrow_rows(rows[i].n, 1));
  }
  EXPECT_EQ(d.offsets, offsets);
  EXPECT_TRUE(testing::bit_equal(d.x_MH, expected_x));

  // combine with the mock expert: out[n] = Σ_k w_k Σ_t (x_n + 100 e_k + 10000 t)
  Tensor y = d.x_MH.clone();
  for (size_t i = 0; i < rows.size() && i < static_cast<size_t>(y.rows()); ++i) {
    for (int64_t col = 0; col < kH; ++col) y.data<float>()[i * kH + col] += mock_shift(rows[i].e, t);
  }
  Tensor out = disp->combine(y, *state);
  Tensor expected_out = Tensor::zeros({num_tokens(g), kH}, DType::kF32);
  Tensor expected_dx = Tensor::zeros({num_tokens(g), kH}, DType::kF32);
  for (int64_t n = 0; n < num_tokens(g); ++n) {
    for (int64_t k = 0; k < kK; ++k) {
      for (int tt = 0; tt < c.layout.T; ++tt) {
        for (int64_t col = 0; col < kH; ++col) {
          const float v = x.data<float>()[n * kH + col] + mock_shift(idx_v[n * kK + k], tt);
          expected_out.data<float>()[n * kH + col] += wts.data<float>()[n * kK + k] * v;
          expected_dx.data<float>()[n * kH + col] += v;
        }
      }
    }
  }
  EXPECT_TRUE(testing::bit_equal(out, expected_out)) << "combine";

  // combine backward: dy[i] = w · dout[source token]; dw[n, k] = <dout[n], Σ_t y_t(n, k)>
  const Tensor dout = payload(g);  // any identifiable rows
  moe::CombineGrads cg = disp->combine_backward(dout, *state);
  Tensor expected_dy = Tensor::empty({static_cast<int64_t>(rows.size()), kH}, DType::kF32);
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int64_t col = 0; col < kH; ++col) {
      expected_dy.data<float>()[i * kH + col] =
          weights(rows[i].g).data<float>()[rows[i].n * kK + rows[i].k] * payload(rows[i].g).data<float>()[rows[i].n * kH + col];
    }
  }
  EXPECT_TRUE(testing::bit_equal(cg.dy_MH, expected_dy)) << "combine_backward dy";
  Tensor expected_dw = Tensor::zeros({num_tokens(g), kK}, DType::kF32);
  for (int64_t n = 0; n < num_tokens(g); ++n) {
    for (int64_t k = 0; k < kK; ++k) {
      double acc = 0;
      for (int tt = 0; tt < c.layout.T; ++tt) {
        for (int64_t col = 0; col < kH; ++col) {
          acc += static_cast<double>(dout.data<float>()[n * kH + col]) *
                 (x.data<float>()[n * kH + col] + mock_shift(idx_v[n * kK + k], tt));
        }
      }
      expected_dw.data<float>()[n * kK + k] = static_cast<float>(acc);
    }
  }
  if (num_tokens(g) > 0) {
    EXPECT_TRUE(testing::close(cg.dtopk_weight_NK, expected_dw, testing::kF32Exactish));
  }
  EXPECT_EQ(cg.dtopk_weight_NK.shape(), (Shape{num_tokens(g), kK}));

  // dispatch backward with the mock rows as gradients: dx[n] = Σ_k Σ_t (x_n + 100 e_k + 10000 t)
  Tensor dx = disp->dispatch_backward(y, *state);
  EXPECT_TRUE(testing::bit_equal(dx, expected_dx)) << "dispatch_backward";
}

TEST(MoeDispatch, AllDispatchersMoveRowsExactlyAtEveryLayout) {
  const std::vector<Case> cases = cases_for_world(world().size());
  ASSERT_FALSE(cases.empty());
  for (const Case& c : cases) run_case(c);
}

// One test per dispatcher name, so the suite can be filtered and read by dispatcher.
class MoeDispatchByName : public ::testing::TestWithParam<std::string> {};
TEST_P(MoeDispatchByName, MovesRowsExactly) {
  int ran = 0;
  for (const Case& c : cases_for_world(world().size())) {
    if (c.dispatcher != GetParam()) continue;
    run_case(c);
    ++ran;
  }
  if (ran == 0) GTEST_SKIP() << GetParam() << " has no layout at world size " << world().size();
}
INSTANTIATE_TEST_SUITE_P(Dispatchers, MoeDispatchByName,
                         ::testing::Values("local", "allgather", "all2all", "vexpert"),
                         [](const auto& info) { return info.param; });

// The worked example of XTuner's validation script (etp_spec §10): E=6, P=2, T=2, K=2, two scalar
// tokens per rank, mock expert in + 100·e identical on both TP ranks, so partials double.
TEST(MoeDispatch, XtunerWorkedExampleAllDispatchers) {
  auto& w = world();
  if (w.size() != 4) GTEST_SKIP() << "needs 4 ranks";
  const float tokens[4][2] = {{10, 11}, {12, 13}, {20, 21}, {22, 23}};
  const int32_t ids[4][4] = {{0, 4, 3, 1}, {2, 5, 4, 0}, {1, 3, 4, 2}, {5, 0, 3, 1}};
  const float wts[4][4] = {{.25f, .75f, .4f, .6f}, {.7f, .3f, .8f, .2f}, {.2f, .8f, .5f, .5f}, {.9f, .1f, .35f, .65f}};
  const float expected[4][2] = {{620, 382}, {604, 666}, {560, 642}, {944, 386}};
  Mesh mesh(w, 2, 2);
  const int g = w.rank();
  for (const DispatcherKind kind : {DispatcherKind::kAllgather, DispatcherKind::kAll2all, DispatcherKind::kVexpert}) {
    SCOPED_TRACE(option_name(kind));
    auto disp = moe::make_dispatcher(kind, mesh, {6, 2});
    std::unique_ptr<moe::DispatchState> state;
    moe::Dispatched d = disp->dispatch(Tensor::from_vector<float>({tokens[g][0], tokens[g][1]}, {2, 1}),
                                       Tensor::from_vector<int32_t>({ids[g][0], ids[g][1], ids[g][2], ids[g][3]}, {2, 2}),
                                       Tensor::from_vector<float>({wts[g][0], wts[g][1], wts[g][2], wts[g][3]}, {2, 2}),
                                       state);
    Tensor y = d.x_MH.clone();
    for (int64_t j = 0; j < 3; ++j) {
      for (int64_t i = d.offsets[j]; i < d.offsets[j + 1]; ++i) y.data<float>()[i] += 100.0f * (mesh.coords().p * 3 + j);
    }
    const std::vector<float> out = disp->combine(y, *state).to_vector<float>();
    EXPECT_NEAR(out[0], expected[g][0], 1e-3);
    EXPECT_NEAR(out[1], expected[g][1], 1e-3);
  }
}

TEST(MoeDispatch, ExpandTopkForTpMatchesTheSpecExample) {
  // E=4, P=2, T=2: a token routed to experts [0, 3] becomes virtual ids [0, 2, 5, 7].
  Tensor v = moe::expand_topk_for_tp(Tensor::from_vector<int32_t>({0, 3}, {1, 2}), 4, 2, 2);
  EXPECT_EQ(v.to_vector<int32_t>(), (std::vector<int32_t>{0, 2, 5, 7}));
}

TEST(MoeDispatchBadInput, ErrorsNameTheValuesOnEveryRank) {
  auto& w = world();
  Mesh mesh(w, 1, 1);
  EXPECT_NE(testing::error_of([&] { parse_option<DispatcherKind>("deepep", "moe.dispatcher"); })
                .find("moe.dispatcher: 'deepep' is not one of auto | local | allgather | all2all | vexpert"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { moe::make_dispatcher(DispatcherKind::kAuto, mesh, {8, 2}); })
                .find("dispatcher 'auto' must be resolved"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { moe::make_dispatcher(DispatcherKind::kAllgather, mesh, {4, 5}); }).find("top_k (5) > num_experts (4)"),
            std::string::npos);
  // An out-of-range expert id on rank 0 only: every rank of the group gets the error, nobody hangs.
  Mesh flat(w, w.size(), 1);
  auto disp = moe::make_dispatcher(w.size() == 1 ? DispatcherKind::kLocal : DispatcherKind::kAllgather, flat, {8, 2});
  std::unique_ptr<moe::DispatchState> state;
  const int32_t bad = w.rank() == 0 ? 9 : 1;
  const std::string err = testing::error_of([&] {
    disp->dispatch(Tensor::zeros({1, 4}, DType::kF32), Tensor::from_vector<int32_t>({0, bad}, {1, 2}),
                   Tensor::zeros({1, 2}, DType::kF32), state);
  });
  EXPECT_NE(err.find("rank 0: topk_idx[0, 1] = 9 is not an expert id in [0, 8)"), std::string::npos) << err;
  if (w.size() % 4 == 0) {
    Mesh m4(w, 4, 1);
    EXPECT_NE(testing::error_of([&] { moe::make_dispatcher(DispatcherKind::kAll2all, m4, {6, 2}); }).find("num_experts (6) % ep (4) = 2 != 0"),
              std::string::npos);
  }
}

}  // namespace
}  // namespace moetp
