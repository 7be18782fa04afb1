// gather_full over the ep_etp group of every mesh (P, T) with P·T dividing the job's world size.
// Every rank builds the same global tensor whose values encode their position,
//   global[row, col] = row·num_cols + col   (exact in f32 below 2^24),
// extracts its own shard (w13: InterleavedShard rows; w2: EP rows x TP columns, etp_spec §3.2) and
// gathers; the result must be the global tensor, bit for bit, on every rank. Bad calls must throw
// the same moetp::Error on every member instead of hanging.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "shard/layout.h"
#include "testing.h"

namespace moetp::shard {
namespace {

using comm::Mesh;
using testing::bit_equal;
using testing::world;

Tensor encoded_global(const Shape& shape, DType dtype) {
  Tensor g = Tensor::empty(shape, DType::kF32);
  float* p = g.data<float>();
  for (int64_t e = 0; e < g.numel(); ++e) p[e] = static_cast<float>(e);
  return dtype == DType::kF32 ? g : g.to(dtype);  // bf16: not unique codes, still exact movement
}

// Every (P, T) with P·T dividing the world size.
std::vector<std::pair<int, int>> meshes_of(int world_size) {
  std::vector<std::pair<int, int>> out;
  for (int P = 1; P <= world_size; ++P) {
    for (int T = 1; P * T <= world_size; ++T) {
      if (world_size % (P * T) == 0) out.push_back({P, T});
    }
  }
  return out;
}

// Expert sizes per (P, T), as multiples: L experts per EP rank, i = I/T columns per TP rank.
struct Sizes {
  int64_t L, i, H;
};
// One expert per rank; several experts with I/T = 1; odd sizes.
const Sizes kSizes[] = {{1, 2, 4}, {3, 1, 2}, {2, 3, 5}};

void expect_gathers(const ShardSpec& spec, comm::Comm& group, DType dtype) {
  const Tensor global = encoded_global(spec.global_shape, dtype);
  const Tensor local = extract_local(global, spec);
  const Tensor full = gather_full(local, spec, group);
  EXPECT_TRUE(bit_equal(full, global)) << describe(spec);
}

TEST(ShardGather, W13AndW2RebuildTheGlobalTensorOnEveryMesh) {
  auto& w = world();
  int checked = 0;
  for (auto [P, T] : meshes_of(w.size())) {
    Mesh mesh(w, P, T);
    const auto [d, p, t] = mesh.coords();
    for (const Sizes& s : kSizes) {
      const int64_t E = s.L * P, I = s.i * T;
      SCOPED_TRACE(fmt::format("{}; E={} I={} H={}", mesh.describe(), E, I, s.H));
      expect_gathers(w13_spec(E, I, s.H, P, p, T, t), mesh.ep_etp(), DType::kF32);
      expect_gathers(w2_spec(E, I, s.H, P, p, T, t), mesh.ep_etp(), DType::kF32);
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(ShardGather, Bf16AndGenericChains) {
  auto& w = world();
  const int W = w.size();
  // bf16 payload, the whole world as one TP group (P = 1, T = W).
  Mesh mesh(w, 1, W);
  const int t = mesh.coords().t;
  expect_gathers(w13_spec(2, 2 * W, 3, 1, 0, W, t), mesh.ep_etp(), DType::kBF16);
  // A generic chain on a 3-D tensor (rows of 4 x 2 elements): replicate, then interleaved(3) over W.
  const ShardSpec chain{{6 * W, 4, 2}, {{1, 0, Placement::replicate()}, {W, w.rank(), Placement::interleaved(3)}}};
  expect_gathers(chain, w, DType::kF32);
}

// ---- errors are the same on every member ----

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ShardGatherBadInput, WrongLocalShapeOnOneMemberThrowsEverywhere) {
  auto& w = world();
  const int last = w.size() - 1;
  const ShardSpec spec = w13_spec(w.size(), 2, 3, w.size(), w.rank(), 1, 0);  // local [4, 3]
  const Tensor local = Tensor::zeros({w.rank() == last ? 5 : 4, 3}, DType::kF32);
  const std::string msg = error_of([&] { gather_full(local, spec, w); });
  EXPECT_NE(msg.find(fmt::format("invalid shard on member(s) {}", last)), std::string::npos) << msg;
  if (w.rank() == last) {
    EXPECT_NE(msg.find("does not have the local shape [4, 3]"), std::string::npos) << msg;
  }
}

TEST(ShardGatherBadInput, MembersDisagreeOnTheGlobalShape) {
  auto& w = world();
  if (w.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int64_t H = w.rank() == 1 ? 5 : 3;
  const ShardSpec spec = w13_spec(w.size(), 2, H, w.size(), w.rank(), 1, 0);
  const std::string msg = error_of([&] { gather_full(Tensor::zeros(local_shape(spec), DType::kF32), spec, w); });
  EXPECT_NE(msg.find(fmt::format("member 1 has global shape [{}, 5], member 0 has [{}, 3]", 4 * w.size(),
                                 4 * w.size())),
            std::string::npos)
      << msg;
}

TEST(ShardGatherBadInput, ShardsThatDoNotPartitionTheTensor) {
  auto& w = world();
  if (w.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  // Gap: the etp group (size 1) of a P = W mesh holds only its own EP block.
  Mesh mesh(w, w.size(), 1);
  const ShardSpec mine = w13_spec(w.size(), 2, 3, w.size(), mesh.coords().p, 1, 0);
  const Tensor local = Tensor::zeros(local_shape(mine), DType::kF32);
  const std::string gap = error_of([&] { gather_full(local, mine, mesh.etp()); });
  EXPECT_NE(gap.find("owned by 0 members, expected exactly 1"), std::string::npos) << gap;
  // Overlap: every world member claims the whole tensor.
  const ShardSpec whole = w13_spec(2, 2, 3, 1, 0, 1, 0);
  const std::string dup = error_of([&] { gather_full(Tensor::zeros({8, 3}, DType::kF32), whole, w); });
  EXPECT_NE(dup.find(fmt::format("global row 0, columns [0, 3) owned by {} members", w.size())), std::string::npos)
      << dup;
}

}  // namespace
}  // namespace moetp::shard
