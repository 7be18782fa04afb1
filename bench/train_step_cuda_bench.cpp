// GPU benchmark of one full training step of the model on the CUDA backend (model/model.h,
// train/optim.h) on 1 to n GPUs: zero_grads, forward_backward of one micro-batch (B, S) per
// GPU, reduce_grads, grad_norm, adamw_step.
//
// Layouts: run under mpirun with one rank per GPU (`--layouts PxT,...`, default Wx1; every P·T must
// divide the world size W, the rest is data parallel); without mpirun it is one GPU (1x1). Every
// rank runs its own B sequences; numbers are per GPU: step ms is the largest of the ranks' means,
// tokens/s per GPU = B·S / step time, peak memory the largest over ranks. The NCCL communicators'
// argument agreement (comm/nccl_comm.h) is off, as in a production run. --routing random | balanced
// | both (balanced = moe.force_balance: token n slot k -> expert (n·K + k) % E).
// Per-phase columns (means, rank 0): fwd_ms = a forward-only pass on the same tokens (measured
// separately), fb_ms = forward_backward, red_ms = reduce_grads + grad_norm, opt_ms = adamw_step
// and the loss all-reduce (the rest of the step).
// --alloc caching (default, as `moetp train`) puts core's caching allocator (kernels/cuda/runtime.h
// AllocMode::kCaching) under the tensors, --alloc direct cudaMalloc/cudaFree per tensor; peak_GB
// counts live tensor bytes either way, dev_used_GB includes what the cache holds.
// --expert-gemm grouped | cublas picks the expert GEMM (moe::ExpertGemm; default grouped);
// --dispatcher all2all | vexpert the CUDA dispatcher on a mesh (default all2all; printed in the
// banner and the JSON, not in the case names, which stay those of the PyTorch baseline).
// --phases adds a line per case splitting forward_backward into the model's phases (embed,
// attn_fwd, moe_fwd, head_ce, aux, moe_bwd, attn_bwd, ...; backend::Backend::set_phase_timing:
// GPU-timeline ms per step, host waits included in the phase they stall).
//
// Cases (default): configs/tiny-moe.json at S = 128, B = 16, and configs/qwen3-30b-a3b-l4.json
// (Qwen3-30B-A3B layer dims, 4 layers, vocab 2048) at S = 4096, B = 2 (8192 tokens). --config
// replaces the list (repeatable); --seq-len / --batch override S / B of every case (a --config
// without them gets S = 128, B = 16, except the two default files, which keep their defaults).
// Case name: <config file stem>_B<B>_S<S>_D<D>xP<P>xT<T>_<routing>, as bench/torch_train_step_dist.py
// names it; the one-GPU HF baseline (bench/torch_train_step.py) is matched on <stem>_B<B>_S<S> for
// 1x1 random routing.
//
// Step: zero_grads; forward_backward(tokens, ce_scale = 1/(B·S), aux_scale = router_aux_loss_coef);
// adamw_step(beta1 0.9, beta2 0.95, eps 1e-8, weight decay 0.1; lr 1e-4; step t counting from 1).
// Tokens: host i32 (B, S + 1), uniform ids < vocab from a fixed seed (inputs [:, :S], targets
// [:, 1:]), the same tokens every step. Model: Qwen3MoeModel(cfg, CUDA backend, seed 1234) (random init).
//
// Timing (bench/cuda_timing.h, as the PyTorch baselines time their steps): --warmup untimed steps,
// then --steps steps back to back on the legacy default stream (the stream the model runs on)
// between two CUDA events, ms = elapsed / steps; events at the phase boundaries give fb_ms, red_ms
// and opt_ms (means); wall_ms = host clock over the same steps / steps. forward_backward is
// synchronous (it returns with the work done; the loss and the routing counts come back to the
// host) and every step all-reduces its loss over MPI: those waits are part of a step and stay in
// the time. Inputs are not rotated: the same tokens every step, as the baselines do, because a
// step reads the weights, gradients and AdamW state (GBs for qwen3-30b-a3b-l4), so nothing of the
// previous step is left in the L2; tiny-moe's model fits in the L2 whatever the tokens (a latency
// case, on both sides).
//
// Model FLOPs per step: config::training_flops (config/model_config.h: 6 · P_active · B·S +
// 6 · L · Hq · D · S² · B); TFLOP/s = that / mean step time.
//
// Memory, two numbers per case:
//   peak_alloc_GB: the peak of bytes live in tensors allocated through core's CUDA hooks, from this
//     program's wrapper of those hooks (exact, every alloc/free counted, max over the whole case:
//     model construction, warm-up and timed steps). Comparable to torch.cuda.max_memory_allocated.
//     Excludes the few raw cudaMalloc's outside the hooks (cuBLAS workspace, small flags).
//   dev_used_GB: cudaMemGetInfo (total - free) sampled after each step, max over the case's steps;
//     includes the CUDA context, cuBLAS workspace and anything else resident, but misses
//     transient intra-step peaks (the tensor allocator frees them before the step returns).
//
// Loss: mean cross-entropy over the B·S targets + router_aux_loss_coef · aux (what HF's
// Qwen3MoeForCausalLM returns as .loss with output_router_logits=True), of the first and last
// timed step (sanity: finite; falling is not required).
//
// Baselines, run separately on the same machine: bench/torch_train_step.py (HF transformers
// Qwen3MoeForCausalLM on one GPU, bf16, sdpa, fused AdamW on bf16 parameters) and
// bench/torch_train_step_dist.py (a plain-PyTorch Qwen3-MoE with the same EP x ETP layouts,
// torch._grouped_mm and all_to_all_single); --torch-results (repeatable) reads their JSON and the
// table gains torch_ms and torch_ms / moetp_ms (> 1: moetp faster). Note torch keeps bf16 master weights and bf16 AdamW
// state, while moetp keeps f32 masters, f32 moments and f32 gradients: torch does less optimizer
// work and holds less memory per parameter.
//   python3 bench/torch_train_step.py --json torch_step.json
//   ./train_step_cuda_bench --torch-results torch_step.json [--steps 20] [--warmup 3] [--json F]
//   torchrun --nproc-per-node 4 bench/torch_train_step_dist.py --layouts 4x1,2x2,1x4 --json dist.json
//   mpirun -np 4 ./train_step_cuda_bench --layouts 4x1,2x2,1x4 --torch-results dist.json
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "comm/mpi_comm.h"
#include "comm/nccl_comm.h"
#include "config/model_config.h"
#include "core/tensor.h"
#include "bench_util.h"
#include "cuda_alloc_counter.h"
#include "cuda_timing.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/runtime.h"
#include "backend/backend.h"
#include "model/model.h"
#include "moe/cuda_moe.h"
#include "train/optim.h"

