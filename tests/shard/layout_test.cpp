// Shard layouts on one process: compute_runs against hand examples (etp_spec §3.3), against two
// independent references (the expert-weight formula below and XTuner's index-list algorithm,
// etp_spec §10), and extract_local / scatter_into_global round trips over every rank.
//
// Expert-weight formula (etp_spec §3.2), rank (p, t), L = E/P, i = I/T, local expert j:
//   w13 local row (2j + proj)·i + k  <-  global row (p·L + j)·2I + proj·I + t·i + k   (proj 0 gate, 1 up)
//   w2  local row j·H + h            <-  global row (p·L + j)·H + h, columns [t·i, (t+1)·i)
// Payloads encode their origin: global[row, col] = row·num_cols + col (exact in f32 below 2^24).
#include "shard/layout.h"

#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "testing.h"

namespace moetp::shard {
namespace {

using testing::bit_equal;
// (Inside TEST bodies a bare `Run` names testing::Test::Run, hence the alias.)
using Runs = std::vector<shard::Run>;

// Global row of every local row, in local order.
std::vector<int64_t> expand(const Runs& runs) {
  std::vector<int64_t> rows;
  for (const Run& r : runs) {
    EXPECT_EQ(r.local_row, static_cast<int64_t>(rows.size())) << "local rows must be consecutive";
    for (int64_t k = 0; k < r.length; ++k) rows.push_back(r.global_row + k);
  }
  return rows;
}

// Runs must be maximal: no two neighbours continue each other in global rows, none empty.
void expect_merged(const Runs& runs) {
  for (size_t i = 0; i < runs.size(); ++i) {
    EXPECT_GT(runs[i].length, 0);
    if (i > 0) {
      EXPECT_NE(runs[i - 1].global_row + runs[i - 1].length, runs[i].global_row) << "run " << i;
    }
  }
}

std::vector<int64_t> w13_rows_reference(int64_t E, int64_t I, int P, int p, int T, int t) {
  const int64_t L = E / P, i = I / T;
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t proj = 0; proj < 2; ++proj) {
      for (int64_t k = 0; k < i; ++k) rows.push_back((p * L + j) * 2 * I + proj * I + t * i + k);
    }
  }
  return rows;
}

std::vector<int64_t> w2_rows_reference(int64_t E, int64_t H, int P, int p) {
  const int64_t L = E / P;
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t h = 0; h < H; ++h) rows.push_back((p * L + j) * H + h);
  }
  return rows;
}

// XTuner's compute_runs as an index list (notes §4.4): indices = [prev[i] for i in new].
std::vector<int64_t> index_list_reference(const ShardSpec& spec) {
  std::vector<int64_t> idx(static_cast<size_t>(spec.global_shape[0]));
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
  for (const MeshDimPlacement& m : spec.dims) {
    const int64_t n = static_cast<int64_t>(idx.size());
    std::vector<int64_t> keep;
    if (m.placement.kind == Placement::Kind::kReplicate) {
      keep = idx;
    } else {
      const int64_t sf = m.placement.kind == Placement::Kind::kShard ? 1 : m.placement.num_stripes;
      const int64_t chunk = n / (m.size * sf);
      for (int64_t j = 0; j < sf; ++j) {
        for (int64_t k = 0; k < chunk; ++k) keep.push_back(idx[static_cast<size_t>((j * m.size + m.rank) * chunk + k)]);
      }
    }
    idx = keep;
  }
  return idx;
}

Tensor encoded_global(const Shape& shape) {
  Tensor g = Tensor::empty(shape, DType::kF32);
  float* p = g.data<float>();
  for (int64_t e = 0; e < g.numel(); ++e) p[e] = static_cast<float>(e);
  return g;
}

// ---- hand examples ----

TEST(LayoutRuns, SpecExampleE2I2P1T2) {
  EXPECT_EQ(compute_runs(w13_spec(2, 2, 3, 1, 0, 2, 0)), (Runs{{0, 0, 1}, {2, 1, 1}, {4, 2, 1}, {6, 3, 1}}));
  EXPECT_EQ(compute_runs(w13_spec(2, 2, 3, 1, 0, 2, 1)), (Runs{{1, 0, 1}, {3, 1, 1}, {5, 2, 1}, {7, 3, 1}}));
  EXPECT_EQ(local_shape(w13_spec(2, 2, 3, 1, 0, 2, 1)), (Shape{4, 3}));
}

TEST(LayoutRuns, SpecExampleE4I2P2T2) {
  for (int p = 0; p < 2; ++p) {
    for (int t = 0; t < 2; ++t) {
      Runs expected;
      for (int64_t s = 0; s < 4; ++s) expected.push_back({8 * p + 2 * s + t, s, 1});
      EXPECT_EQ(compute_runs(w13_spec(4, 2, 5, 2, p, 2, t)), expected) << "p=" << p << " t=" << t;
    }
  }
}

