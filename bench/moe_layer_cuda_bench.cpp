// GPU benchmark of one MoE layer (moe/cuda_moe.h), forward + backward on one GPU (expert parallel
// 1), at the Qwen3-30B-A3B layer shape: H = 2048, E = 128, K = 8, N = 8192 tokens, with I = 768 (the
// full expert width) and 384, 192 (its ETP shards at T = 2, 4); routing either real (random router
// weights, top-K of the softmax) or forced balance (token n slot k -> expert (n·K + k) % E).
//
// Timing (bench/cuda_timing.h, as bench/torch_moe_layer*.py time torch): after --warmup untimed
// iterations, --iters iterations (forward, backward) back to back on the layer's stream between
// CUDA events, one more event between forward and backward; fwd, bwd and total ms are means.
// Inputs (x, dout) cycle through --input-sets sets (default max(2, ceil(4 · L2 / bytes of one
// set)), the baselines' rule). With real routing every set has its own per-expert row counts, so
// each set is a new set of GEMM shapes; many sets (e.g. --input-sets 40 with --iters 40) show what a
// training run sees, where the routing changes every step. The weights are one model, as in
// training (0.3 to 1.2 GB, far more than the L2). Per case one line: forward, backward and total
// ms, the expert-GEMM rate (2·N·K·(2I·H + I·H) FLOPs forward, three times that forward + backward),
// tokens/s, the routing's load imbalance (largest expert count / mean) and peak_GiB: the peak of
// CUDA tensor bytes (bench/cuda_alloc_counter.h) from the layer's construction to its last
// iteration, the inputs included (max over ranks; torch_GiB: the baseline's
// torch.cuda.max_memory_allocated after a reset at the same point, where its JSON has it).
//
// Baseline: the same computation in PyTorch (bench/torch_moe_layer.py: torch._grouped_mm experts,
// autograd backward), run separately on the same card; with its JSON the table gains torch_ms and
// torch_ms / moetp_ms (> 1: moetp faster):
//   python3 bench/torch_moe_layer.py --json torch.json
//   ./moe_layer_cuda_bench --torch-results torch.json [--iters 50] [--warmup 5] [--tokens 8192]
//                          [--expert-streams 1,4] [--json moetp.json]
// Each case runs once per expert GEMM of --expert-gemm (default grouped,cublas; moe::ExpertGemm) and,
// for cublas, once per --expert-streams value (CudaMoeOptions::expert_streams): the grouped rows
// carry the bare case name, the cuBLAS rows the suffix _cublas_sS; all share the torch baseline.
//
// Expert parallel: under mpirun with one rank per GPU, --layouts PxT[,PxT...] (default Wx1) runs
// the layer over NCCL (the all2all dispatcher, moe/cuda_moe.h) at I = 768 only, every rank with its
// own N tokens and its shards (L = E/P experts, width I/T); the time is the slowest rank's mean,
// the NCCL argument agreement is off (production setting). Case names
// N<N>_H<H>_E<E>_K<K>_I<I>_D<D>xP<P>xT<T>_<routing>, as bench/torch_moe_layer_dist.py writes them:
//   torchrun --nproc-per-node 4 bench/torch_moe_layer_dist.py --layouts 4x1,2x2,1x4 --json dist.json
//   mpirun -np 4 ./moe_layer_cuda_bench --layouts 4x1,2x2,1x4 --torch-results dist.json
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "comm/mpi_comm.h"
#include "comm/nccl_comm.h"
#include "core/bf16.h"
#include "bench_util.h"
#include "cuda_alloc_counter.h"
#include "cuda_timing.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/runtime.h"
#include "moe/cuda_moe.h"

