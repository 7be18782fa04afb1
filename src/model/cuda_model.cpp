#include "model/cuda_model.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cpu/router.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cast.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "moe/cuda_moe.h"
#include "moe/moe_block.h"

namespace moetp::model {

namespace launch {
// cuda_model_kernels.cu
cudaError_t add_bf16(const uint16_t* a, const uint16_t* b, const uint16_t* c, uint16_t* out, int64_t n,
                     cudaStream_t stream);
}  // namespace launch

namespace {

constexpr float kInitStd = 0.02f;  // as model.cpp (transformers' initializer_range)

void check_bf16_cuda(const Tensor& t, const char* name) {
  check_dtype(t, DType::kBF16, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
}

// dst = bf16(dst + a [+ b]) in f32, one rounding. All (same shape) bf16 CUDA tensors.
void add_into(Tensor& dst, const Tensor& a, const Tensor& b = Tensor()) {
  check_bf16_cuda(dst, "residual add dst");
  check_bf16_cuda(a, "residual add src");
  MOETP_CHECK(a.shape() == dst.shape(), "residual add: {} vs {}", a.describe(), dst.describe());
  if (b.defined()) {
    check_bf16_cuda(b, "residual add src");
    MOETP_CHECK(b.shape() == dst.shape(), "residual add: {} vs {}", b.describe(), dst.describe());
  }
  auto* d = static_cast<uint16_t*>(dst.raw_data());
  CUDA_CHECK(launch::add_bf16(d, static_cast<const uint16_t*>(a.raw_data()),
                              b.defined() ? static_cast<const uint16_t*>(b.raw_data()) : nullptr, d, dst.numel(),
                              nullptr));
}

Tensor upload_i32(const std::vector<int32_t>& v) {
  return Tensor::from_vector<int32_t>(v, {static_cast<int64_t>(v.size())}).to(Device::kCuda);
}

}  // namespace

struct CudaQwen3MoeModel::ParamInit {
  std::string name;
  Shape shape;
  bool decay = true;
  bool ones = false;
};

// Everything one layer's backward needs from its forward (bf16 unless noted).
struct LayerSavedGpu {
  Tensor x_in, rstd1, a;                // input, ln1 rstd (f32), normed input (N, H)
  Tensor q_pre, k_pre, q_rstd, k_rstd;  // projections before the per-head norms; rstd f32
  Tensor q, k, v;                       // (B, S, Hq|Hkv, D) after norm + RoPE
  Tensor attn, lse;                     // (B, S, Hq, D) attention output; (B, Hq, S) f32
  Tensor x_mid, rstd2, m;               // after the attention residual; ln2
  Tensor dense_h, dense_a;              // dense MLP: (N, 2F) gate|up, (N, F)
};

struct CudaQwen3MoeModel::Layer {
  size_t ln1 = 0, q = 0, k = 0, v = 0, o = 0, q_norm = 0, k_norm = 0, ln2 = 0;
  bool is_moe = false;
  size_t gate = 0, up = 0, down = 0;   // dense MLP
  Tensor gate_up_work_2FH;             // bf16 (2F, H): gate rows [0, F), up rows [F, 2F)
  Tensor gate_up_grad_2FH;             // f32 (2F, H)
  size_t router = 0, w13 = 0, w2 = 0;  // MoE
  std::unique_ptr<moe::CudaMoeLayer> moe;
};

// The CPU model's parameter list, in its order (model.cpp's constructor).
std::vector<CudaQwen3MoeModel::ParamInit> CudaQwen3MoeModel::param_list(const config::ModelConfig& cfg) {
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size, D = cfg.head_dim;
  const int64_t hq = cfg.num_attention_heads * D, hkv = cfg.num_key_value_heads * D;
  std::vector<ParamInit> out;
  out.push_back({"model.embed_tokens.weight", {V, H}, true, false});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    out.push_back({p + "input_layernorm.weight", {H}, false, true});
    out.push_back({p + "self_attn.q_proj.weight", {hq, H}, true, false});
    out.push_back({p + "self_attn.k_proj.weight", {hkv, H}, true, false});
    out.push_back({p + "self_attn.v_proj.weight", {hkv, H}, true, false});
    out.push_back({p + "self_attn.o_proj.weight", {H, hq}, true, false});
    out.push_back({p + "self_attn.q_norm.weight", {D}, false, true});
    out.push_back({p + "self_attn.k_norm.weight", {D}, false, true});
    out.push_back({p + "post_attention_layernorm.weight", {H}, false, true});
    if (cfg.is_moe_layer(l)) {
      const int64_t E = cfg.num_experts, I = cfg.moe_intermediate_size;
      out.push_back({p + "mlp.gate.weight", {E, H}, true, false});
      out.push_back({p + "mlp.experts.w13", {E * 2 * I, H}, true, false});
      out.push_back({p + "mlp.experts.w2", {E * H, I}, true, false});
    } else {
      const int64_t F = cfg.intermediate_size;
      out.push_back({p + "mlp.gate_proj.weight", {F, H}, true, false});
      out.push_back({p + "mlp.up_proj.weight", {F, H}, true, false});
      out.push_back({p + "mlp.down_proj.weight", {H, F}, true, false});
    }
  }
  out.push_back({"model.norm.weight", {H}, false, true});
  if (!cfg.tie_word_embeddings) out.push_back({"lm_head.weight", {V, H}, true, false});
  return out;
}

// At P = T = 1 every shard is the whole global tensor in global order, so a replicated spec of the
// global shape draws the same values as the CPU model's expert shard specs.
CudaQwen3MoeModel::CudaQwen3MoeModel(const config::ModelConfig& cfg, uint64_t seed) : cfg_(cfg) {
  std::vector<Tensor> values;
  for (const ParamInit& p : param_list(cfg)) {
    if (p.ones) {
      values.push_back(Tensor::full<float>(p.shape, 1.0f));
    } else {
      values.push_back(moe::init_normal(shard::ShardSpec{p.shape, {}, 0, -1}, seed, p.name, kInitStd));
    }
  }
  build(values);
}

CudaQwen3MoeModel::CudaQwen3MoeModel(const config::ModelConfig& cfg, const std::vector<Tensor>& host_values)
    : cfg_(cfg) {
  build(host_values);
}

std::unique_ptr<CudaQwen3MoeModel> CudaQwen3MoeModel::from_cpu(const Qwen3MoeModel& cpu) {
  MOETP_CHECK(cpu.mesh().ep_size() == 1 && cpu.mesh().etp_size() == 1,
              "CudaQwen3MoeModel::from_cpu needs a one-rank expert layout, got ep {} etp {}", cpu.mesh().ep_size(),
              cpu.mesh().etp_size());
  const std::vector<ParamInit> list = param_list(cpu.config());
  MOETP_CHECK(list.size() == cpu.params().size(), "CudaQwen3MoeModel::from_cpu: {} parameters expected, CPU has {}",
              list.size(), cpu.params().size());
  std::vector<Tensor> values;
  for (size_t i = 0; i < list.size(); ++i) {
    const Param& p = cpu.params()[i];
    MOETP_CHECK(p.name == list[i].name && p.value.shape() == list[i].shape,
                "CudaQwen3MoeModel::from_cpu: parameter {} is '{}' {}, expected '{}' {}", i, p.name,
                p.value.describe(), list[i].name, shape_str(list[i].shape));
    values.push_back(p.value);
  }
  return std::unique_ptr<CudaQwen3MoeModel>(new CudaQwen3MoeModel(cpu.config(), values));
}

CudaQwen3MoeModel::~CudaQwen3MoeModel() = default;

void CudaQwen3MoeModel::build(const std::vector<Tensor>& host_values) {
  const std::vector<ParamInit> list = param_list(cfg_);
  MOETP_CHECK(host_values.size() == list.size(), "CudaQwen3MoeModel: {} initial values for {} parameters",
              host_values.size(), list.size());
  params_.resize(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    CudaParam& p = params_[i];
    p.name = list[i].name;
    p.decay = list[i].decay;
    check_dtype(host_values[i], DType::kF32, p.name.c_str());
    p.master = host_values[i].contiguous().to(Device::kCuda);
  }
  const int64_t H = cfg_.hidden_size;
  size_t idx = 0;
  auto plain = [&](size_t i) {  // a parameter with its own working copy and gradient
    params_[i].work = cuda::cast(params_[i].master, DType::kBF16);
    params_[i].grad = Tensor::zeros(params_[i].master.shape(), DType::kF32, Device::kCuda);
    return i;
  };
  embed_ = plain(idx++);
  layers_.clear();
  layers_.resize(static_cast<size_t>(cfg_.num_hidden_layers));
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    Layer& L = layers_[static_cast<size_t>(l)];
    L.ln1 = plain(idx++);
    L.q = plain(idx++);
    L.k = plain(idx++);
    L.v = plain(idx++);
    L.o = plain(idx++);
    L.q_norm = plain(idx++);
    L.k_norm = plain(idx++);
    L.ln2 = plain(idx++);
    L.is_moe = cfg_.is_moe_layer(l);
    if (L.is_moe) {
      const int64_t E = cfg_.num_experts, I = cfg_.moe_intermediate_size;
      L.moe = std::make_unique<moe::CudaMoeLayer>(
          moe::MoeConfig{H, E, cfg_.num_experts_per_tok, I, cfg_.norm_topk_prob, "local"});
      L.router = idx++;
      L.w13 = idx++;
      L.w2 = idx++;
      moe::MoeParams& g = L.moe->grads();
      params_[L.router].grad = g.wg_EH;
      params_[L.w13].grad = g.w13_L2iH.view({E * 2 * I, H});
      params_[L.w2].grad = g.w2_LHi.view({E * H, I});
    } else {
      const int64_t F = cfg_.intermediate_size;
      L.gate = idx++;
      L.up = idx++;
      L.down = plain(idx++);
      // Fuse gate | up into one (2F, H) buffer of each kind; the parameters become row views.
      Tensor master = Tensor::empty({2 * F, H}, DType::kF32, Device::kCuda);
      master.narrow_rows(0, F).copy_from(params_[L.gate].master);
      master.narrow_rows(F, F).copy_from(params_[L.up].master);
      L.gate_up_work_2FH = cuda::cast(master, DType::kBF16);
      L.gate_up_grad_2FH = Tensor::zeros({2 * F, H}, DType::kF32, Device::kCuda);
      for (const auto& [pi, row0] : {std::pair{L.gate, int64_t{0}}, std::pair{L.up, F}}) {
        params_[pi].master = master.narrow_rows(row0, F);
        params_[pi].work = L.gate_up_work_2FH.narrow_rows(row0, F);
        params_[pi].grad = L.gate_up_grad_2FH.narrow_rows(row0, F);
      }
    }
  }
  final_norm_ = plain(idx++);
  lm_head_ = cfg_.tie_word_embeddings ? embed_ : plain(idx++);
  MOETP_CHECK(idx == params_.size(), "CudaQwen3MoeModel: built {} of {} parameters", idx, params_.size());
  refresh_moe_params();
  CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaQwen3MoeModel::refresh_moe_params() {
  const int64_t H = cfg_.hidden_size, E = cfg_.num_experts, I = cfg_.moe_intermediate_size;
  for (Layer& L : layers_) {
    if (!L.is_moe) continue;
    L.moe->set_params({params_[L.router].master, params_[L.w13].master.view({E, 2 * I, H}),
                       params_[L.w2].master.view({E, H, I})});
  }
}

void CudaQwen3MoeModel::zero_grads() {
  for (Layer& L : layers_) {
    if (L.is_moe) L.moe->zero_grads();
  }
  for (size_t i = 0; i < params_.size(); ++i) params_[i].grad.zero_();  // MoE views again: harmless
  CUDA_CHECK(cudaDeviceSynchronize());
}

const moe::CudaMoeLayer* CudaQwen3MoeModel::moe_layer(int64_t layer_idx) const {
  MOETP_CHECK(layer_idx >= 0 && layer_idx < static_cast<int64_t>(layers_.size()), "layer {} of {}", layer_idx,
              layers_.size());
  return layers_[static_cast<size_t>(layer_idx)].moe.get();
}

MicroStats CudaQwen3MoeModel::forward_backward(const Tensor& tokens_BS1, double ce_scale, double aux_scale) {
  return run(tokens_BS1, true, ce_scale, aux_scale);
}

MicroStats CudaQwen3MoeModel::forward(const Tensor& tokens_BS1) { return run(tokens_BS1, false, 0, 0); }

MicroStats CudaQwen3MoeModel::run(const Tensor& tokens_BS1, bool backward, double ce_scale, double aux_scale) {
  check_dtype(tokens_BS1, DType::kI32, "tokens");
  check_device(tokens_BS1, Device::kCpu, "tokens");
  MOETP_CHECK(tokens_BS1.ndim() == 2 && tokens_BS1.size(1) >= 2, "tokens must be (B, S + 1) with S >= 1, got {}",
              tokens_BS1.describe());
  const int64_t B = tokens_BS1.size(0), S = tokens_BS1.size(1) - 1, N = B * S;
  const int64_t D = cfg_.head_dim, Hq = cfg_.num_attention_heads, Hkv = cfg_.num_key_value_heads,
                V = cfg_.vocab_size, E = cfg_.num_experts;
  MOETP_CHECK(S <= cfg_.max_position_embeddings, "sequence length {} > max_position_embeddings {}", S,
              cfg_.max_position_embeddings);
  const std::vector<int32_t> inputs_host = tokens_BS1.slice(1, 0, S).contiguous().to_vector<int32_t>();
  const std::vector<int32_t> targets_host = tokens_BS1.slice(1, 1, S + 1).contiguous().to_vector<int32_t>();
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(i % S);
  const Tensor inputs = upload_i32(inputs_host), targets = upload_i32(targets_host), positions = upload_i32(pos);
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const double theta = cfg_.rope_theta;
  auto W = [&](size_t i) -> const Tensor& { return params_[i].work; };
  auto G = [&](size_t i) -> Tensor& { return params_[i].grad; };

  // ---- forward ----
  std::vector<LayerSavedGpu> saved(layers_.size());
  Tensor x = cuda::embedding_forward(inputs, W(embed_));
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    LayerSavedGpu& s = saved[l];
    s.x_in = x;
    s.a = cuda::rmsnorm_forward(x, W(L.ln1), eps, &s.rstd1);
    s.q_pre = cuda::linear(s.a, W(L.q));
    s.k_pre = cuda::linear(s.a, W(L.k));
    Tensor q = cuda::rmsnorm_forward(s.q_pre.view({N * Hq, D}), W(L.q_norm), eps, &s.q_rstd).view({N, Hq, D});
    Tensor k = cuda::rmsnorm_forward(s.k_pre.view({N * Hkv, D}), W(L.k_norm), eps, &s.k_rstd).view({N, Hkv, D});
    cuda::rope_forward(q, positions, theta);
    cuda::rope_forward(k, positions, theta);
    s.q = q.view({B, S, Hq, D});
    s.k = k.view({B, S, Hkv, D});
    s.v = cuda::linear(s.a, W(L.v)).view({B, S, Hkv, D});
    s.attn = cuda::attention_forward(s.q, s.k, s.v, &s.lse);
    Tensor o = cuda::linear(s.attn.view({N, Hq * D}), W(L.o));
    add_into(o, x);
    s.x_mid = o;
    s.m = cuda::rmsnorm_forward(s.x_mid, W(L.ln2), eps, &s.rstd2);
    Tensor mlp;
    if (L.is_moe) {
      mlp = L.moe->forward(s.m);  // keeps s.m (not copied) for its backward
    } else {
      s.dense_h = cuda::linear(s.m, L.gate_up_work_2FH);
      s.dense_a = cuda::swiglu_forward(s.dense_h);
      mlp = cuda::linear(s.dense_a, W(L.down));
    }
    add_into(mlp, s.x_mid);
    x = mlp;
  }
  Tensor rstd_f;
  const Tensor f = cuda::rmsnorm_forward(x, W(final_norm_), eps, &rstd_f);