TEST(LayoutRuns, XtunerUnitTestExampleEp2Tp2Stripes2) {
  // E=4, 4 out rows per expert, in 8: global [16, 8], (Shard(0), InterleavedShard(0, 2)).
  for (int ep = 0; ep < 2; ++ep) {
    for (int tp = 0; tp < 2; ++tp) {
      const ShardSpec spec{{16, 8}, {{2, ep, Placement::shard()}, {2, tp, Placement::interleaved(2)}}};
      EXPECT_EQ(compute_runs(spec), (Runs{{8 * ep + 2 * tp, 0, 2}, {8 * ep + 4 + 2 * tp, 2, 2}}))
          << "ep=" << ep << " tp=" << tp;
    }
  }
}

TEST(LayoutRuns, Qwen3_30B_A3B_W13AndW2) {
  // 128 experts, moe_intermediate_size 768, hidden 2048; P=2, T=4. Runs only: nothing allocated.
  for (int p = 0; p < 2; ++p) {
    for (int t = 0; t < 4; ++t) {
      const ShardSpec w13 = w13_spec(128, 768, 2048, 2, p, 4, t);
      EXPECT_EQ(w13.global_shape, (Shape{196608, 2048}));
      Runs expected;
      for (int64_t s = 0; s < 128; ++s) expected.push_back({p * 98304 + s * 768 + t * 192, s * 192, 192});
      EXPECT_EQ(compute_runs(w13), expected) << "p=" << p << " t=" << t;
      EXPECT_EQ(local_shape(w13), (Shape{24576, 2048}));
      const ShardSpec w2 = w2_spec(128, 768, 2048, 2, p, 4, t);
      EXPECT_EQ(compute_runs(w2), (Runs{{p * 131072, 0, 131072}}));
      EXPECT_EQ(local_shape(w2), (Shape{131072, 192}));
      EXPECT_EQ(column_range(w2).begin, t * 192);
    }
  }
}

TEST(LayoutRuns, TrivialPlacementsGiveOneRun) {
  EXPECT_EQ(compute_runs(w13_spec(4, 6, 2, 1, 0, 1, 0)), (Runs{{0, 0, 48}}));
  const ShardSpec replicated{{12, 3}, {{4, 3, Placement::replicate()}, {3, 1, Placement::interleaved(2)}}};
  EXPECT_EQ(compute_runs(replicated), (Runs{{2, 0, 2}, {8, 2, 2}}));
  EXPECT_TRUE(compute_runs(ShardSpec{{0, 4}, {{2, 1, Placement::shard()}}}).empty());
  EXPECT_EQ(describe(replicated), "[12, 3] rows: 4@3:replicate > 3@1:interleaved(2); cols [0, -1)");
}

// ---- random layouts against the references ----

TEST(LayoutRandom, ExpertSpecsMatchTheFormula) {
  for (uint32_t seed = 1; seed <= 40; ++seed) {
    std::mt19937 rng(seed);
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const int P = pick(1, 4), T = pick(1, 4);
    const int64_t E = P * pick(1, 3), I = T * pick(1, 3), H = pick(1, 5);
    for (int p = 0; p < P; ++p) {
      for (int t = 0; t < T; ++t) {
        SCOPED_TRACE(fmt::format("seed {} E={} I={} H={} P={} p={} T={} t={}", seed, E, I, H, P, p, T, t));
        const Runs w13 = compute_runs(w13_spec(E, I, H, P, p, T, t));
        expect_merged(w13);
        EXPECT_EQ(expand(w13), w13_rows_reference(E, I, P, p, T, t));
        const ShardSpec w2 = w2_spec(E, I, H, P, p, T, t);
        EXPECT_EQ(expand(compute_runs(w2)), w2_rows_reference(E, H, P, p));
        EXPECT_EQ(local_shape(w2), (Shape{E / P * H, I / T}));
      }
    }
  }
}

TEST(LayoutRandom, PlacementChainsMatchIndexListReference) {
  for (uint32_t seed = 1; seed <= 200; ++seed) {
    std::mt19937 rng(seed);
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    ShardSpec spec;
    int64_t rows = pick(1, 3);
    const int num_dims = pick(0, 3);
    for (int d = 0; d < num_dims; ++d) {
      const int size = pick(1, 4);
      const int kind = pick(0, 2);
      const Placement pl = kind == 0 ? Placement::replicate()
                           : kind == 1 ? Placement::shard()
                                       : Placement::interleaved(pick(1, 4));
      rows *= size * pl.num_stripes;  // makes every stage divisible
      spec.dims.push_back({size, pick(0, size - 1), pl});
    }
    spec.global_shape = {rows, 2};
    SCOPED_TRACE(fmt::format("seed {}: {}", seed, describe(spec)));
    const Runs runs = compute_runs(spec);
    expect_merged(runs);
    EXPECT_EQ(expand(runs), index_list_reference(spec));
    EXPECT_EQ(local_rows(spec), static_cast<int64_t>(index_list_reference(spec).size()));
  }
}

