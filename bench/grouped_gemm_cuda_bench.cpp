// GPU benchmark of the Hopper grouped GEMM (kernels/cuda/grouped_gemm.h, issue 7) at the expert-TP
// shapes of Qwen3-30B-A3B: G = 16 groups × 2048 rows (M = 32768) at (N, K) = (384, 2048),
// (2048, 192), (768, 2048), (2048, 384), (1536, 2048), (2048, 768) — gate/up shards (N = 2·I/T rows
// of w13, K = H) and down shards (N = H, K = I/T) at etp 4, 2, 1 — for the three products:
//   fwd   y = x · wᵀ per group          (M, K) × (N, K)ᵀ
//   dgrad dx = dy · w per group         (M, N) × (N, K)
//   wgrad dw += dyᵀ · x per group       f32 accumulate, beta = 1
//   wgrad0 dw = dyᵀ · x per group        f32 overwrite (the first backward after zero_grads: the
//                                       trainer's case with one micro-batch; no dW read)
// with balanced groups (2048 rows each) and ragged groups of the same total (kRagged, one empty).
// --rows R sets the rows per group (issue 7 asks for 128 to 8192): balanced groups of R rows and the
// ragged list scaled to R (ragged_counts: each size · R / 2048 rounded down to a multiple of 16, the
// remainder on group 2, so the total stays 16 · R).
//
// Same-run baseline: the cuBLAS per-group loop (cuda::grouped_linear / grouped_linear_backward, one
// cublasGemmEx per non-empty group) on identical data. PyTorch's torch._grouped_mm on the same shapes
// runs separately (bench/torch_grouped_gemm.py) and its JSON adds torch_ms and torch_ms / moetp_ms
// (> 1: moetp faster; wgrad0 is compared with torch's wgrad, which also writes a fresh dW, and with
// the accumulating cuBLAS loop from zero). Each row also checks moetp against cuBLAS:
// max |moetp − cublas| / max |cublas| (wgrad0 from a dW filled with garbage first).
// Timing (bench/cuda_timing.h, as bench/torch_grouped_gemm.py times torch): per shape
// max(2, ceil(4 · L2 / bytes)) sets of (x, w, dy) and outputs, rotated; after --warmup calls,
// --iters calls back to back between two CUDA events, ms = elapsed / iters (host-side setup
// included where the GPU waits for it: tensor maps and the launch for moetp, 16 cuBLAS calls for
// the loop). FLOPs: 2·M·N·K.
//   python3 bench/torch_grouped_gemm.py --json torch_gg.json
//   ./grouped_gemm_cuda_bench --torch-results torch_gg.json [--iters 100] [--warmup 10] [--sweep]
//       [--shape NxK ...] [--dist balanced|ragged]   (a subset, e.g. to profile one kernel with ncu)
// --sweep adds a row per tile configuration (launch::kGroupedGemmTileN, coN = cooperative 128 × N tiles,
// ppN = ping-pong 64 × N tiles, csN = cooperative with the staged TMA-store epilogue) to tune the
// per-shape choice.
// Targets (issue 7, H100): >= 1.1x torch at every forward shape; >= 600 TFLOP/s at (384, 2048) and
// >= 350 at (2048, 192); wgrad within 10% of fwd.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "core/bf16.h"
#include "core/tensor.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/grouped_gemm_launch.h"
#include "kernels/cuda/runtime.h"
#include "bench_util.h"
#include "cuda_timing.h"

