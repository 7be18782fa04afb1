#include "train/trainer.h"

#include <chrono>
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>

#include "backend/backend.h"
#include "io/checkpoint.h"

namespace moetp::train {

namespace {

// The dispatchers the CUDA model implements (kLocal on one rank runs as the layer without a mesh).
bool runs_on_cuda(DispatcherKind d) {
  return d == DispatcherKind::kLocal || d == DispatcherKind::kAll2all || d == DispatcherKind::kVexpert;
}

// (device, reason) for train.device; collective (every rank decides alike). `local`: this rank on
// its node (comm::node_local).
std::pair<Device, std::string> pick_device(DeviceChoice want, DispatcherKind dispatcher, comm::Comm& world,
                                           comm::NodeLocal local) {
  const auto [local_rank, local_size] = local;
  const backend::Backend* cuda = backend::find(Device::kCuda);
  const int gpus = cuda != nullptr ? cuda->visible_devices() : 0;
  const std::string why_not =
      cuda == nullptr ? "this build has no CUDA backend" : gpus == 0 ? cuda->unavailable_reason() : "";
  // The fewest GPUs per rank anywhere decides, so that every rank picks the same device.
  const int64_t enough = world.all_reduce_scalar(int64_t{gpus >= local_size ? 1 : 0}, comm::ReduceOp::kSum);
  const bool all_enough = enough == world.size();
  const std::string counts = fmt::format("{} GPU(s) visible for {} rank(s) on rank {}'s node", gpus, local_size,
                                         world.rank());
  if (want == DeviceChoice::kCpu) return {Device::kCpu, "train.device = cpu"};
  if (want == DeviceChoice::kCuda) {
    world.raise_if_any(gpus >= local_size ? "" : fmt::format("train.device = cuda needs one GPU per rank: {}{}", counts,
                                                                  why_not.empty() ? "" : " (" + why_not + ")"),
                       "train.device");
    return {Device::kCuda, fmt::format("train.device = cuda, rank {} on GPU {}", world.rank(), local_rank)};
  }
  if (!runs_on_cuda(dispatcher)) {
    return {Device::kCpu, fmt::format("train.device = auto: moe.dispatcher '{}' runs on the CPU device only",
                                      option_name(dispatcher))};
  }
  if (all_enough) return {Device::kCuda, fmt::format("train.device = auto: one GPU per rank ({})", counts)};
  return {Device::kCpu, fmt::format("train.device = auto: not every rank has a GPU ({}{})", counts,
                             why_not.empty() ? "" : ", " + why_not)};
}

data::DataOptions data_options(const config::TrainConfig& cfg) {
  data::DataOptions o;
  o.path = cfg.data.path;
  o.seq_len = cfg.train.seq_len;
  o.global_batch_size = cfg.train.global_batch_size;
  o.seed = static_cast<uint64_t>(cfg.train.seed);
  o.overlong = cfg.data.overlong;
  return o;
}

// The model's batch from the loader's flat rows (kNoLoss is the model's ignore index).
model::Batch to_batch(data::TokenRows&& r) {
  static_assert(data::kNoLoss == model::kIgnoreIndex);
  model::Batch b;
  b.rows = r.rows;
  b.seq_len = r.seq_len;
  const int64_t N = r.rows * r.seq_len;
  b.inputs = Tensor::from_vector<int32_t>(r.inputs, {N});
  b.targets = Tensor::from_vector<int32_t>(r.targets, {N});
  b.positions = Tensor::from_vector<int32_t>(r.positions, {N});
  b.doc_offsets = std::move(r.doc_offsets);
  return b;
}

}  // namespace

Trainer::Trainer(const config::TrainConfig& cfg, const config::ModelConfig& model_cfg, comm::Comm& world,
                 data::TokenFile data)
    : Trainer(cfg, model_cfg, world, data::token_file_data(std::move(data), data_options(cfg))) {}

Trainer::Trainer(const config::TrainConfig& cfg, const config::ModelConfig& model_cfg, comm::Comm& world,
                 std::unique_ptr<data::TrainData> data)
    : cfg_(cfg), model_cfg_(model_cfg), world_(world), data_(std::move(data)) {
  config::validate(cfg_);
  config::validate_with_model(cfg_, model_cfg_, world.size());
  step_flops_ = config::training_flops(model_cfg_, cfg_.train.global_batch_size, cfg_.train.seq_len).total();
  MOETP_CHECK(data_->vocab_size() <= model_cfg_.vocab_size,
              "data {} has vocabulary size {} but the model's vocab_size is {} (a tokenizer that does not match the "
              "model?)",
              data_->identity().value("path", ""), data_->vocab_size(), model_cfg_.vocab_size);
  add_side_files(data_->tokenizer_files(), false);
  if (!cfg_.data.valid.empty()) {
    eval_ = std::make_unique<data::EvalData>(cfg_.data.valid, cfg_.train.seq_len, cfg_.train.global_batch_size,
                                             cfg_.data.overlong);
    MOETP_CHECK(eval_->dataset().vocab_size() <= model_cfg_.vocab_size,
                "data.valid {} has vocabulary size {} but the model's vocab_size is {}", cfg_.data.valid,
                eval_->dataset().vocab_size(), model_cfg_.vocab_size);
  }
  const comm::NodeLocal local = comm::node_local(world_);
  std::tie(device_, device_reason_) = pick_device(cfg_.train.device, config::resolved_dispatcher(cfg_), world_, local);
  const std::string_view dev = device_name(device_);
  MOETP_CHECK(!cfg_.moe.force_balance || device_ == Device::kCuda,
              "moe.force_balance is implemented on the CUDA device only (train.device resolved to '{}': {})", dev,
              device_reason_);
  MOETP_CHECK(cfg_.moe.expert_gemm == ExpertGemmChoice::kAuto || device_ == Device::kCuda,
              "moe.expert_gemm = {} applies to the CUDA device only (train.device resolved to '{}': {})",
              option_name(cfg_.moe.expert_gemm), dev, device_reason_);
  MOETP_CHECK(cfg_.train.cuda_allocator == AllocatorChoice::kAuto || device_ == Device::kCuda,
              "train.cuda_allocator = {} applies to the CUDA device only (train.device resolved to '{}': {})",
              option_name(cfg_.train.cuda_allocator), dev, device_reason_);
  mesh_ = std::make_unique<comm::Mesh>(world_, cfg_.parallel.ep, cfg_.parallel.etp);
  backend::Backend& be = backend::get(device_);
  const DispatcherKind dispatcher = config::resolved_dispatcher(cfg_);
  MOETP_CHECK(device_ == Device::kCpu || runs_on_cuda(dispatcher),
              "moe.dispatcher '{}' is not implemented on the CUDA device; use all2all (or auto) or vexpert",
              option_name(dispatcher));
  world_.run_collectively("selecting this rank's device", [&] { be.init(local.rank, cfg_.train.cuda_allocator); });
  be.set_deterministic(cfg_.train.deterministic);
  device_world_ = be.make_comm(world_.host(), "world");
  if (device_world_) device_mesh_ = std::make_unique<comm::Mesh>(*device_world_, cfg_.parallel.ep, cfg_.parallel.etp);
  plan_ = plan_memory(model_cfg_, cfg_, world_.size(), device_, cfg_.moe.plan_imbalance);
  check_memory_plan();
  model::ModelOptions opts;
  opts.mesh = device_mesh_ ? device_mesh_.get() : mesh_.get();
  // On one rank `auto` resolves to `local`; a backend whose layer is built over a mesh of one rank
  // runs it as `local` too.
  opts.dispatcher = dispatcher;
  opts.force_balance = cfg_.moe.force_balance;
  opts.expert_gemm = cfg_.moe.expert_gemm;
  opts.recompute = cfg_.train.recompute;
  opts.recompute_layers = cfg_.train.recompute_layers;
  opts.logit_chunk_rows = cfg_.train.logit_chunk_rows;
  opts.shard_masters = cfg_.optim.zero == 1;
  const std::string gemm = be.describe_expert_gemm(
      model_cfg_.hidden_size, model_cfg_.moe_intermediate_size / cfg_.parallel.etp, cfg_.moe.expert_gemm);
  if (!gemm.empty()) device_reason_ += "; " + gemm;
  if (device_ == Device::kCuda) {
    device_reason_ += fmt::format("; allocator {}",
                                  cfg_.train.cuda_allocator == AllocatorChoice::kDirect ? "direct" : "caching");
  }
  world_.run_collectively("building the model", [&] {
    model_ = std::make_unique<model::Qwen3MoeModel>(model_cfg_, be, opts, static_cast<uint64_t>(cfg_.train.seed));
  });
  optim_ = std::make_unique<AdamW>(
      *model_, AdamWConfig{cfg_.optim.beta1, cfg_.optim.beta2, cfg_.optim.eps, cfg_.optim.weight_decay, cfg_.optim.state_dtype});
}

Trainer::~Trainer() = default;

void Trainer::check_memory_plan() {
  const backend::Backend::DeviceMemory mem = backend::get(device_).device_memory();
  if (!cfg_.train.memory_check || mem.free_bytes < 0) return;
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  const double need = plan_.peak_bytes + kDefaultAllowanceGiB * kGiB;
  // Every rank plans the same sizes; the GPU with the least free memory decides.
  const double free = -world_.all_reduce_scalar(-mem.free_bytes, comm::ReduceOp::kMax);
  std::string why;
  if (need > free) {
    const double budget = free - kDefaultAllowanceGiB * kGiB;
    why = fmt::format(
        "the memory plan does not fit: {:.2f} GiB per rank (with {:g} GiB allowance for the CUDA context and "
        "allocator slack) but the fullest GPU has {:.2f} GiB free of {:.2f} GiB\n{}{}"
        "(moetp plan prints this table; train.memory_check=false skips the check)",
        need / kGiB, kDefaultAllowanceGiB, free / kGiB, mem.total_bytes / kGiB, format_plan(plan_, 0, kDefaultAllowanceGiB),
        format_advice(advise_fit(model_cfg_, cfg_, world_.size(), device_, budget), cfg_, kDefaultAllowanceGiB));
  }
  world_.raise_if_any(why, "train.memory_check");
}

std::string Trainer::memory_line(const StepResult& r) const {
  if (r.peak_mem_gb < 0) return "";
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  return fmt::format("memory: planned {:.2f} GiB per rank (live tensors), measured {:.2f} GiB (peak in {}), device use "
                     "{:.2f} GiB; plan / measured = {:.3f}",
                     plan_.peak_bytes / kGiB, r.peak_mem_gb * 1e9 / kGiB,
                     r.peak_mem_phase.empty() ? "?" : r.peak_mem_phase, r.device_mem_gb * 1e9 / kGiB,
                     plan_.peak_bytes / (r.peak_mem_gb * 1e9));
}

StepResult Trainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
  backend::Backend& be = model_->backend();
  be.set_memory_phase("step");
  be.reset_peak_memory();
  StepResult r;
  r.step = step_ + 1;
  const int num_micro = cfg_.train.micro_batches;
  const int64_t S = cfg_.train.seq_len;
  r.tokens = static_cast<int64_t>(cfg_.train.global_batch_size) * S;
  r.loss_tokens = data_->global_loss_tokens(step_);
  r.padding = data_->global_padding(step_);
  r.epoch = data_->epoch_of(step_);
  // Every loss-carrying target of the global batch weighs 1 / loss_tokens (data/packing.h).
  const double ce_scale = 1.0 / static_cast<double>(std::max<int64_t>(r.loss_tokens, 1));
  model_->zero_grads();
  double ce_sum = 0, aux_sum = 0;
  for (int micro = 0; micro < num_micro; ++micro) {
    const model::MicroStats ms =
        model_->forward_backward(to_batch(data_->micro_batch(step_, world_.rank(), world_.size(), micro, num_micro)),
                                 ce_scale, model_cfg_.router_aux_loss_coef / num_micro);
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
  // Fixed order: micro-batches in order on each rank (each one's row losses in token order), then
  // ranks in rank order (all_reduce_scalar(double)).
  r.ce_loss = world_.all_reduce_scalar(ce_sum, comm::ReduceOp::kSum) * ce_scale;
  r.aux_loss = aux_sum / num_micro;
  r.loss = r.ce_loss + model_cfg_.router_aux_loss_coef * r.aux_loss;
  MOETP_CHECK(std::isfinite(r.loss), "step {}: loss is {} (cross-entropy {}, aux {}) on rank {}", r.step, r.loss,
              r.ce_loss, r.aux_loss, world_.rank());

  be.set_memory_phase("optimizer");
  reduce_grads(*model_, cfg_.optim.zero == 1);
  r.grad_norm = global_grad_norm(*model_, cfg_.optim.zero == 1);
  MOETP_CHECK(std::isfinite(r.grad_norm), "step {}: gradient norm is {} on rank {} (loss {})", r.step, r.grad_norm,
              world_.rank(), r.loss);
  if (cfg_.optim.grad_clip > 0 && r.grad_norm > cfg_.optim.grad_clip) {
    scale_grads(*model_, static_cast<float>(cfg_.optim.grad_clip / (r.grad_norm + 1e-6)));
  }
  r.lr = lr_at(r.step, cfg_.train.steps, cfg_.optim.warmup_steps, cfg_.optim.lr, cfg_.optim.min_lr);
  optim_->step(*model_, r.lr, r.step);
  step_ = r.step;
  const double peak = be.peak_memory_bytes();
  if (peak >= 0) r.peak_mem_gb = world_.all_reduce_scalar(peak / 1e9, comm::ReduceOp::kMax);
  r.peak_mem_phase = be.peak_memory_phase();
  const backend::Backend::DeviceMemory mem = be.device_memory();
  if (mem.free_bytes >= 0) {
    r.device_mem_gb = world_.all_reduce_scalar((mem.total_bytes - mem.free_bytes) / 1e9, comm::ReduceOp::kMax);
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.model_tflops_per_rank = r.seconds > 0 ? step_flops_ / r.seconds / static_cast<double>(world_.size()) / 1e12 : 0.0;
  return r;
}

EvalResult Trainer::evaluate() {
  MOETP_CHECK(eval_ != nullptr, "evaluate: no validation data (set data.valid)");
  const auto t0 = std::chrono::steady_clock::now();
  backend::Backend& be = model_->backend();
  be.set_memory_phase("eval");
  const data::EvalRows& rows = eval_->rows();
  const int num_micro = cfg_.train.micro_batches;
  const int64_t batches = cfg_.train.eval_batches > 0 ? std::min<int64_t>(cfg_.train.eval_batches, rows.num_batches())
                                                      : rows.num_batches();
  double ce_sum = 0;
  int64_t loss_tokens = 0;
  for (int64_t b = 0; b < batches; ++b) {
    for (int micro = 0; micro < num_micro; ++micro) {
      data::TokenRows tr = rows.micro_batch(b, world_.rank(), world_.size(), micro, num_micro);
      loss_tokens += tr.loss_tokens;
      ce_sum += model_->forward(to_batch(std::move(tr))).ce_sum;
    }
  }
  EvalResult r;
  r.step = step_;
  r.batches = batches;
  r.loss_tokens = world_.all_reduce_scalar(loss_tokens, comm::ReduceOp::kSum);
  r.ce_loss = world_.all_reduce_scalar(ce_sum, comm::ReduceOp::kSum) / static_cast<double>(std::max<int64_t>(r.loss_tokens, 1));
  MOETP_CHECK(std::isfinite(r.ce_loss), "step {}: validation loss is {} on rank {}", step_, r.ce_loss, world_.rank());
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::unique_ptr<model::ParamStore> Trainer::param_store() const {
  return std::make_unique<model::ModelParamStore>(*model_, *mesh_, optim_->states());
}

void Trainer::save_checkpoint(const std::string& dir) const {
  const nlohmann::json state = {{"format", "moetp-native"},
                                {"version", 1},
                                {"step", step_},
                                {"seed", cfg_.train.seed},
                                {"data", data_->identity()},
                                {"seq_len", cfg_.train.seq_len},
                                {"global_batch_size", cfg_.train.global_batch_size},
                                {"overlong", option_name(cfg_.data.overlong)},
                                {"layout", {{"dp", mesh_->dp_size()}, {"ep", mesh_->ep_size()}, {"etp", mesh_->etp_size()}}},
                                {"train_config", config::to_json(cfg_)}};
  io::SaveOptions opts;
  opts.show_progress = world_.rank() == 0;
  opts.files = side_files_;
  io::save_native(*param_store(), state, dir, opts);
}

namespace {

// Field `key` of a checkpoint's trainer_state.json as a T: nullopt when absent (and `required` is
// false); an error naming the file, the field, the expected type and the value otherwise.
template <typename T>
std::optional<T> state_field(const nlohmann::json& state, const std::string& dir, const char* key, bool required,
                             const char* expected) {
  if (!state.contains(key)) {
    MOETP_CHECK(!required, "{}/trainer_state.json: field '{}' is missing", dir, key);
    return std::nullopt;
  }
  try {
    return state.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    MOETP_FAIL("{}/trainer_state.json: field '{}' must be {}, got {}", dir, key, expected, state.at(key).dump());
  }
}

}  // namespace

void Trainer::load_checkpoint(const std::string& dir) {
  const nlohmann::json state = io::load_native(*param_store(), dir);
  MOETP_CHECK(state.is_object(), "{}/trainer_state.json: must be a JSON object, got {}", dir, state.type_name());
  const std::string format = state_field<std::string>(state, dir, "format", true, "a string").value();
  const int64_t version = state_field<int64_t>(state, dir, "version", true, "an integer").value();
  MOETP_CHECK(format == "moetp-native" && version == 1,
              "{}: not a moetp native checkpoint of version 1 (format '{}', version {})", dir, format, version);
  const int64_t step = state_field<int64_t>(state, dir, "step", true, "an integer").value();
  MOETP_CHECK(step >= 0, "{}/trainer_state.json: field 'step' must be >= 0, got {}", dir, step);
  const int64_t seed = state_field<int64_t>(state, dir, "seed", true, "an integer").value();
  MOETP_CHECK(seed == cfg_.train.seed,
              "{}: checkpoint was trained with train.seed = {}, this run has {} (the data order would change)", dir,
              seed, cfg_.train.seed);
  // The data order is a function of the data, seq_len, global_batch_size and the over-long rule:
  // a change would silently train on other rows. Checkpoints that predate these fields skip them.
  if (state.contains("data")) {
    const nlohmann::json have = data_->identity(), saved = state.at("data");
    MOETP_CHECK(saved == have,
                "{}: the checkpoint was trained on other data: it recorded {}, this run reads {} (a dataset whose "
                "manifest changed, or another file; resume with the data it was trained on)",
                dir, saved.dump(), have.dump());
  }
  for (const auto& [key, value] : {std::pair<const char*, int64_t>{"seq_len", cfg_.train.seq_len},
                                   {"global_batch_size", cfg_.train.global_batch_size}}) {
    if (const auto saved = state_field<int64_t>(state, dir, key, false, "an integer")) {
      MOETP_CHECK(*saved == value,
                  "{}: checkpoint was trained with train.{} = {}, this run has {} (the data order would change)", dir,
                  key, *saved, value);
    }
  }
  if (const auto saved = state_field<std::string>(state, dir, "overlong", false, "a string")) {
    MOETP_CHECK(*saved == option_name(cfg_.data.overlong),
                "{}: checkpoint was trained with data.overlong = {}, this run has {} (the data order would change)",
                dir, *saved, option_name(cfg_.data.overlong));
  }
  step_ = step;
  add_side_files(io::hf_side_files(dir), true);
}

void Trainer::add_side_files(const std::vector<std::string>& files, bool first) {
  std::vector<std::string> merged = first ? files : side_files_;
  for (const std::string& f : first ? side_files_ : files) {
    const auto name = std::filesystem::path(f).filename();
    if (std::none_of(merged.begin(), merged.end(),
                     [&](const std::string& m) { return std::filesystem::path(m).filename() == name; })) {
      merged.push_back(f);
    }
  }
  side_files_ = std::move(merged);
}

void Trainer::init_from_hf(const std::string& dir) {
  io::load_hf(*param_store(), dir);
  add_side_files(io::hf_side_files(dir), true);
}

}  // namespace moetp::train
