// Qwen3-MoE decoder, CPU f32 reference: parameters (model/param_table.h) and one micro-batch's
// forward + backward composed from the kernels (no autograd: each layer saves what its backward
// needs and the model runs the layers in order and in reverse).
//
// Legend: B sequences, S sequence length, N = B·S tokens on this rank, H hidden, V vocab,
// Hq/Hkv query/kv heads, D head_dim, E experts, I expert FFN width.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "model/param_table.h"
#include "moe/moe_block.h"
#include "shard/layout.h"

namespace moetp::model {

// A parameter of the table with its value and gradient.
struct Param : ParamDesc {
  Tensor value;  // f32, local shape of `spec` (2-D for matrices, 1-D for norms)
  Tensor grad;   // same shape; accumulated by forward_backward
};

// Statistics of one micro-batch on this rank (the trainer reduces them).
struct MicroStats {
  double ce_sum = 0;                          // Σ of per-target cross-entropy on this rank
  int64_t num_targets = 0;                    // targets on this rank
  double aux = 0;                             // aux loss of the micro-batch (global, no coefficient)
  std::vector<std::vector<float>> expert_counts;  // per MoE layer: global tokens per expert
};

class Qwen3MoeModel {
 public:
  // Collective over the mesh when the model has MoE layers. `dispatcher` is concrete (not kAuto).
  Qwen3MoeModel(const config::ModelConfig& cfg, const comm::Mesh& mesh, DispatcherKind dispatcher,
                uint64_t seed);
  ~Qwen3MoeModel();
  Qwen3MoeModel(const Qwen3MoeModel&) = delete;
  Qwen3MoeModel& operator=(const Qwen3MoeModel&) = delete;

  const config::ModelConfig& config() const { return cfg_; }
  const comm::Mesh& mesh() const { return mesh_; }
  std::vector<Param>& params() { return params_; }
  const std::vector<Param>& params() const { return params_; }
  Param& param(const std::string& name);
  void zero_grads();

  // One micro-batch: forward, loss, backward; gradients accumulate into Param::grad.
  //   tokens_BS1 [IN] i32 (B, S + 1): inputs are [:, :S], targets [:, 1:]
  //   ce_scale   gradient scale of the summed cross-entropy (1 / global targets of the step)
  //   aux_scale  gradient scale of the aux loss (router_aux_loss_coef / micro-batches)
  // Collective (aux statistics over world; dispatchers over ep_etp).
  MicroStats forward_backward(const Tensor& tokens_BS1, double ce_scale, double aux_scale);
  // Forward only; writes logits (N, V) when `logits` is non-null.
  MicroStats forward(const Tensor& tokens_BS1, Tensor* logits);

 private:
  struct Layer;
  struct Saved;
  MicroStats run(const Tensor& tokens_BS1, bool backward, double ce_scale, double aux_scale, Tensor* logits);

  config::ModelConfig cfg_;
  const comm::Mesh& mesh_;
  std::vector<Param> params_;
  std::vector<Layer> layers_;
  size_t embed_ = 0, final_norm_ = 0, lm_head_ = 0;
};

}  // namespace moetp::model