// ---- extract / scatter over every rank of a layout ----

struct ExpertLayout {
  int64_t E, I, H;
  int P, T;
};

std::string layout_name(const ::testing::TestParamInfo<ExpertLayout>& info) {
  const ExpertLayout& l = info.param;
  return fmt::format("E{}_I{}_H{}_P{}_T{}", l.E, l.I, l.H, l.P, l.T);
}

class LayoutRoundTrip : public ::testing::TestWithParam<ExpertLayout> {};

// Every rank extracts its shard, checks each value against the formula, and scatters it back into
// a zeroed tensor; an ownership count (extract, +1, scatter) must end at exactly 1 everywhere.
void round_trip(const std::function<ShardSpec(int, int)>& spec_of, const ExpertLayout& l,
                const std::function<std::vector<int64_t>(int, int)>& rows_of) {
  const Shape global_shape = spec_of(0, 0).global_shape;
  const Tensor global = encoded_global(global_shape);
  Tensor rebuilt = Tensor::zeros(global_shape, DType::kF32);
  Tensor owners = Tensor::zeros(global_shape, DType::kI32);
  const int64_t num_cols = global_shape[1];
  for (int p = 0; p < l.P; ++p) {
    for (int t = 0; t < l.T; ++t) {
      SCOPED_TRACE(fmt::format("p={} t={}", p, t));
      const ShardSpec spec = spec_of(p, t);
      const Tensor local = extract_local(global, spec);
      ASSERT_EQ(local.shape(), local_shape(spec));
      const std::vector<int64_t> rows = rows_of(p, t);
      const ColumnRange cols = column_range(spec);
      const std::vector<float> v = local.to_vector<float>();
      for (int64_t r = 0; r < local.rows(); ++r) {
        for (int64_t c = 0; c < cols.width(); ++c) {
          ASSERT_EQ(v[static_cast<size_t>(r * cols.width() + c)],
                    static_cast<float>(rows[static_cast<size_t>(r)] * num_cols + cols.begin + c))
              << "local [" << r << ", " << c << "]";
        }
      }
      scatter_into_global(local, spec, rebuilt);
      Tensor count = extract_local(owners, spec);
      for (int64_t e = 0; e < count.numel(); ++e) count.data<int32_t>()[e] += 1;
      scatter_into_global(count, spec, owners);
    }
  }
  EXPECT_TRUE(bit_equal(rebuilt, global));
  EXPECT_TRUE(bit_equal(owners, Tensor::full<int32_t>(global_shape, 1)));
}

TEST_P(LayoutRoundTrip, W13RebuildsGlobalAndOwnsEachElementOnce) {
  const ExpertLayout l = GetParam();
  round_trip([&](int p, int t) { return w13_spec(l.E, l.I, l.H, l.P, p, l.T, t); }, l,
             [&](int p, int t) { return w13_rows_reference(l.E, l.I, l.P, p, l.T, t); });
}

TEST_P(LayoutRoundTrip, W2RebuildsGlobalAndOwnsEachElementOnce) {
  const ExpertLayout l = GetParam();
  round_trip([&](int p, int t) { return w2_spec(l.E, l.I, l.H, l.P, p, l.T, t); }, l,
             [&](int p, int) { return w2_rows_reference(l.E, l.H, l.P, p); });
}

// Smallest legal sizes, several experts per rank, I/T = 1, T > P, P > T, and odd sizes.
INSTANTIATE_TEST_SUITE_P(Layouts, LayoutRoundTrip,
                         ::testing::Values(ExpertLayout{1, 1, 1, 1, 1}, ExpertLayout{2, 2, 3, 1, 2},
                                           ExpertLayout{4, 2, 3, 2, 2}, ExpertLayout{8, 4, 5, 2, 2},
                                           ExpertLayout{6, 3, 2, 3, 3}, ExpertLayout{4, 8, 4, 1, 4},
                                           ExpertLayout{8, 6, 3, 4, 2}, ExpertLayout{3, 5, 7, 1, 1},
                                           ExpertLayout{12, 4, 2, 4, 4}),
                         layout_name);

