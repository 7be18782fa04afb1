// The CPU model's initial parameters are a pure function of (seed, name, global index): these
// fingerprints pin them, so a change of the parameter table or of the initialiser that moves a
// single bit of any parameter at any layout fails here. Each fingerprint is FNV-1a over every
// parameter's name, local shape and f32 bytes on every rank, in rank order.
#include <gtest/gtest.h>

#include <map>
#include <tuple>

#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "model/model.h"
#include "testing.h"

namespace moetp {
namespace {

using testing::world;

config::ModelConfig tiny_model(bool tie) {
  nlohmann::json j = {{"vocab_size", 64},         {"hidden_size", 32},          {"intermediate_size", 48},
                      {"moe_intermediate_size", 16}, {"num_hidden_layers", 3},   {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},  {"head_dim", 8},              {"num_experts", 8},
                      {"num_experts_per_tok", 2},  {"norm_topk_prob", true},     {"mlp_only_layers", {1}},
                      {"tie_word_embeddings", tie}, {"max_position_embeddings", 64}};
  return config::ModelConfig::from_json(j, "tiny test model");
}

void fnv(uint64_t& h, const void* data, size_t n) {
  const auto* b = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= 1099511628211ull;
  }
}

// This rank's fingerprint of every parameter (names, local shapes, values).
uint64_t fingerprint(const model::Qwen3MoeModel& m) {
  uint64_t h = 1469598103934665603ull;
  for (const model::Param& p : m.params()) {
    fnv(h, p.name.data(), p.name.size());
    for (int64_t d : p.value.shape()) fnv(h, &d, sizeof d);
    const Tensor v = p.value.contiguous();
    fnv(h, v.raw_data(), static_cast<size_t>(v.num_bytes()));
  }
  return h;
}

TEST(ParamInit, ValuesArePinned) {
  auto& w = world();
  // (world, ep, etp, tie) -> fingerprint over ranks, as the model built before the parameter
  // table (commit c04f9ba) gave them.
  const std::map<std::tuple<int, int, int, bool>, uint64_t> expected = {
      {{1, 1, 1, false}, 0xc8be5b837e06a510ull}, {{1, 1, 1, true}, 0x9309e6d7a103856aull},
      {{4, 1, 1, false}, 0xc400f0b5838027abull}, {{4, 2, 1, false}, 0xefc528239f1d4123ull},
      {{4, 1, 2, false}, 0xca18648d6bbad9d3ull}, {{4, 2, 2, false}, 0x20fa5c738e4410a3ull},
      {{4, 4, 1, false}, 0xc544298733151711ull}, {{4, 1, 4, false}, 0xc650875092dab30full},
      {{4, 1, 1, true}, 0xeb46367b6c20021bull},  {{4, 2, 1, true}, 0x94b06b3766b425abull},
      {{4, 1, 2, true}, 0xb10fd519410be35bull},  {{4, 2, 2, true}, 0xb598c3c196f8affcull},
      {{4, 4, 1, true}, 0x0dc4ef0f6b7e2106ull},  {{4, 1, 4, true}, 0xbe7fd6b7db758c5bull},
  };
  for (const bool tie : {false, true}) {
    for (const auto& [P, T] : {std::pair{1, 1}, std::pair{2, 1}, std::pair{1, 2}, std::pair{2, 2}, std::pair{4, 1},
                               std::pair{1, 4}}) {
      if (w.size() % (P * T) != 0) continue;
      comm::Mesh mesh(w, P, T);
      const model::Qwen3MoeModel m(tiny_model(tie), mesh, P * T == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 1234);
      const uint64_t mine = fingerprint(m);
      uint64_t h = 1469598103934665603ull;
      for (int64_t r : w.all_gather_scalar(static_cast<int64_t>(mine))) fnv(h, &r, sizeof r);
      const auto key = std::make_tuple(w.size(), P, T, tie);
      const auto it = expected.find(key);
      if (it == expected.end()) {
        ADD_FAILURE() << "no fingerprint for world " << w.size() << ", ep " << P << ", etp " << T << ", tie " << tie;
        continue;
      }
      EXPECT_EQ(h, it->second) << "world " << w.size() << ", ep " << P << ", etp " << T << ", tie " << tie;
    }
  }
}

}  // namespace
}  // namespace moetp
