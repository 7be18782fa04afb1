#include "model/cuda_model.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "comm/nccl_comm.h"
#include "kernels/cpu/router.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cast.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "moe/cuda_moe.h"
#include "moe/moe_block.h"
#include "shard/layout.h"

namespace moetp::model {

namespace launch {
// cuda_model_kernels.cu
cudaError_t add_bf16(const uint16_t* a, const uint16_t* b, const uint16_t* c, uint16_t* out, int64_t n,
                     cudaStream_t stream);
cudaError_t scale_f32(float* x, float s, int64_t n, cudaStream_t stream);
cudaError_t column_sums_f64(const float* x, int64_t N, int64_t E, double* out, cudaStream_t stream);
}  // namespace launch

namespace {

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

// The CPU model's parameters are the GPU model's, in order: names, and shapes (the parameter value,
// or its gradient when `grads`). Errors name the call, the index and both sides.
void check_same_params(const char* what, const std::vector<Param>& cpu, const std::vector<CudaParam>& gpu,
                       bool grads) {
  MOETP_CHECK(cpu.size() == gpu.size(), "{}: CPU model has {} parameters, GPU {}", what, cpu.size(), gpu.size());
  for (size_t i = 0; i < gpu.size(); ++i) {
    const Tensor& c = grads ? cpu[i].grad : cpu[i].value;
    const Tensor& g = grads ? gpu[i].grad : gpu[i].master;
    MOETP_CHECK(cpu[i].name == gpu[i].name && c.shape() == g.shape(),
                "{}: parameter {} is '{}' {} on the CPU, '{}' {} on the GPU", what, i, cpu[i].name, c.describe(),
                gpu[i].name, g.describe());
  }
}

Tensor upload_i32(const std::vector<int32_t>& v) {
  return Tensor::from_vector<int32_t>(v, {static_cast<int64_t>(v.size())}).to(Device::kCuda);
}

}  // namespace

// Events at phase boundaries on the legacy stream; finish() waits for the last one and adds the
// gaps between consecutive marks to the phase that started at the earlier mark.
struct CudaQwen3MoeModel::PhaseTimer {
  std::vector<cudaEvent_t> pool;
  std::vector<std::string> names;  // the phase starting at pool[i]
  std::map<std::string, double> acc;
  ~PhaseTimer() {
    for (cudaEvent_t e : pool) cudaEventDestroy(e);
  }
  void mark(const char* phase) {
    if (names.size() == pool.size()) {
      pool.push_back(nullptr);
      CUDA_CHECK(cudaEventCreate(&pool.back()));
    }
    CUDA_CHECK(cudaEventRecord(pool[names.size()], nullptr));
    names.emplace_back(phase);
  }
  void finish() {
    if (names.empty()) return;
    mark("end");
    CUDA_CHECK(cudaEventSynchronize(pool[names.size() - 1]));
    for (size_t i = 0; i + 1 < names.size(); ++i) {
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, pool[i], pool[i + 1]));
      acc[names[i]] += ms;
    }
    names.clear();
  }
};

void CudaQwen3MoeModel::set_phase_timing(bool on) {
  if (on && !phases_) phases_ = std::make_unique<PhaseTimer>();
  if (!on) phases_.reset();
}

const std::map<std::string, double>& CudaQwen3MoeModel::phase_ms() const {
  static const std::map<std::string, double> kEmpty;
  return phases_ ? phases_->acc : kEmpty;
}

void CudaQwen3MoeModel::reset_phase_ms() {
  if (phases_) phases_->acc.clear();
}

void CudaQwen3MoeModel::mark(const char* phase) {
  if (phases_) phases_->mark(phase);
}

// Everything one layer's backward needs from its forward (bf16 unless noted).
struct LayerSavedGpu {
  Tensor x_in, rstd1, a;                // input, ln1 rstd (f32), normed input (N, H)
  Tensor q_pre, k_pre, q_rstd, k_rstd;  // projections before the per-head norms; rstd f32
  Tensor q, k, v;                       // (B, S, Hq|Hkv, D) after norm + RoPE
  Tensor attn, lse;                     // (B, S, Hq, D) attention output; (B, Hq, S) f32
  Tensor x_mid, rstd2, m;               // after the attention residual; ln2
  Tensor dense_h, dense_a;              // dense MLP: (N, 2F) gate|up, (N, F)
};

