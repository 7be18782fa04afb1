// Qwen3-MoE config.json reader/writer and parameter counts. See model_config.h.
#include "config/model_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "core/check.h"

namespace moetp::config {
namespace {

using nlohmann::json;

// Typed access to the fields of one config.json object. A JSON null counts as absent (HF writes
// `"head_dim": null`, `"rope_scaling": null`). Every error names the source and the field.
class Fields {
 public:
  Fields(const json& object, const std::string& source) : object_(object), source_(source) {}

  const json* find(const std::string& key) const {
    auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  [[noreturn]] void type_error(const std::string& key, const char* expected, const json& value) const {
    MOETP_FAIL("{}: field '{}' must be {}, got {} ({})", source_, key, expected, value.dump(),
               value.type_name());
  }

  int64_t as_int(const std::string& key, const json& value) const {
    if (value.is_number_unsigned()) {
      const auto u = value.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) type_error(key, "an int64", value);
      return static_cast<int64_t>(u);
    }
    if (!value.is_number_integer()) type_error(key, "an integer", value);
    return value.get<int64_t>();
  }
  double as_double(const std::string& key, const json& value) const {
    if (!value.is_number()) type_error(key, "a number", value);
    return value.get<double>();
  }
  bool as_bool(const std::string& key, const json& value) const {
    if (!value.is_boolean()) type_error(key, "a boolean", value);
    return value.get<bool>();
  }
  std::string as_string(const std::string& key, const json& value) const {
    if (!value.is_string()) type_error(key, "a string", value);
    return value.get<std::string>();
  }

  int64_t required_int(const std::string& key) const {
    const json* value = find(key);
    MOETP_CHECK(value != nullptr, "{}: missing required field '{}'", source_, key);
    return as_int(key, *value);
  }
  std::optional<int64_t> optional_int(const std::string& key) const {
    const json* value = find(key);
    return value ? std::optional(as_int(key, *value)) : std::nullopt;
  }
  std::optional<double> optional_double(const std::string& key) const {
    const json* value = find(key);
    return value ? std::optional(as_double(key, *value)) : std::nullopt;
  }
  std::optional<bool> optional_bool(const std::string& key) const {
    const json* value = find(key);
    return value ? std::optional(as_bool(key, *value)) : std::nullopt;
  }
  std::optional<std::string> optional_string(const std::string& key) const {
    const json* value = find(key);
    return value ? std::optional(as_string(key, *value)) : std::nullopt;
  }

  const std::string& source() const { return source_; }

