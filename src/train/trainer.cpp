#include "train/trainer.h"

#include <chrono>
#include <cmath>

#include "io/checkpoint.h"
#if MOETP_HAVE_CUDA
#include "comm/nccl_comm.h"
#include "kernels/cuda/runtime.h"
#include "model/cuda_model.h"
#endif

namespace moetp::train {

#if MOETP_HAVE_CUDA
struct Trainer::Gpu {
  std::unique_ptr<comm::NcclComm> world;
  std::unique_ptr<comm::Mesh> mesh;
  std::unique_ptr<model::CudaQwen3MoeModel> model;
};
#else
struct Trainer::Gpu {};
#endif

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
#if MOETP_HAVE_CUDA
  const int gpus = cuda::device_count();
  const std::string why_not = gpus == 0 ? cuda::unavailable_reason() : "";
#else
  const int gpus = 0;
  const std::string why_not = "this build has no CUDA backend";
#endif
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

}  // namespace

Trainer::Trainer(const config::TrainConfig& cfg, const config::ModelConfig& model_cfg, comm::Comm& world,
                 data::TokenFile data)
    : cfg_(cfg),
      model_cfg_(model_cfg),
      world_(world),
      batches_(std::move(data), cfg.train.seq_len, cfg.train.global_batch_size, static_cast<uint64_t>(cfg.train.seed)) {
  config::validate(cfg_);
  config::validate_with_model(cfg_, model_cfg_, world.size());
  step_flops_ = config::training_flops(model_cfg_, cfg_.train.global_batch_size, cfg_.train.seq_len).total();
  MOETP_CHECK(batches_.file().vocab_size() <= model_cfg_.vocab_size,
              "data file {} has vocabulary size {} but the model's vocab_size is {}", batches_.file().path(),
              batches_.file().vocab_size(), model_cfg_.vocab_size);
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
  if (device_ == Device::kCpu) {
    model_ = std::make_unique<model::Qwen3MoeModel>(model_cfg_, *mesh_, config::resolved_dispatcher(cfg_),
                                                    static_cast<uint64_t>(cfg_.train.seed));
    optim_ = std::make_unique<AdamW>(model_->params(), AdamWConfig{cfg_.optim.beta1, cfg_.optim.beta2,
                                                                   cfg_.optim.eps, cfg_.optim.weight_decay});
  }
#if MOETP_HAVE_CUDA
  if (device_ == Device::kCuda) {
    const DispatcherKind dispatcher = config::resolved_dispatcher(cfg_);
    MOETP_CHECK(runs_on_cuda(dispatcher),
                "moe.dispatcher '{}' is not implemented on the CUDA device; use all2all (or auto) or vexpert",
                option_name(dispatcher));
    gpu_ = std::make_unique<Gpu>();
    // The caching allocator by default: with cudaFree per temporary, every free synchronises the
    // device (docs/performance.md, Allocator).
    const bool direct = cfg_.train.cuda_allocator == AllocatorChoice::kDirect;
    world_.run_collectively("selecting this rank's GPU", [&] {
      cuda::init(local.rank, direct ? cuda::AllocMode::kDirect : cuda::AllocMode::kCaching);
    });
    gpu_->world = comm::NcclComm::create(world_.host(), "world");
    gpu_->mesh = std::make_unique<comm::Mesh>(*gpu_->world, cfg_.parallel.ep, cfg_.parallel.etp);
    model::CudaModelOptions opts;
    opts.mesh = world_.size() > 1 ? gpu_->mesh.get() : nullptr;
    opts.dispatcher = dispatcher == DispatcherKind::kLocal ? DispatcherKind::kAll2all : dispatcher;
    opts.force_balance = cfg_.moe.force_balance;
    // auto: the grouped GEMM where its TMA strides allow (multiples of 8), else cuBLAS; said in the banner.
    const int64_t local_i = model_cfg_.moe_intermediate_size / cfg_.parallel.etp;
    const bool fits = moe::grouped_gemm_fits(model_cfg_.hidden_size, local_i);
    std::string why = "moe.expert_gemm";
    if (cfg_.moe.expert_gemm != ExpertGemmChoice::kAuto) {
      opts.expert_gemm =
          cfg_.moe.expert_gemm == ExpertGemmChoice::kGrouped ? moe::ExpertGemm::kGrouped : moe::ExpertGemm::kCublas;
    } else {
      opts.expert_gemm = fits ? moe::ExpertGemm::kGrouped : moe::ExpertGemm::kCublas;
      why = fits ? "moe.expert_gemm = auto"
                 : fmt::format("moe.expert_gemm = auto: hidden {} or expert width {} is not a multiple of 8",
                               model_cfg_.hidden_size, local_i);
    }
    device_reason_ += fmt::format("; expert GEMM {} ({}); allocator {}", moe::expert_gemm_name(opts.expert_gemm), why,
                                  direct ? "direct" : "caching");
    world_.run_collectively("building the CUDA model", [&] {
      gpu_->model =
          std::make_unique<model::CudaQwen3MoeModel>(model_cfg_, static_cast<uint64_t>(cfg_.train.seed), opts);
    });
  }
#endif
}