namespace moetp {
namespace {

using bench::Layout;
using bench::parse_layouts;
using bench::random_bf16;
using bench::split_commas;

constexpr int64_t kH = 2048, kE = 128, kK = 8;
constexpr int64_t kIntermediates[] = {768, 384, 192};

struct Args {
  std::vector<Layout> layouts;  // empty: W x 1
  std::string torch_results, json_out;
  int iters = 50, warmup = 5;
  int64_t tokens = 8192;
  int input_sets = 0;  // distinct (x, dout) pairs cycled through (0: bench::rotation_sets); more sets = more routings
  std::vector<int> expert_streams = {1, 4};
  std::vector<moe::ExpertGemm> expert_gemms = {moe::ExpertGemm::kGrouped, moe::ExpertGemm::kCublas};
  std::vector<std::string> dispatchers = {"all2all"};  // with --layouts
};


Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&] { return bench::option_value(argc, argv, i); };
    if (arg == "--torch-results") {
      a.torch_results = value();
    } else if (arg == "--json") {
      a.json_out = value();
    } else if (arg == "--iters") {
      a.iters = std::stoi(value());
    } else if (arg == "--warmup") {
      a.warmup = std::stoi(value());
    } else if (arg == "--tokens") {
      a.tokens = std::stoll(value());
    } else if (arg == "--input-sets") {
      a.input_sets = std::stoi(value());
    } else if (arg == "--layouts") {
      a.layouts = parse_layouts(value());
    } else if (arg == "--expert-streams") {
      a.expert_streams.clear();
      for (const std::string& v : split_commas(value())) a.expert_streams.push_back(std::stoi(v));
    } else if (arg == "--dispatchers") {
      a.dispatchers = split_commas(value());
      for (const std::string& d : a.dispatchers) {
        MOETP_CHECK(d == "all2all" || d == "vexpert", "--dispatchers: '{}' is not all2all or vexpert", d);
      }
    } else if (arg == "--expert-gemm") {
      a.expert_gemms.clear();
      for (const std::string& v : split_commas(value())) a.expert_gemms.push_back(moe::parse_expert_gemm(v));
    } else {
      MOETP_FAIL(
          "unknown argument '{}' (valid: --torch-results FILE, --json FILE, --iters N, --warmup N, --tokens N, "
          "--expert-gemm grouped,cublas, --expert-streams 1,4, --layouts PxT[,PxT...], "
          "--dispatchers all2all,vexpert, --input-sets N)",
          arg);
    }
  }
  MOETP_CHECK(a.iters >= 1 && a.warmup >= 0 && a.tokens >= 1 && a.input_sets >= 0,
              "bad --iters ({}), --warmup ({}), --tokens ({}) or --input-sets ({})", a.iters, a.warmup, a.tokens,
              a.input_sets);
  MOETP_CHECK(!a.expert_streams.empty() && *std::min_element(a.expert_streams.begin(), a.expert_streams.end()) >= 1,
              "--expert-streams needs values >= 1");
  return a;
}

// One way to run the experts: the grouped GEMM, or cuBLAS per expert on `streams` streams.
// With a mesh also the dispatcher.
struct Variant {
  moe::ExpertGemm gemm = moe::ExpertGemm::kGrouped;
  int streams = 1;
  std::string dispatcher = "local";
};

std::vector<Variant> variants(const Args& a, bool mesh) {
  std::vector<Variant> out;
  for (const std::string& d : mesh ? a.dispatchers : std::vector<std::string>{"local"}) {
    for (const moe::ExpertGemm g : a.expert_gemms) {
      if (g == moe::ExpertGemm::kGrouped) {
        out.push_back({g, 1, d});
      } else {
        for (const int s : a.expert_streams) out.push_back({g, s, d});
      }
    }
  }
  return out;
}

struct Result {
  std::string name, torch_name;  // torch_name: the case without the variant suffix
  int64_t I = 0;
  bool balanced = false;
  Variant variant;
  double fwd_ms = 0, bwd_ms = 0, ms = 0, imbalance = 0;
  double peak_gib = 0;  // peak CUDA tensor bytes from layer construction to the last iteration
};

std::string case_name(int64_t N, int64_t I, bool balanced, const comm::Mesh* mesh) {
  const std::string layout =
      mesh == nullptr ? "" : fmt::format("_D{}xP{}xT{}", mesh->dp_size(), mesh->ep_size(), mesh->etp_size());
  return fmt::format("N{}_H{}_E{}_K{}_I{}{}_{}", N, kH, kE, kK, I, layout, balanced ? "balanced" : "random");
}

Result run_case(const Args& args, int64_t I, bool balanced, Variant variant, const moe::MoeParams& host_params,
                const std::vector<Tensor>& x, const std::vector<Tensor>& dout, comm::Mesh* mesh) {
  const int64_t N = args.tokens;
  moe::CudaMoeOptions opts;
  opts.force_balance = balanced;
  opts.expert_streams = variant.streams;
  opts.expert_gemm = variant.gemm;
  opts.mesh = mesh;
  CUDA_CHECK(cudaStreamCreateWithFlags(&opts.stream, cudaStreamNonBlocking));
  if (mesh != nullptr) {
    for (comm::Comm* g : {&mesh->ep(), &mesh->etp(), &mesh->ep_etp()}) g->set_compute_stream(opts.stream);
  }
  Result r;
  r.torch_name = case_name(N, I, balanced, mesh);
  r.name = r.torch_name + (variant.dispatcher == "vexpert" ? "_vexpert" : "") +
           (variant.gemm == moe::ExpertGemm::kGrouped ? "" : fmt::format("_cublas_s{}", variant.streams));
  r.I = I;
  r.balanced = balanced;
  r.variant = variant;
  bench::reset_peak();  // from the bytes live now (the inputs), as the baseline counts its inputs
  {
    moe::CudaMoeLayer layer({kH, kE, kK, I, true, parse_option<DispatcherKind>(variant.dispatcher, "--dispatchers")}, opts);
    layer.set_params(host_params);
    Tensor out, dx;
    const bench::Timing t =
        bench::time_loop(opts.stream, args.iters, args.warmup, 1, [&](int it, const bench::Mark& mark) {
          layer.forward_into(x[it % x.size()], out);
          mark();
          layer.backward_into(dout[it % dout.size()], Tensor(), dx);
        });
    r.fwd_ms = t.parts[0];
    r.bwd_ms = t.parts[1];
    r.ms = t.ms;
    const std::vector<int64_t>& counts = layer.counts_E();
    const double mean = static_cast<double>(N * kK) / static_cast<double>(kE);
    r.imbalance = static_cast<double>(*std::max_element(counts.begin(), counts.end())) / mean;
    r.peak_gib = static_cast<double>(bench::peak_bytes()) / static_cast<double>(1 << 30);
  }
  CUDA_CHECK(cudaStreamDestroy(opts.stream));
  return r;
}

