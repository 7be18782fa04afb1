// The LM head with its cross-entropy, forward + backward, on one GPU: model::lm_head_loss (the
// phase of Qwen3MoeModel::forward_backward) at the Qwen3-30B-A3B shape, N 8192 rows (2 sequences of
// 4096), H 2048, V 151,936, per logit chunk size. FLOPs: 6·N·V·H (logits, dX, dW).
//
// Timing (bench/cuda_timing.h): max(2, ceil(4 · L2 / bytes)) sets of (f, targets) rotated, the weight
// shared (622 MB, far larger than the L2); after warm-up, --iters iterations back to back between two
// CUDA events. Baseline PyTorch (bench/torch_lm_head.py: F.linear, then F.cross_entropy on the
// logits in f32, backward), run separately on the same card; with its JSON the table gains torch_ms
// and torch_ms / moetp_ms (> 1: moetp faster):
//   python3 bench/torch_lm_head.py --json torch.json
//   ./lm_head_cuda_bench --torch-results torch.json [--iters 20] [--warmup 3]
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <vector>

#include "backend/backend.h"
#include "bench_util.h"
#include "cuda_timing.h"
#include "kernels/cuda/runtime.h"
#include "model/lm_head.h"

namespace moetp {
namespace {

constexpr int64_t kN = 8192, kH = 2048, kV = 151936;

struct Args {
  std::string torch_results;
  int iters = 20, warmup = 3;
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--torch-results") {
      a.torch_results = bench::option_value(argc, argv, i);
    } else if (arg == "--iters") {
      a.iters = std::stoi(bench::option_value(argc, argv, i));
    } else if (arg == "--warmup") {
      a.warmup = std::stoi(bench::option_value(argc, argv, i));
    } else {
      MOETP_FAIL("unknown argument '{}' (valid: --torch-results FILE, --iters N, --warmup N)", arg);
    }
  }
  return a;
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  MOETP_CHECK(cuda::device_count() > 0, "lm_head_cuda_bench needs a GPU: {}", cuda::unavailable_reason());
  backend::Backend& be = backend::get(Device::kCuda);
  be.init(0, AllocatorChoice::kCaching);
  double torch_ms = -1;
  if (!args.torch_results.empty()) {
    std::ifstream f(args.torch_results);
    MOETP_CHECK(f.good(), "cannot open --torch-results file '{}'", args.torch_results);
    torch_ms = nlohmann::json::parse(f).at("ms").get<double>();
  }
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const size_t set_bytes = static_cast<size_t>(kN * kH * 2 + kN * 4);
  const int sets = bench::rotation_sets(set_bytes);
  std::vector<Tensor> f, t;
  for (int s = 0; s < sets; ++s) {
    f.push_back(bench::random_bf16({kN, kH}, 100 + static_cast<uint64_t>(s), 1.0f).to(Device::kCuda));
    std::vector<int32_t> ids(static_cast<size_t>(kN));
    for (int64_t i = 0; i < kN; ++i) ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919 + s * 104729) % kV);
    t.push_back(Tensor::from_vector<int32_t>(ids, {kN}).to(Device::kCuda));
  }
  const Tensor w = bench::random_bf16({kV, kH}, 7, 0.02f).to(Device::kCuda);
  Tensor dw = be.zeros({kV, kH}, DType::kF32), df;
  const double flops = 6.0 * kN * kV * kH;
  std::printf("lm_head_cuda_bench: %s (%d SMs); N %lld, H %lld, V %lld; %s; torch baseline: %s\n", prop.name,
              prop.multiProcessorCount, static_cast<long long>(kN), static_cast<long long>(kH),
              static_cast<long long>(kV), bench::timing_method(args.iters, args.warmup).c_str(),
              args.torch_results.empty() ? "(none: --torch-results not given)" : args.torch_results.c_str());
  std::printf("%-11s %-13s %9s %9s %12s %9s %9s\n", "chunk_rows", "logits_MiB", "ms", "TFLOP/s", "loss/row", "torch_ms",
              "torch/me");
  const int64_t default_rows = be.logit_chunk_rows(kV);
  for (const int64_t rows : {default_rows, int64_t{1024}, int64_t{2048}, int64_t{4096}, kN}) {
    double loss = 0;
    const model::LmHeadGrads grads{&df, &dw, 1.0 / kN};
    const bench::Timing tm = bench::time_loop(nullptr, args.iters, args.warmup, 0, [&](int i, const bench::Mark&) {
      loss = model::lm_head_loss(be, f[static_cast<size_t>(i % sets)], w, t[static_cast<size_t>(i % sets)], rows, &grads);
    });
    std::printf("%-11s %-13.0f %9.3f %9.1f %12.5f %9s %9s\n",
                (std::to_string(rows) + (rows == default_rows ? "*" : "")).c_str(),
                static_cast<double>(rows) * kV * 2 / (1 << 20), tm.ms, flops / tm.ms / 1e9, loss / kN,
                torch_ms > 0 ? fmt::format("{:.3f}", torch_ms).c_str() : "-",
                torch_ms > 0 ? fmt::format("{:.2f}", torch_ms / tm.ms).c_str() : "-");
  }
  std::printf("* the CUDA backend's chunk (Backend::logit_chunk_rows)\n");
  // Where the time goes, one chunk of all N rows: the ops of model::lm_head_loss one by one.
  {
    double loss = 0;
    const bench::Timing tm = bench::time_loop(nullptr, args.iters, args.warmup, 2, [&](int i, const bench::Mark& mark) {
      const Tensor& fi = f[static_cast<size_t>(i % sets)];
      Tensor logits = be.linear(fi, w);
      mark();
      be.cross_entropy(logits, t[static_cast<size_t>(i % sets)], &logits, 1.0f / kN, loss);
      mark();
      Tensor dfi;
      be.linear_backward(logits, fi, w, &dfi, &dw);
    });
    const double gemm = 2.0 * kN * kV * kH;
    std::printf("\nphases at chunk_rows %lld: logits GEMM %.3f ms (%.1f TFLOP/s) | cross-entropy %.3f ms (%.0f GB/s on "
                "the bf16 logits read and written) | dX + dW GEMMs %.3f ms (%.1f TFLOP/s)\n",
                static_cast<long long>(kN), tm.parts[0], gemm / tm.parts[0] / 1e9, tm.parts[1],
                2.0 * kN * kV * 2 / tm.parts[1] / 1e6, tm.parts[2], 2 * gemm / tm.parts[2] / 1e9);
  }
  return 0;
}

}  // namespace
}  // namespace moetp

int main(int argc, char** argv) { return moetp::bench::plain_main("lm_head_cuda_bench", argc, argv, moetp::run); }
