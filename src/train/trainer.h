// The training loop of one rank: global batch -> this rank's slice -> micro-batches ->
// forward/backward -> gradient reduction (etp_spec §8.1) -> global norm, clipping -> AdamW.
// Collective: every rank of `world` constructs a Trainer and calls step() in lockstep.
//
// Devices (train.device): the one model (model/model.h) and optimizer (train/optim.h) on the
// backend of the device (backend/backend.h): "cpu" with MPI collectives; "cuda" one GPU per rank
// (the node-local rank picks the GPU) over NCCL communicators, with f32 masters, gradients and
// AdamW moments on the GPU and no copy of the model in host memory. Checkpoints and Hugging Face
// import move the model's tensors one at a time through a model::ParamStore. "auto" picks cuda
// when this build has CUDA and every rank of the node has a GPU, else cpu; device() says which was
// picked and why.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "config/train_config.h"
#include "data/loader.h"
#include "data/source.h"
#include "model/model.h"
#include "model/param_store.h"
#include "train/optim.h"
#include "train/plan.h"

namespace moetp::train {

struct StepResult {
  int64_t step = 0;
  double loss = 0;       // mean cross-entropy over the global batch + coef · aux
  double ce_loss = 0;    // mean cross-entropy over the loss-carrying targets of the global batch
  double aux_loss = 0;   // aux loss (no coefficient), mean over micro-batches
  double grad_norm = 0;  // before clipping
  double lr = 0;
  double seconds = 0;
  int64_t tokens = 0;    // positions of the global batch (rows x seq_len)
  int64_t loss_tokens = 0;  // targets that carry loss in the global batch (the loss's denominator)
  int64_t padding = 0;      // padding positions of the global batch (packed datasets)
  int64_t epoch = 0;        // data epoch of the step
  // config::training_flops of the global batch / seconds / ranks / 1e12.
  double model_tflops_per_rank = 0;
  // CUDA device: the largest over ranks of the step's peak of live tensor bytes / 1e9, counting the
  // whole block each tensor holds (cuda::memory_stats; the benchmarks count requested bytes). CPU: -1.
  double peak_mem_gb = -1;
  std::string peak_mem_phase;  // the phase of this rank's own peak (backend::Backend::peak_memory_phase)
  // CUDA device: the largest over ranks of the device's used bytes (total - free, cudaMemGetInfo:
  // the CUDA context, library workspaces and the allocator's cached blocks included) / 1e9 after
  // the step. CPU: -1.
  double device_mem_gb = -1;
  std::vector<std::vector<float>> expert_counts;  // per MoE layer: tokens per expert, global batch
};

// A validation pass (Trainer::evaluate): mean cross-entropy over the loss-carrying targets of the
// validation rows it ran.
struct EvalResult {
  int64_t step = 0;
  double ce_loss = 0;
  int64_t loss_tokens = 0;
  int64_t batches = 0;
  double seconds = 0;
};

class Trainer {
 public:
  // `data`: the training rows (data/source.h; cfg.data.path opened by the caller). With
  // cfg.data.valid set, the validation rows are opened here.
  Trainer(const config::TrainConfig& cfg, const config::ModelConfig& model_cfg, comm::Comm& world,
          std::unique_ptr<data::TrainData> data);
  // A token file as the training data.
  Trainer(const config::TrainConfig& cfg, const config::ModelConfig& model_cfg, comm::Comm& world,
          data::TokenFile data);
  ~Trainer();

  // Runs step current_step() + 1. Throws (on every rank alike) on a non-finite loss or gradient.
  StepResult step();
  int64_t current_step() const { return step_; }
  // Validation loss over the first train.eval_batches global batches of the validation rows (all
  // when 0), forward only (collective). Errors when data.valid is not set.
  EvalResult evaluate();
  bool has_validation() const { return eval_ != nullptr; }
  const data::TrainData& data() const { return *data_; }
  const data::EvalData* validation_data() const { return eval_.get(); }

  // Native checkpoint (collective): parameters, AdamW moments, step and configs in global
  // coordinates, so it loads at any layout. The data order and LR schedule are pure functions of
  // (data, seq_len, global_batch_size, seed, step), so restoring the step restores them; loading
  // refuses a checkpoint whose data (the dataset's manifest, or the token file's size), seed,
  // seq_len or global_batch_size differ from this run's.
  void save_checkpoint(const std::string& dir) const;
  void load_checkpoint(const std::string& dir);
  // Starts from Hugging Face weights (collective); optimizer state stays at zero.
  void init_from_hf(const std::string& dir);
  // The tokenizer and generation files every checkpoint carries (io::SaveOptions::files), so that
  // `moetp convert --to hf` of a checkpoint gives a complete Hugging Face model folder: those of the
  // Hugging Face folder the run started from or the checkpoint it resumed, else the dataset's
  // tokenizer.json and the tokenizer_config.json beside it.
  const std::vector<std::string>& side_files() const { return side_files_; }
  // Where the model runs (train.device resolved), and a line saying why (for the run's banner).
  Device device() const { return device_; }
  const std::string& device_reason() const { return device_reason_; }
  model::Qwen3MoeModel& model() { return *model_; }
  const comm::Mesh& mesh() const { return *mesh_; }
  const config::TrainConfig& config() const { return cfg_; }
  // This configuration's memory plan on the resolved device (train/plan.h; moe.plan_imbalance).
  // On CUDA with train.memory_check the constructor stopped, before allocating the model, when
  // plan + kDefaultAllowanceGiB exceeded a rank's free GPU memory.
  const MemoryPlan& memory_plan() const { return plan_; }
  // "memory: planned ..., measured ..." for the first step's result (empty on the CPU).
  std::string memory_line(const StepResult& r) const;

 private:
  config::TrainConfig cfg_;
  config::ModelConfig model_cfg_;
  comm::Comm& world_;
  std::unique_ptr<comm::Mesh> mesh_;            // over world_ (MPI): host collectives, checkpoints
  std::unique_ptr<comm::Comm> device_world_;    // the backend's own communicator, when it has one (NCCL)
  std::unique_ptr<comm::Mesh> device_mesh_;     // over device_world_
  std::unique_ptr<model::Qwen3MoeModel> model_;
  std::unique_ptr<data::TrainData> data_;
  std::unique_ptr<data::EvalData> eval_;
  std::unique_ptr<AdamW> optim_;
  int64_t step_ = 0;
  double step_flops_ = 0;  // model FLOPs of one step (config::training_flops), fixed by the configs
  Device device_ = Device::kCpu;
  std::string device_reason_;
  MemoryPlan plan_;
  std::vector<std::string> side_files_;
  // Adds files whose names are not there yet; `first`: the new ones take precedence.
  void add_side_files(const std::vector<std::string>& files, bool first);
  // train.memory_check on CUDA: the plan against every rank's free memory (collective).
  void check_memory_plan();
  // The model with its AdamW moments, for checkpoints and HF import.
  std::unique_ptr<model::ParamStore> param_store() const;
};

}  // namespace moetp::train