 private:
  const json& object_;
  const std::string& source_;
};

// RoPE settings may come as top-level `rope_theta` (released checkpoints, transformers 4.x), as
// `rope_parameters` (transformers 5.x) or as legacy `rope_scaling`. Only plain RoPE ("default")
// is implemented; every theta given must agree.
std::optional<double> read_rope(const Fields& fields) {
  std::optional<double> theta = fields.optional_double("rope_theta");
  std::string theta_from = "rope_theta";
  for (const char* block_name : {"rope_parameters", "rope_scaling"}) {
    const json* block = fields.find(block_name);
    if (block == nullptr) continue;
    if (!block->is_object()) fields.type_error(block_name, "an object", *block);
    const Fields sub(*block, fields.source());
    // transformers writes `rope_type`; older configs wrote `type`.
    for (const char* type_key : {"rope_type", "type"}) {
      const std::string sub_key = fmt::format("{}.{}", block_name, type_key);
      const json* type = sub.find(type_key);
      if (type == nullptr) continue;
      if (!type->is_string()) fields.type_error(sub_key, "a string", *type);
      MOETP_CHECK(type->get<std::string>() == "default",
                  "{}: {} '{}' is not supported (moetp implements plain RoPE, rope_type 'default' only)",
                  fields.source(), sub_key, type->get<std::string>());
    }
    const json* sub_theta = sub.find("rope_theta");
    if (sub_theta == nullptr) continue;
    const std::string sub_key = fmt::format("{}.rope_theta", block_name);
    const double value = fields.as_double(sub_key, *sub_theta);
    MOETP_CHECK(!theta || *theta == value, "{}: {} ({}) and {} ({}) disagree", fields.source(), theta_from,
                *theta, sub_key, value);
    theta = value;
    theta_from = sub_key;
  }
  return theta;
}

void reject_unsupported(const Fields& fields) {
  const std::string& source = fields.source();
  if (auto model_type = fields.optional_string("model_type")) {
    MOETP_CHECK(*model_type == "qwen3_moe", "{}: model_type '{}' is not supported (moetp implements 'qwen3_moe')",
                source, *model_type);
  }
  if (auto act = fields.optional_string("hidden_act")) {
    MOETP_CHECK(*act == "silu", "{}: hidden_act '{}' is not supported (moetp implements 'silu' only)", source,
                *act);
  }
  MOETP_CHECK(!fields.optional_bool("use_sliding_window").value_or(false),
              "{}: use_sliding_window = true is not supported (moetp implements full causal attention)", source);
  MOETP_CHECK(!fields.optional_bool("attention_bias").value_or(false),
              "{}: attention_bias = true is not supported (moetp's attention projections have no bias)",
              source);
}

}  // namespace

bool ModelConfig::is_moe_layer(int64_t layer) const {
  const bool dense_listed = std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end();
  return !dense_listed && num_experts > 0 && (layer + 1) % decoder_sparse_step == 0;
}

int64_t ModelConfig::num_moe_layers() const {
  int64_t count = 0;
  for (int64_t layer = 0; layer < num_hidden_layers; ++layer) count += is_moe_layer(layer) ? 1 : 0;
  return count;
}

ModelConfig ModelConfig::from_json(const nlohmann::json& json, const std::string& source_name) {
  MOETP_CHECK(json.is_object(), "{}: a config.json must be a JSON object, got {}", source_name, json.type_name());
  const Fields fields(json, source_name);
  reject_unsupported(fields);

  ModelConfig c;
  c.vocab_size = fields.required_int("vocab_size");
  c.hidden_size = fields.required_int("hidden_size");
  c.intermediate_size = fields.required_int("intermediate_size");
  c.moe_intermediate_size = fields.required_int("moe_intermediate_size");
  c.num_hidden_layers = fields.required_int("num_hidden_layers");
  c.num_attention_heads = fields.required_int("num_attention_heads");
  c.num_key_value_heads = fields.required_int("num_key_value_heads");
  c.num_experts_per_tok = fields.required_int("num_experts_per_tok");

  // transformers 5.x maps num_experts onto num_local_experts (Qwen3MoeConfig.attribute_map).
  const std::optional<int64_t> released = fields.optional_int("num_experts");
  const std::optional<int64_t> local = fields.optional_int("num_local_experts");
  MOETP_CHECK(released || local, "{}: missing required field 'num_experts' (or 'num_local_experts')", source_name);
  MOETP_CHECK(!released || !local || *released == *local, "{}: num_experts ({}) and num_local_experts ({}) disagree",
              source_name, released.value_or(0), local.value_or(0));
  c.num_experts = released ? *released : *local;

  MOETP_CHECK(c.num_attention_heads > 0, "{}: num_attention_heads ({}) must be positive", source_name,
              c.num_attention_heads);
  c.head_dim = fields.optional_int("head_dim").value_or(c.hidden_size / c.num_attention_heads);
  c.norm_topk_prob = fields.optional_bool("norm_topk_prob").value_or(c.norm_topk_prob);
  c.decoder_sparse_step = fields.optional_int("decoder_sparse_step").value_or(c.decoder_sparse_step);
  if (const nlohmann::json* layers = fields.find("mlp_only_layers")) {
    if (!layers->is_array()) fields.type_error("mlp_only_layers", "a list of integers", *layers);
    for (size_t i = 0; i < layers->size(); ++i) {
      c.mlp_only_layers.push_back(fields.as_int(fmt::format("mlp_only_layers[{}]", i), (*layers)[i]));
    }
  }
  c.rms_norm_eps = fields.optional_double("rms_norm_eps").value_or(c.rms_norm_eps);
  c.rope_theta = read_rope(fields).value_or(c.rope_theta);
  c.tie_word_embeddings = fields.optional_bool("tie_word_embeddings").value_or(c.tie_word_embeddings);
  c.router_aux_loss_coef = fields.optional_double("router_aux_loss_coef").value_or(c.router_aux_loss_coef);
  c.max_position_embeddings = fields.optional_int("max_position_embeddings").value_or(c.max_position_embeddings);
  const nlohmann::json written = c.to_hf_json();
  for (const auto& [key, value] : json.items()) {
    if (!written.contains(key) && key != "num_local_experts") c.passthrough[key] = value;
  }
  c.validate(source_name);
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream file(path);
  MOETP_CHECK(file.good(), "cannot open model config '{}'", path);
  std::stringstream text;
  text << file.rdbuf();
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::parse_error& e) {
    MOETP_FAIL("{}: invalid JSON: {}", path, e.what());
  }
  return from_json(json, path);
}

bool ModelConfig::same_model(const ModelConfig& other) const {
  ModelConfig a = *this, b = other;
  a.passthrough = b.passthrough = nlohmann::json::object();
  return a == b;
}

std::string ModelConfig::weights_dtype() const {
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (passthrough.contains(key) && passthrough.at(key).is_string()) return passthrough.at(key).get<std::string>();
  }
  return "";
}