Trainer::~Trainer() = default;

StepResult Trainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
#if MOETP_HAVE_CUDA
  if (gpu_) cuda::reset_peak_memory();
#endif
  StepResult r;
  r.step = step_ + 1;
  const int num_micro = cfg_.train.micro_batches;
  const int64_t S = cfg_.train.seq_len;
  const int64_t global_targets = static_cast<int64_t>(cfg_.train.global_batch_size) * S;
  r.tokens = global_targets;
  const std::vector<int64_t> slice = batches_.rank_slice(step_, world_.rank(), world_.size());
  const StepOps ops = gpu_ ? gpu_ops() : cpu_ops();
  ops.zero_grads();
  double ce_sum = 0, aux_sum = 0;
  for (int micro = 0; micro < num_micro; ++micro) {
    const std::vector<int64_t> ids = data::micro_slice(slice, micro, num_micro);
    const model::MicroStats ms = ops.forward_backward(batches_.tokens(ids), 1.0 / static_cast<double>(global_targets),
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
  // Fixed order: micro-batches in order on each rank (each one's row losses in token order), then
  // ranks in rank order (all_reduce_scalar(double)).
  r.ce_loss = world_.all_reduce_scalar(ce_sum, comm::ReduceOp::kSum) / static_cast<double>(global_targets);
  r.aux_loss = aux_sum / num_micro;
  r.loss = r.ce_loss + model_cfg_.router_aux_loss_coef * r.aux_loss;
  MOETP_CHECK(std::isfinite(r.loss), "step {}: loss is {} (cross-entropy {}, aux {}) on rank {}", r.step, r.loss,
              r.ce_loss, r.aux_loss, world_.rank());

  ops.reduce_grads();
  r.grad_norm = ops.grad_norm();
  MOETP_CHECK(std::isfinite(r.grad_norm), "step {}: gradient norm is {} on rank {} (loss {})", r.step, r.grad_norm,
              world_.rank(), r.loss);
  if (cfg_.optim.grad_clip > 0 && r.grad_norm > cfg_.optim.grad_clip) {
    ops.scale_grads(static_cast<float>(cfg_.optim.grad_clip / (r.grad_norm + 1e-6)));
  }
  r.lr = lr_at(r.step, cfg_.train.steps, cfg_.optim.warmup_steps, cfg_.optim.lr, cfg_.optim.min_lr);
  ops.optimizer_step(r.lr, r.step);
  step_ = r.step;
#if MOETP_HAVE_CUDA
  if (gpu_) {
    const double peak = static_cast<double>(cuda::memory_stats().peak_live_bytes) / 1e9;
    r.peak_mem_gb = world_.all_reduce_scalar(peak, comm::ReduceOp::kMax);
  }
#endif
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.model_tflops_per_rank = r.seconds > 0 ? step_flops_ / r.seconds / static_cast<double>(world_.size()) / 1e12 : 0.0;
  return r;
}

Trainer::StepOps Trainer::cpu_ops() {
  StepOps ops;
  ops.zero_grads = [this] { model_->zero_grads(); };
  ops.forward_backward = [this](const Tensor& tokens, double ce_scale, double aux_scale) {
    return model_->forward_backward(tokens, ce_scale, aux_scale);
  };
  ops.reduce_grads = [this] { reduce_grads(model_->params(), *mesh_); };
  ops.grad_norm = [this] { return global_grad_norm(model_->params(), *mesh_); };
  ops.scale_grads = [this](float s) { scale_grads(model_->params(), s); };
  ops.optimizer_step = [this](double lr, int64_t step) { optim_->step(model_->params(), lr, step); };
  return ops;
}

Trainer::StepOps Trainer::gpu_ops() {
  StepOps ops;
#if MOETP_HAVE_CUDA
  model::CudaQwen3MoeModel* m = gpu_->model.get();
  ops.zero_grads = [m] { m->zero_grads(); };
  ops.forward_backward = [m](const Tensor& tokens, double ce_scale, double aux_scale) {
    return m->forward_backward(tokens, ce_scale, aux_scale);
  };
  ops.reduce_grads = [m] { m->reduce_grads(); };
  ops.grad_norm = [m] { return m->grad_norm(); };
  ops.scale_grads = [m](float s) { m->scale_grads(s); };
  const model::CudaAdamWConfig adam{cfg_.optim.beta1, cfg_.optim.beta2, cfg_.optim.eps, cfg_.optim.weight_decay};
  ops.optimizer_step = [m, adam](double lr, int64_t step) { m->adamw_step(adam, lr, step); };
#else
  MOETP_FAIL("Trainer: the CUDA device was selected in a build without CUDA");
#endif
  return ops;
}

model::Qwen3MoeModel& Trainer::model() {
  MOETP_CHECK(model_ != nullptr, "Trainer::model(): there is no CPU model on the '{}' device", device_name(device_));
  return *model_;
}

std::unique_ptr<model::ParamStore> Trainer::param_store() const {
#if MOETP_HAVE_CUDA
  if (gpu_) return std::make_unique<model::CudaParamStore>(*gpu_->model, *mesh_);
#endif
  const std::vector<std::string>& prefixes = model::kAdamWStatePrefixes;
  return std::make_unique<model::CpuParamStore>(
      *model_, std::vector<model::ParamState>{{prefixes[0], &optim_->exp_avg()}, {prefixes[1], &optim_->exp_avg_sq()}});
}

void Trainer::save_checkpoint(const std::string& dir) const {
  const nlohmann::json state = {{"format", "moetp-native"},
                                {"version", 1},
                                {"step", step_},
                                {"seed", cfg_.train.seed},
                                {"layout", {{"dp", mesh_->dp_size()}, {"ep", mesh_->ep_size()}, {"etp", mesh_->etp_size()}}},
                                {"train_config", config::to_json(cfg_)}};
  io::save_native(*param_store(), state, dir, {io::HfExpertLayout::kPerExpert, world_.rank() == 0});
}

void Trainer::load_checkpoint(const std::string& dir) {
  const nlohmann::json state = io::load_native(*param_store(), dir);
  MOETP_CHECK(state.value("format", "") == "moetp-native" && state.value("version", 0) == 1,
              "{}: not a moetp native checkpoint of version 1 (format '{}', version {})", dir,
              state.value("format", ""), state.value("version", 0));
  const int64_t seed = state.value("seed", int64_t{-1});
  MOETP_CHECK(seed == cfg_.train.seed,
              "{}: checkpoint was trained with train.seed = {}, this run has {} (the data order would change)", dir,
              seed, cfg_.train.seed);
  step_ = state.at("step").get<int64_t>();
}

void Trainer::init_from_hf(const std::string& dir) {
  io::load_hf(*param_store(), dir);
}

}  // namespace moetp::train