  // ---- LM head + cross-entropy, in chunks of rows; the LM head's backward runs per chunk ----
  MicroStats stats;
  Tensor df;
  if (backward) df = Tensor::empty({N, cfg_.hidden_size}, DType::kBF16, Device::kCuda);
  const int64_t chunk_rows = std::max<int64_t>(1, kLogitChunkElems / std::max<int64_t>(V, 1));
  double ce_sum = 0;
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N - r0);
    const Tensor f_c = f.narrow_rows(r0, rows);
    Tensor logits_c = cuda::linear(f_c, W(lm_head_));
    // dlogits overwrite the logits in place (allowed by the kernel's contract).
    const Tensor loss_c = cuda::cross_entropy_forward(logits_c, targets.narrow_rows(r0, rows),
                                                      backward ? &logits_c : nullptr, static_cast<float>(ce_scale));
    for (float v : loss_c.to_vector<float>()) ce_sum += v;
    if (backward) {
      Tensor df_c;
      cuda::linear_backward(logits_c, f_c, W(lm_head_), &df_c, &G(lm_head_));
      df.narrow_rows(r0, rows).copy_from(df_c);
    }
  }
  stats.ce_sum = ce_sum;
  for (int32_t t : targets_host) stats.num_targets += t != -100 ? 1 : 0;

  // ---- aux loss: moe::aux_loss on one rank (statistics summed over MoE layers in f32) ----
  Tensor d_probs_NE;
  std::vector<size_t> moe_layers;
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (layers_[l].is_moe) moe_layers.push_back(l);
  }
  if (!moe_layers.empty()) {
    Tensor counts = Tensor::zeros({E}, DType::kF32), prob_sum = Tensor::zeros({E}, DType::kF32);
    for (size_t l : moe_layers) {
      const moe::CudaMoeLayer& layer = *layers_[l].moe;
      std::vector<float> layer_counts(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) layer_counts[e] = static_cast<float>(layer.counts_E()[static_cast<size_t>(e)]);
      // Host copy of the (N, E) probabilities; per-layer sums in double rounded to f32 (cpu::router_stats).
      const std::vector<float> probs = layer.saved().probs_NE.to_vector<float>();
      std::vector<double> layer_prob(static_cast<size_t>(E), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t e = 0; e < E; ++e) layer_prob[e] += probs[static_cast<size_t>(n * E + e)];
      }
      for (int64_t e = 0; e < E; ++e) {
        counts.data<float>()[e] += layer_counts[e];
        prob_sum.data<float>()[e] += static_cast<float>(layer_prob[e]);
      }
      stats.expert_counts.push_back(layer_counts);
    }
    const int64_t num_layers = static_cast<int64_t>(moe_layers.size());
    if (N > 0) {
      stats.aux = cpu::aux_loss_from_stats(counts, prob_sum, num_layers, N);
      // Every layer's d_probs is the same (global counts): one upload serves all.
      if (backward) {
        d_probs_NE = cpu::aux_loss_grad_probs(counts, E, num_layers, N, static_cast<float>(aux_scale), N)
                         .to(Device::kCuda);
      }
    }
  }
  if (!backward) {
    cuda::check_index_faults();
    return stats;
  }

  // ---- backward ----
  Tensor dx;
  {
    Tensor dfinal;
    cuda::rmsnorm_backward(df, x, W(final_norm_), rstd_f, dfinal, G(final_norm_));
    dx = dfinal;
  }
  for (size_t li = layers_.size(); li-- > 0;) {
    Layer& L = layers_[li];
    LayerSavedGpu& s = saved[li];
    Tensor dm;
    if (L.is_moe) {
      dm = L.moe->backward(dx, d_probs_NE);
    } else {
      Tensor da;
      cuda::linear_backward(dx, s.dense_a, W(L.down), &da, &G(L.down));
      const Tensor dh = cuda::swiglu_backward(s.dense_h, da);
      cuda::linear_backward(dh, s.m, L.gate_up_work_2FH, &dm, &L.gate_up_grad_2FH);
    }
    Tensor dx_mid;
    cuda::rmsnorm_backward(dm, s.x_mid, W(L.ln2), s.rstd2, dx_mid, G(L.ln2));
    add_into(dx_mid, dx);
    Tensor dattn;
    cuda::linear_backward(dx_mid, s.attn.view({N, Hq * D}), W(L.o), &dattn, &G(L.o));
    Tensor dq, dk, dv;
    cuda::attention_backward(dattn.view({B, S, Hq, D}), s.q, s.k, s.v, s.attn, s.lse, dq, dk, dv);
    Tensor dq3 = dq.view({N, Hq, D}), dk3 = dk.view({N, Hkv, D});
    cuda::rope_backward(dq3, positions, theta);
    cuda::rope_backward(dk3, positions, theta);
    Tensor dq_pre, dk_pre;
    cuda::rmsnorm_backward(dq.view({N * Hq, D}), s.q_pre.view({N * Hq, D}), W(L.q_norm), s.q_rstd, dq_pre,
                           G(L.q_norm));
    cuda::rmsnorm_backward(dk.view({N * Hkv, D}), s.k_pre.view({N * Hkv, D}), W(L.k_norm), s.k_rstd, dk_pre,
                           G(L.k_norm));
    Tensor da, da_k, da_v;
    cuda::linear_backward(dq_pre.view({N, Hq * D}), s.a, W(L.q), &da, &G(L.q));
    cuda::linear_backward(dk_pre.view({N, Hkv * D}), s.a, W(L.k), &da_k, &G(L.k));
    cuda::linear_backward(dv.view({N, Hkv * D}), s.a, W(L.v), &da_v, &G(L.v));
    add_into(da, da_k, da_v);
    Tensor dx_in;
    cuda::rmsnorm_backward(da, s.x_in, W(L.ln1), s.rstd1, dx_in, G(L.ln1));
    add_into(dx_in, dx_mid);
    dx = dx_in;
  }
  cuda::embedding_backward(inputs, dx, G(embed_));
  cuda::check_index_faults();  // synchronises the legacy stream
  return stats;
}

