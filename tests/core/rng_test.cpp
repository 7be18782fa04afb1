#include "core/rng.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace moetp {
namespace {

// Known-answer vectors for Philox4x32-10 from Random123's kat_vectors.
TEST(Philox, KnownAnswerVectors) {
  EXPECT_EQ(philox4x32({0, 0, 0, 0}, {0, 0}), (Philox4x32{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox4x32({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}),
            (Philox4x32{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox4x32({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}),
            (Philox4x32{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(CounterRng, IsAPureFunctionOfSeedStreamAndIndex) {
  CounterRng a(42, stream_id("model.layers.0.mlp.experts.w13"));
  CounterRng b(42, stream_id("model.layers.0.mlp.experts.w13"));
  CounterRng other_stream(42, stream_id("model.layers.0.mlp.experts.w2"));
  CounterRng other_seed(43, stream_id("model.layers.0.mlp.experts.w13"));
  int diff_stream = 0, diff_seed = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    EXPECT_EQ(a.uniform(i), b.uniform(i));
    diff_stream += a.uniform(i) != other_stream.uniform(i);
    diff_seed += a.uniform(i) != other_seed.uniform(i);
  }
  EXPECT_GT(diff_stream, 990);
  EXPECT_GT(diff_seed, 990);
  EXPECT_EQ(stream_id("abc"), 0xe71fa2190541574bull);  // FNV-1a 64 of "abc"
}

TEST(CounterRng, ShardedFillEqualsSliceOfFullFill) {
  CounterRng rng(7, 99);
  std::vector<float> full(1000);
  fill_normal(full, rng, 0, 0.0f, 0.02f);
  std::vector<float> shard(250);
  fill_normal(shard, rng, 500, 0.0f, 0.02f);
  for (size_t i = 0; i < shard.size(); ++i) EXPECT_EQ(shard[i], full[500 + i]);
}

TEST(CounterRng, UniformAndNormalMoments) {
  CounterRng rng(1, 2);
  constexpr int kN = 200000;
  double su = 0, su2 = 0, sn = 0, sn2 = 0;
  float umin = 1, umax = 0;
  for (int i = 0; i < kN; ++i) {
    const double u = rng.uniform(i);
    const double n = rng.normal(i);
    su += u;
    su2 += u * u;
    sn += n;
    sn2 += n * n;
    umin = std::min<float>(umin, u);
    umax = std::max<float>(umax, u);
  }
  EXPECT_NEAR(su / kN, 0.5, 0.005);
  EXPECT_NEAR(su2 / kN - (su / kN) * (su / kN), 1.0 / 12.0, 0.002);
  EXPECT_NEAR(sn / kN, 0.0, 0.01);
  EXPECT_NEAR(sn2 / kN, 1.0, 0.01);
  EXPECT_GE(umin, 0.0f);
  EXPECT_LT(umax, 1.0f);
}

}  // namespace
}  // namespace moetp