#ifndef MOETP_SOURCE_DIR
#define MOETP_SOURCE_DIR "."
#endif

namespace moetp {
namespace {

using bench::Layout;
using bench::parse_layouts;
using bench::install_counting_hooks;
using bench::peak_bytes;
using bench::reset_peak;


// Published step throughput of the frameworks users compare moetp with (printed under the table).
struct PublishedStep {
  const char* name;
  double tflops;  // model TFLOP/s per GPU as published
  const char* source;
};
const PublishedStep kPublishedSteps[] = {
    {"Megatron-Bridge Qwen3-30B-A3B H100 (published)", 299,
     "Megatron-Bridge performance summary (docs.nvidia.com/nemo/megatron-bridge, performance-summary)"},
    {"NeMo Automodel Qwen3-30B-A3B 8xH100 (published)", 277,
     "NeMo Automodel performance docs (docs.nvidia.com/nemo/automodel, performance-summary: Qwen3 MoE 30B, "
     "8 GPUs, EP 8, seq 4096, TE + DeepEP)"},
};

constexpr uint64_t kModelSeed = 1234;
constexpr uint64_t kTokenSeed = 4321;
constexpr double kLr = 1e-4;

size_t device_used_bytes() {
  const cuda::DeviceMemory m = cuda::device_memory();
  return m.total_bytes - m.free_bytes;
}

// ---- Arguments and cases. ----
struct Case {
  std::string config_path;
  int64_t seq_len = 128, batch = 16;
};

struct Args {
  std::vector<std::string> configs;
  int64_t seq_len = 0, batch = 0;  // 0: the case's default
  int steps = 20, warmup = 3;
  std::vector<std::string> torch_results;
  std::string json_out;
  std::vector<Layout> layouts;  // empty: W x 1
  std::vector<bool> routings = {false, true};  // balanced?
  bool phases = false;  // per-phase GPU timeline of forward_backward (backend::Backend::set_phase_timing)
  cuda::AllocMode alloc = cuda::AllocMode::kCaching;  // --alloc caching | direct (the trainer's default is caching)
  moe::ExpertGemm expert_gemm = moe::ExpertGemm::kGrouped;  // --expert-gemm grouped | cublas
  std::string dispatcher = "all2all";                       // --dispatcher all2all | vexpert (layouts)
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&] { return bench::option_value(argc, argv, i); };
    if (arg == "--config") {
      a.configs.push_back(value());
    } else if (arg == "--seq-len") {
      a.seq_len = std::stoll(value());
    } else if (arg == "--batch") {
      a.batch = std::stoll(value());
    } else if (arg == "--steps") {
      a.steps = std::stoi(value());
    } else if (arg == "--warmup") {
      a.warmup = std::stoi(value());
    } else if (arg == "--torch-results") {
      a.torch_results.push_back(value());
    } else if (arg == "--json") {
      a.json_out = value();
    } else if (arg == "--layouts") {
      a.layouts = parse_layouts(value());
    } else if (arg == "--alloc") {
      const std::string v = value();
      MOETP_CHECK(v == "direct" || v == "caching", "--alloc must be direct or caching, got '{}'", v);
      a.alloc = v == "caching" ? cuda::AllocMode::kCaching : cuda::AllocMode::kDirect;
    } else if (arg == "--expert-gemm") {
      a.expert_gemm = moe::parse_expert_gemm(value());
    } else if (arg == "--dispatcher") {
      a.dispatcher = value();
      MOETP_CHECK(a.dispatcher == "all2all" || a.dispatcher == "vexpert",
                  "--dispatcher must be all2all or vexpert, got '{}'", a.dispatcher);
    } else if (arg == "--phases") {
      a.phases = true;
    } else if (arg == "--routing") {
      const std::string r = value();
      MOETP_CHECK(r == "random" || r == "balanced" || r == "both", "--routing must be random, balanced or both, got '{}'",
                  r);
      a.routings = r == "random" ? std::vector<bool>{false} : r == "balanced" ? std::vector<bool>{true}
                                                                               : std::vector<bool>{false, true};
    } else {
      MOETP_FAIL(
          "unknown argument '{}' (valid: --config PATH (repeatable), --seq-len S, --batch B, --steps N, --warmup W, "
          "--layouts PxT[,PxT...], --routing random|balanced|both, --phases, --alloc direct|caching, "
          "--expert-gemm grouped|cublas, --dispatcher all2all|vexpert, --torch-results FILE (repeatable), "
          "--json FILE)",
          arg);
    }
  }
  MOETP_CHECK(a.steps >= 1 && a.warmup >= 0, "bad --steps ({}) or --warmup ({})", a.steps, a.warmup);
  MOETP_CHECK(a.seq_len >= 0 && a.batch >= 0, "bad --seq-len ({}) or --batch ({})", a.seq_len, a.batch);
  return a;
}

