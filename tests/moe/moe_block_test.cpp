// The MoE block at every layout and dispatcher reproduces the single-rank block run on all ranks'
// tokens concatenated: each rank's output and dx, the router-weight gradient (all-reduced over
// world), the aux loss, and the expert-weight gradients (all-reduced over expert_dp, gathered
// over ep_etp to global form). Global weights come from the counter RNG: each rank builds only
// its own shard. Tokens differ per rank (N_g = 3 + 2·(g % 3)); routing is random, or skewed
// (expert 0 attracts most tokens).
#include <gtest/gtest.h>

#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "moe/moe_block.h"
#include "testing.h"

namespace moetp {
namespace {

using comm::Mesh;
using testing::world;

constexpr int64_t kE = 8, kK = 2, kH = 16, kI = 8;
constexpr float kCoef = 0.1f;
constexpr uint64_t kSeed = 5;

struct Layout {
  int D, P, T;
};
const Layout kLayouts[] = {{1, 1, 1}, {1, 2, 1}, {1, 4, 1}, {1, 1, 2}, {1, 2, 2}, {1, 1, 4}, {1, 2, 4}, {2, 2, 2}};

int64_t num_tokens(int g) { return 3 + 2 * (g % 3); }

Tensor tokens(int g, bool skewed) {
  // Skewed: positive inputs, so the router row with a positive bias (expert 0) wins most tokens.
  return testing::random_tensor({num_tokens(g), kH}, kSeed, 1000 + static_cast<uint64_t>(g), skewed ? 0.0f : -1.0f,
                                1.0f);
}

Tensor upstream(int g) { return testing::random_tensor({num_tokens(g), kH}, kSeed, 2000 + static_cast<uint64_t>(g)); }

moe::MoeParams init_params(const moe::MoeBlock& block, bool skewed) {
  moe::MoeParams p;
  shard::ShardSpec wg{{kE, kH}, {}, 0, -1};
  p.wg_EH = moe::init_normal(wg, kSeed, "router", 0.5f);
  if (skewed) {
    for (int64_t h = 0; h < kH; ++h) p.wg_EH.data<float>()[h] += 1.0f;
  }
  const int64_t L = block.num_local_experts(), i = block.local_intermediate();
  p.w13_L2iH = moe::init_normal(block.w13_spec(), kSeed, "w13", 0.3f).view({L, 2 * i, kH});
  p.w2_LHi = moe::init_normal(block.w2_spec(), kSeed, "w2", 0.3f).view({L, kH, i});
  return p;
}

struct Result {
  Tensor out, dx, dwg, dw13_full, dw2_full;
  double aux = 0;
  Tensor counts;
};

// Forward + backward of L = Σ out ⊙ R + coef · aux on this rank's tokens.
Result run_layer(const Mesh& mesh, const std::string& dispatcher, const Tensor& x, const Tensor& r, bool skewed) {
  moe::MoeBlock block({kH, kE, kK, kI, true, parse_option<DispatcherKind>(dispatcher, "dispatcher")}, mesh);
  const moe::MoeParams params = init_params(block, skewed);
  moe::MoeSaved saved;
  Result res;
  res.out = block.forward(x, params, saved);
  const moe::AuxLoss aux = moe::aux_loss({&saved}, mesh.world(), kE, kCoef);
  res.aux = aux.value;
  res.counts = aux.global_counts_E;
  moe::MoeParams grads = block.zeros_like_params();
  res.dx = block.backward(r, aux.d_probs_NE[0], params, saved, grads);
  res.dwg = grads.wg_EH;
  mesh.world().all_reduce(res.dwg, comm::ReduceOp::kSum);
  Tensor dw13 = grads.w13_L2iH.view({-1, kH});
  Tensor dw2 = grads.w2_LHi.view({-1, block.local_intermediate()});
  mesh.expert_dp().all_reduce(dw13, comm::ReduceOp::kSum);
  mesh.expert_dp().all_reduce(dw2, comm::ReduceOp::kSum);
  res.dw13_full = shard::gather_full(dw13, block.w13_spec(), mesh.ep_etp());
  res.dw2_full = shard::gather_full(dw2, block.w2_spec(), mesh.ep_etp());
  return res;
}

void check_layout(const Layout& l, const std::string& dispatcher, bool skewed) {
  SCOPED_TRACE(fmt::format("{}_D{}P{}T{}_{}", dispatcher, l.D, l.P, l.T, skewed ? "skewed" : "random"));
  auto& w = world();
  const int g = w.rank();
  Mesh mesh(w, l.P, l.T);
  const Result par = run_layer(mesh, dispatcher, tokens(g, skewed), upstream(g), skewed);

  // The single-rank reference on every rank's tokens, concatenated in rank order.
  auto self = w.split(g, 0, "self");
  Mesh single(*self, 1, 1);
  int64_t total = 0, mine = 0;
  for (int r = 0; r < w.size(); ++r) {
    if (r == g) mine = total;
    total += num_tokens(r);
  }
  Tensor x_all = Tensor::empty({total, kH}, DType::kF32), r_all = Tensor::empty({total, kH}, DType::kF32);
  for (int r = 0, off = 0; r < w.size(); off += static_cast<int>(num_tokens(r)), ++r) {
    x_all.narrow_rows(off, num_tokens(r)).copy_from(tokens(r, skewed));
    r_all.narrow_rows(off, num_tokens(r)).copy_from(upstream(r));
  }
  const Result ref = run_layer(single, "local", x_all, r_all, skewed);

  const auto tol = testing::kF32Parallel;
  EXPECT_TRUE(testing::close(par.out, ref.out.narrow_rows(mine, num_tokens(g)).contiguous(), tol)) << "output";
  EXPECT_TRUE(testing::close(par.dx, ref.dx.narrow_rows(mine, num_tokens(g)).contiguous(), tol)) << "dx";
  EXPECT_TRUE(testing::close(par.dwg, ref.dwg, tol)) << "router weight gradient";
  EXPECT_TRUE(testing::close(par.dw13_full, ref.dw13_full, tol)) << "dw13";
  EXPECT_TRUE(testing::close(par.dw2_full, ref.dw2_full, tol)) << "dw2";
  EXPECT_NEAR(par.aux, ref.aux, 1e-6 * std::abs(ref.aux)) << "aux loss";
  EXPECT_TRUE(testing::bit_equal(par.counts, ref.counts)) << "global expert counts";
  if (skewed) {
    const std::vector<float> c = ref.counts.to_vector<float>();
    EXPECT_GT(c[0], 0.4 * total) << "skewed routing should send most tokens to expert 0";
  }
}

class MoeBlockLayouts : public ::testing::TestWithParam<std::string> {};

TEST_P(MoeBlockLayouts, MatchesSingleRankLayer) {
  int ran = 0;
  for (const Layout& l : kLayouts) {
    if (l.D * l.P * l.T != world().size()) continue;
    if (GetParam() == "local" && (l.P != 1 || l.T != 1)) continue;
    for (bool skewed : {false, true}) check_layout(l, GetParam(), skewed);
    ++ran;
  }
  if (ran == 0) GTEST_SKIP() << GetParam() << " has no listed layout at world size " << world().size();
}

INSTANTIATE_TEST_SUITE_P(Dispatchers, MoeBlockLayouts, ::testing::Values("local", "allgather", "all2all", "vexpert"),
                         [](const auto& info) { return info.param; });

// Recomputation (MoeBlock::release / recompute): the backward after a recompute gives the same bits
// as after the forward, and the recompute reuses the forward's routing: it runs with a router
// weight that would route differently (the backward then gets the original one), and nothing
// changes. Every dispatcher, every listed layout of this world size.
TEST(MoeBlockRecompute, ReusesTheForwardRoutingBitExactly) {
  auto& w = world();
  const int g = w.rank();
  int ran = 0;
  for (const Layout& l : kLayouts) {
    if (l.D * l.P * l.T != w.size()) continue;
    Mesh mesh(w, l.P, l.T);
    for (const char* name : {"local", "allgather", "all2all", "vexpert"}) {
      if (std::string(name) == "local" && (l.P != 1 || l.T != 1)) continue;
      SCOPED_TRACE(fmt::format("{}_D{}P{}T{}", name, l.D, l.P, l.T));
      moe::MoeBlock block({kH, kE, kK, kI, true, parse_option<DispatcherKind>(name, "dispatcher")}, mesh);
      const moe::MoeParams params = init_params(block, false);
      moe::MoeParams other = params;
      other.wg_EH = testing::random_tensor({kE, kH}, kSeed, 77, -2.0f, 2.0f);
      const Tensor x = tokens(g, false), r = upstream(g);
      const Tensor d_probs = testing::random_tensor({num_tokens(g), kE}, kSeed, 3000 + static_cast<uint64_t>(g));
      auto run = [&](bool recompute, const moe::MoeParams& fwd_params) {
        moe::MoeSaved saved;
        moe::MoeParams grads = block.zeros_like_params();
        const Tensor out = block.forward(x, fwd_params, saved);
        if (recompute) {
          block.release(saved);
          EXPECT_THROW(block.backward(r, d_probs, params, saved, grads), Error) << "backward without the rows";
          block.recompute(x, other, saved);
          EXPECT_THROW(block.recompute(x, other, saved), Error) << "a second recompute without a release";
        }
        const Tensor dx = block.backward(r, d_probs, params, saved, grads);
        return std::vector<Tensor>{out, dx, grads.wg_EH, grads.w13_L2iH, grads.w2_LHi, saved.counts_E};
      };
      const auto ref = run(false, params);
      const auto rec = run(true, params);
      for (size_t k = 0; k < ref.size(); ++k) EXPECT_TRUE(testing::bit_equal(rec[k], ref[k])) << "result " << k;
      // The other router weight does route differently: a recompute that re-routed would differ.
      const auto rerouted = run(false, other);
      const int64_t differs = w.all_reduce_scalar(int64_t{!testing::bit_equal(rerouted[5], ref[5])}, comm::ReduceOp::kMax);
      EXPECT_EQ(differs, 1) << "the test's second router weight routes like the first";
    }
    ++ran;
  }
  if (ran == 0) GTEST_SKIP() << "no listed layout at world size " << w.size();
}

TEST(MoeBlockBadInput, InvalidSizesAndNaNLogitsFailOnEveryRank) {
  auto& w = world();
  Mesh flat(w, 1, w.size());
  if (w.size() > 1) {
    EXPECT_NE(testing::error_of([&] { moe::MoeBlock b({kH, kE, kK, 3, true, DispatcherKind::kAll2all}, flat); })
                  .find("moe_intermediate_size (3) % etp (" + std::to_string(w.size()) + ")"),
              std::string::npos);
  }
  EXPECT_NE(testing::error_of([&] { moe::MoeBlock b({kH, kE, 9, kI, true, DispatcherKind::kAll2all}, flat); }).find("top_k (9) > num_experts (8)"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { moe::MoeBlock b({kH, kE, kK, kI, true, DispatcherKind::kAuto}, flat); })
                .find("dispatcher 'auto' must be resolved"),
            std::string::npos);
  // NaN in one rank's input: every rank stops with a message naming rank 0's token.
  moe::MoeBlock block({kH, kE, kK, kI, true, w.size() == 1 ? DispatcherKind::kLocal : DispatcherKind::kVexpert}, flat);
  const moe::MoeParams params = init_params(block, false);
  Tensor x = tokens(w.rank(), false);
  if (w.rank() == 0) x.data<float>()[3] = std::nanf("");
  moe::MoeSaved saved;
  const std::string err = testing::error_of([&] { block.forward(x, params, saved); });
  EXPECT_NE(err.find("MoE router failed"), std::string::npos) << err;
  EXPECT_NE(err.find("rank 0:"), std::string::npos) << err;
  EXPECT_NE(err.find("NaN"), std::string::npos) << err;
}

}  // namespace
}  // namespace moetp