namespace moetp {
namespace {

using bench::random_bf16;

constexpr int64_t kGroups = 16, kRowsPerGroup = 2048;
// Ragged sizes, total 16 × 2048; multiples of 16 (torch._grouped_mm's CUTLASS path wants aligned
// offsets); the tests cover arbitrary sizes. bench/torch_grouped_gemm.py has the same list.
const std::vector<int64_t> kRagged = {1008, 3104, 2048, 16, 4096, 1504, 2592, 0,
                                      2896, 1808, 2240, 3008, 1200, 2496, 1776, 2976};
const std::vector<std::pair<int64_t, int64_t>> kShapes = {{384, 2048}, {2048, 192}, {768, 2048},
                                                          {2048, 384}, {1536, 2048}, {2048, 768}};

struct Args {
  std::string torch_results, json_out;
  int iters = 100, warmup = 10;
  bool sweep = false;
  std::vector<std::pair<int64_t, int64_t>> shapes = kShapes;  // --shape NxK (repeatable) narrows the list
  std::vector<std::string> dists = {"balanced", "ragged"};    // --dist balanced|ragged narrows it
  int64_t rows = kRowsPerGroup;                                // --rows R: rows per group
};

Args parse_args(int argc, char** argv) {
  Args a;
  bool shape_given = false;
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
    } else if (arg == "--rows") {
      a.rows = std::stoll(value());
    } else if (arg == "--sweep") {
      a.sweep = true;
    } else if (arg == "--shape") {
      const std::string v = value();
      const size_t x = v.find('x');
      MOETP_CHECK(x != std::string::npos, "--shape wants NxK (e.g. 1536x2048), got '{}'", v);
      const std::pair<int64_t, int64_t> nk{std::stoll(v.substr(0, x)), std::stoll(v.substr(x + 1))};
      if (!shape_given) a.shapes.clear();
      shape_given = true;
      a.shapes.push_back(nk);
    } else if (arg == "--dist") {
      const std::string v = value();
      MOETP_CHECK(v == "balanced" || v == "ragged", "--dist wants balanced or ragged, got '{}'", v);
      a.dists = {v};
    } else {
      MOETP_FAIL(
          "unknown argument '{}' (valid: --torch-results FILE, --json FILE, --iters N, --warmup N, --sweep, --shape NxK, "
          "--dist balanced|ragged)",
          arg);
    }
  }
  for (const auto& [n, k] : a.shapes) {
    MOETP_CHECK(n >= 8 && k >= 8 && n % 8 == 0 && k % 8 == 0, "--shape {}x{}: N and K must be multiples of 8", n, k);
  }
  MOETP_CHECK(a.iters >= 1 && a.warmup >= 0, "bad --iters ({}) or --warmup ({})", a.iters, a.warmup);
  MOETP_CHECK(a.rows >= 16 && a.rows % 16 == 0, "--rows wants a multiple of 16 (torch._grouped_mm's aligned offsets), got {}",
              a.rows);
  MOETP_CHECK(static_cast<int64_t>(std::accumulate(kRagged.begin(), kRagged.end(), int64_t{0})) ==
                  kGroups * kRowsPerGroup,
              "kRagged does not sum to {}", kGroups * kRowsPerGroup);
  return a;
}


// kRagged scaled to `rows` per group on average (header comment); kRagged itself at 2048.
std::vector<int64_t> ragged_counts(int64_t rows) {
  std::vector<int64_t> c = kRagged;
  int64_t total = 0;
  for (int64_t& v : c) {
    v = v * rows / kRowsPerGroup / 16 * 16;
    total += v;
  }
  c[2] += kGroups * rows - total;
  return c;
}

// Mean milliseconds of fn(set) over the rotated sets, on the legacy default stream (both paths
// enqueue there).
double time_ms(const Args& args, int sets, const std::function<void(int)>& fn) {
  return bench::time_loop(nullptr, args.iters, args.warmup, 0, [&](int i, const bench::Mark&) { fn(i % sets); }).ms;
}

// max |a − b| / max |b| over two tensors of the same shape (any float dtype).
double rel_diff(const Tensor& a, const Tensor& b) {
  const std::vector<float> va = a.to(Device::kCpu).to(DType::kF32).to_vector<float>();
  const std::vector<float> vb = b.to(Device::kCpu).to(DType::kF32).to_vector<float>();
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < va.size(); ++i) {
    num = std::max(num, static_cast<double>(std::fabs(va[i] - vb[i])));
    den = std::max(den, static_cast<double>(std::fabs(vb[i])));
  }
  return den > 0.0 ? num / den : num;
}

