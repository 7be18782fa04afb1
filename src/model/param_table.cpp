#include "model/param_table.h"

#include <algorithm>

#include "comm/mesh.h"
#include "moe/moe_block.h"

namespace moetp::model {

ExpertLayout expert_layout(const comm::Mesh& mesh) {
  return {mesh.ep_size(), mesh.coords().p, mesh.etp_size(), mesh.coords().t};
}

ParamTable qwen3_moe_params(const config::ModelConfig& cfg, const ExpertLayout& layout) {
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size, D = cfg.head_dim;
  const int64_t hq = cfg.num_attention_heads * D, hkv = cfg.num_key_value_heads * D;
  ParamTable t;
  t.params.reserve(static_cast<size_t>(4 + 11 * cfg.num_hidden_layers));
  auto add = [&](std::string name, ParamKind kind, shard::ShardSpec spec, bool decay, ParamInit init) {
    t.params.push_back({std::move(name), kind, std::move(spec), decay, init});
    return t.params.size() - 1;
  };
  auto matrix = [&](std::string name, Shape shape) {  // replicated, decayed, N(0, kInitStd²)
    return add(std::move(name), ParamKind::kReplicated, shard::ShardSpec{std::move(shape), {}, 0, -1}, true,
               ParamInit::kNormal);
  };
  auto norm = [&](std::string name, int64_t n) {  // replicated, no decay, ones
    return add(std::move(name), ParamKind::kReplicated, shard::ShardSpec{{n}, {}, 0, -1}, false, ParamInit::kOnes);
  };
  t.embed = matrix("model.embed_tokens.weight", {V, H});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    LayerParams L;
    L.ln1 = norm(p + "input_layernorm.weight", H);
    L.q = matrix(p + "self_attn.q_proj.weight", {hq, H});
    L.k = matrix(p + "self_attn.k_proj.weight", {hkv, H});
    L.v = matrix(p + "self_attn.v_proj.weight", {hkv, H});
    L.o = matrix(p + "self_attn.o_proj.weight", {H, hq});
    L.q_norm = norm(p + "self_attn.q_norm.weight", D);
    L.k_norm = norm(p + "self_attn.k_norm.weight", D);
    L.ln2 = norm(p + "post_attention_layernorm.weight", H);
    L.is_moe = cfg.is_moe_layer(l);
    if (L.is_moe) {
      const int64_t E = cfg.num_experts, I = cfg.moe_intermediate_size;
      const ExpertLayout& x = layout;
      L.router = matrix(p + "mlp.gate.weight", {E, H});
      L.w13 = add(p + "mlp.experts.w13", ParamKind::kExpert,
                  shard::w13_spec(E, I, H, x.ep_size, x.ep_rank, x.etp_size, x.etp_rank), true, ParamInit::kNormal);
      L.w2 = add(p + "mlp.experts.w2", ParamKind::kExpert,
                 shard::w2_spec(E, I, H, x.ep_size, x.ep_rank, x.etp_size, x.etp_rank), true, ParamInit::kNormal);
    } else {
      const int64_t F = cfg.intermediate_size;
      L.gate = matrix(p + "mlp.gate_proj.weight", {F, H});
      L.up = matrix(p + "mlp.up_proj.weight", {F, H});
      L.down = matrix(p + "mlp.down_proj.weight", {H, F});
    }
    t.layers.push_back(L);
  }
  t.final_norm = norm("model.norm.weight", H);
  t.lm_head = cfg.tie_word_embeddings ? t.embed : matrix("lm_head.weight", {V, H});
  return t;
}

void fill_initial_value(const ParamDesc& p, uint64_t seed, Tensor& host_f32) {
  switch (p.init) {
    case ParamInit::kOnes:
      check_dtype(host_f32, DType::kF32, p.name.c_str());
      check_device(host_f32, Device::kCpu, p.name.c_str());
      check_contiguous(host_f32, p.name.c_str());
      MOETP_CHECK(host_f32.shape() == shard::local_shape(p.spec), "initial value of '{}': tensor is {}, the shard is {}",
                  p.name, host_f32.describe(), shape_str(shard::local_shape(p.spec)));
      std::fill_n(host_f32.data<float>(), host_f32.numel(), 1.0f);
      return;
    case ParamInit::kNormal:
      moe::init_normal_into(p.spec, seed, p.name, kInitStd, host_f32);
      return;
  }
  MOETP_FAIL("initial value of '{}': unknown initialiser {}", p.name, static_cast<int>(p.init));
}

Tensor initial_value(const ParamDesc& p, uint64_t seed) {
  Tensor t = Tensor::empty(shard::local_shape(p.spec), DType::kF32);
  fill_initial_value(p, seed, t);
  return t;
}

int64_t flat_layout(const ParamTable& table, std::vector<int64_t>& offsets) {
  const size_t P = table.params.size();
  std::vector<bool> follows_previous(P, false);
  for (const LayerParams& lp : table.layers) {
    if (lp.is_moe) continue;
    MOETP_CHECK(lp.up == lp.gate + 1, "parameter table: a layer has gate_proj at {} and up_proj at {}, not adjacent",
                lp.gate, lp.up);
    follows_previous[lp.up] = true;
  }
  offsets.assign(P, 0);
  int64_t total = 0;
  for (size_t i = 0; i < P; ++i) {
    if (!follows_previous[i]) total = (total + kFlatAlign - 1) / kFlatAlign * kFlatAlign;
    offsets[i] = total;
    total += shape_numel(shard::local_shape(table.params[i].spec));
  }
  return total;
}

}  // namespace moetp::model