std::string stem(const std::string& path) { return std::filesystem::path(path).stem().string(); }

// The default (S, B) of a config file: the two default cases by file name, else S = 128, B = 16.
std::pair<int64_t, int64_t> default_shape(const std::string& path) {
  const std::string s = stem(path);
  if (s == "qwen3-30b-a3b-l4") return {4096, 2};
  return {128, 16};
}

std::vector<Case> make_cases(const Args& args) {
  std::vector<std::string> paths = args.configs;
  if (paths.empty()) {
    for (const char* rel : {"configs/tiny-moe.json", "configs/qwen3-30b-a3b-l4.json"}) {
      // From the working directory if it is there, else from the source tree.
      const std::filesystem::path p(rel);
      paths.push_back(std::filesystem::exists(p) ? p.string() : (std::filesystem::path(MOETP_SOURCE_DIR) / p).string());
    }
  }
  std::vector<Case> cases;
  for (const std::string& p : paths) {
    auto [S, B] = default_shape(p);
    if (args.seq_len > 0) S = args.seq_len;
    if (args.batch > 0) B = args.batch;
    cases.push_back({p, S, B});
  }
  return cases;
}

std::string base_name(const Case& c) { return fmt::format("{}_B{}_S{}", stem(c.config_path), c.batch, c.seq_len); }
std::string case_name(const Case& c, int W, Layout l, bool balanced) {
  return fmt::format("{}_D{}xP{}xT{}_{}", base_name(c), W / (l.P * l.T), l.P, l.T, balanced ? "balanced" : "random");
}

