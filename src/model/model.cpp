#include "model/model.h"

#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/experts.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"

namespace moetp::model {

namespace {

void add_into(Tensor& dst, const Tensor& src) {
  float* d = dst.data<float>();
  const float* s = src.data<float>();
  for (int64_t i = 0; i < dst.numel(); ++i) d[i] += s[i];
}

// (N, 2F) = [gate(x) | up(x)] for the dense MLP.
Tensor concat_cols(const Tensor& a_NF, const Tensor& b_NF) {
  const int64_t n = a_NF.size(0), f = a_NF.size(1);
  Tensor out = Tensor::empty({n, 2 * f}, DType::kF32);
  out.slice(1, 0, f).copy_from(a_NF);
  out.slice(1, f, 2 * f).copy_from(b_NF);
  return out;
}

}  // namespace

struct Qwen3MoeModel::Layer : LayerParams {
  std::unique_ptr<moe::MoeBlock> block;  // MoE layers
};

// Everything one layer's backward needs from its forward.
struct LayerSaved {
  Tensor x_in, rstd1, a;              // input, ln1 statistics, normed input (N, H)
  Tensor q_pre, k_pre, q_rstd, k_rstd;  // projections before the per-head norms
  Tensor q, k, v;                     // (B, S, Hq|Hkv, D) after norm + RoPE
  cpu::AttentionSaved attn;
  Tensor attn_out;                    // (N, Hq·D) before o_proj
  Tensor x_mid, rstd2, m;             // after the attention residual; ln2
  Tensor dense_h, dense_a;            // dense MLP: (N, 2F) gate|up, (N, F) activation
  moe::MoeSaved moe;
};

struct Qwen3MoeModel::Saved {
  std::vector<LayerSaved> layers;
};

Qwen3MoeModel::Qwen3MoeModel(const config::ModelConfig& cfg, const comm::Mesh& mesh, DispatcherKind dispatcher,
                             uint64_t seed)
    : cfg_(cfg), mesh_(mesh) {
  const ParamTable table = qwen3_moe_params(cfg, expert_layout(mesh));
  params_.reserve(table.params.size());
  for (const ParamDesc& d : table.params) {
    Param p;
    static_cast<ParamDesc&>(p) = d;
    p.value = initial_value(d, seed);
    p.grad = Tensor::zeros(p.value.shape(), DType::kF32);
    params_.push_back(std::move(p));
  }
  for (const LayerParams& lp : table.layers) {
    Layer layer;
    static_cast<LayerParams&>(layer) = lp;
    if (layer.is_moe) {
      layer.block = std::make_unique<moe::MoeBlock>(
          moe::MoeConfig{cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                         cfg.norm_topk_prob, dispatcher},
          mesh);
    }
    layers_.push_back(std::move(layer));
  }
  embed_ = table.embed;
  final_norm_ = table.final_norm;
  lm_head_ = table.lm_head;
}

Qwen3MoeModel::~Qwen3MoeModel() = default;

Param& Qwen3MoeModel::param(const std::string& name) {
  for (Param& p : params_) {
    if (p.name == name) return p;
  }
  MOETP_FAIL("no parameter named '{}'", name);
}

void Qwen3MoeModel::zero_grads() {
  for (Param& p : params_) p.grad.zero_();
}

MicroStats Qwen3MoeModel::forward_backward(const Tensor& tokens_BS1, double ce_scale, double aux_scale) {
  return run(tokens_BS1, true, ce_scale, aux_scale, nullptr);
}

MicroStats Qwen3MoeModel::forward(const Tensor& tokens_BS1, Tensor* logits) { return run(tokens_BS1, false, 0, 0, logits); }

MicroStats Qwen3MoeModel::run(const Tensor& tokens_BS1, bool backward, double ce_scale, double aux_scale,
                              Tensor* logits_out) {
  check_dtype(tokens_BS1, DType::kI32, "tokens");
  MOETP_CHECK(tokens_BS1.ndim() == 2 && tokens_BS1.size(1) >= 2, "tokens must be (B, S + 1) with S >= 1, got {}",
              tokens_BS1.describe());
  const int64_t B = tokens_BS1.size(0), S = tokens_BS1.size(1) - 1, N = B * S;
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim, Hq = cfg_.num_attention_heads,
                Hkv = cfg_.num_key_value_heads;
  MOETP_CHECK(S <= cfg_.max_position_embeddings, "sequence length {} > max_position_embeddings {}", S,
              cfg_.max_position_embeddings);
  const Tensor inputs = tokens_BS1.slice(1, 0, S).contiguous().view({N});
  const Tensor targets = tokens_BS1.slice(1, 1, S + 1).contiguous().view({N});
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) pos[i] = static_cast<int32_t>(i % S);
  const Tensor positions = Tensor::from_vector<int32_t>(pos, {N});
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  auto W = [&](size_t i) -> const Tensor& { return params_[i].value; };
  auto G = [&](size_t i) -> Tensor& { return params_[i].grad; };

