// The training loop of one rank: global batch -> this rank's slice -> micro-batches ->
// forward/backward -> gradient reduction (ETP_SPEC §7) -> global norm, clipping -> AdamW.
// Collective: every rank of `world` constructs a Trainer and calls step() in lockstep.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "config/train_config.h"
#include "data/loader.h"
#include "model/model.h"
#include "train/optim.h"

namespace moetp::train {

struct StepResult {
  int64_t step = 0;
  double loss = 0;       // mean cross-entropy over the global batch + coef · aux
  double ce_loss = 0;    // mean cross-entropy over every target of the global batch
  double aux_loss = 0;   // aux loss (no coefficient), mean over micro-batches
  double grad_norm = 0;  // before clipping
  double lr = 0;
  double seconds = 0;
  int64_t tokens = 0;    // tokens of the global batch
  std::vector<std::vector<float>> expert_counts;  // per MoE layer: tokens per expert, global batch
};

class Trainer {
 public:
  Trainer(const config::TrainConfig& cfg, const config::ModelConfig& model_cfg, comm::Comm& world,
          data::TokenFile data);
  ~Trainer();

  // Runs step current_step() + 1. Throws (on every rank alike) on a non-finite loss or gradient.
  StepResult step();
  int64_t current_step() const { return step_; }

  // Native checkpoint (collective): parameters, AdamW moments, step and configs in global
  // coordinates, so it loads at any layout. The data order and LR schedule are pure functions of
  // (seed, step), so restoring the step restores them.
  void save_checkpoint(const std::string& dir) const;
  void load_checkpoint(const std::string& dir);
  // Starts from Hugging Face weights (collective); optimizer state stays at zero.
  void init_from_hf(const std::string& dir);
  model::Qwen3MoeModel& model() { return *model_; }
  const comm::Mesh& mesh() const { return *mesh_; }
  const config::TrainConfig& config() const { return cfg_; }

 private:
  config::TrainConfig cfg_;
  config::ModelConfig model_cfg_;
  comm::Comm& world_;
  std::unique_ptr<comm::Mesh> mesh_;
  std::unique_ptr<model::Qwen3MoeModel> model_;
  data::Batches batches_;
  std::unique_ptr<AdamW> optim_;
  int64_t step_ = 0;
};

}  // namespace moetp::train