struct Result {
  std::string name, base;
  bool ok = false;
  std::string error;
  int64_t B = 0, S = 0;
  Layout layout;
  bool balanced = false;
  int64_t total_params = 0, active_matmul_params = 0;
  double ms = 0, wall_ms = 0, tokens_per_s = 0, tflops = 0;
  double fwd_ms = 0, fb_ms = 0, red_ms = 0, opt_ms = 0;
  double peak_alloc_gb = 0, dev_used_gb = 0;
  double loss_first = 0, loss_last = 0;
  std::map<std::string, double> phase_ms;  // --phases: ms per timed step and phase (this rank)
  double load = 0;  // routing skew of the last timed step: max over MoE layers of max/mean tokens per expert
};

bool is_oom(const std::string& msg) {
  return msg.find("out of memory") != std::string::npos || msg.find("cudaMalloc") != std::string::npos ||
         msg.find("ALLOC_FAILED") != std::string::npos;
}

struct Ctx {
  comm::MpiComm& world;
  comm::NcclComm* nccl = nullptr;  // W > 1
};

double max_over_ranks(Ctx& ctx, double v) { return ctx.world.all_reduce_scalar(v, comm::ReduceOp::kMax); }

Result run_case(const Args& args, const Case& c, Ctx& ctx, Layout layout, bool balanced) {
  const int W = ctx.world.size(), rank = ctx.world.rank();
  Result r;
  r.base = base_name(c);
  r.name = case_name(c, W, layout, balanced);
  r.B = c.batch;
  r.S = c.seq_len;
  r.layout = layout;
  r.balanced = balanced;
  const config::ModelConfig cfg = config::ModelConfig::load(c.config_path);
  r.total_params = cfg.num_params();
  const config::TrainingFlops flops = config::training_flops(cfg, c.batch, c.seq_len);
  r.active_matmul_params = flops.active_matmul_params;

  // Tokens: host i32 (B, S + 1), uniform in [0, V), a different stream per rank.
  Tensor tokens = Tensor::empty({c.batch, c.seq_len + 1}, DType::kI32);
  {
    std::mt19937_64 rng(kTokenSeed + static_cast<uint64_t>(rank));
    std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(cfg.vocab_size - 1));
    int32_t* p = tokens.data<int32_t>();
    for (int64_t i = 0; i < tokens.numel(); ++i) p[i] = dist(rng);
  }
  const int64_t global_targets = c.batch * c.seq_len * W;
  const double ce_scale = 1.0 / static_cast<double>(global_targets);
  const double aux_scale = cfg.router_aux_loss_coef;

  std::unique_ptr<comm::Mesh> mesh;
  if (W > 1) mesh = std::make_unique<comm::Mesh>(*ctx.nccl, layout.P, layout.T);
  model::ModelOptions opts;
  opts.mesh = mesh.get();
  opts.force_balance = balanced;
  opts.expert_gemm =
      args.expert_gemm == moe::ExpertGemm::kGrouped ? ExpertGemmChoice::kGrouped : ExpertGemmChoice::kCublas;
  opts.dispatcher = parse_option<DispatcherKind>(args.dispatcher, "--dispatcher");
  MOETP_CHECK(W > 1 || (layout.P == 1 && layout.T == 1), "layout {}x{} needs {} ranks (run under mpirun)", layout.P,
              layout.T, layout.P * layout.T);

  reset_peak();
  size_t dev_used = 0;
  try {
    backend::Backend& be = backend::get(Device::kCuda);
    be.reset_phase_ms();
    auto model = std::make_unique<model::Qwen3MoeModel>(cfg, be, opts, kModelSeed);
    train::AdamW opt(*model, train::AdamWConfig{});
    int64_t step_no = 0;
    auto step = [&](int i, const bench::Mark& mark) {
      model->zero_grads();
      const model::MicroStats st = model->forward_backward(tokens, ce_scale, aux_scale);
      mark();
      train::reduce_grads(*model);
      train::global_grad_norm(*model);
      mark();
      opt.step(*model, kLr, ++step_no);
      const double ce = ctx.world.all_reduce_scalar(st.ce_sum, comm::ReduceOp::kSum) * ce_scale;
      r.load = 0;
      for (const std::vector<float>& counts : st.expert_counts) {  // global counts per layer
        double sum = 0, mx = 0;
        for (float c : counts) {
          sum += c;
          mx = std::max(mx, static_cast<double>(c));
        }
        if (sum > 0) r.load = std::max(r.load, mx * static_cast<double>(counts.size()) / sum);
      }
      const double loss = ce + cfg.router_aux_loss_coef * st.aux;
      if (i < args.warmup) {
        dev_used = std::max(dev_used, device_used_bytes());  // sampled outside the timed steps
        if (i + 1 == args.warmup) be.set_phase_timing(args.phases);
        return;
      }
      if (i == args.warmup) r.loss_first = loss;
      r.loss_last = loss;
    };
    std::chrono::steady_clock::time_point t0;  // host clock at the first timed step's start
    auto timed_step = [&](int i, const bench::Mark& mark) {
      if (i == args.warmup) t0 = std::chrono::steady_clock::now();
      step(i, mark);
    };
    be.set_phase_timing(args.phases && args.warmup == 0);
    const bench::Timing t = bench::time_loop(0, args.steps, args.warmup, 2, timed_step);
    const auto t1 = std::chrono::steady_clock::now();
    dev_used = std::max(dev_used, device_used_bytes());
    for (const auto& [phase, ms_total] : be.phase_ms()) r.phase_ms[phase] = ms_total / args.steps;
    be.set_phase_timing(false);
    // Forward alone, same tokens (no gradients; forward is synchronous like forward_backward).
    const bench::Timing f =
        bench::time_loop(0, args.steps, 1, 0, [&](int, const bench::Mark&) { model->forward(tokens); });
    r.ms = t.ms;
    r.wall_ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / args.steps;
    r.fwd_ms = f.ms;
    r.fb_ms = t.parts[0];
    r.red_ms = t.parts[1];
    r.opt_ms = t.parts[2];
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    cudaGetLastError();  // clear a (non-sticky) allocation error
    // One GPU: an out-of-memory case is a row of the table. Several: rethrown (the job aborts; a
    // rank that went on would wait in a collective for the failed one).
    if (W > 1 || !is_oom(msg)) throw;
    r.ok = false;
    r.error = "out of memory: " + msg;
    r.peak_alloc_gb = static_cast<double>(peak_bytes()) / 1e9;
    return r;
  }
  r.ok = true;
  // Per GPU: the slowest rank's means, the largest memory.
  r.ms = max_over_ranks(ctx, r.ms);
  r.wall_ms = max_over_ranks(ctx, r.wall_ms);
  r.tokens_per_s = static_cast<double>(c.batch * c.seq_len) / (r.ms * 1e-3);
  r.tflops = flops.total() / (r.ms * 1e-3) / 1e12;
  r.peak_alloc_gb = max_over_ranks(ctx, static_cast<double>(peak_bytes()) / 1e9);
  r.dev_used_gb = max_over_ranks(ctx, static_cast<double>(dev_used) / 1e9);
  return r;
}

