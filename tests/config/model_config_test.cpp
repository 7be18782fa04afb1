// ModelConfig: both HF spellings (released checkpoints and transformers 5.x) parse to the same
// config; every error (missing field, wrong type, unsupported option, disagreeing duplicates,
// failed validation) names the values; is_moe_layer follows transformers' rule; the presets in
// configs/ load; parameter counts match Qwen3-30B-A3B's published 30.5B total / 3.3B active.
#include "config/model_config.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>

#include "core/check.h"
#include "testing.h"

namespace moetp::config {
namespace {

using nlohmann::json;

// Runs `fn`, expects moetp::Error, and expects every substring in its message.
using testing::expect_error;

// A small config in the released-checkpoint spelling.
json released_json() {
  return json{{"architectures", {"Qwen3MoeForCausalLM"}},
              {"model_type", "qwen3_moe"},
              {"vocab_size", 256},
              {"hidden_size", 64},
              {"intermediate_size", 128},
              {"moe_intermediate_size", 32},
              {"num_hidden_layers", 4},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"head_dim", 16},
              {"num_experts", 8},
              {"num_experts_per_tok", 2},
              {"norm_topk_prob", true},
              {"decoder_sparse_step", 1},
              {"mlp_only_layers", json::array()},
              {"rms_norm_eps", 1e-6},
              {"rope_theta", 500000.0},
              {"rope_scaling", nullptr},
              {"tie_word_embeddings", false},
              {"router_aux_loss_coef", 0.01},
              {"max_position_embeddings", 512},
              {"hidden_act", "silu"},
              {"use_sliding_window", false},
              {"sliding_window", nullptr},
              {"attention_bias", false},
              {"torch_dtype", "bfloat16"}};
}

// The same config as transformers 5.x writes it.
json transformers5_json() {
  json j = released_json();
  j.erase("num_experts");
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j.erase("torch_dtype");
  j["num_local_experts"] = 8;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  j["dtype"] = "bfloat16";
  j["transformers_version"] = "5.0.0";
  return j;
}

TEST(ModelConfig, BothSpellingsParseToTheSameConfig) {
  const ModelConfig released = ModelConfig::from_json(released_json(), "released.json");
  const ModelConfig v5 = ModelConfig::from_json(transformers5_json(), "v5.json");
  EXPECT_TRUE(released.same_model(v5));
  EXPECT_EQ(released.weights_dtype(), "bfloat16");
  EXPECT_EQ(v5.weights_dtype(), "bfloat16");
  EXPECT_EQ(released.num_experts, 8);
  EXPECT_EQ(released.rope_theta, 500000.0);
  EXPECT_TRUE(released.norm_topk_prob);
  EXPECT_EQ(released.max_position_embeddings, 512);
}

TEST(ModelConfig, BothSpellingsTogetherMustAgree) {
  json j = released_json();
  j["num_local_experts"] = 8;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  EXPECT_EQ(ModelConfig::from_json(j, "both.json").num_experts, 8);

  j["num_local_experts"] = 16;
  expect_error([&] { ModelConfig::from_json(j, "both.json"); },
               {"both.json", "num_experts (8)", "num_local_experts (16)", "disagree"});
  j["num_local_experts"] = 8;
  j["rope_parameters"]["rope_theta"] = 10000.0;
  expect_error([&] { ModelConfig::from_json(j, "both.json"); },
               {"rope_theta (500000)", "rope_parameters.rope_theta (10000)", "disagree"});
}

TEST(ModelConfig, DefaultsOfOptionalFields) {
  json j = released_json();
  for (const char* key : {"head_dim", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "rms_norm_eps",
                          "rope_theta", "tie_word_embeddings", "router_aux_loss_coef", "max_position_embeddings",
                          "model_type", "hidden_act", "use_sliding_window", "attention_bias"}) {
    j.erase(key);
  }
  j["hidden_size"] = 96;
  const ModelConfig c = ModelConfig::from_json(j, "minimal.json");
  EXPECT_EQ(c.head_dim, 96 / 4);  // hidden_size / num_attention_heads
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_TRUE(c.mlp_only_layers.empty());
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_EQ(c.max_position_embeddings, 32768);
}

TEST(ModelConfig, MissingRequiredFieldNamesFieldAndFile) {
  for (const char* key : {"vocab_size", "hidden_size", "moe_intermediate_size", "num_key_value_heads",
                          "num_experts_per_tok"}) {
    json j = released_json();
    j.erase(key);
    expect_error([&] { ModelConfig::from_json(j, "cfg/config.json"); },
                 {"cfg/config.json", "missing required field", std::string("'") + key + "'"});
  }
  json j = released_json();
  j.erase("num_experts");
  expect_error([&] { ModelConfig::from_json(j, "x.json"); }, {"'num_experts'", "num_local_experts"});
  j = released_json();
  j["hidden_size"] = nullptr;  // null counts as absent
  expect_error([&] { ModelConfig::from_json(j, "x.json"); }, {"missing required field 'hidden_size'"});
}

TEST(ModelConfig, WrongTypeNamesFieldTypeAndValue) {
  struct Case {
    const char* key;
    json value;
    const char* expected;
    const char* shown;
  };
  const Case cases[] = {
      {"hidden_size", "64", "an integer", "\"64\""},
      {"hidden_size", 64.5, "an integer", "64.5"},
      {"norm_topk_prob", 1, "a boolean", "1"},
      {"rms_norm_eps", "1e-6", "a number", "\"1e-6\""},
      {"mlp_only_layers", 3, "a list of integers", "3"},
      {"model_type", 7, "a string", "7"},
      {"rope_parameters", "default", "an object", "\"default\""},
  };
  for (const Case& c : cases) {
    json j = released_json();
    j[c.key] = c.value;
    expect_error([&] { ModelConfig::from_json(j, "t.json"); },
                 {"t.json", std::string("field '") + c.key + "'", c.expected, c.shown});
  }
  json j = released_json();
  j["mlp_only_layers"] = {1, "two"};
  expect_error([&] { ModelConfig::from_json(j, "t.json"); }, {"mlp_only_layers[1]", "an integer", "\"two\""});
  expect_error([] { ModelConfig::from_json(json::array(), "t.json"); }, {"t.json", "JSON object", "array"});
}

TEST(ModelConfig, RejectsUnsupportedOptions) {
  struct Case {
    const char* key;
    json value;
    std::initializer_list<std::string> substrings;
  };
  const Case cases[] = {
      {"use_sliding_window", true, {"use_sliding_window = true", "not supported"}},
      {"attention_bias", true, {"attention_bias = true", "not supported"}},
      {"model_type", "qwen2_moe", {"model_type 'qwen2_moe'", "qwen3_moe"}},
      {"hidden_act", "gelu", {"hidden_act 'gelu'", "silu"}},
      {"rope_scaling", {{"type", "yarn"}, {"factor", 4.0}}, {"rope_scaling.type 'yarn'", "not supported"}},
      {"rope_scaling", {{"rope_type", "linear"}}, {"rope_scaling.rope_type 'linear'"}},
      {"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 500000.0}}, {"rope_parameters.rope_type 'yarn'"}},
  };
  for (const Case& c : cases) {
    json j = released_json();
    j[c.key] = c.value;
    SCOPED_TRACE(c.key);
    expect_error([&] { ModelConfig::from_json(j, "u.json"); }, c.substrings);
  }
}

TEST(ModelConfig, ValidationNamesTheValues) {
  auto with = [](const char* key, json value) {
    json j = released_json();
    j[key] = std::move(value);
    return j;
  };
  expect_error([&] { ModelConfig::from_json(with("num_key_value_heads", 3), "v.json"); },
               {"num_attention_heads (4) % num_key_value_heads (3) != 0"});
  expect_error([&] { ModelConfig::from_json(with("num_experts_per_tok", 9), "v.json"); },
               {"num_experts_per_tok (9)", "num_experts (8)"});
  expect_error([&] { ModelConfig::from_json(with("mlp_only_layers", {0, 4}), "v.json"); },
               {"mlp_only_layers entry 4", "num_hidden_layers (4)"});
  expect_error([&] { ModelConfig::from_json(with("hidden_size", 0), "v.json"); }, {"hidden_size (0) must be positive"});
  expect_error([&] { ModelConfig::from_json(with("vocab_size", -5), "v.json"); }, {"vocab_size (-5)"});
  expect_error([&] { ModelConfig::from_json(with("head_dim", 15), "v.json"); }, {"head_dim (15)", "even"});
  expect_error([&] { ModelConfig::from_json(with("decoder_sparse_step", 0), "v.json"); },
               {"decoder_sparse_step (0)"});
}

TEST(ModelConfig, IsMoeLayerFollowsTransformers) {
  json j = released_json();
  j["num_hidden_layers"] = 6;
  j["mlp_only_layers"] = {0, 5};
  ModelConfig c = ModelConfig::from_json(j, "m.json");
  EXPECT_FALSE(c.is_moe_layer(0));
  for (int layer = 1; layer <= 4; ++layer) EXPECT_TRUE(c.is_moe_layer(layer)) << layer;
  EXPECT_FALSE(c.is_moe_layer(5));
  EXPECT_EQ(c.num_moe_layers(), 4);

  j["mlp_only_layers"] = json::array();
  j["decoder_sparse_step"] = 2;  // (layer + 1) % 2 == 0: layers 1, 3, 5
  c = ModelConfig::from_json(j, "m.json");
  for (int layer = 0; layer < 6; ++layer) EXPECT_EQ(c.is_moe_layer(layer), layer % 2 == 1) << layer;

  j["mlp_only_layers"] = {3};
  c = ModelConfig::from_json(j, "m.json");
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_FALSE(c.is_moe_layer(3));
  EXPECT_TRUE(c.is_moe_layer(5));
  EXPECT_EQ(c.num_moe_layers(), 2);

  j["num_experts"] = 0;  // no experts: every layer dense
  c = ModelConfig::from_json(j, "m.json");
  EXPECT_EQ(c.num_moe_layers(), 0);
}

TEST(ModelConfig, PresetsLoad) {
  const std::string dir = MOETP_CONFIGS_DIR;
  const ModelConfig tiny = ModelConfig::load(dir + "/tiny-moe.json");
  EXPECT_EQ(tiny.vocab_size, 256);
  EXPECT_EQ(tiny.hidden_size, 64);
  EXPECT_EQ(tiny.head_dim, 16);
  EXPECT_EQ(tiny.num_experts, 8);
  EXPECT_EQ(tiny.num_experts_per_tok, 2);
  EXPECT_EQ(tiny.router_aux_loss_coef, 0.01);
  EXPECT_EQ(tiny.num_moe_layers(), 2);

  const ModelConfig full = ModelConfig::load(dir + "/qwen3-30b-a3b.json");
  EXPECT_EQ(full.vocab_size, 151936);
  EXPECT_EQ(full.num_hidden_layers, 48);
  EXPECT_EQ(full.num_experts, 128);
  EXPECT_EQ(full.num_experts_per_tok, 8);
  EXPECT_EQ(full.rope_theta, 1e6);
  EXPECT_EQ(full.max_position_embeddings, 40960);

  const ModelConfig l4 = ModelConfig::load(dir + "/qwen3-30b-a3b-l4.json");
  ModelConfig expected = full;
  expected.num_hidden_layers = 4;
  expected.vocab_size = 2048;
  expected.max_position_embeddings = 4096;
  EXPECT_TRUE(l4.same_model(expected));

  // One rank of an ep-8 run of the full model: its 16 experts, everything else the same.
  const ModelConfig slice = ModelConfig::load(dir + "/qwen3-30b-a3b-ep8-slice.json");
  ModelConfig slice_expected = full;
  slice_expected.num_experts = 128 / 8;
  EXPECT_EQ(slice, slice_expected);
  EXPECT_EQ(slice.num_params(), 5153961984);
}

TEST(ModelConfig, LoadErrorsNameThePath) {
  expect_error([] { ModelConfig::load("/nonexistent/config.json"); }, {"/nonexistent/config.json"});
  const std::string path = ::testing::TempDir() + "moetp_bad_config.json";
  std::ofstream(path) << "{ \"vocab_size\": 12,";
  expect_error([&] { ModelConfig::load(path); }, {path, "invalid JSON"});
  std::remove(path.c_str());
}

TEST(ModelConfig, Qwen3_30B_A3B_ParamCounts) {
  const ModelConfig c = ModelConfig::load(std::string(MOETP_CONFIGS_DIR) + "/qwen3-30b-a3b.json");
  const double total = static_cast<double>(c.num_params());
  const double active = static_cast<double>(c.num_active_params());
  EXPECT_NEAR(total / 30.5e9, 1.0, 0.02) << total;  // published: 30.5B total
  EXPECT_NEAR(active / 3.3e9, 1.0, 0.02) << active;  // published: 3.3B activated
  // Exact by hand: attention 4096·2048·2 + 512·2048·2 + 2·128, norms 2·2048, router 128·2048,
  // experts E·3·2048·768; embeddings and head 2·151936·2048; final norm 2048.
  const int64_t attention = 2 * 4096 * 2048 + 2 * 512 * 2048 + 2 * 128 + 2 * 2048;
  const int64_t expert = 3 * 2048 * 768;
  const int64_t outer = 2 * int64_t{151936} * 2048 + 2048;
  EXPECT_EQ(c.num_params(), outer + 48 * (attention + 128 * 2048 + 128 * expert));
  EXPECT_EQ(c.num_active_params(), outer + 48 * (attention + 128 * 2048 + 8 * expert));

  ModelConfig tied = c;
  tied.tie_word_embeddings = true;
  EXPECT_EQ(c.num_params() - tied.num_params(), int64_t{151936} * 2048);
}

TEST(ModelConfig, TrainingFlopsFollowTheSixNPPlusAttentionFormula) {
  const ModelConfig c = ModelConfig::load(std::string(MOETP_CONFIGS_DIR) + "/qwen3-30b-a3b.json");
  const TrainingFlops f = training_flops(c, 2, 4096);
  EXPECT_EQ(f.active_matmul_params, c.num_active_params() - int64_t{151936} * 2048) << "the embedding table is a lookup";
  EXPECT_DOUBLE_EQ(f.matmul, 6.0 * static_cast<double>(f.active_matmul_params) * 8192);
  // 6 · L · Hq · D · S² per sequence: 6 · 48 · 32 · 128 · 4096² · 2 sequences.
  EXPECT_DOUBLE_EQ(f.attention, 6.0 * 48 * 32 * 128 * 4096.0 * 4096.0 * 2);
  EXPECT_DOUBLE_EQ(f.total(), f.matmul + f.attention);
  ModelConfig tied = c;
  tied.tie_word_embeddings = true;
  EXPECT_EQ(training_flops(tied, 1, 1).active_matmul_params, tied.num_active_params()) << "tied: the table is the head";
}

TEST(ModelConfig, DenseLayersCountIntermediateSize) {
  json j = released_json();
  j["mlp_only_layers"] = {0};
  const ModelConfig dense0 = ModelConfig::from_json(j, "d.json");
  const ModelConfig all_moe = ModelConfig::from_json(released_json(), "d.json");
  // Layer 0 swaps router + 8 experts for one dense SwiGLU MLP of intermediate_size.
  EXPECT_EQ(all_moe.num_params() - dense0.num_params(), (8 * 64 + 8 * 3 * 64 * 32) - 3 * 64 * 128);
  EXPECT_EQ(all_moe.num_active_params() - dense0.num_active_params(), (8 * 64 + 2 * 3 * 64 * 32) - 3 * 64 * 128);
}

TEST(ModelConfig, HfJsonRoundTrip) {
  json j = released_json();
  j["mlp_only_layers"] = {1};
  j["decoder_sparse_step"] = 1;
  j["tie_word_embeddings"] = true;
  const ModelConfig c = ModelConfig::from_json(j, "r.json");
  const json out = c.to_hf_json();
  EXPECT_EQ(out["model_type"], "qwen3_moe");
  EXPECT_EQ(out["architectures"], json({"Qwen3MoeForCausalLM"}));
  EXPECT_EQ(out["num_experts"], 8);
  EXPECT_EQ(out["rope_theta"], 500000.0);
  EXPECT_EQ(out["rope_parameters"]["rope_type"], "default");
  EXPECT_EQ(ModelConfig::from_json(out, "out.json"), c);
  EXPECT_EQ(ModelConfig::from_json(json::parse(out.dump()), "out.json"), c);

  // A transformers 5 reader sees num_local_experts through its attribute map; ours takes either.
  json v5 = out;
  v5.erase("num_experts");
  v5.erase("rope_theta");
  v5["num_local_experts"] = 8;
  EXPECT_EQ(ModelConfig::from_json(v5, "v5.json"), c);

  const ModelConfig preset = ModelConfig::load(std::string(MOETP_CONFIGS_DIR) + "/qwen3-30b-a3b.json");
  EXPECT_EQ(ModelConfig::from_json(preset.to_hf_json(), "preset"), preset);
}

// Fields moetp does not interpret (token ids, dtype, versions, ...) come back out of to_hf_json
// unchanged, so an exported checkpoint keeps them; they do not make two configs different models.
TEST(ModelConfig, KeepsTheFieldsItDoesNotUse) {
  json j = released_json();
  j["bos_token_id"] = 151643;
  j["eos_token_id"] = 151645;
  j["initializer_range"] = 0.02;
  j["custom"] = {{"nested", {1, 2}}};
  const ModelConfig c = ModelConfig::from_json(j, "r.json");
  EXPECT_EQ(c.passthrough.at("bos_token_id"), 151643);
  EXPECT_EQ(c.passthrough.at("torch_dtype"), "bfloat16");
  EXPECT_FALSE(c.passthrough.contains("hidden_size"));  // interpreted fields are not duplicated
  const json out = c.to_hf_json();
  for (const char* key : {"bos_token_id", "eos_token_id", "initializer_range", "custom", "torch_dtype"}) {
    EXPECT_EQ(out.at(key), j.at(key)) << key;
  }
  json other = released_json();
  other.erase("torch_dtype");
  const ModelConfig bare = ModelConfig::from_json(other, "o.json");
  EXPECT_TRUE(bare.same_model(c));
  EXPECT_FALSE(bare == c);
  EXPECT_EQ(bare.weights_dtype(), "");
  json changed = j;
  changed["hidden_size"] = 128;
  EXPECT_FALSE(ModelConfig::from_json(changed, "h.json").same_model(c));
}

}  // namespace
}  // namespace moetp::config