nlohmann::json ModelConfig::to_hf_json() const {
  nlohmann::json j = passthrough;
  j["architectures"] = {"Qwen3MoeForCausalLM"};
  j["model_type"] = "qwen3_moe";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["num_experts"] = num_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["norm_topk_prob"] = norm_topk_prob;
  j["decoder_sparse_step"] = decoder_sparse_step;
  j["mlp_only_layers"] = mlp_only_layers;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", rope_theta}};
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["router_aux_loss_coef"] = router_aux_loss_coef;
  j["max_position_embeddings"] = max_position_embeddings;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["use_sliding_window"] = false;
  return j;
}

void ModelConfig::validate(const std::string& source_name) const {
  const std::pair<const char*, int64_t> sizes[] = {
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"decoder_sparse_step", decoder_sparse_step},
      {"max_position_embeddings", max_position_embeddings},
  };
  for (const auto& [name, value] : sizes) {
    MOETP_CHECK(value > 0, "{}: {} ({}) must be positive", source_name, name, value);
  }
  MOETP_CHECK(num_attention_heads % num_key_value_heads == 0,
              "{}: num_attention_heads ({}) % num_key_value_heads ({}) != 0", source_name, num_attention_heads,
              num_key_value_heads);
  MOETP_CHECK(head_dim % 2 == 0, "{}: head_dim ({}) must be even for RoPE", source_name, head_dim);
  MOETP_CHECK(num_experts >= 0, "{}: num_experts ({}) must be >= 0", source_name, num_experts);
  if (num_experts > 0) {
    MOETP_CHECK(num_experts_per_tok >= 1 && num_experts_per_tok <= num_experts,
                "{}: num_experts_per_tok ({}) must be in [1, num_experts ({})]", source_name, num_experts_per_tok,
                num_experts);
  }
  for (int64_t layer : mlp_only_layers) {
    MOETP_CHECK(layer >= 0 && layer < num_hidden_layers,
                "{}: mlp_only_layers entry {} is out of range [0, num_hidden_layers ({}))", source_name, layer,
                num_hidden_layers);
  }
  MOETP_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, "{}: rms_norm_eps ({}) must be positive", source_name,
              rms_norm_eps);
  MOETP_CHECK(std::isfinite(rope_theta) && rope_theta > 0, "{}: rope_theta ({}) must be positive", source_name,
              rope_theta);
  MOETP_CHECK(std::isfinite(router_aux_loss_coef) && router_aux_loss_coef >= 0,
              "{}: router_aux_loss_coef ({}) must be >= 0", source_name, router_aux_loss_coef);
}

namespace {

// Per-layer parameter counts of transformers' Qwen3-MoE (no biases anywhere).
int64_t attention_params(const ModelConfig& c) {
  const int64_t q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim;
  // q, k, v, o projections + q_norm and k_norm (one weight of head_dim each).
  return c.hidden_size * q + 2 * c.hidden_size * kv + q * c.hidden_size + 2 * c.head_dim;
}

int64_t count_params(const ModelConfig& c, bool active_only) {
  const int64_t H = c.hidden_size;
  int64_t total = c.vocab_size * H;                   // embed_tokens
  if (!c.tie_word_embeddings) total += c.vocab_size * H;  // lm_head
  total += H;                                         // final norm
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    total += attention_params(c) + 2 * H;  // + input and post-attention RMSNorm
    if (c.is_moe_layer(layer)) {
      const int64_t experts = active_only ? c.num_experts_per_tok : c.num_experts;
      total += c.num_experts * H;                              // router gate (always evaluated)
      total += experts * 3 * H * c.moe_intermediate_size;      // gate, up, down per expert
    } else {
      total += 3 * H * c.intermediate_size;
    }
  }
  return total;
}

}  // namespace

int64_t ModelConfig::num_params() const { return count_params(*this, /*active_only=*/false); }
int64_t ModelConfig::num_active_params() const { return count_params(*this, /*active_only=*/true); }

TrainingFlops training_flops(const ModelConfig& cfg, int64_t B, int64_t S) {
  TrainingFlops f;
  const int64_t embed = cfg.tie_word_embeddings ? 0 : cfg.vocab_size * cfg.hidden_size;
  f.active_matmul_params = cfg.num_active_params() - embed;
  const double b = static_cast<double>(B), s = static_cast<double>(S);
  f.matmul = 6.0 * static_cast<double>(f.active_matmul_params) * b * s;
  f.attention = 3.0 * 2.0 * 2.0 * static_cast<double>(cfg.num_attention_heads) * static_cast<double>(cfg.head_dim) * s *
                s / 2.0 * static_cast<double>(cfg.num_hidden_layers) * b;
  return f;
}

}  // namespace moetp::config