// torch_train_step.py --json: {"cases": [{"case": ..., "ms": ..., "tokens_per_s": ..., "peak_mem_gb": ...}]}
// (a bare list of those objects is accepted too).
struct TorchResult {
  double ms = 0, tokens_per_s = 0, peak_mem_gb = 0;
};

// torch_train_step_dist.py --json: the same with "name", "tokens_per_s_per_gpu" and "peak_gib".
void read_torch_results(const std::string& path, std::map<std::string, TorchResult>& out) {
  std::ifstream f(path);
  MOETP_CHECK(f.good(), "cannot open --torch-results file '{}'", path);
  const nlohmann::json j = nlohmann::json::parse(f);
  const nlohmann::json& list = j.is_array() ? j : j.at("cases");
  for (const auto& c : list) {
    if (!c.contains("ms") || c.at("ms").is_null()) continue;  // a case torch could not run (OOM)
    TorchResult t;
    t.ms = c.at("ms").get<double>();
    t.tokens_per_s = c.value("tokens_per_s", c.value("tokens_per_s_per_gpu", 0.0));
    if (c.contains("peak_mem_gb") && !c.at("peak_mem_gb").is_null()) t.peak_mem_gb = c.at("peak_mem_gb").get<double>();
    if (c.contains("peak_gib") && !c.at("peak_gib").is_null()) t.peak_mem_gb = c.at("peak_gib").get<double>() * 1.073741824;
    out[c.contains("case") ? c.at("case").get<std::string>() : c.at("name").get<std::string>()] = t;
  }
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  auto world = comm::MpiComm::world();
  const int W = world->size(), rank = world->rank();
  const bool lead = rank == 0;
  const std::vector<Case> cases = make_cases(args);
  std::map<std::string, TorchResult> torch;
  for (const std::string& path : args.torch_results) read_torch_results(path, torch);
  if (lead) {
    std::printf("torch baseline: %zu cases from %s\n", torch.size(),
                args.torch_results.empty() ? "(none: --torch-results not given)"
                                           : fmt::format("{}", fmt::join(args.torch_results, ", ")).c_str());
  }
  const int gpus = cuda::device_count();
  world->raise_if_any(gpus > rank ? "" : fmt::format("train_step_cuda_bench: rank {} needs GPU {}, {} visible{}", rank,
                                                     rank, gpus, gpus == 0 ? " (" + cuda::unavailable_reason() + ")" : ""),
                      "GPU per rank");
  cuda::init(rank, args.alloc);
  install_counting_hooks();  // after init: replaces its hooks with the counting ones
  Ctx ctx{*world};
  std::unique_ptr<comm::NcclComm> nccl;
  if (W > 1) {
    nccl = comm::NcclComm::create(*world, "world");
    nccl->set_validate(false);  // a production run's setting; splits inherit it
    ctx.nccl = nccl.get();
  }
  std::vector<Layout> layouts = args.layouts;
  if (layouts.empty()) layouts.push_back({W, 1});
  for (const Layout& l : layouts) {
    MOETP_CHECK(l.P >= 1 && l.T >= 1 && W % (l.P * l.T) == 0, "layout {}x{}: ep·etp must divide the {} ranks", l.P,
                l.T, W);
  }
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, rank));

  if (lead) {
    std::printf(
        "train_step_cuda_bench: %d x %s (%d SMs); one step = zero_grads + forward_backward + reduce_grads + grad_norm "
        "+ adamw_step (lr %g, f32 masters/moments/grads); %s; per GPU, slowest rank; allocator %s; expert GEMM %s; "
        "dispatcher %s\n",
        W, prop.name, prop.multiProcessorCount, kLr, bench::step_timing_method(args.steps, args.warmup).c_str(),
        args.alloc == cuda::AllocMode::kCaching ? "caching" : "direct", moe::expert_gemm_name(args.expert_gemm),
        W > 1 ? args.dispatcher.c_str() : "local");
    std::printf(
        "  TFLOP/s = (6·P_active·T + attn) / time; P_active = num_active_params - embedding table (LM head kept); "
        "T = B·S;\n  attn = B · 3 (fwd+bwd) · 2 (QK^T, PV) · 2 (mul+add) · Hq · D · S^2 / 2 (causal) · L\n"
        "  ms: mean of back-to-back steps between two CUDA events (wall_ms: host clock); fwd_ms: forward alone "
        "(separate run), fb_ms: "
        "forward_backward, red_ms: reduce_grads + grad_norm, opt_ms: adamw_step + the loss all-reduce (rank 0's "
        "means);\n"
        "  peak_GB: peak of tensor bytes through the CUDA hooks; dev_used_GB: max of cudaMemGetInfo total-free after "
        "each warm-up step and after the timed steps;\n  load: routing skew of the last step, max over MoE layers of (largest / mean tokens per expert)\n");
    std::printf("%-50s %9s %9s %8s %8s %7s %7s %10s %7s %8s %9s %10s %10s %6s %9s %8s %8s\n", "case", "ms",
                "wall_ms", "fwd_ms", "fb_ms", "red_ms", "opt_ms", "tok/s/GPU", "TFLOP/s", "peak_GB", "dev_GB",
                "loss_first", "loss_last", "load", "torch_ms", "torch_GB", "torch/us");
  }
  nlohmann::json out_json;
  out_json["device"] = prop.name;
  out_json["world_size"] = W;
  out_json["expert_gemm"] = moe::expert_gemm_name(args.expert_gemm);
  out_json["dispatcher"] = W > 1 ? args.dispatcher : std::string("local");
  out_json["cases"] = nlohmann::json::array();
  int failures = 0;
  for (const Case& c : cases) {
    for (const Layout& l : layouts) {
      for (const bool balanced : args.routings) {
        const Result r = run_case(args, c, ctx, l, balanced);
        if (!lead) continue;
        std::string torch_col = "-", torch_gb = "-", ratio_col = "-";
        auto it = torch.find(r.name);
        if (it == torch.end() && W == 1 && !balanced) it = torch.find(r.base);  // the one-GPU HF baseline
        if (it != torch.end()) {
          torch_col = fmt::format("{:.2f}", it->second.ms);
          torch_gb = fmt::format("{:.2f}", it->second.peak_mem_gb);
          if (r.ok) ratio_col = fmt::format("{:.2f}", it->second.ms / r.ms);
        }
        if (!r.ok) {
          ++failures;
          std::printf("%-50s FAILED: %s (peak tensor bytes before the failure: %.2f GB); torch_ms %s\n", r.name.c_str(),
                      r.error.c_str(), r.peak_alloc_gb, torch_col.c_str());
          std::fflush(stdout);
          out_json["cases"].push_back({{"case", r.name}, {"error", r.error}});
          continue;
        }
        const bool finite = std::isfinite(r.loss_first) && std::isfinite(r.loss_last);
        std::printf(
            "%-50s %9.2f %9.2f %8.2f %8.2f %7.2f %7.2f %10.4g %7.1f %8.2f %9.2f %10.5f %10.5f %6.2f %9s %8s %8s%s\n",
            r.name.c_str(), r.ms, r.wall_ms, r.fwd_ms, r.fb_ms, r.red_ms, r.opt_ms, r.tokens_per_s, r.tflops,
            r.peak_alloc_gb, r.dev_used_gb, r.loss_first, r.loss_last, r.load, torch_col.c_str(), torch_gb.c_str(),
            ratio_col.c_str(), finite ? "" : "  NON-FINITE LOSS");
        if (!r.phase_ms.empty()) {
          std::string line;
          for (const auto& [phase, ms] : r.phase_ms) line += fmt::format(" {} {:.2f}", phase, ms);
          std::printf("  phases of forward_backward, ms per step (rank 0):%s\n", line.c_str());
        }
        std::fflush(stdout);
        if (!finite) ++failures;
        out_json["cases"].push_back({{"case", r.name},
                                     {"batch", r.B},
                                     {"seq_len", r.S},
                                     {"ep", r.layout.P},
                                     {"etp", r.layout.T},
                                     {"routing", r.balanced ? "balanced" : "random"},
                                     {"params", r.total_params},
                                     {"active_matmul_params", r.active_matmul_params},
                                     {"ms", r.ms},
                                     {"wall_ms", r.wall_ms},
                                     {"fwd_ms", r.fwd_ms},
                                     {"fb_ms", r.fb_ms},
                                     {"red_ms", r.red_ms},
                                     {"opt_ms", r.opt_ms},
                                     {"tokens_per_s", r.tokens_per_s},
                                     {"tflops", r.tflops},
                                     {"peak_mem_gb", r.peak_alloc_gb},
                                     {"dev_used_gb", r.dev_used_gb},
                                     {"loss_first", r.loss_first},
                                     {"loss_last", r.loss_last},
                                     {"max_over_mean_load", r.load}});
      }
    }
  }
  if (lead) {
    // Published figures of the frameworks users compare with (full Qwen3-30B-A3B, many H100s, their
    // own FLOP counts): reference rows, not measurements of this program.
    std::printf("published, not measured here (Qwen3-30B-A3B pre-training, BF16, H100; model TFLOP/s per GPU as "
                "each source counts it):\n");
    for (const PublishedStep& p : kPublishedSteps) {
      std::printf("%-50s %9s %9s %8s %8s %7s %7s %10s %7.0f   source: %s\n", p.name, "-", "-", "-", "-", "-", "-", "-",
                  p.tflops, p.source);
      out_json["published_not_measured_here"].push_back(
          {{"case", p.name}, {"model_tflops_per_gpu", p.tflops}, {"source", p.source}});
    }
    std::printf(
        "note: torch keeps bf16 master weights and bf16 AdamW state (fused AdamW on bf16 parameters); moetp keeps f32 "
        "masters, f32 moments and f32 gradients, so torch does less optimizer work and holds less memory.\n");
    if (!args.json_out.empty()) {
      std::ofstream f(args.json_out);
      MOETP_CHECK(f.good(), "cannot write --json file '{}'", args.json_out);
      f << out_json.dump(2) << "\n";
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace moetp

int main(int argc, char** argv) { return moetp::bench::mpi_main("train_step_cuda_bench", argc, argv, moetp::run); }
