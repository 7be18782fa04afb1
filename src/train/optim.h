// Optimiser pieces of one training step (etp_spec §8): gradient reduction over the right group,
// the global gradient norm with each unique shard counted once, clipping, AdamW on f32 master
// weights, and the warmup + cosine learning-rate schedule.
#pragma once

#include <vector>

#include "comm/mesh.h"
#include "model/model.h"

namespace moetp::train {

// Replicated parameters: all-reduce (sum) over world. Expert shards: all-reduce over expert_dp.
void reduce_grads(std::vector<model::Param>& params, const comm::Mesh& mesh);

// sqrt(Σ replicated g² + Σ over the ep_etp group of expert-shard g²): every unique element once.
// Call after reduce_grads (then it is identical on every rank).
double global_grad_norm(const std::vector<model::Param>& params, const comm::Mesh& mesh);

// Multiplies every gradient by `scale`.
void scale_grads(std::vector<model::Param>& params, float scale);

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

// AdamW (decoupled weight decay, bias-corrected moments), f32 state. Decay only where
// Param::decay (norm weights are exempt).
class AdamW {
 public:
  AdamW(const std::vector<model::Param>& params, const AdamWConfig& cfg);
  // step counts from 1.
  void step(std::vector<model::Param>& params, double lr, int64_t step);
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
