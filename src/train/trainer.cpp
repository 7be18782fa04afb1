#include "train/trainer.h"

#include <chrono>
#include <cmath>

#include "io/checkpoint.h"

namespace moetp::train {

Trainer::Trainer(const config::TrainConfig& cfg, const config::ModelConfig& model_cfg, comm::Comm& world,
                 data::TokenFile data)
    : cfg_(cfg),
      model_cfg_(model_cfg),
      world_(world),
      batches_(std::move(data), cfg.train.seq_len, cfg.train.global_batch_size, static_cast<uint64_t>(cfg.train.seed)) {
  config::validate(cfg_);
  config::validate_with_model(cfg_, model_cfg_, world.size());
  MOETP_CHECK(batches_.file().vocab_size() <= model_cfg_.vocab_size,
              "data file {} has vocabulary size {} but the model's vocab_size is {}", batches_.file().path(),
              batches_.file().vocab_size(), model_cfg_.vocab_size);
  mesh_ = std::make_unique<comm::Mesh>(world_, cfg_.parallel.ep, cfg_.parallel.etp);
  model_ = std::make_unique<model::Qwen3MoeModel>(model_cfg_, *mesh_, config::resolved_dispatcher(cfg_),
                                                  static_cast<uint64_t>(cfg_.train.seed));
  optim_ = std::make_unique<AdamW>(model_->params(), AdamWConfig{cfg_.optim.beta1, cfg_.optim.beta2, cfg_.optim.eps,
                                                                 cfg_.optim.weight_decay});
}

Trainer::~Trainer() = default;

StepResult Trainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
  StepResult r;
  r.step = step_ + 1;
  const int num_micro = cfg_.train.micro_batches;
  const int64_t S = cfg_.train.seq_len;
  const int64_t global_targets = static_cast<int64_t>(cfg_.train.global_batch_size) * S;
  r.tokens = global_targets;
  const std::vector<int64_t> slice = batches_.rank_slice(step_, world_.rank(), world_.size());
  model_->zero_grads();
  double ce_sum = 0, aux_sum = 0;
  for (int micro = 0; micro < num_micro; ++micro) {
    const std::vector<int64_t> ids = data::micro_slice(slice, micro, num_micro);
    const model::MicroStats ms = model_->forward_backward(batches_.tokens(ids), 1.0 / static_cast<double>(global_targets),
                                                          model_cfg_.router_aux_loss_coef / num_micro);
    ce_sum += ms.ce_sum;
    aux_sum += ms.aux;
    if (micro == 0) {
      r.expert_counts = ms.expert_counts;
    } else {
      for (size_t l = 0; l < ms.expert_counts.size(); ++l) {
        for (size_t e = 0; e < ms.expert_counts[l].size(); ++e) r.expert_counts[l][e] += ms.expert_counts[l][e];
      }
    }
  }
  r.ce_loss = world_.all_reduce_scalar(ce_sum, comm::ReduceOp::kSum) / static_cast<double>(global_targets);
  r.aux_loss = aux_sum / num_micro;
  r.loss = r.ce_loss + model_cfg_.router_aux_loss_coef * r.aux_loss;
  MOETP_CHECK(std::isfinite(r.loss), "step {}: loss is {} (cross-entropy {}, aux {}) on rank {}", r.step, r.loss,
              r.ce_loss, r.aux_loss, world_.rank());

  reduce_grads(model_->params(), *mesh_);
  r.grad_norm = global_grad_norm(model_->params(), *mesh_);
  MOETP_CHECK(std::isfinite(r.grad_norm), "step {}: gradient norm is {} on rank {} (loss {})", r.step, r.grad_norm,
              world_.rank(), r.loss);
  if (cfg_.optim.grad_clip > 0 && r.grad_norm > cfg_.optim.grad_clip) {
    scale_grads(model_->params(), static_cast<float>(cfg_.optim.grad_clip / (r.grad_norm + 1e-6)));
  }
  r.lr = lr_at(r.step, cfg_.train.steps, cfg_.optim.warmup_steps, cfg_.optim.lr, cfg_.optim.min_lr);
  optim_->step(model_->params(), r.lr, r.step);
  step_ = r.step;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

void Trainer::save_checkpoint(const std::string& dir) const {
  const nlohmann::json state = {{"format", "moetp-native"},
                                {"version", 1},
                                {"step", step_},
                                {"seed", cfg_.train.seed},
                                {"layout", {{"dp", mesh_->dp_size()}, {"ep", mesh_->ep_size()}, {"etp", mesh_->etp_size()}}},
                                {"train_config", config::to_json(cfg_)}};
  io::save_native(*model_, {{"optim.exp_avg.", &optim_->exp_avg()}, {"optim.exp_avg_sq.", &optim_->exp_avg_sq()}},
                  state, dir, {io::HfExpertLayout::kPerExpert, world_.rank() == 0});
}

void Trainer::load_checkpoint(const std::string& dir) {
  const nlohmann::json state = io::load_native(
      *model_, {{"optim.exp_avg.", &optim_->exp_avg()}, {"optim.exp_avg_sq.", &optim_->exp_avg_sq()}}, dir);
  MOETP_CHECK(state.value("format", "") == "moetp-native" && state.value("version", 0) == 1,
              "{}: not a moetp native checkpoint of version 1 (format '{}', version {})", dir,
              state.value("format", ""), state.value("version", 0));
  const int64_t seed = state.value("seed", int64_t{-1});
  MOETP_CHECK(seed == cfg_.train.seed,
              "{}: checkpoint was trained with train.seed = {}, this run has {} (the data order would change)", dir,
              seed, cfg_.train.seed);
  step_ = state.at("step").get<int64_t>();
}

void Trainer::init_from_hf(const std::string& dir) { io::load_hf(*model_, dir); }

}  // namespace moetp::train
