#include "model/model.h"

#include <algorithm>

#include "kernels/cpu/router.h"
#include "model/lm_head.h"
#include "shard/layout.h"

namespace moetp::model {

struct Qwen3MoeModel::Layer : LayerParams {
  std::unique_ptr<moe::MoeLayer> moe;  // MoE layers
  Tensor gate_up_work, gate_up_grad;   // dense layers: gate | up stacked, (2F, H) views
};

// Everything one layer's backward needs from its forward (the compute dtype unless noted).
struct LayerSaved {
  Tensor x_in, rstd1, a;                // input, ln1 rstd (f32), normed input (N, H)
  Tensor q_pre, k_pre, q_rstd, k_rstd;  // projections before the per-head norms; rstd f32
  Tensor q, k, v;                       // (B, S, Hq|Hkv, D) after norm + RoPE
  Tensor attn, lse;                     // (B, S, Hq, D) attention output; (B, Hq, S) f32
  Tensor x_mid, rstd2, m;               // after the attention residual; ln2
  Tensor dense_h, dense_a;              // dense MLP: (N, 2F) gate|up, (N, F)
};

Qwen3MoeModel::Qwen3MoeModel(const config::ModelConfig& cfg, backend::Backend& backend, const ModelOptions& opts,
                             uint64_t seed)
    : cfg_(cfg), backend_(backend), opts_(opts) {
  MOETP_CHECK(opts_.dispatcher != DispatcherKind::kAuto, "Qwen3MoeModel: the dispatcher must be resolved (not auto)");
  build(qwen3_moe_params(cfg_, layout()), seed);
}

Qwen3MoeModel::Qwen3MoeModel(const config::ModelConfig& cfg, const comm::Mesh& mesh, DispatcherKind dispatcher,
                             uint64_t seed)
    : Qwen3MoeModel(cfg, backend::get(Device::kCpu), ModelOptions{&mesh, dispatcher}, seed) {}

Qwen3MoeModel::~Qwen3MoeModel() = default;

ExpertLayout Qwen3MoeModel::layout() const { return opts_.mesh ? expert_layout(*opts_.mesh) : ExpertLayout{}; }

std::vector<ParamSlice> replica_slices(const ParamTable& table, const comm::Mesh* mesh) {
  std::vector<ParamSlice> out(table.params.size());
  for (size_t i = 0; i < table.params.size(); ++i) {
    const ParamDesc& p = table.params[i];
    ParamSlice& s = out[i];
    const int64_t n = shape_numel(shard::local_shape(p.spec));
    comm::Comm* group = mesh == nullptr ? nullptr : p.kind == ParamKind::kExpert ? &mesh->expert_dp() : &mesh->world();
    s.group = group != nullptr && group->size() > 1 ? group : nullptr;
    if (s.group == nullptr) {
      s.counts = {n};
      s.count = n;
      continue;
    }
    const int64_t d = s.group->size();
    const int64_t per = (n + d * kSliceAlign - 1) / (d * kSliceAlign) * kSliceAlign;
    for (int64_t r = 0; r < d; ++r) s.counts.push_back(std::clamp<int64_t>(n - r * per, 0, per));
    s.offset = std::min<int64_t>(n, s.group->rank() * per);
    s.count = s.counts[static_cast<size_t>(s.group->rank())];
  }
  return out;
}

// Flat offsets, the buffers and their views, the MoE layers bound to theirs, then the initial
// values one tensor at a time (host -> master -> working copy). Sharded masters: the value buffer
// holds this rank's slices, each at a multiple of kFlatAlign.
void Qwen3MoeModel::build(const ParamTable& table, uint64_t seed) {
  const size_t P = table.params.size();
  const int64_t total = flat_layout(table, offsets_);
  master_slices_.clear();
  if (opts_.shard_masters) {
    master_slices_ = replica_slices(table, opts_.mesh);
    if (std::none_of(master_slices_.begin(), master_slices_.end(), [](const ParamSlice& s) { return s.group; })) {
      master_slices_.clear();  // one replica of everything: nothing to split
    }
  }
  std::vector<int64_t> value_offsets = offsets_;
  int64_t value_total = total;
  if (masters_sharded()) {
    value_total = 0;
    for (size_t i = 0; i < P; ++i) {
      value_offsets[i] = value_total;
      value_total += (master_slices_[i].count + kFlatAlign - 1) / kFlatAlign * kFlatAlign;
    }
  }
  flat_value_ = backend_.zeros({value_total}, DType::kF32);
  flat_grad_ = backend_.zeros({total}, DType::kF32);
  const bool separate_work = backend_.compute_dtype() != DType::kF32 || masters_sharded();
  flat_work_ = separate_work ? backend_.zeros({total}, backend_.compute_dtype()) : flat_value_;
  params_.assign(P, Param{});
  for (size_t i = 0; i < P; ++i) {
    Param& p = params_[i];
    static_cast<ParamDesc&>(p) = table.params[i];
    const Shape shape = shard::local_shape(p.spec);
    const int64_t n = shape_numel(shape);
    const ParamSlice* s = master_slice(i);
    p.value = s == nullptr ? flat_value_.slice(0, value_offsets[i], value_offsets[i] + n).view(shape)
                           : flat_value_.slice(0, value_offsets[i], value_offsets[i] + s->count);
    p.work = flat_work_.slice(0, offsets_[i], offsets_[i] + n).view(shape);
    p.grad = flat_grad_.slice(0, offsets_[i], offsets_[i] + n).view(shape);
  }
  const int64_t H = cfg_.hidden_size;
  layers_.clear();
  layers_.resize(table.layers.size());
  for (size_t l = 0; l < table.layers.size(); ++l) {
    Layer& L = layers_[l];
    static_cast<LayerParams&>(L) = table.layers[l];
    if (L.is_moe) {
      moe::MoeLayerOptions mo{opts_.mesh, opts_.force_balance, opts_.expert_streams, opts_.expert_gemm};
      L.moe = backend_.make_moe_layer(moe::MoeConfig{H, cfg_.num_experts, cfg_.num_experts_per_tok,
                                                     cfg_.moe_intermediate_size, cfg_.norm_topk_prob, opts_.dispatcher},
                                      mo);
      const int64_t n_local = L.moe->num_local_experts();
      auto views = [&](auto field) {
        return moe::MoeParams{(params_[L.router].*field), (params_[L.w13].*field).view({n_local, -1, H}),
                              (params_[L.w2].*field).view({n_local, H, -1})};
      };
      L.moe->bind(views(&Param::work), views(&Param::grad));
    } else {
      const int64_t F = cfg_.intermediate_size;
      L.gate_up_work = flat_work_.slice(0, offsets_[L.gate], offsets_[L.gate] + 2 * F * H).view({2 * F, H});
      L.gate_up_grad = flat_grad_.slice(0, offsets_[L.gate], offsets_[L.gate] + 2 * F * H).view({2 * F, H});
    }
  }
  embed_ = table.embed;
  final_norm_ = table.final_norm;
  lm_head_ = table.lm_head;
  for (size_t i = 0; i < P; ++i) set_value(i, initial_value(params_[i], seed));
  backend_.synchronize();
}

const ParamSlice* Qwen3MoeModel::master_slice(size_t i) const {
  MOETP_CHECK(i < params_.size(), "master_slice: parameter {} of {}", i, params_.size());
  if (master_slices_.empty() || master_slices_[i].group == nullptr) return nullptr;
  return &master_slices_[i];
}

void Qwen3MoeModel::set_value(size_t i, const Tensor& host_f32) {
  Param& p = params_.at(i);
  MOETP_CHECK(host_f32.shape() == p.work.shape(), "set_value '{}': shape {} for a parameter of shape {}", p.name,
              shape_str(host_f32.shape()), shape_str(p.work.shape()));
  const ParamSlice* s = master_slice(i);
  if (s == nullptr) {
    p.value.copy_from(host_f32);
    refresh_work(i);
    return;
  }
  const Tensor flat = host_f32.contiguous().view({host_f32.numel()});
  p.value.copy_from(flat.slice(0, s->offset, s->offset + s->count));
  if (p.work.dtype() == DType::kF32) {
    p.work.copy_from(host_f32);
  } else {
    p.work.copy_from(host_f32.to(p.work.dtype()));
  }
}

void Qwen3MoeModel::refresh_work(size_t i) {
  MOETP_CHECK(i < params_.size(), "refresh_work: parameter {} of {}", i, params_.size());
  Param& p = params_[i];
  const ParamSlice* s = master_slice(i);
  if (s == nullptr) {
    if (p.work.raw_data() != p.value.raw_data()) backend_.cast_into(p.value, p.work);
    return;
  }
  // This rank's part of the working copy from its master slice, then every member's part.
  Tensor all = p.work.view({p.work.numel()});
  Tensor mine = backend_.empty({s->count}, p.work.dtype());
  backend_.cast_into(p.value, mine);
  s->group->all_gather_v(mine, all, s->counts);
}

std::vector<Param>& Qwen3MoeModel::params() {
  for (Layer& L : layers_) {
    if (L.moe) L.moe->materialize_grads();
  }
  return params_;
}

const std::vector<Param>& Qwen3MoeModel::params() const {
  for (const Layer& L : layers_) {
    if (L.moe) L.moe->materialize_grads();
  }
  return params_;
}

Param& Qwen3MoeModel::param(const std::string& name) {
  for (Param& p : params()) {
    if (p.name == name) return p;
  }
  MOETP_FAIL("no parameter named '{}'", name);
}

Tensor Qwen3MoeModel::grad_span(size_t first, size_t last) const {
  MOETP_CHECK(first < last && last <= params_.size(), "grad_span: parameters [{}, {}) of {}", first, last,
              params_.size());
  for (const Layer& L : layers_) {
    if (L.moe) L.moe->materialize_grads();
  }
  return flat_grad_.slice(0, offsets_[first], offsets_[last - 1] + params_[last - 1].grad.numel());
}

void Qwen3MoeModel::zero_grads() {
  // A MoE layer zeroes its own gradients (and may defer the expert weights' to its next backward,
  // which then overwrites them); the rest is zeroed here.
  std::vector<bool> by_layer(params_.size(), false);
  for (Layer& L : layers_) {
    if (!L.moe) continue;
    L.moe->zero_grads();
    by_layer[L.router] = by_layer[L.w13] = by_layer[L.w2] = true;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!by_layer[i]) params_[i].grad.zero_();
  }
  backend_.synchronize();
}

