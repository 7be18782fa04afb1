// The Qwen3-MoE parameter table: every parameter's name, kind, shard spec, weight decay and
// initialiser, in model order, for one rank's place in the expert layout. The model (model.h, on
// every backend) and the checkpoint code (io/checkpoint.h, through ParamStore) build on this one
// list, so names, shapes and initial values cannot drift apart between them.
//
// Parameters are named as in Hugging Face transformers, except the routed experts of a layer,
// which are two fused tensors in global (HF-equivalent) coordinates (etp_spec §3.1):
//   model.layers.{l}.mlp.experts.w13  [E·2I, H]  stripes gate_0, up_0, gate_1, ...  (InterleavedShard)
//   model.layers.{l}.mlp.experts.w2   [E·H, I]   down_proj of expert e = rows [e·H, (e+1)·H)
// Every other parameter is replicated on every rank. Initial values are a pure function of
// (seed, name, global index), so every layout starts from the same global model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/model_config.h"
#include "core/tensor.h"
#include "shard/layout.h"

namespace moetp::comm {
class Mesh;
}

namespace moetp::model {

enum class ParamKind {
  kReplicated,  // identical on every rank; gradients all-reduced over world
  kExpert,      // one shard per (p, t); gradients all-reduced over expert_dp
};

enum class ParamInit {
  kNormal,  // N(0, kInitStd²), a pure function of (seed, name, global element index)
  kOnes,    // norm weights
};

constexpr float kInitStd = 0.02f;  // transformers' initializer_range for Qwen3-MoE

struct ParamDesc {
  std::string name;
  ParamKind kind = ParamKind::kReplicated;
  shard::ShardSpec spec;  // this rank's shard of the global tensor
  bool decay = true;      // AdamW weight decay (off for norm weights)
  ParamInit init = ParamInit::kNormal;
};

// Indices into ParamTable::params of one decoder layer's parameters.
struct LayerParams {
  size_t ln1 = 0, q = 0, k = 0, v = 0, o = 0, q_norm = 0, k_norm = 0, ln2 = 0;
  bool is_moe = false;
  // Dense MLP: gate_proj (F, H), up_proj (F, H), down_proj (H, F). up == gate + 1 (the CUDA model
  // keeps gate | up in one (2F, H) buffer, so one GEMM gives the SwiGLU input).
  size_t gate = 0, up = 0, down = 0;
  size_t router = 0, w13 = 0, w2 = 0;  // MoE: router (E, H) and the expert shards
};

// This rank's place in the expert layout: EP rank ep_rank of ep_size, ETP rank etp_rank of
// etp_size (one process: 1 x 1).
struct ExpertLayout {
  int ep_size = 1, ep_rank = 0, etp_size = 1, etp_rank = 0;
};
ExpertLayout expert_layout(const comm::Mesh& mesh);

struct ParamTable {
  std::vector<ParamDesc> params;  // model order: embed, per layer (attention, MLP), final norm, lm_head
  std::vector<LayerParams> layers;
  size_t embed = 0, final_norm = 0;
  size_t lm_head = 0;  // == embed with tie_word_embeddings (no lm_head.weight parameter)
};

// The table of `cfg` at `layout` (expert shard specs via shard::w13_spec / w2_spec).
ParamTable qwen3_moe_params(const config::ModelConfig& cfg, const ExpertLayout& layout);

// Where each parameter sits in the model's flat buffers (elements): every parameter starts on a
// multiple of kFlatAlign, except a dense layer's up_proj, which directly follows its gate_proj (the
// two form one stacked weight). Returns the buffers' length; `offsets` gets one entry per parameter.
inline constexpr int64_t kFlatAlign = 256;  // elements: 512 B of bf16, 1 KiB of f32
int64_t flat_layout(const ParamTable& table, std::vector<int64_t>& offsets);

// Writes the parameter's initial shard values into `host_f32` (f32, host, contiguous, the spec's
// local shape): the one initialiser of both models, one tensor at a time.
void fill_initial_value(const ParamDesc& p, uint64_t seed, Tensor& host_f32);
// The same into a new tensor.
Tensor initial_value(const ParamDesc& p, uint64_t seed);

}  // namespace moetp::model
