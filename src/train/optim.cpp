#include "train/optim.h"

#include <cmath>

namespace moetp::train {

void reduce_grads(model::Qwen3MoeModel& model) {
  const comm::Mesh* mesh = model.mesh();
  if (mesh == nullptr) return;
  for (model::Param& p : model.params()) {
    comm::Comm& group = p.kind == model::ParamKind::kExpert ? mesh->expert_dp() : mesh->world();
    // A dense layer's gate and up gradients are row views of one buffer: each is reduced on its own.
    if (group.size() > 1) group.all_reduce(p.grad, comm::ReduceOp::kSum);
  }
}

// Fixed order: each parameter's sum of squares in double (the backend's fixed order), parameters in
// the model's order. Replicated gradients are identical on every rank after reduce_grads, so every
// rank has the same `replicated`; `expert` is this rank's shards, summed over ep_etp in rank order
// (Comm::all_reduce_scalar(double) on the host). The layout decides which shards a rank holds.
double global_grad_norm(model::Qwen3MoeModel& model) {
  backend::Backend& be = model.backend();
  double replicated = 0, expert = 0;
  for (const model::Param& p : model.params()) {
    (p.kind == model::ParamKind::kExpert ? expert : replicated) += be.sum_of_squares(p.grad);
  }
  // Expert shards partition the expert tensors over ep_etp.
  const comm::Mesh* mesh = model.mesh();
  if (mesh != nullptr && mesh->ep_etp().size() > 1) {
    expert = mesh->ep_etp().host().all_reduce_scalar(expert, comm::ReduceOp::kSum);
  }
  return std::sqrt(replicated + expert);
}

void scale_grads(model::Qwen3MoeModel& model, float scale) {
  backend::Backend& be = model.backend();
  for (model::Param& p : model.params()) be.scale(p.grad, scale);
}

AdamW::AdamW(const model::Qwen3MoeModel& model, const AdamWConfig& cfg) : cfg_(cfg) {
  for (size_t i = 0; i < model.num_params(); ++i) {
    const Shape shape = shard::local_shape(model.param_desc(i).spec);
    const DType dtype = cfg.state_dtype == StateDType::kBF16 ? DType::kBF16 : DType::kF32;
    m_.push_back(model.backend().zeros(shape, dtype));
    v_.push_back(model.backend().zeros(shape, dtype));
  }
}

void AdamW::step(model::Qwen3MoeModel& model, double lr, int64_t step) {
  MOETP_CHECK(step >= 1, "AdamW step counts from 1, got {}", step);
  std::vector<model::Param>& params = model.params();
  MOETP_CHECK(params.size() == m_.size(), "AdamW built for {} parameters, stepped with {}", m_.size(), params.size());
  backend::Backend& be = model.backend();
  for (size_t i = 0; i < params.size(); ++i) {
    model::Param& p = params[i];
    backend::AdamWHyper h;
    h.lr = lr;
    h.beta1 = cfg_.beta1;
    h.beta2 = cfg_.beta2;
    h.eps = cfg_.eps;
    h.weight_decay = p.decay ? cfg_.weight_decay : 0.0;
    h.step = step;
    const bool separate = p.work.raw_data() != p.value.raw_data();
    be.adamw_step(p.value, p.grad, m_[i], v_[i], h, separate ? &p.work : nullptr);
  }
  be.synchronize();
}

double lr_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double lr, double min_lr) {
  if (warmup_steps > 0 && step <= warmup_steps) return lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  if (total_steps <= warmup_steps) return lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace moetp::train