  // ---- forward ----
  std::vector<LayerSaved> saved(layers_.size());
  Tensor x = cpu::embedding_forward(inputs, W(embed_));
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    LayerSaved& s = saved[l];
    s.x_in = x;
    s.a = cpu::rmsnorm_forward(x, W(L.ln1), eps, &s.rstd1);
    s.q_pre = cpu::linear(s.a, W(L.q));
    s.k_pre = cpu::linear(s.a, W(L.k));
    Tensor q = cpu::rmsnorm_forward(s.q_pre.view({N * Hq, D}), W(L.q_norm), eps, &s.q_rstd).view({N, Hq, D});
    Tensor k = cpu::rmsnorm_forward(s.k_pre.view({N * Hkv, D}), W(L.k_norm), eps, &s.k_rstd).view({N, Hkv, D});
    cpu::rope_forward(q, positions, cfg_.rope_theta);
    cpu::rope_forward(k, positions, cfg_.rope_theta);
    s.q = q.view({B, S, Hq, D});
    s.k = k.view({B, S, Hkv, D});
    s.v = cpu::linear(s.a, W(L.v)).view({B, S, Hkv, D});
    s.attn_out = cpu::attention_forward(s.q, s.k, s.v, &s.attn).view({N, Hq * D});
    Tensor o = cpu::linear(s.attn_out, W(L.o));
    add_into(o, x);
    s.x_mid = o;
    s.m = cpu::rmsnorm_forward(s.x_mid, W(L.ln2), eps, &s.rstd2);
    Tensor mlp;
    if (L.is_moe) {
      const moe::MoeParams mp{W(L.router), W(L.w13).view({L.block->num_local_experts(), -1, H}),
                              W(L.w2).view({L.block->num_local_experts(), H, -1})};
      mlp = L.block->forward(s.m, mp, s.moe);
    } else {
      s.dense_h = concat_cols(cpu::linear(s.m, W(L.gate)), cpu::linear(s.m, W(L.up)));
      s.dense_a = cpu::swiglu_forward(s.dense_h);
      mlp = cpu::linear(s.dense_a, W(L.down));
    }
    add_into(mlp, s.x_mid);
    x = mlp;
  }
  Tensor rstd_f;
  const Tensor f = cpu::rmsnorm_forward(x, W(final_norm_), eps, &rstd_f);
  const Tensor logits = cpu::linear(f, W(lm_head_));
  if (logits_out != nullptr) *logits_out = logits;
  Tensor dlogits;
  const cpu::CrossEntropyResult ce =
      cpu::cross_entropy_forward(logits, targets, backward ? &dlogits : nullptr, static_cast<float>(ce_scale));

  MicroStats stats;
  stats.ce_sum = ce.loss_sum;
  stats.num_targets = ce.num_targets;
  std::vector<const moe::MoeSaved*> moe_saved;
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (layers_[l].is_moe) moe_saved.push_back(&saved[l].moe);
  }
  moe::AuxLoss aux;
  if (!moe_saved.empty()) {
    aux = moe::aux_loss(moe_saved, mesh_.world(), cfg_.num_experts, static_cast<float>(aux_scale));
    stats.aux = aux.value;
    // Per-layer global expert load (telemetry).
    Tensor counts = Tensor::empty({static_cast<int64_t>(moe_saved.size()), cfg_.num_experts}, DType::kF32);
    for (size_t i = 0; i < moe_saved.size(); ++i) counts.narrow_rows(static_cast<int64_t>(i), 1).copy_from(moe_saved[i]->counts_E.view({1, cfg_.num_experts}));
    mesh_.world().all_reduce(counts, comm::ReduceOp::kSum);
    for (size_t i = 0; i < moe_saved.size(); ++i) stats.expert_counts.push_back(counts.narrow_rows(static_cast<int64_t>(i), 1).to_vector<float>());
  }
  if (!backward) return stats;

  // ---- backward ----
  Tensor df, dx;
  cpu::linear_backward(dlogits, f, W(lm_head_), &df, &G(lm_head_));
  cpu::rmsnorm_backward(df, x, W(final_norm_), rstd_f, dx, G(final_norm_));
  size_t moe_idx = moe_saved.size();
  for (size_t li = layers_.size(); li-- > 0;) {
    const Layer& L = layers_[li];
    LayerSaved& s = saved[li];
    // MLP (residual: dx flows to x_mid unchanged, plus through the MLP)
    Tensor dm;
    if (L.is_moe) {
      --moe_idx;
      moe::MoeParams mp{W(L.router), W(L.w13).view({L.block->num_local_experts(), -1, H}),
                        W(L.w2).view({L.block->num_local_experts(), H, -1})};
      moe::MoeParams mg{G(L.router), G(L.w13).view({L.block->num_local_experts(), -1, H}),
                        G(L.w2).view({L.block->num_local_experts(), H, -1})};
      dm = L.block->backward(dx, aux.d_probs_NE[moe_idx], mp, s.moe, mg);
    } else {
      Tensor da;
      cpu::linear_backward(dx, s.dense_a, W(L.down), &da, &G(L.down));
      const Tensor dh = cpu::swiglu_backward(s.dense_h, da);
      const int64_t F = cfg_.intermediate_size;
      Tensor dm_up;
      cpu::linear_backward(dh.slice(1, 0, F).contiguous(), s.m, W(L.gate), &dm, &G(L.gate));
      cpu::linear_backward(dh.slice(1, F, 2 * F).contiguous(), s.m, W(L.up), &dm_up, &G(L.up));
      add_into(dm, dm_up);
    }
    Tensor dx_mid;
    cpu::rmsnorm_backward(dm, s.x_mid, W(L.ln2), s.rstd2, dx_mid, G(L.ln2));
    add_into(dx_mid, dx);
    // Attention
    Tensor dattn;
    cpu::linear_backward(dx_mid, s.attn_out, W(L.o), &dattn, &G(L.o));
    Tensor dq, dk, dv;
    cpu::attention_backward(dattn.view({B, S, Hq, D}), s.q, s.k, s.v, s.attn, dq, dk, dv);
    Tensor dq3 = dq.view({N, Hq, D}), dk3 = dk.view({N, Hkv, D});
    cpu::rope_backward(dq3, positions, cfg_.rope_theta);
    cpu::rope_backward(dk3, positions, cfg_.rope_theta);
    Tensor dq_pre, dk_pre;
    cpu::rmsnorm_backward(dq3.view({N * Hq, D}), s.q_pre.view({N * Hq, D}), W(L.q_norm), s.q_rstd, dq_pre,
                          G(L.q_norm));
    cpu::rmsnorm_backward(dk3.view({N * Hkv, D}), s.k_pre.view({N * Hkv, D}), W(L.k_norm), s.k_rstd, dk_pre,
                          G(L.k_norm));
    Tensor da, da_k, da_v;
    cpu::linear_backward(dq_pre.view({N, Hq * D}), s.a, W(L.q), &da, &G(L.q));
    cpu::linear_backward(dk_pre.view({N, Hkv * D}), s.a, W(L.k), &da_k, &G(L.k));
    cpu::linear_backward(dv.view({N, Hkv * D}), s.a, W(L.v), &da_v, &G(L.v));
    add_into(da, da_k);
    add_into(da, da_v);
    Tensor dx_in;
    cpu::rmsnorm_backward(da, s.x_in, W(L.ln1), s.rstd1, dx_in, G(L.ln1));
    add_into(dx_in, dx_mid);
    dx = dx_in;
  }
  cpu::embedding_backward(inputs, dx, G(embed_));
  return stats;
}

}  // namespace moetp::model
