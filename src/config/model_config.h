// Qwen3-MoE model hyper-parameters, read from (and written as) a Hugging Face config.json.
// Start-up reads it before anything is allocated: it fixes every parameter shape, which layers are
// MoE, and the router's top-k. Both spellings of the HF file are accepted: released checkpoints
// (`num_experts`, top-level `rope_theta`) and transformers 5.x (`num_local_experts`,
// `rope_parameters: {rope_type, rope_theta}`). Options moetp does not implement (sliding-window
// attention, RoPE scaling, attention bias, activations other than SiLU, other model types) are
// errors, never silently ignored; fields moetp does not use (dtype, token ids, ...) are kept
// verbatim (`passthrough`) and written back by to_hf_json, so an exported checkpoint keeps them.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace moetp::config {

struct ModelConfig {
  // Required (no default: a wrong architecture must not be filled in silently).
  int64_t vocab_size = 0;             // V
  int64_t hidden_size = 0;            // H
  int64_t intermediate_size = 0;      // FFN width of dense (non-MoE) layers
  int64_t moe_intermediate_size = 0;  // I, FFN width of one routed expert
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t num_experts = 0;          // E; 0 makes every layer dense (as transformers)
  int64_t num_experts_per_tok = 0;  // K

  // Optional; defaults are those of transformers' Qwen3MoeConfig unless noted.
  int64_t head_dim = 0;  // default hidden_size / num_attention_heads (Qwen3MoeAttention)
  bool norm_topk_prob = false;               // Qwen3MoeConfig default False
  int64_t decoder_sparse_step = 1;           // Qwen3MoeConfig default 1
  std::vector<int64_t> mlp_only_layers;      // Qwen3MoeConfig default None -> []
  double rms_norm_eps = 1e-6;                // Qwen3MoeConfig default 1e-6
  double rope_theta = 10000.0;               // transformers' default RoPE base (v4 field default)
  bool tie_word_embeddings = false;          // Qwen3MoeConfig default False
  double router_aux_loss_coef = 0.001;       // Qwen3MoeConfig default 0.001
  int64_t max_position_embeddings = 32768;   // Qwen3MoeConfig default 32768

  // Every field of the source config.json that to_hf_json does not write itself (bos_token_id,
  // eos_token_id, torch_dtype / dtype, transformers_version, initializer_range, ...), verbatim.
  nlohmann::json passthrough = nlohmann::json::object();

  // The weights' dtype the source names (`torch_dtype`, or transformers 5's `dtype`): "bfloat16",
  // "float32", ..., or "" when it names none.
  std::string weights_dtype() const;

  // Layer `layer` uses the sparse MoE block (else a dense SwiGLU MLP of intermediate_size);
  // the rule of transformers' Qwen3MoeDecoderLayer.
  bool is_moe_layer(int64_t layer) const;
  int64_t num_moe_layers() const;

  // Parses an HF config.json object; `source_name` (usually the file path) prefixes every error.
  // Throws moetp::Error on a missing required field, a wrong JSON type, an unsupported option,
  // disagreeing duplicate spellings, or a failed validate().
  static ModelConfig from_json(const nlohmann::json& json, const std::string& source_name);
  // Reads and parses `path`; errors name the path.
  static ModelConfig load(const std::string& path);

  // A config.json that both transformers 4.x and 5.x read back to this config: the passthrough
  // fields, then model_type qwen3_moe, architectures ["Qwen3MoeForCausalLM"], the
  // released-checkpoint spelling (`num_experts`, `rope_theta`) plus `rope_parameters`.
  // from_json(to_hf_json()) == *this.
  nlohmann::json to_hf_json() const;

  // Sizes positive, heads divisible by kv heads, head_dim even (RoPE), top-k within experts,
  // mlp_only_layers in range. Messages name `source_name` and the values.
  void validate(const std::string& source_name) const;

  // Parameter counts, embedding and LM head included (the head counted once when tied).
  // num_active_params counts the router and only K of the E experts of every MoE layer.
  int64_t num_params() const;
  int64_t num_active_params() const;

  bool operator==(const ModelConfig&) const = default;
  // The same architecture and hyper-parameters: every field but `passthrough` equal (what a
  // checkpoint's config.json must match to load into a model).
  bool same_model(const ModelConfig& other) const;
};

// Model FLOPs of one training step (forward + backward) over B sequences of S tokens, the
// "6·N·P + attention" convention (no recomputation counted):
//   matmul    = 6 · P_active · B·S, P_active = num_active_params() minus the embedding table V·H (a
//               lookup, not a matmul; tied embeddings keep it, as it is then the LM head). P_active
//               keeps the LM head, the router and K of E experts per MoE layer (and the norm
//               weights, not matmuls: negligible).
//   attention = 3 (fwd + 2·fwd for bwd) · 2 (QKᵀ and PV) · 2 (mul + add) · Hq · D · S² / 2 (causal)
//               · L per sequence, times B.
// Model TFLOP/s = total() / step seconds (per GPU: divide by the ranks).
struct TrainingFlops {
  int64_t active_matmul_params = 0;
  double matmul = 0, attention = 0;
  double total() const { return matmul + attention; }
};
TrainingFlops training_flops(const ModelConfig& cfg, int64_t B, int64_t S);

}  // namespace moetp::config