TEST(LayoutCopies, Bf16AndTrailingDimsAndStridedTensors) {
  // [8, 4, 3]: dim-1 slice [1, 3) with a trailing dim of 3, over 2 shards; bf16 payload.
  const Tensor global = testing::random_tensor({8, 4, 3}, 7, 1).to(DType::kBF16);
  Tensor rebuilt = Tensor::zeros({8, 4, 3}, DType::kBF16);
  for (int r = 0; r < 2; ++r) {
    for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 1}, {1, 3}, {3, 4}}) {
      const ShardSpec spec{{8, 4, 3}, {{2, r, Placement::shard()}}, b, e};
      const Tensor local = extract_local(global, spec);
      EXPECT_TRUE(bit_equal(local, global.narrow_rows(4 * r, 4).slice(1, b, e).contiguous()));
      scatter_into_global(local, spec, rebuilt);
    }
  }
  EXPECT_TRUE(bit_equal(rebuilt, global));
  // A transposed (non-contiguous) global, read and written in place.
  const Tensor base = encoded_global({3, 8});
  Tensor strided = Tensor::zeros({3, 8}, DType::kF32).transpose(0, 1);
  const ShardSpec spec{{8, 3}, {{2, 1, Placement::interleaved(2)}}};
  const Tensor local = extract_local(base.transpose(0, 1), spec);
  EXPECT_EQ(local.to_vector<float>(), (std::vector<float>{2, 10, 18, 3, 11, 19, 6, 14, 22, 7, 15, 23}));
  scatter_into_global(local, spec, strided);
  EXPECT_EQ(strided.contiguous().to_vector<float>()[3 * 3 + 1], 11.0f);  // global [3, 1]
  EXPECT_EQ(strided.contiguous().to_vector<float>()[0], 0.0f);          // row 0: not owned, untouched
}

// ---- bad input names the values ----

using testing::expect_error;

TEST(LayoutBadInput, IndivisibleExpertSizes) {
  expect_error([] { w13_spec(6, 4, 8, 4, 0, 2, 0); }, {"num_experts (6) % ep (4) != 0"});
  expect_error([] { w2_spec(4, 6, 8, 2, 0, 4, 0); }, {"intermediate (6) % etp (4) != 0"});
  expect_error([] { w13_spec(4, 4, 8, 2, 2, 2, 0); }, {"ep rank 2 not in [0, 2)"});
  expect_error([] { w2_spec(4, 4, 8, 2, 0, 2, -1); }, {"etp rank -1 not in [0, 2)"});
  expect_error([] { w13_spec(0, 4, 8, 1, 0, 1, 0); }, {"num_experts (0)"});
}

TEST(LayoutBadInput, IndivisibleRowsStripesAndRanks) {
  expect_error([] { compute_runs({{6, 2}, {{4, 0, Placement::shard()}}}); }, {"shard of 6 rows over size 4"});
  expect_error([] { compute_runs({{12, 2}, {{2, 0, Placement::interleaved(4)}}}); }, {"12 rows do not split into 4 stripes x 2 ranks"});
  // Stripes are counted on the rows left by the outer dims: 16 rows / ep 2 = 8, not 3 stripes.
  expect_error([] { compute_runs({{16, 2}, {{2, 0, Placement::shard()}, {1, 0, Placement::interleaved(3)}}}); }, {"mesh dim 1: 8 rows do not split into 3 stripes"});
  expect_error([] { compute_runs({{8}, {{2, 3, Placement::shard()}}}); }, {"rank 3 not in [0, 2)"});
  expect_error([] { compute_runs({{8}, {{0, 0, Placement::replicate()}}}); }, {"has size 0"});
  expect_error([] { Placement::interleaved(0); }, {"num_stripes (0) must be >= 1"});
}

TEST(LayoutBadInput, ColumnSlicesAndShapes) {
  expect_error([] { compute_runs({{4, 6}, {}, 2, 7}); }, {"column slice [2, 7) out of range for 6 columns"});
  expect_error([] { compute_runs({{4, 6}, {}, 3, 2}); }, {"column slice [3, 2)"});
  expect_error([] { compute_runs({{4}, {}, 0, 1}); }, {"needs a tensor of >= 2 dims"});
  expect_error([] { compute_runs({{}, {}}); }, {"at least one dim"});
  const ShardSpec spec = w13_spec(4, 2, 3, 2, 0, 2, 1);  // local [4, 3]
  Tensor global = Tensor::zeros({16, 3}, DType::kF32);
  expect_error([&] { scatter_into_global(Tensor::zeros({4, 2}, DType::kF32), spec, global); }, {"expected shape [4, 3], got f32[4, 2]"});
  expect_error([&] { scatter_into_global(Tensor::zeros({4, 3}, DType::kBF16), spec, global); }, {"differ in dtype"});
  expect_error([&] { extract_local(Tensor::zeros({15, 3}, DType::kF32), spec); }, {"expected shape [16, 3], got f32[15, 3]"});
}

}  // namespace
}  // namespace moetp::shard