struct TorchCase {
  double ms = 0;
  double peak_gib = -1;  // -1: not in the file
};

// torch_moe_layer*.py --json: {"cases": [{"name": ..., "ms": ..., "peak_gib": ...}, ...], ...}
std::map<std::string, TorchCase> read_torch_results(const std::string& path) {
  std::ifstream f(path);
  MOETP_CHECK(f.good(), "cannot open --torch-results file '{}'", path);
  const nlohmann::json j = nlohmann::json::parse(f);
  std::map<std::string, TorchCase> cases;
  for (const auto& c : j.at("cases")) {
    cases[c.at("name").get<std::string>()] = {c.at("ms").get<double>(), c.value("peak_gib", -1.0)};
  }
  return cases;
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  auto world = comm::MpiComm::world();
  const int W = world->size(), rank = world->rank();
  const bool lead = rank == 0;
  const std::map<std::string, TorchCase> torch_ms =
      args.torch_results.empty() ? std::map<std::string, TorchCase>{} : read_torch_results(args.torch_results);
  if (lead) {
    std::printf("torch baseline: %zu cases from %s\n", torch_ms.size(),
                args.torch_results.empty() ? "(none: --torch-results not given)" : args.torch_results.c_str());
  }
  const int gpus = cuda::device_count();
  world->raise_if_any(gpus > rank ? "" : fmt::format("moe_layer_cuda_bench: rank {} needs GPU {}, {} visible{}", rank,
                                                     rank, gpus, gpus == 0 ? " (" + cuda::unavailable_reason() + ")" : ""),
                      "GPU per rank");
  cuda::init(rank);
  bench::install_counting_hooks();
  std::unique_ptr<comm::NcclComm> nccl;
  if (W > 1) {
    nccl = comm::NcclComm::create(*world, "world");
    nccl->set_validate(false);  // production setting; splits inherit it
  }
  std::vector<Layout> layouts = args.layouts;
  if (W > 1 && layouts.empty()) layouts.push_back({W, 1});
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, rank));
  const int64_t N = args.tokens;

  // Logits of std ~1 for x ~ U(-1, 1): var = H · (1/3) · (a²/3).
  const float a_router = 3.0f / std::sqrt(static_cast<float>(kH));
  std::vector<Tensor> x, dout;
  const int input_sets =
      args.input_sets > 0 ? args.input_sets : bench::rotation_sets(static_cast<size_t>(2 * 2 * N * kH));  // bf16 x, dout
  for (uint64_t s = 0; s < static_cast<uint64_t>(input_sets); ++s) {
    x.push_back(random_bf16({N, kH}, 100 + s + 10 * static_cast<uint64_t>(rank), 1.0f).to(Device::kCuda));
    dout.push_back(random_bf16({N, kH}, 200 + s + 10 * static_cast<uint64_t>(rank), 1.0f).to(Device::kCuda));
  }
  CUDA_CHECK(cudaDeviceSynchronize());  // the layers run on non-blocking streams

  if (lead) {
    std::printf(
        "moe_layer_cuda_bench: %d x %s (%d SMs); N=%lld per GPU, H=%lld E=%lld K=%lld; %s (%d sets); with layouts "
        "the slowest rank's\n",
        W, prop.name, prop.multiProcessorCount, static_cast<long long>(N), static_cast<long long>(kH),
        static_cast<long long>(kE), static_cast<long long>(kK), bench::timing_method(args.iters, args.warmup).c_str(),
        input_sets);
    std::printf("%-56s %8s %8s %9s %14s %12s %9s %9s %9s %12s %9s\n", "case", "fwd_ms", "bwd_ms", "total_ms",
                "expert_TFLOP/s", "tokens/s", "max/mean", "peak_GiB", "torch_ms", "torch/moetp", "torch_GiB");
  }
  nlohmann::json out_json;
  out_json["device"] = prop.name;
  out_json["world_size"] = W;
  out_json["timing"] = bench::timing_method(args.iters, args.warmup);
  out_json["input_sets"] = input_sets;
  out_json["cases"] = nlohmann::json::array();
  auto report = [&](Result r, int64_t I) {
    r.fwd_ms = world->all_reduce_scalar(r.fwd_ms, comm::ReduceOp::kMax);
    r.bwd_ms = world->all_reduce_scalar(r.bwd_ms, comm::ReduceOp::kMax);
    r.ms = world->all_reduce_scalar(r.ms, comm::ReduceOp::kMax);
    r.peak_gib = world->all_reduce_scalar(r.peak_gib, comm::ReduceOp::kMax);
    if (!lead) return;
    // Expert FLOPs per GPU: every GPU's N·K rows through full-width experts, split over the ranks.
    const double flops = 3.0 * 2.0 * static_cast<double>(N * kK) * static_cast<double>(3 * I * kH);
    const double tflops = flops / (r.ms * 1e-3) / 1e12;
    const double tokens_per_s = static_cast<double>(N) / (r.ms * 1e-3);
    std::string torch_col = "-", ratio_col = "-", torch_gib = "-";
    if (const auto it = torch_ms.find(r.torch_name); it != torch_ms.end()) {
      torch_col = fmt::format("{:.3f}", it->second.ms);
      ratio_col = fmt::format("{:.2f}", it->second.ms / r.ms);
      if (it->second.peak_gib >= 0) torch_gib = fmt::format("{:.2f}", it->second.peak_gib);
    }
    std::printf("%-56s %8.3f %8.3f %9.3f %14.1f %12.4g %9.2f %9.2f %9s %12s %9s\n", r.name.c_str(), r.fwd_ms, r.bwd_ms,
                r.ms, tflops, tokens_per_s, r.imbalance, r.peak_gib, torch_col.c_str(), ratio_col.c_str(),
                torch_gib.c_str());
    std::fflush(stdout);
    out_json["cases"].push_back({{"name", r.name},
                                 {"expert_gemm", moe::expert_gemm_name(r.variant.gemm)},
                                 {"expert_streams", r.variant.streams},
                                 {"fwd_ms", r.fwd_ms},
                                 {"bwd_ms", r.bwd_ms},
                                 {"ms", r.ms},
                                 {"expert_tflops", tflops},
                                 {"tokens_per_s", tokens_per_s},
                                 {"max_over_mean_load", r.imbalance},
                                 {"peak_gib", r.peak_gib}});
  };
  if (layouts.empty()) {
    for (const int64_t I : kIntermediates) {
      moe::MoeParams host{random_bf16({kE, kH}, 1, a_router),
                          random_bf16({kE, 2 * I, kH}, 2, 1.0f / std::sqrt(static_cast<float>(kH))),
                          random_bf16({kE, kH, I}, 3, 1.0f / std::sqrt(static_cast<float>(I)))};
      for (const bool balanced : {false, true}) {
        for (const Variant& v : variants(args, false)) report(run_case(args, I, balanced, v, host, x, dout, nullptr), I);
      }
    }
  } else {
    const int64_t I = kIntermediates[0];
    for (const Layout& l : layouts) {
      MOETP_CHECK(l.P >= 1 && l.T >= 1 && W % (l.P * l.T) == 0, "layout {}x{}: ep·etp must divide the {} ranks", l.P,
                  l.T, W);
      MOETP_CHECK(W > 1, "--layouts needs mpirun with one rank per GPU");
      comm::Mesh mesh(*nccl, l.P, l.T);
      const int64_t L = kE / l.P, i = I / l.T;
      // This rank's shards (random values: only their shapes matter here; the router is shared).
      moe::MoeParams host{random_bf16({kE, kH}, 1, a_router),
                          random_bf16({L, 2 * i, kH}, 2 + 100 * static_cast<uint64_t>(rank), 1.0f / std::sqrt(static_cast<float>(kH))),
                          random_bf16({L, kH, i}, 3 + 100 * static_cast<uint64_t>(rank), 1.0f / std::sqrt(static_cast<float>(I)))};
      for (const bool balanced : {false, true}) {
        for (const Variant& v : variants(args, true)) report(run_case(args, I, balanced, v, host, x, dout, &mesh), I);
      }
    }
  }
  if (lead && !args.json_out.empty()) {
    std::ofstream f(args.json_out);
    MOETP_CHECK(f.good(), "cannot write --json file '{}'", args.json_out);
    f << out_json.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace moetp

int main(int argc, char** argv) { return moetp::bench::mpi_main("moe_layer_cuda_bench", argc, argv, moetp::run); }