using TorchKey = std::tuple<std::string, std::string, int64_t, int64_t>;  // op, dist, N, K

std::map<TorchKey, double> read_torch(const std::string& path) {
  std::map<TorchKey, double> out;
  if (path.empty()) return out;
  std::ifstream in(path);
  MOETP_CHECK(in.good(), "cannot open --torch-results file '{}'", path);
  const nlohmann::json j = nlohmann::json::parse(in);
  for (const auto& r : j.at("results")) {
    out[{r.at("op").get<std::string>(), r.at("dist").get<std::string>(), r.at("N").get<int64_t>(),
         r.at("K").get<int64_t>()}] = r.at("ms").get<double>();
  }
  return out;
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  MOETP_CHECK(cuda::device_count() > 0, "no GPU: {}", cuda::unavailable_reason());
  cuda::init(0);
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const std::map<TorchKey, double> torch = read_torch(args.torch_results);
  std::printf("device: %s (%d SMs, L2 %.0f MiB); G = %lld groups, M = %lld rows; %s\n", prop.name,
              prop.multiProcessorCount, static_cast<double>(bench::l2_bytes()) / (1 << 20),
              static_cast<long long>(kGroups), static_cast<long long>(kGroups * args.rows),
              bench::timing_method(args.iters, args.warmup).c_str());
  std::printf("%-6s %-8s %5s %5s | %-6s %8s %8s | %9s %8s %6s | %8s %6s | %8s\n", "op", "dist", "N", "K", "kernel",
              "ms", "TFLOP/s", "cublas_ms", "TFLOP/s", "vs_cb", "torch_ms", "vs_pt", "check");
  nlohmann::json rows = nlohmann::json::array();

  for (const auto& [N, K] : args.shapes) {
    const int64_t M = kGroups * args.rows;
    const int sets = bench::rotation_sets(static_cast<size_t>(2 * (M * K + kGroups * N * K + M * N)));  // bf16 x, w, dy
    struct Set {
      Tensor x, w, dy;
    };
    std::vector<Set> in;
    for (int s = 0; s < sets; ++s) {
      const uint64_t seed = 10 * static_cast<uint64_t>(s);
      in.push_back({random_bf16({M, K}, seed + 1, 1.0f).to(Device::kCuda),
                    random_bf16({kGroups, N, K}, seed + 2, 0.05f).to(Device::kCuda),
                    random_bf16({M, N}, seed + 3, 1.0f).to(Device::kCuda)});
    }
    const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
    for (const std::string& dist : args.dists) {
      const std::vector<int64_t> counts =
          dist == "balanced" ? std::vector<int64_t>(kGroups, args.rows) : ragged_counts(args.rows);
      std::vector<int64_t> offsets(counts.size() + 1, 0);
      std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
      const Tensor off_g =
          Tensor::from_vector(offsets, {static_cast<int64_t>(offsets.size())}).to(Device::kCuda);
      for (const std::string op : {"fwd", "dgrad", "wgrad", "wgrad0"}) {
        // One output per set (wgrad reads its dW: a shared one would stay in the L2).
        std::vector<Tensor> out_blas, out;
        std::function<void(int)> blas;
        std::function<void(int, int)> ours;  // (set, config)
        for (int s = 0; s < sets; ++s) {
          const Shape shape = op == "fwd" ? Shape{M, N} : op == "dgrad" ? Shape{M, K} : Shape{kGroups, N, K};
          const DType dtype = op == "fwd" || op == "dgrad" ? DType::kBF16 : DType::kF32;
          out_blas.push_back(Tensor::zeros(shape, dtype, Device::kCuda));
          out.push_back(Tensor::zeros(shape, dtype, Device::kCuda));
        }
        if (op == "fwd") {
          blas = [&](int s) { cuda::grouped_linear(in[s].x, offsets, in[s].w, out_blas[s]); };
          ours = [&](int s, int config) { cuda::grouped_gemm_fwd(in[s].x, off_g, in[s].w, out[s], nullptr, config); };
        } else if (op == "dgrad") {
          blas = [&](int s) { cuda::grouped_linear_backward(in[s].dy, in[s].x, offsets, in[s].w, &out_blas[s], nullptr); };
          ours = [&](int s, int config) { cuda::grouped_gemm_dgrad(in[s].dy, off_g, in[s].w, out[s], nullptr, config); };
        } else {
          const bool accumulate = op == "wgrad";
          blas = [&](int s) { cuda::grouped_linear_backward(in[s].dy, in[s].x, offsets, in[s].w, nullptr, &out_blas[s]); };
          ours = [&, accumulate](int s, int config) {
            cuda::grouped_gemm_wgrad(in[s].dy, in[s].x, off_g, out[s], nullptr, config, accumulate);
          };
        }
        // Correctness check on one call (set 0): wgrad accumulates from zero, wgrad0 overwrites garbage
        // (0x7f bytes: large finite floats; every element, empty groups included, must be written).
        if (op == "wgrad" || op == "wgrad0") {
          CUDA_CHECK(cudaMemset(out[0].raw_data(), op == "wgrad" ? 0 : 0x7f, out[0].num_bytes()));
          CUDA_CHECK(cudaMemset(out_blas[0].raw_data(), 0, out_blas[0].num_bytes()));
        }
        blas(0);
        ours(0, -1);
        CUDA_CHECK(cudaDeviceSynchronize());
        const double check = rel_diff(out[0], out_blas[0]);

        const double blas_ms = time_ms(args, sets, blas);
        const auto it = torch.find({op == "wgrad0" ? "wgrad" : op, dist, N, K});
        const double torch_ms = it == torch.end() ? std::nan("") : it->second;
        std::vector<int> configs = {-1};
        if (args.sweep) {
          for (int c = 0; c < cuda::launch::kGroupedGemmConfigs; ++c) configs.push_back(c);
        }
        for (int config : configs) {
          const double ms = time_ms(args, sets, [&](int s) { ours(s, config); });
          const int product = op == "fwd" ? 0 : (op == "dgrad" ? 1 : 2);  // wgrad0: the wgrad product
          const int used = config >= 0 ? config : cuda::launch::grouped_gemm_auto_config_for(product, M, N, K, kGroups);
          MOETP_CHECK(used >= 0, "grouped_gemm_auto_config_for: the device could not be queried");
          // auto128 / co192 / pp256 / cs256: automatic choice, cooperative, ping-pong or cooperative with
          // the staged (shared memory + TMA store) epilogue, tile N.
          const char* kind = cuda::launch::kGroupedGemmPingpong[used] ? "pp"
                             : cuda::launch::kGroupedGemmStaged[used] ? "cs"
                                                                      : "co";
          const std::string kernel = std::string(config < 0 ? "auto" : kind) +
                                     std::to_string(cuda::launch::kGroupedGemmTileN[used]);
          std::printf("%-6s %-8s %5lld %5lld | %-6s %8.3f %8.1f | %9.3f %8.1f %6.2f | %8.3f %6.2f | %8.1e\n",
                      op.c_str(), dist.c_str(), static_cast<long long>(N), static_cast<long long>(K), kernel.c_str(), ms,
                      flops / ms * 1e-9, blas_ms, flops / blas_ms * 1e-9, blas_ms / ms, torch_ms, torch_ms / ms,
                      check);
          rows.push_back({{"op", op}, {"dist", dist}, {"N", N}, {"K", K}, {"kernel", kernel}, {"ms", ms},
                          {"tflops", flops / ms * 1e-9}, {"cublas_ms", blas_ms}, {"torch_ms", torch_ms},
                          {"check", check}, {"input_sets", sets}});
        }
      }
    }
  }
  if (!args.json_out.empty()) {
    std::ofstream out(args.json_out);
    out << nlohmann::json{{"device", prop.name}, {"timing", bench::timing_method(args.iters, args.warmup)},
                          {"results", rows}}
               .dump(2)
        << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace moetp

int main(int argc, char** argv) { return moetp::bench::plain_main("grouped_gemm_cuda_bench", argc, argv, moetp::run); }
