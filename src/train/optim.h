// The optimizer path of one training step (etp_spec §8), written once for every backend: gradient
// reduction over the right group, the global gradient norm with each unique shard counted once,
// clipping, AdamW on f32 master weights, and the warmup + cosine learning-rate schedule.
//
// Replica groups and slices: every parameter has replicas on the ranks of its replica group (world
// for replicated parameters, expert_dp for expert shards; etp_spec §8.1), and its flattened
// elements split into one contiguous slice per member (replica_slices: multiples of kSliceAlign
// elements, the last ones shorter or empty). The gradient norm is summed slice by slice in that
// order whatever optim.zero says, so that both stages give the same bits. With optim.zero = 1 the
// gradient is reduce-scattered (member r receives the reduced slice r), and member r holds only
// slice r of the f32 master weights (model::ModelOptions::shard_masters) and of the AdamW moments
// (1/d of the parameter's): it updates its slice, and the working copies (bf16 on CUDA) are
// all-gathered from every member's updated slice (model::Qwen3MoeModel::refresh_work). On the CPU
// backend every step is bit-identical to optim.zero = 0 (the reductions are deterministic: a
// reduce-scatter gives the bits of the all-reduce, comm/mpi_comm.h).
#pragma once

#include <vector>

#include "model/model.h"
#include "model/param_store.h"

namespace moetp::train {

// Replicated parameters: all-reduce (sum) over world. Expert shards: all-reduce over expert_dp.
// With `zero` (optim.zero = 1): a reduce-scatter into this rank's slice instead (the rest of the
// gradient is left as it was). Over the model's mesh (its backend's communicators); no-op without one.
void reduce_grads(model::Qwen3MoeModel& model, bool zero = false);

// sqrt(Σ replicated g² + Σ over the ep_etp group of expert-shard g²): every unique element once,
// summed slice by slice (replica_slices). Call after reduce_grads with the same `zero` (then it is
// identical on every rank).
double global_grad_norm(model::Qwen3MoeModel& model, bool zero = false);

// Multiplies every gradient by `scale`.
void scale_grads(model::Qwen3MoeModel& model, float scale);

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  StateDType state_dtype = StateDType::kF32;  // storage of the moments
};

// AdamW (decoupled weight decay, bias-corrected moments), moments in f32 or bf16 on the model's
// backend (backend::Backend::adamw_step; the same bits on every backend). Decay only where Param::decay
// (norm weights are exempt). The working copies are refreshed from the new masters. A model with
// sharded masters (optim.zero = 1) gets moments of its master slices only.
class AdamW {
 public:
  AdamW(const model::Qwen3MoeModel& model, const AdamWConfig& cfg);
  // step counts from 1. Synchronous.
  void step(model::Qwen3MoeModel& model, double lr, int64_t step);
  std::vector<Tensor>& exp_avg() { return m_; }
  std::vector<Tensor>& exp_avg_sq() { return v_; }
  // The moments as checkpoint state (model::ParamStore slots 1 and 2), sliced with the masters.
  std::vector<model::ParamState> states();

 private:
  AdamWConfig cfg_;
  std::vector<Tensor> m_, v_;
  std::vector<model::ParamSlice> slices_;  // sharded masters: this rank's slice of each parameter
};

// Linear warmup from 0 to `lr` over warmup_steps, then cosine decay to min_lr at total_steps.
// step counts from 1.
double lr_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double lr, double min_lr);

}  // namespace moetp::train