void CudaQwen3MoeModel::copy_grads_to(Qwen3MoeModel& cpu) const {
  MOETP_CHECK(cpu.params().size() == params_.size(), "copy_grads_to: CPU model has {} parameters, GPU {}",
              cpu.params().size(), params_.size());
  CUDA_CHECK(cudaDeviceSynchronize());
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = cpu.params()[i];
    MOETP_CHECK(p.name == params_[i].name && p.grad.shape() == params_[i].grad.shape(),
                "copy_grads_to: parameter {} is '{}' {} on the CPU, '{}' {} on the GPU", i, p.name, p.grad.describe(),
                params_[i].name, params_[i].grad.describe());
    p.grad.copy_from(params_[i].grad);
  }
}

void CudaQwen3MoeModel::copy_params_to(Qwen3MoeModel& cpu) const {
  MOETP_CHECK(cpu.params().size() == params_.size(), "copy_params_to: CPU model has {} parameters, GPU {}",
              cpu.params().size(), params_.size());
  CUDA_CHECK(cudaDeviceSynchronize());
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = cpu.params()[i];
    MOETP_CHECK(p.name == params_[i].name && p.value.shape() == params_[i].master.shape(),
                "copy_params_to: parameter {} is '{}' {} on the CPU, '{}' {} on the GPU", i, p.name,
                p.value.describe(), params_[i].name, params_[i].master.describe());
    p.value.copy_from(params_[i].master);
  }
}

void CudaQwen3MoeModel::adamw_step(const CudaAdamWConfig& cfg, double lr, int64_t step) {
  MOETP_CHECK(step >= 1, "AdamW step counts from 1, got {}", step);
  for (CudaParam& p : params_) {
    if (!p.exp_avg.defined()) {
      p.exp_avg = Tensor::zeros(p.master.shape(), DType::kF32, Device::kCuda);
      p.exp_avg_sq = Tensor::zeros(p.master.shape(), DType::kF32, Device::kCuda);
    }
    cuda::AdamWHyper hyper;
    hyper.lr = lr;
    hyper.beta1 = cfg.beta1;
    hyper.beta2 = cfg.beta2;
    hyper.eps = cfg.eps;
    hyper.weight_decay = p.decay ? cfg.weight_decay : 0.0;
    hyper.step = step;
    cuda::adamw_step(p.master, p.grad, p.exp_avg, p.exp_avg_sq, hyper, p.work.defined() ? &p.work : nullptr);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  refresh_moe_params();  // the MoE layers keep their own bf16 copies
}

}  // namespace moetp::model
