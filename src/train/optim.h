// The optimizer path of one training step (etp_spec §8), written once for every backend: gradient
// reduction over the right group, the global gradient norm with each unique shard counted once,
// clipping, AdamW on f32 master weights, and the warmup + cosine learning-rate schedule.
#pragma once

#include <vector>

#include "model/model.h"

namespace moetp::train {

// Replicated parameters: all-reduce (sum) over world. Expert shards: all-reduce over expert_dp.
// Over the model's mesh (its backend's communicators); no-op without one.
void reduce_grads(model::Qwen3MoeModel& model);

// sqrt(Σ replicated g² + Σ over the ep_etp group of expert-shard g²): every unique element once.
// Call after reduce_grads (then it is identical on every rank).
double global_grad_norm(model::Qwen3MoeModel& model);

// Multiplies every gradient by `scale`.
void scale_grads(model::Qwen3MoeModel& model, float scale);

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  StateDType state_dtype = StateDType::kF32;  // storage of the moments
};

// AdamW (decoupled weight decay, bias-corrected moments), moments in f32 or bf16 on the model's
// backend (backend::Backend::adamw_step; the same bits on every backend). Decay only where Param::decay
// (norm weights are exempt). The working copies are refreshed from the new masters.
class AdamW {
 public:
  AdamW(const model::Qwen3MoeModel& model, const AdamWConfig& cfg);
  // step counts from 1. Synchronous.
  void step(model::Qwen3MoeModel& model, double lr, int64_t step);
  std::vector<Tensor>& exp_avg() { return m_; }
  std::vector<Tensor>& exp_avg_sq() { return v_; }

 private:
  AdamWConfig cfg_;
  std::vector<Tensor> m_, v_;
};

// Linear warmup from 0 to `lr` over warmup_steps, then cosine decay to min_lr at total_steps.
// step counts from 1.
double lr_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double lr, double min_lr);

}  // namespace moetp::train