const moe::MoeLayer* Qwen3MoeModel::moe_layer(int64_t layer_idx) const {
  MOETP_CHECK(layer_idx >= 0 && layer_idx < static_cast<int64_t>(layers_.size()), "layer {} of {}", layer_idx,
              layers_.size());
  return layers_[static_cast<size_t>(layer_idx)].moe.get();
}

MicroStats Qwen3MoeModel::forward_backward(const Batch& batch, double ce_scale, double aux_scale) {
  return run(batch, true, ce_scale, aux_scale, nullptr);
}

MicroStats Qwen3MoeModel::forward_backward(const Tensor& tokens_BS1, double ce_scale, double aux_scale) {
  return run(Batch::from_rows(tokens_BS1), true, ce_scale, aux_scale, nullptr);
}

MicroStats Qwen3MoeModel::forward(const Batch& batch, Tensor* logits) { return run(batch, false, 0, 0, logits); }

MicroStats Qwen3MoeModel::forward(const Tensor& tokens_BS1, Tensor* logits) {
  return run(Batch::from_rows(tokens_BS1), false, 0, 0, logits);
}

MicroStats Qwen3MoeModel::run(const Batch& batch, bool backward, double ce_scale, double aux_scale,
                              Tensor* logits_out) {
  batch.validate();
  // The attention's documents: none passed for one document per row (every backend's fast path).
  const std::span<const int64_t> docs =
      batch.one_document_per_row() ? std::span<const int64_t>{} : std::span<const int64_t>(batch.doc_offsets);
  backend::Backend& be = backend_;
  const int64_t B = batch.rows, S = batch.seq_len, N = B * S;
  const int64_t D = cfg_.head_dim, Hq = cfg_.num_attention_heads,
                Hkv = cfg_.num_key_value_heads, V = cfg_.vocab_size, E = cfg_.num_experts;
  MOETP_CHECK(S <= cfg_.max_position_embeddings, "sequence length {} > max_position_embeddings {}", S,
              cfg_.max_position_embeddings);
  const Tensor inputs = be.to_device(batch.inputs), targets = be.to_device(batch.targets),
               positions = be.to_device(batch.positions);
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const double theta = cfg_.rope_theta;
  auto W = [&](size_t i) -> const Tensor& { return params_[i].work; };
  auto G = [&](size_t i) -> Tensor& { return params_[i].grad; };

  // One layer's forward in two blocks, each filling its part of `s` from s.x_in (attention) or
  // s.x_mid (MLP); the backward re-runs them for recomputed layers.
  auto attention_block = [&](Layer& L, LayerSaved& s) {
    s.a = be.rmsnorm_forward(s.x_in, W(L.ln1), eps, &s.rstd1);
    s.q_pre = be.linear(s.a, W(L.q));
    s.k_pre = be.linear(s.a, W(L.k));
    Tensor q = be.rmsnorm_forward(s.q_pre.view({N * Hq, D}), W(L.q_norm), eps, &s.q_rstd).view({N, Hq, D});
    Tensor k = be.rmsnorm_forward(s.k_pre.view({N * Hkv, D}), W(L.k_norm), eps, &s.k_rstd).view({N, Hkv, D});
    be.rope_forward(q, positions, theta);
    be.rope_forward(k, positions, theta);
    s.q = q.view({B, S, Hq, D});
    s.k = k.view({B, S, Hkv, D});
    s.v = be.linear(s.a, W(L.v)).view({B, S, Hkv, D});
    s.attn = be.attention_forward(s.q, s.k, s.v, s.lse, docs);
    Tensor o = be.linear(s.attn.view({N, Hq * D}), W(L.o));
    be.add_into(o, s.x_in);
    s.x_mid = o;
  };
  // recomputing: only what the backward reads (a dense MLP skips its down projection; a MoE layer
  // re-runs dispatch and experts with the forward's routing, moe::MoeLayer::recompute).
  auto mlp_block = [&](Layer& L, LayerSaved& s, bool recomputing) {
    s.m = be.rmsnorm_forward(s.x_mid, W(L.ln2), eps, &s.rstd2);
    Tensor mlp;
    if (L.moe) {
      if (recomputing) {
        L.moe->recompute(s.m);
        return Tensor();
      }
      mlp = L.moe->forward(s.m);  // keeps s.m (not copied) for its backward
    } else {
      s.dense_h = be.linear_stacked(s.m, L.gate_up_work, cfg_.intermediate_size);
      s.dense_a = be.swiglu_forward(s.dense_h);
      if (recomputing) return Tensor();
      mlp = be.linear(s.dense_a, W(L.down));
    }
    be.add_into(mlp, s.x_mid);
    return mlp;
  };
  MOETP_CHECK(opts_.recompute_layers >= -1, "recompute_layers ({}) must be >= -1 (-1: every layer)",
              opts_.recompute_layers);
  const size_t recomputed = opts_.recompute == RecomputeMode::kNone ? 0
                            : opts_.recompute_layers < 0
                                ? layers_.size()
                                : std::min(layers_.size(), static_cast<size_t>(opts_.recompute_layers));

  // ---- forward ----
  be.mark("embed");
  std::vector<LayerSaved> saved(layers_.size());
  Tensor x = be.embedding_forward(inputs, W(embed_));
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    LayerSaved& s = saved[l];
    be.mark("attn_fwd");
    s.x_in = x;
    attention_block(L, s);
    be.mark(L.moe ? "moe_fwd" : "dense_fwd");
    x = mlp_block(L, s, false);
    if (backward && l < recomputed && opts_.recompute == RecomputeMode::kMoe) {
      // Everything but the MoE block's rows (dense layers keep theirs: nothing to recompute).
      if (L.moe) L.moe->release_activations();
    } else if (backward && l < recomputed) {
      // Keep what the backward cannot recompute: the layer input (both modes) and, with attn, the
      // MLP block's activations (its input x_mid is the attention block's output: recomputed).
      const Tensor x_in = s.x_in;
      if (opts_.recompute == RecomputeMode::kLayer) {
        if (L.moe) L.moe->release_activations();
        s = LayerSaved{};
      } else {
        s.a = s.rstd1 = s.q_pre = s.k_pre = s.q_rstd = s.k_rstd = s.q = s.k = s.v = s.attn = s.lse = s.x_mid = Tensor();
      }
      s.x_in = x_in;
    }
  }
  Tensor rstd_f;
  const Tensor f = be.rmsnorm_forward(x, W(final_norm_), eps, &rstd_f);

  // ---- LM head + cross-entropy in chunks of rows; the LM head's backward runs per chunk ----
  be.mark("head_ce");
  MicroStats stats;
  MOETP_CHECK(opts_.logit_chunk_rows >= 0, "logit_chunk_rows ({}) must be >= 0", opts_.logit_chunk_rows);
  const int64_t chunk_rows = opts_.logit_chunk_rows > 0 ? opts_.logit_chunk_rows : be.logit_chunk_rows(V);
  Tensor df;
  const LmHeadGrads head_grads{&df, &G(lm_head_), ce_scale};
  const double ce_sum =
      lm_head_loss(be, f, W(lm_head_), targets, chunk_rows, backward ? &head_grads : nullptr, logits_out);
  stats.ce_sum = ce_sum;
  for (int32_t t : batch.targets.to_vector<int32_t>()) stats.num_targets += t != kIgnoreIndex ? 1 : 0;

  // ---- aux loss (HF Qwen3-MoE; cpu::aux_loss_from_stats) on the global batch ----
  // Statistics summed over the MoE layers in f32, in layer order, then over world in rank order.
  be.mark("aux");
  Tensor d_probs_NE;
  std::vector<size_t> moe_layers;
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (layers_[l].moe) moe_layers.push_back(l);
  }
  if (!moe_layers.empty()) {
    const int64_t num_layers = static_cast<int64_t>(moe_layers.size());
    // Rows [0, num_layers): per-layer counts; row num_layers: counts summed; row num_layers + 1: prob sums.
    Tensor stats_t = Tensor::zeros({num_layers + 2, E}, DType::kF32);
    float* counts = stats_t.data<float>() + num_layers * E;
    float* prob_sum = counts + E;
    for (size_t li = 0; li < moe_layers.size(); ++li) {
      const moe::RoutingStats rs = layers_[moe_layers[li]].moe->routing_stats();
      float* layer_counts = stats_t.data<float>() + static_cast<int64_t>(li) * E;
      for (int64_t e = 0; e < E; ++e) {
        layer_counts[e] = rs.counts_E[static_cast<size_t>(e)];
        counts[e] += layer_counts[e];
        prob_sum[e] += rs.prob_sums_E[static_cast<size_t>(e)];
      }
    }
    int64_t global_tokens = N;
    if (opts_.mesh != nullptr && opts_.mesh->world().size() > 1) {
      comm::Comm& host = opts_.mesh->world().host();
      host.all_reduce(stats_t, comm::ReduceOp::kSum);
      global_tokens = host.all_reduce_scalar(N, comm::ReduceOp::kSum);
    }
    for (int64_t li = 0; li < num_layers; ++li) {
      stats.expert_counts.push_back(stats_t.narrow_rows(li, 1).contiguous().to_vector<float>());
    }
    if (global_tokens > 0) {
      const Tensor counts_t = stats_t.narrow_rows(num_layers, 1).view({E}).contiguous();
      const Tensor prob_t = stats_t.narrow_rows(num_layers + 1, 1).view({E}).contiguous();
      stats.aux = cpu::aux_loss_from_stats(counts_t, prob_t, num_layers, global_tokens);
      // Every layer's d_probs is the same (global counts): one tensor serves all.
      if (backward && N > 0) {
        d_probs_NE = be.to_device(
            cpu::aux_loss_grad_probs(counts_t, E, num_layers, global_tokens, static_cast<float>(aux_scale), N));
      }
    }
  }
  if (!backward) {
    be.check_faults();
    be.finish_phases();
    return stats;
  }

  // ---- backward ----
  be.mark("final_norm_bwd");
  Tensor dx;
  be.rmsnorm_backward(df, x, W(final_norm_), rstd_f, dx, G(final_norm_));
  for (size_t li = layers_.size(); li-- > 0;) {
    Layer& L = layers_[li];
    LayerSaved& s = saved[li];
    if (li < recomputed) {
      be.mark("recompute");
      if (opts_.recompute == RecomputeMode::kMoe) {
        if (L.moe) L.moe->recompute(s.m);
      } else {
        attention_block(L, s);
        if (opts_.recompute == RecomputeMode::kLayer) mlp_block(L, s, true);
      }
    }
    // MLP (residual: dx flows to x_mid unchanged, plus through the MLP)
    Tensor dm;
    be.mark(L.moe ? "moe_bwd" : "dense_bwd");
    if (L.moe) {
      dm = L.moe->backward(dx, d_probs_NE);
      // A recomputed layer's rows were allocated again by the re-run forward: free them for the
      // layers below.
      if (li < recomputed && opts_.recompute != RecomputeMode::kAttn) L.moe->release_activations();
    } else {
      Tensor da;
      be.linear_backward(dx, s.dense_a, W(L.down), &da, &G(L.down));
      const Tensor dh = be.swiglu_backward(s.dense_h, da);
      be.linear_stacked_backward(dh, s.m, L.gate_up_work, cfg_.intermediate_size, dm, L.gate_up_grad);
    }
    Tensor dx_mid;
    be.mark("attn_bwd");
    be.rmsnorm_backward(dm, s.x_mid, W(L.ln2), s.rstd2, dx_mid, G(L.ln2));
    be.add_into(dx_mid, dx);
    Tensor dattn;
    be.linear_backward(dx_mid, s.attn.view({N, Hq * D}), W(L.o), &dattn, &G(L.o));
    Tensor dq, dk, dv;
    be.attention_backward(dattn.view({B, S, Hq, D}), s.q, s.k, s.v, s.attn, s.lse, dq, dk, dv, docs);
    Tensor dq3 = dq.view({N, Hq, D}), dk3 = dk.view({N, Hkv, D});
    be.rope_backward(dq3, positions, theta);
    be.rope_backward(dk3, positions, theta);
    Tensor dq_pre, dk_pre;
    be.rmsnorm_backward(dq.view({N * Hq, D}), s.q_pre.view({N * Hq, D}), W(L.q_norm), s.q_rstd, dq_pre,
                        G(L.q_norm));
    be.rmsnorm_backward(dk.view({N * Hkv, D}), s.k_pre.view({N * Hkv, D}), W(L.k_norm), s.k_rstd, dk_pre,
                        G(L.k_norm));
    Tensor da, da_k, da_v;
    be.linear_backward(dq_pre.view({N, Hq * D}), s.a, W(L.q), &da, &G(L.q));
    be.linear_backward(dk_pre.view({N, Hkv * D}), s.a, W(L.k), &da_k, &G(L.k));
    be.linear_backward(dv.view({N, Hkv * D}), s.a, W(L.v), &da_v, &G(L.v));
    be.add_into(da, da_k, da_v);
    Tensor dx_in;
    be.rmsnorm_backward(da, s.x_in, W(L.ln1), s.rstd1, dx_in, G(L.ln1));
    be.add_into(dx_in, dx_mid);
    dx = dx_in;
    s = LayerSaved{};  // this layer's activations are done: the layers below run without them
  }
  be.mark("embed_bwd");
  be.embedding_backward(inputs, dx, G(embed_));
  be.check_faults();  // synchronises
  be.finish_phases();
  return stats;
}

void copy_grads(const Qwen3MoeModel& from, Qwen3MoeModel& to) {
  const std::vector<Param>& a = from.params();
  std::vector<Param>& b = to.params();
  MOETP_CHECK(a.size() == b.size(), "copy_grads: {} parameters into {}", a.size(), b.size());
  from.backend().synchronize();
  for (size_t i = 0; i < a.size(); ++i) {
    MOETP_CHECK(a[i].name == b[i].name && a[i].grad.shape() == b[i].grad.shape(),
                "copy_grads: parameter {} is '{}' {} in the source, '{}' {} in the destination", i, a[i].name,
                a[i].grad.describe(), b[i].name, b[i].grad.describe());
    b[i].grad.copy_from(a[i].grad);
  }
  to.backend().synchronize();
}

}  // namespace moetp::model
