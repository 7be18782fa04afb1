// moe::MoeLayer::release_activations on the CPU backend (the recomputation path): after a release
// the routing statistics stay, a backward is refused until a new forward or a recompute, and either
// followed by its backward gives the same bits as a layer that never released (the forward is
// deterministic; recompute reuses the routing).
// Runs under mpirun -np 1 (the CPU layer needs a one-rank mesh).
#include <gtest/gtest.h>

#include "backend/backend.h"
#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "testing.h"

namespace moetp {
namespace {

TEST(CpuMoeLayer, ReleasedActivationsNeedANewForwardThatGivesTheSameBits) {
  MOETP_REQUIRE_WORLD_SIZE(1);
  comm::Mesh mesh(testing::world(), 1, 1);
  backend::Backend& be = backend::get(Device::kCpu);
  const int64_t N = 24, H = 16, E = 6, K = 2, I = 8;
  const moe::MoeConfig cfg{H, E, K, I, true, DispatcherKind::kLocal};
  const moe::MoeParams work{testing::random_tensor({E, H}, 4, 1), testing::random_tensor({E, 2 * I, H}, 4, 2),
                            testing::random_tensor({E, H, I}, 4, 3)};
  const Tensor x = testing::random_tensor({N, H}, 4, 4), dout = testing::random_tensor({N, H}, 4, 5);
  auto make = [&](moe::MoeParams& grads) {
    moe::MoeLayerOptions opts;
    opts.mesh = &mesh;
    std::unique_ptr<moe::MoeLayer> layer = be.make_moe_layer(cfg, opts);
    grads = {Tensor::zeros(work.wg_EH.shape(), DType::kF32), Tensor::zeros(work.w13_L2iH.shape(), DType::kF32),
             Tensor::zeros(work.w2_LHi.shape(), DType::kF32)};
    layer->bind(work, grads);
    return layer;
  };
  moe::MoeParams ref_grads, grads;
  auto ref = make(ref_grads);
  const Tensor ref_out = ref->forward(x);
  const Tensor ref_dx = ref->backward(dout, Tensor());

  auto layer = make(grads);
  const Tensor out = layer->forward(x);
  const moe::RoutingStats stats = layer->routing_stats();
  layer->release_activations();
  EXPECT_EQ(layer->routing_stats().counts_E, stats.counts_E) << "the statistics stay";
  EXPECT_EQ(layer->routing_stats().prob_sums_E, stats.prob_sums_E);
  testing::expect_error([&] { layer->backward(dout, Tensor()); }, {"needs a forward"});
  EXPECT_TRUE(testing::bit_equal(layer->forward(x), ref_out));
  EXPECT_TRUE(testing::bit_equal(layer->backward(dout, Tensor()), ref_dx));
  EXPECT_TRUE(testing::bit_equal(grads.w13_L2iH, ref_grads.w13_L2iH));
  EXPECT_TRUE(testing::bit_equal(grads.wg_EH, ref_grads.wg_EH));
  EXPECT_TRUE(testing::bit_equal(out, ref_out));

  // The recomputation path: forward, release, recompute from the same input, backward.
  moe::MoeParams rec_grads;
  auto rec = make(rec_grads);
  rec->forward(x);
  rec->release_activations();
  rec->recompute(x);
  EXPECT_TRUE(testing::bit_equal(rec->backward(dout, Tensor()), ref_dx));
  EXPECT_TRUE(testing::bit_equal(rec_grads.w13_L2iH, ref_grads.w13_L2iH));
  EXPECT_TRUE(testing::bit_equal(rec_grads.w2_LHi, ref_grads.w2_LHi));
  EXPECT_TRUE(testing::bit_equal(rec_grads.wg_EH, ref_grads.wg_EH));
  testing::expect_error([&] { rec->recompute(x); }, {"MoE recompute needs a forward"});
}

}  // namespace
}  // namespace moetp
