#include "train/optim.h"

#include <cmath>

namespace moetp::train {

void reduce_grads(std::vector<model::Param>& params, const comm::Mesh& mesh) {
  for (model::Param& p : params) {
    comm::Comm& group = p.kind == model::ParamKind::kExpert ? mesh.expert_dp() : mesh.world();
    if (group.size() > 1) group.all_reduce(p.grad, comm::ReduceOp::kSum);
  }
}

// Fixed order: sums of squares in double, elements in storage order, parameters in the model's
// order. Replicated gradients are identical on every rank after reduce_grads, so every rank has the
// same `replicated`; `expert` is this rank's shards, summed over ep_etp in rank order
// (Comm::all_reduce_scalar(double)). No thread or message-size dependence; the layout decides
// which shards a rank holds.
double global_grad_norm(const std::vector<model::Param>& params, const comm::Mesh& mesh) {
  double replicated = 0, expert = 0;
  for (const model::Param& p : params) {
    const float* g = p.grad.data<float>();
    double s = 0;
    for (int64_t i = 0; i < p.grad.numel(); ++i) s += static_cast<double>(g[i]) * g[i];
    (p.kind == model::ParamKind::kExpert ? expert : replicated) += s;
  }
  // Expert shards partition the expert tensors over ep_etp.
  if (mesh.ep_etp().size() > 1) expert = mesh.ep_etp().all_reduce_scalar(expert, comm::ReduceOp::kSum);
  return std::sqrt(replicated + expert);
}

void scale_grads(std::vector<model::Param>& params, float scale) {
  for (model::Param& p : params) {
    float* g = p.grad.data<float>();
    for (int64_t i = 0; i < p.grad.numel(); ++i) g[i] *= scale;
  }
}

AdamW::AdamW(const std::vector<model::Param>& params, const AdamWConfig& cfg) : cfg_(cfg) {
  for (const model::Param& p : params) {
    m_.push_back(Tensor::zeros(p.value.shape(), DType::kF32));
    v_.push_back(Tensor::zeros(p.value.shape(), DType::kF32));
  }
}

void AdamW::step(std::vector<model::Param>& params, double lr, int64_t step) {
  MOETP_CHECK(step >= 1, "AdamW step counts from 1, got {}", step);
  MOETP_CHECK(params.size() == m_.size(), "AdamW built for {} parameters, stepped with {}", m_.size(), params.size());
  // The per-step scalars in double, rounded once to f32; the element update is all f32 (as PyTorch's
  // AdamW on f32 parameters), every operation correctly rounded and none contracted, so the CUDA
  // kernel (kernels/cuda/ops_optim.cu) reproduces it bit for bit.
  const float bc1 = static_cast<float>(1.0 - std::pow(cfg_.beta1, static_cast<double>(step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(cfg_.beta2, static_cast<double>(step)));
  const float b1 = static_cast<float>(cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
  const float eps = static_cast<float>(cfg_.eps), lr_f = static_cast<float>(lr);
  for (size_t i = 0; i < params.size(); ++i) {
    model::Param& p = params[i];
    float* w = p.value.data<float>();
    const float* g = p.grad.data<float>();
    float* m = m_[i].data<float>();
    float* v = v_[i].data<float>();
    const float decay = p.decay ? static_cast<float>(lr * cfg_.weight_decay) : 0.0f;
    for (int64_t k = 0; k < p.value.numel(); ++k) {
      m[k] = b1 * m[k] + (1.0f - b1) * g[k];
      v[k] = b2 * v[k] + (1.0f - b2) * g[k] * g[k];
      const float update = (m[k] / bc1) / (std::sqrt(v[k] / bc2) + eps);
      w[k] = (w[k] - decay * w[k]) - lr_f * update;
    }
  }
}

double lr_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double lr, double min_lr) {
  if (warmup_steps > 0 && step <= warmup_steps) return lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  if (total_steps <= warmup_steps) return lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace moetp::train
