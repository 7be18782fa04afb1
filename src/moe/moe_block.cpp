#include "moe/moe_block.h"

#include <utility>
#include <vector>

#include "core/rng.h"

namespace moetp::moe {

MoeBlock::MoeBlock(const MoeConfig& cfg, const comm::Mesh& mesh) : cfg_(cfg), mesh_(mesh) {
  MOETP_CHECK(cfg.hidden >= 1 && cfg.intermediate >= 1, "hidden ({}) and moe_intermediate_size ({}) must be >= 1",
              cfg.hidden, cfg.intermediate);
  MOETP_CHECK(cfg.intermediate % mesh.etp_size() == 0, "moe_intermediate_size ({}) % etp ({}) = {} != 0",
              cfg.intermediate, mesh.etp_size(), cfg.intermediate % mesh.etp_size());
  dispatcher_ = make_dispatcher(cfg.dispatcher, mesh, {cfg.num_experts, cfg.top_k});
}

shard::ShardSpec MoeBlock::w13_spec() const {
  return shard::w13_spec(cfg_.num_experts, cfg_.intermediate, cfg_.hidden, mesh_.ep_size(), mesh_.coords().p,
                         mesh_.etp_size(), mesh_.coords().t);
}

shard::ShardSpec MoeBlock::w2_spec() const {
  return shard::w2_spec(cfg_.num_experts, cfg_.intermediate, cfg_.hidden, mesh_.ep_size(), mesh_.coords().p,
                        mesh_.etp_size(), mesh_.coords().t);
}

MoeParams MoeBlock::zeros_like_params() const {
  const int64_t L = num_local_experts(), i = local_intermediate(), H = cfg_.hidden;
  return {Tensor::zeros({cfg_.num_experts, H}, DType::kF32), Tensor::zeros({L, 2 * i, H}, DType::kF32),
          Tensor::zeros({L, H, i}, DType::kF32)};
}

Tensor MoeBlock::forward(const Tensor& x_NH, const MoeParams& params, MoeSaved& saved) const {
  saved.x_NH = x_NH;
  // A bad input or NaN logit on any rank stops all ranks with the same message.
  mesh_.world().run_collectively("MoE router", [&] {
    check_shape(params.wg_EH, {cfg_.num_experts, cfg_.hidden}, "router weight wg_EH");
    MOETP_CHECK(x_NH.ndim() == 2 && x_NH.size(1) == cfg_.hidden, "MoE input must be (N, {}), got {}", cfg_.hidden,
                x_NH.describe());
    saved.router = cpu::router_forward(x_NH, params.wg_EH, cfg_.top_k, cfg_.norm_topk_prob);
  });
  cpu::router_stats(saved.router, saved.counts_E, saved.prob_sum_E);
  saved.dispatched =
      dispatcher_->dispatch(x_NH, saved.router.topk_idx_NK, saved.router.topk_weight_NK, saved.dispatch);
  Tensor y_MH = cpu::experts_forward(saved.dispatched.x_MH, saved.dispatched.offsets, params.w13_L2iH,
                                     params.w2_LHi, &saved.experts);
  saved.has_rows = true;
  return dispatcher_->combine(y_MH, *saved.dispatch);
}

void MoeBlock::release(MoeSaved& saved) const {
  saved.x_NH = Tensor();
  saved.dispatched = Dispatched{};
  saved.experts = cpu::ExpertsSaved{};
  if (saved.dispatch) saved.dispatch->release_rows();
  saved.has_rows = false;
}

void MoeBlock::recompute(const Tensor& x_NH, const MoeParams& params, MoeSaved& saved) const {
  MOETP_CHECK(saved.dispatch != nullptr && !saved.has_rows,
              "MoE recompute needs a forward whose activations were released (and no backward since)");
  MOETP_CHECK(x_NH.ndim() == 2 && x_NH.size(0) == saved.router.topk_idx_NK.size(0) && x_NH.size(1) == cfg_.hidden,
              "MoE recompute: input {} is not the forward's ({} tokens of {})", x_NH.describe(),
              saved.router.topk_idx_NK.size(0), cfg_.hidden);
  saved.x_NH = x_NH;
  saved.dispatched = dispatcher_->redispatch(x_NH, *saved.dispatch);
  Tensor y_MH = cpu::experts_forward(saved.dispatched.x_MH, saved.dispatched.offsets, params.w13_L2iH,
                                     params.w2_LHi, &saved.experts);
  dispatcher_->recombine(y_MH, *saved.dispatch);
  saved.has_rows = true;
}

Tensor MoeBlock::backward(const Tensor& dout_NH, const Tensor& d_probs_NE, const MoeParams& params, MoeSaved& saved,
                          MoeParams& grads) const {
  MOETP_CHECK(saved.dispatch != nullptr && saved.has_rows,
              "MoE backward needs a forward (or, after release_activations, a recompute) first");
  CombineGrads cg = dispatcher_->combine_backward(dout_NH, *saved.dispatch);
  Tensor dx_MH = Tensor::empty(saved.dispatched.x_MH.shape(), DType::kF32);
  cpu::experts_backward(cg.dy_MH, saved.dispatched.x_MH, saved.dispatched.offsets, params.w13_L2iH, params.w2_LHi,
                        saved.experts, dx_MH, grads.w13_L2iH, grads.w2_LHi);
  Tensor dx_NH = dispatcher_->dispatch_backward(dx_MH, *saved.dispatch);
  Tensor dx_router;
  cpu::router_backward(saved.x_NH, params.wg_EH, saved.router, cfg_.norm_topk_prob, cg.dtopk_weight_NK, d_probs_NE,
                       dx_router, grads.wg_EH);
  float* d = dx_NH.data<float>();
  const float* r = dx_router.data<float>();
  for (int64_t k = 0; k < dx_NH.numel(); ++k) d[k] += r[k];
  saved.dispatch.reset();  // counts and buffers of this step are done
  saved.has_rows = false;
  return dx_NH;
}

AuxLoss aux_loss(const std::vector<const MoeSaved*>& layers, comm::Comm& world, int64_t num_experts, float coef) {
  MOETP_CHECK(!layers.empty(), "aux_loss needs at least one MoE layer");
  Tensor stats = Tensor::zeros({2, num_experts}, DType::kF32);
  float* c = stats.data<float>();
  float* p = c + num_experts;
  int64_t local_tokens = 0;
  for (const MoeSaved* s : layers) {
    const float* sc = s->counts_E.data<float>();
    const float* sp = s->prob_sum_E.data<float>();
    for (int64_t e = 0; e < num_experts; ++e) {
      c[e] += sc[e];
      p[e] += sp[e];
    }
    local_tokens = s->x_NH.size(0);
  }
  // Layers in order on each rank, then ranks in rank order (the MPI backend's f32 sum): fixed.
  world.all_reduce(stats, comm::ReduceOp::kSum);
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  const int64_t global_tokens = world.all_reduce_scalar(local_tokens, comm::ReduceOp::kSum);
  AuxLoss out;
  out.global_counts_E = stats.narrow_rows(0, 1).view({num_experts}).clone();
  const Tensor prob_E = stats.narrow_rows(1, 1).view({num_experts}).clone();
  out.value = global_tokens == 0 ? 0.0 : cpu::aux_loss_from_stats(out.global_counts_E, prob_E, num_layers, global_tokens);
  for (const MoeSaved* s : layers) {
    out.d_probs_NE.push_back(global_tokens == 0 ? Tensor::zeros({0, num_experts}, DType::kF32)
                                                : cpu::aux_loss_grad_probs(out.global_counts_E, num_experts, num_layers,
                                                                           global_tokens, coef, s->x_NH.size(0)));
  }
  return out;
}

Tensor init_normal(const shard::ShardSpec& spec, uint64_t seed, std::string_view name, float std) {
  Tensor local = Tensor::empty(shard::local_shape(spec), DType::kF32);
  init_normal_into(spec, seed, name, std, local);
  return local;
}

void init_normal_into(const shard::ShardSpec& spec, uint64_t seed, std::string_view name, float std, Tensor& local) {
  check_dtype(local, DType::kF32, "init_normal_into");
  check_device(local, Device::kCpu, "init_normal_into");
  check_contiguous(local, "init_normal_into");
  MOETP_CHECK(local.shape() == shard::local_shape(spec), "init_normal_into '{}': tensor is {}, the shard is {}", name,
              local.describe(), shape_str(shard::local_shape(spec)));
  const CounterRng rng(seed, stream_id(name));
  const int64_t global_cols = shape_numel(std::span<const int64_t>(spec.global_shape).subspan(1));
  const shard::ColumnRange cols = shard::column_range(spec);
  const int64_t local_cols = cols.width();
  float* out = local.data<float>();
  // Every row is a pure function of its global position (counter-based RNG), so rows fill in any
  // order and on any number of threads with the same result (the Qwen3 presets hold billions of
  // values; the GPU benchmarks build a model per case from a seed).
  std::vector<std::pair<int64_t, int64_t>> rows;  // (local row, global row)
  for (const shard::Run& run : shard::compute_runs(spec)) {
    for (int64_t r = 0; r < run.length; ++r) rows.emplace_back(run.local_row + r, run.global_row + r);
  }
  const int64_t num_rows = static_cast<int64_t>(rows.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < num_rows; ++i) {
    const auto [local_row, global_row] = rows[static_cast<size_t>(i)];
    const uint64_t first = static_cast<uint64_t>(global_row * global_cols + cols.begin);
    fill_normal(std::span<float>(out + local_row * local_cols, static_cast<size_t>(local_cols)), rng, first, 0.0f, std);
  }
}

}  // namespace moetp::moe