struct CudaQwen3MoeModel::Layer : LayerParams {
  Tensor gate_up_work_2FH;  // dense MLP, bf16 (2F, H): gate rows [0, F), up rows [F, 2F)
  Tensor gate_up_grad_2FH;  // f32 (2F, H)
  std::unique_ptr<moe::CudaMoeLayer> moe;
};

ExpertLayout CudaQwen3MoeModel::layout() const { return opts_.mesh ? expert_layout(*opts_.mesh) : ExpertLayout{}; }

CudaQwen3MoeModel::CudaQwen3MoeModel(const config::ModelConfig& cfg, uint64_t seed, CudaModelOptions opts)
    : cfg_(cfg), opts_(std::move(opts)) {
  build(qwen3_moe_params(cfg_, layout()), seed);
}

CudaQwen3MoeModel::~CudaQwen3MoeModel() = default;

// Allocates every parameter's GPU tensors, then fills the masters one tensor at a time from the
// host (fill_initial_value) and rounds the bf16 working copies from them.
void CudaQwen3MoeModel::build(const ParamTable& table, uint64_t seed) {
  params_.assign(table.params.size(), CudaParam{});
  for (size_t i = 0; i < table.params.size(); ++i) static_cast<ParamDesc&>(params_[i]) = table.params[i];
  const int64_t H = cfg_.hidden_size;
  auto plain = [&](size_t i) {  // a parameter with its own master, working copy and gradient
    const Shape shape = shard::local_shape(params_[i].spec);
    params_[i].master = Tensor::empty(shape, DType::kF32, Device::kCuda);
    params_[i].work = Tensor::empty(shape, DType::kBF16, Device::kCuda);
    params_[i].grad = Tensor::zeros(shape, DType::kF32, Device::kCuda);
  };
  plain(table.embed);
  layers_.clear();
  layers_.resize(table.layers.size());
  for (size_t l = 0; l < table.layers.size(); ++l) {
    Layer& L = layers_[l];
    static_cast<LayerParams&>(L) = table.layers[l];
    for (size_t i : {L.ln1, L.q, L.k, L.v, L.o, L.q_norm, L.k_norm, L.ln2}) plain(i);
    if (L.is_moe) {
      const int64_t E = cfg_.num_experts, I = cfg_.moe_intermediate_size;
      moe::CudaMoeOptions mo;
      mo.force_balance = opts_.force_balance;
      mo.expert_streams = opts_.expert_streams;
      mo.expert_gemm = opts_.expert_gemm;
      mo.mesh = opts_.mesh;
      L.moe = std::make_unique<moe::CudaMoeLayer>(
          moe::MoeConfig{H, E, cfg_.num_experts_per_tok, I, cfg_.norm_topk_prob, opts_.mesh ? opts_.dispatcher : DispatcherKind::kLocal},
          mo);
      // Gradients and bf16 working copies are the layer's own tensors (AdamW writes the rounded
      // update straight into the copies the layer computes with).
      for (size_t i : {L.router, L.w13, L.w2}) {
        params_[i].master = Tensor::empty(shard::local_shape(params_[i].spec), DType::kF32, Device::kCuda);
      }
      moe::MoeParams& g = L.moe->grads();
      params_[L.router].grad = g.wg_EH;
      params_[L.w13].grad = g.w13_L2iH.view(params_[L.w13].master.shape());
      params_[L.w2].grad = g.w2_LHi.view(params_[L.w2].master.shape());
      moe::MoeParams& w = L.moe->mutable_params();
      params_[L.router].work = w.wg_EH;
      params_[L.w13].work = w.w13_L2iH.view(params_[L.w13].master.shape());
      params_[L.w2].work = w.w2_LHi.view(params_[L.w2].master.shape());
    } else {
      const int64_t F = cfg_.intermediate_size;
      MOETP_CHECK(L.up == L.gate + 1, "CudaQwen3MoeModel: layer {} has gate_proj at {} and up_proj at {}, not adjacent",
                  l, L.gate, L.up);
      plain(L.down);
      // gate | up in one (2F, H) buffer of each kind; the parameters are row views.
      const Tensor master = Tensor::empty({2 * F, H}, DType::kF32, Device::kCuda);
      L.gate_up_work_2FH = Tensor::empty({2 * F, H}, DType::kBF16, Device::kCuda);
      L.gate_up_grad_2FH = Tensor::zeros({2 * F, H}, DType::kF32, Device::kCuda);
      for (const auto& [pi, row0] : {std::pair{L.gate, int64_t{0}}, std::pair{L.up, F}}) {
        params_[pi].master = master.narrow_rows(row0, F);
        params_[pi].work = L.gate_up_work_2FH.narrow_rows(row0, F);
        params_[pi].grad = L.gate_up_grad_2FH.narrow_rows(row0, F);
      }
    }
  }
  plain(table.final_norm);
  if (table.lm_head != table.embed) plain(table.lm_head);
  embed_ = table.embed;
  final_norm_ = table.final_norm;
  lm_head_ = table.lm_head;
  for (size_t i = 0; i < params_.size(); ++i) {
    MOETP_CHECK(params_[i].master.defined(), "CudaQwen3MoeModel: parameter {} '{}' has no storage", i, params_[i].name);
    upload(i, Slot::kMaster, initial_value(params_[i], seed));
  }
  refresh_moe_params();
  CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaQwen3MoeModel::refresh_moe_params() {
  for (Layer& L : layers_) {
    if (!L.is_moe) continue;
    const moe::MoeParams& shapes = L.moe->params();
    L.moe->set_params({params_[L.router].master, params_[L.w13].master.view(shapes.w13_L2iH.shape()),
                       params_[L.w2].master.view(shapes.w2_LHi.shape())});
  }
}

void CudaQwen3MoeModel::zero_grads() {
  // The MoE layers defer their expert gradients' zeroing to the next backward, which overwrites
  // them (moe::CudaMoeLayer::grads), and zero their router gradient themselves; the rest is zeroed
  // here (the router gradient again: a few KB, kept simple).
  std::vector<bool> deferred(params_.size(), false);
  for (Layer& L : layers_) {
    if (!L.is_moe) continue;
    L.moe->zero_grads();
    deferred[static_cast<size_t>(L.w13)] = deferred[static_cast<size_t>(L.w2)] = true;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!deferred[i]) params_[i].grad.zero_();
  }
  CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaQwen3MoeModel::materialize_moe_grads() const {
  // params_[...].grad are views of the layers' gradients: a read between zero_grads and the next
  // backward must see zeros, so the layers zero whatever they deferred (a no-op after a backward).
  for (const Layer& L : layers_) {
    if (L.is_moe) (void)static_cast<const moe::CudaMoeLayer&>(*L.moe).grads();
  }
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
  mark("embed");
  std::vector<LayerSavedGpu> saved(layers_.size());
  Tensor x = cuda::embedding_forward(inputs, W(embed_));
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& L = layers_[l];
    LayerSavedGpu& s = saved[l];
    mark("attn_fwd");
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
    mark(L.is_moe ? "moe_fwd" : "dense_fwd");
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
  mark("head_ce");
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

  // ---- aux loss: moe::aux_loss's statistics (summed over MoE layers in f32, then over world) ----
  mark("aux");
  Tensor d_probs_NE;
  std::vector<size_t> moe_layers;
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (layers_[l].is_moe) moe_layers.push_back(l);
  }
  if (!moe_layers.empty()) {
    const int64_t num_layers = static_cast<int64_t>(moe_layers.size());
    // Rows [0, num_layers): per-layer counts; row num_layers: counts summed; row num_layers + 1: prob sums.
    Tensor stats_t = Tensor::zeros({num_layers + 2, E}, DType::kF32);
    float* counts = stats_t.data<float>() + num_layers * E;
    float* prob_sum = counts + E;
    // Per-layer probability sums in double on the GPU (cpu::router_stats sums in double and rounds
    // to f32); E doubles per layer come back instead of the (N, E) probabilities. Doubles travel
    // in an i64 tensor (core has no f64 dtype).
    if (prob_sums_dev_.numel() != num_layers * E) {
      prob_sums_dev_ = Tensor::empty({num_layers, E}, DType::kI64, Device::kCuda);  // once: no cudaFree per step
    }
    Tensor& prob_sums_dev = prob_sums_dev_;
    if (N == 0) prob_sums_dev.zero_();
    if (N > 0) {
      for (size_t li = 0; li < moe_layers.size(); ++li) {
        CUDA_CHECK(launch::column_sums_f64(layers_[moe_layers[li]].moe->saved().probs_NE.data<float>(), N, E,
                                           reinterpret_cast<double*>(prob_sums_dev.data<int64_t>()) +
                                               static_cast<int64_t>(li) * E,
                                           nullptr));
      }
    }
    const std::vector<int64_t> prob_bits = prob_sums_dev.to_vector<int64_t>();
    for (size_t li = 0; li < moe_layers.size(); ++li) {
      const moe::CudaMoeLayer& layer = *layers_[moe_layers[li]].moe;
      float* layer_counts = stats_t.data<float>() + static_cast<int64_t>(li) * E;
      for (int64_t e = 0; e < E; ++e) {
        layer_counts[e] = static_cast<float>(layer.counts_E()[static_cast<size_t>(e)]);
        counts[e] += layer_counts[e];
        prob_sum[e] += static_cast<float>(std::bit_cast<double>(prob_bits[static_cast<size_t>(li) * E + e]));
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
      // Every layer's d_probs is the same (global counts): one upload serves all.
      if (backward && N > 0) {
        d_probs_NE = cpu::aux_loss_grad_probs(counts_t, E, num_layers, global_tokens, static_cast<float>(aux_scale), N)
                         .to(Device::kCuda);
      }
    }
  }
  if (!backward) {
    cuda::check_index_faults();
    if (phases_) phases_->finish();
    return stats;
  }

  // ---- backward ----
  mark("final_norm_bwd");
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
    mark(L.is_moe ? "moe_bwd" : "dense_bwd");
    if (L.is_moe) {
      dm = L.moe->backward(dx, d_probs_NE);
    } else {
      Tensor da;
      cuda::linear_backward(dx, s.dense_a, W(L.down), &da, &G(L.down));
      const Tensor dh = cuda::swiglu_backward(s.dense_h, da);
      cuda::linear_backward(dh, s.m, L.gate_up_work_2FH, &dm, &L.gate_up_grad_2FH);
    }
    Tensor dx_mid;
    mark("attn_bwd");
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
  mark("embed_bwd");
  cuda::embedding_backward(inputs, dx, G(embed_));
  cuda::check_index_faults();  // synchronises the legacy stream
  if (phases_) phases_->finish();
  return stats;
}

void CudaQwen3MoeModel::copy_grads_to(Qwen3MoeModel& cpu) const {
  materialize_moe_grads();
  check_same_params("copy_grads_to", cpu.params(), params_, true);
  CUDA_CHECK(cudaDeviceSynchronize());
  for (size_t i = 0; i < params_.size(); ++i) cpu.params()[i].grad.copy_from(params_[i].grad);
}

void CudaQwen3MoeModel::adamw_step(const CudaAdamWConfig& cfg, double lr, int64_t step) {
  materialize_moe_grads();
  MOETP_CHECK(step >= 1, "AdamW step counts from 1, got {}", step);
  ensure_moments();
  for (CudaParam& p : params_) {
    cuda::AdamWHyper hyper;
    hyper.lr = lr;
    hyper.beta1 = cfg.beta1;
    hyper.beta2 = cfg.beta2;
    hyper.eps = cfg.eps;
    hyper.weight_decay = p.decay ? cfg.weight_decay : 0.0;
    hyper.step = step;
    cuda::adamw_step(p.master, p.grad, p.exp_avg, p.exp_avg_sq, hyper, &p.work);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaQwen3MoeModel::reduce_grads() {
  materialize_moe_grads();
  if (opts_.mesh == nullptr) return;
  const comm::Mesh& mesh = *opts_.mesh;
  for (CudaParam& p : params_) {
    comm::Comm& group = p.kind == ParamKind::kExpert ? mesh.expert_dp() : mesh.world();
    // The dense gate and up gradients are row views of one buffer: each is reduced on its own.
    if (group.size() > 1) group.all_reduce(p.grad, comm::ReduceOp::kSum);
  }
}

double CudaQwen3MoeModel::grad_norm() {
  materialize_moe_grads();
  double replicated = 0, expert = 0;
  for (const CudaParam& p : params_) {
    (p.kind == ParamKind::kExpert ? expert : replicated) += cuda::sum_of_squares(p.grad);
  }
  // Expert shards partition the expert tensors over ep_etp (rank-order sum: identical everywhere).
  if (opts_.mesh != nullptr && opts_.mesh->ep_etp().size() > 1) {
    expert = opts_.mesh->ep_etp().host().all_reduce_scalar(expert, comm::ReduceOp::kSum);
  }
  return std::sqrt(replicated + expert);
}

void CudaQwen3MoeModel::scale_grads(float scale) {
  materialize_moe_grads();
  for (CudaParam& p : params_) {
    check_dtype(p.grad, DType::kF32, p.name.c_str());
    check_contiguous(p.grad, p.name.c_str());
    CUDA_CHECK(launch::scale_f32(p.grad.data<float>(), scale, p.grad.numel(), nullptr));
  }
}

void CudaQwen3MoeModel::ensure_moments() {
  for (CudaParam& p : params_) {
    if (p.exp_avg.defined()) continue;
    p.exp_avg = Tensor::zeros(p.master.shape(), DType::kF32, Device::kCuda);
    p.exp_avg_sq = Tensor::zeros(p.master.shape(), DType::kF32, Device::kCuda);
  }
}

void CudaQwen3MoeModel::download(size_t i, Slot what, Tensor& host) const {
  MOETP_CHECK(i < params_.size(), "CudaQwen3MoeModel::download: parameter {} of {}", i, params_.size());
  const CudaParam& p = params_[i];
  check_host_shard(p, host, "CudaQwen3MoeModel::download");
  const Tensor& src = what == Slot::kMaster ? p.master : what == Slot::kExpAvg ? p.exp_avg : p.exp_avg_sq;
  CUDA_CHECK(cudaDeviceSynchronize());
  if (src.defined()) {
    host.copy_from(src);
  } else {
    host.zero_();  // moments before the first adamw_step
  }
}

void CudaQwen3MoeModel::upload(size_t i, Slot what, const Tensor& host) {
  MOETP_CHECK(i < params_.size(), "CudaQwen3MoeModel::upload: parameter {} of {}", i, params_.size());
  CudaParam& p = params_[i];
  check_host_shard(p, host, "CudaQwen3MoeModel::upload");
  if (what == Slot::kMaster) {
    p.master.copy_from(host);
    // The working copy, also where it is a view of a MoE layer's own bf16 tensor.
    p.work.copy_from(cuda::cast(p.master, DType::kBF16));
  } else {
    ensure_moments();
    (what == Slot::kExpAvg ? p.exp_avg : p.exp_avg_sq).copy_from(host);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
}

CudaParamStore::CudaParamStore(CudaQwen3MoeModel& model, const comm::Mesh& host_mesh)
    : model_(model), mesh_(host_mesh) {
  const ExpertLayout a = model.layout(), b = expert_layout(host_mesh);
  MOETP_CHECK(a.ep_size == b.ep_size && a.ep_rank == b.ep_rank && a.etp_size == b.etp_size && a.etp_rank == b.etp_rank,
              "CudaParamStore: the CUDA model is ep rank {} of {}, etp rank {} of {}; the host mesh ep rank {} of {}, "
              "etp rank {} of {}",
              a.ep_rank, a.ep_size, a.etp_rank, a.etp_size, b.ep_rank, b.ep_size, b.etp_rank, b.etp_size);
}

namespace {

CudaQwen3MoeModel::Slot slot_of(int slot) {
  MOETP_CHECK(slot >= 0 && slot <= 2, "CudaParamStore: slot {} (0 master, 1 exp_avg, 2 exp_avg_sq)", slot);
  return static_cast<CudaQwen3MoeModel::Slot>(slot);
}

}  // namespace

void CudaParamStore::read(size_t i, int slot, Tensor& host_f32) const { model_.download(i, slot_of(slot), host_f32); }

void CudaParamStore::write(size_t i, int slot, const Tensor& host_f32) { model_.upload(i, slot_of(slot), host_f32); }

}  // namespace moetp::model
