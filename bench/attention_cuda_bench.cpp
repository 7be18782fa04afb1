// GPU benchmark of the causal grouped-query attention (kernels/cuda/attention.h): forward and
// backward at the shape of the qwen3-30b-a3b benchmark model (B 2, S 4096, Q 32, G 4, D 128), the
// same at D 64, and the tiny preset (configs/tiny-moe.json: Q 4, G 2, D 16) at B 16, S 128, plus that
// shape at D 64.
//
// Timing (bench/cuda_timing.h, as bench/torch_attention.py times SDPA): max(2, ceil(4 · L2 /
// bytes)) sets of (q, k, v, dout) with their own outputs, rotated; the forward and the backward are
// timed in two loops, each --warmup untimed iterations and then --iters back to back between two
// CUDA events on one stream (mean); every set's forward runs before the backward loop. The kernels are driven through the launchers (kernels/cuda/launch.h)
// on preallocated buffers, so allocation is not timed; the backward is the host wrapper's sequence:
// zero the f32 dq accumulator, delta = rowsum(dout ⊙ out), the backward kernel, dq to bf16.
// FLOPs (causal, as flash-attention reports them): forward 2·B·Q·S²·D, backward 2.5 times that.
//
// Rows per shape: `moetp` (the kernel attention_forward/backward pick: tensor cores for D = 64, 128),
// `determ` (the same with dq added in key-tile order: train.deterministic), `packed` (at S 4096:
// documents of log-uniform lengths in [64, S] packed into the rows, FLOPs counted per document),
// `f32` (the f32 kernel, AttentionKernel::kF32: the same-run baseline; vs_f32 = its time / the row's
// time), and for the tensor-core shapes one `tc_cfgN` row per tile configuration of
// attention_tc_{fwd,bwd}.cu and attention_wgmma_fwd.cu (config N of both; where one of them has
// fewer configurations, nan), and at S 4096 one `pk_cfgN` row per forward configuration on the
// packed documents (its backward: nan past the backward's configurations). A check line per tensor-core shape gives max |tc − f32| / max |f32| of
// out, dq, dk and dv. Baseline PyTorch (bench/torch_attention.py: scaled_dot_product_attention,
// is_causal, enable_gqa), run separately on the same card; with its JSON the table gains torch_ms and
// torch_ms / moetp_ms (> 1: moetp faster):
//   python3 bench/torch_attention.py --json torch.json
//   ./attention_cuda_bench --torch-results torch.json [--iters 50] [--warmup 5] [--json moetp.json]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/tensor.h"
#include "bench_util.h"
#include "cuda_timing.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/runtime.h"

namespace moetp {
namespace {

using bench::random_bf16;

namespace launch = cuda::launch;

struct Shape5 {
  std::string name;
  int64_t B, S, Q, G, D;
};

const std::vector<Shape5> kShapes = {
    {"B2_S4096_Q32_G4_D128", 2, 4096, 32, 4, 128},
    {"B2_S4096_Q32_G4_D64", 2, 4096, 32, 4, 64},
    {"B1_S32768_Q32_G4_D128", 1, 32768, 32, 4, 128},  // long fine-tuning sequences
    {"B16_S128_Q4_G2_D16", 16, 128, 4, 2, 16},
    {"B16_S128_Q4_G2_D64", 16, 128, 4, 2, 64},
};

struct Args {
  std::string torch_results, json_out;
  int iters = 50, warmup = 5;
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
    } else {
      MOETP_FAIL("unknown argument '{}' (valid: --torch-results FILE, --json FILE, --iters N, --warmup N)", arg);
    }
  }
  MOETP_CHECK(a.iters >= 1 && a.warmup >= 0, "bad --iters ({}) or --warmup ({})", a.iters, a.warmup);
  return a;
}

uint16_t* bits(Tensor& t) { return reinterpret_cast<uint16_t*>(t.data<bf16>()); }

// Packed documents for a shape's B rows of S tokens: lengths drawn (fixed seed) log-uniformly from
// [64, S], each row filled in order (the last document of a row cut to fit), as cu_seqlens over the
// B·S tokens. `flops` gets the forward FLOPs counted per document (2·Q·L²·D each, causal as half).
std::vector<int64_t> packed_documents(const Shape5& s, double* flops) {
  std::mt19937_64 rng(2024);
  std::uniform_real_distribution<double> u(std::log(64.0), std::log(static_cast<double>(s.S)));
  std::vector<int64_t> docs = {0};
  *flops = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t used = 0; used < s.S;) {
      const int64_t len = std::min<int64_t>(s.S - used, static_cast<int64_t>(std::exp(u(rng))));
      used += len;
      docs.push_back(b * s.S + used);
      *flops += 2.0 * s.Q * static_cast<double>(len) * len * s.D;
    }
  }
  return docs;
}

// Inputs and outputs of one shape, on the GPU.
struct Buffers {
  Tensor q, k, v, dout, out, lse, delta, dq_accum, dq, dk, dv, dq_turns;
  Tensor docs;  // packed documents (device i64 offsets; the `packed` row)
};

// Bytes of one set's inputs (q, k, v, dout, bf16), as bench/torch_attention.py counts them.
size_t input_bytes(const Shape5& s) { return static_cast<size_t>(2 * 2 * s.B * s.S * (s.Q + s.G) * s.D); }

Buffers make_buffers(const Shape5& s, uint64_t set) {
  Buffers b;
  const uint64_t seed = 10 * set;
  // q, k in [-2, 2): scores of standard deviation ~1.3 after the 1/sqrt(D) scale.
  b.q = random_bf16({s.B, s.S, s.Q, s.D}, seed + 1, 2.0f).to(Device::kCuda);
  b.k = random_bf16({s.B, s.S, s.G, s.D}, seed + 2, 2.0f).to(Device::kCuda);
  b.v = random_bf16({s.B, s.S, s.G, s.D}, seed + 3, 1.0f).to(Device::kCuda);
  b.dout = random_bf16({s.B, s.S, s.Q, s.D}, seed + 4, 1.0f).to(Device::kCuda);
  b.out = Tensor::empty({s.B, s.S, s.Q, s.D}, DType::kBF16, Device::kCuda);
  b.dq = Tensor::empty({s.B, s.S, s.Q, s.D}, DType::kBF16, Device::kCuda);
  b.dk = Tensor::empty({s.B, s.S, s.G, s.D}, DType::kBF16, Device::kCuda);
  b.dv = Tensor::empty({s.B, s.S, s.G, s.D}, DType::kBF16, Device::kCuda);
  b.lse = Tensor::empty({s.B, s.Q, s.S}, DType::kF32, Device::kCuda);
  b.delta = Tensor::empty({s.B, s.Q, s.S}, DType::kF32, Device::kCuda);
  b.dq_accum = Tensor::empty({s.B, s.S, s.Q, s.D}, DType::kF32, Device::kCuda);
  b.dq_turns = Tensor::empty({launch::attention_dq_turns(s.B, s.S, s.Q)}, DType::kI32, Device::kCuda);
  return b;
}

// Which kernels a row runs: the f32 kernel, the automatic choice, or tensor-core config N.
struct Variant {
  std::string name;
  enum { kF32, kAuto, kTc } kind;
  int config = 0;
  bool deterministic = false;  // dq added in key-tile order (train.deterministic)
  bool packed = false;         // packed documents (packed_documents)
};

float softmax_scale(int64_t D) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))); }

// Enqueues the forward; false when the variant has no such forward (config out of range).
bool forward(const Variant& var, const Shape5& s, Buffers& b, cudaStream_t st) {
  const float scale = softmax_scale(s.D);
  if (var.kind == Variant::kTc) {
    if (var.config >= launch::kAttentionForwardTcConfigs) return false;
    CUDA_CHECK(launch::attention_forward_tc(
        bits(b.q), bits(b.k), bits(b.v), bits(b.out), b.lse.data<float>(), s.B, s.S, s.Q, s.G, s.D, scale, st,
        var.config,
        var.packed ? launch::AttentionDocs{b.docs.data<int64_t>(), b.docs.numel() - 1} : launch::AttentionDocs{}));
  } else {
    CUDA_CHECK(launch::attention_forward(
        bits(b.q), bits(b.k), bits(b.v), bits(b.out), b.lse.data<float>(), s.B, s.S, s.Q, s.G, s.D, scale, st,
        var.kind == Variant::kF32 ? launch::AttentionKernel::kF32 : launch::AttentionKernel::kAuto,
        var.packed ? launch::AttentionDocs{b.docs.data<int64_t>(), b.docs.numel() - 1} : launch::AttentionDocs{}));
  }
  return true;
}

bool backward(const Variant& var, const Shape5& s, Buffers& b, cudaStream_t st) {
  if (var.kind == Variant::kTc && var.config >= launch::kAttentionBackwardTcConfigs) return false;
  const float scale = softmax_scale(s.D);
  CUDA_CHECK(cudaMemsetAsync(b.dq_accum.raw_data(), 0, b.dq_accum.num_bytes(), st));
  if (var.deterministic) CUDA_CHECK(cudaMemsetAsync(b.dq_turns.raw_data(), 0, b.dq_turns.num_bytes(), st));
  CUDA_CHECK(
      launch::attention_backward_delta(bits(b.dout), bits(b.out), b.delta.data<float>(), s.B, s.S, s.Q, s.D, st));
  if (var.kind == Variant::kTc) {
    CUDA_CHECK(launch::attention_backward_tc(bits(b.dout), bits(b.q), bits(b.k), bits(b.v), b.lse.data<float>(),
                                             b.delta.data<float>(), b.dq_accum.data<float>(), bits(b.dk), bits(b.dv),
                                             s.B, s.S, s.Q, s.G, s.D, scale, st, var.config, nullptr,
                                             var.packed ? launch::AttentionDocs{b.docs.data<int64_t>(), b.docs.numel() - 1}
                                                        : launch::AttentionDocs{}));
  } else {
    CUDA_CHECK(launch::attention_backward(
        bits(b.dout), bits(b.q), bits(b.k), bits(b.v), b.lse.data<float>(), b.delta.data<float>(),
        b.dq_accum.data<float>(), bits(b.dk), bits(b.dv), s.B, s.S, s.Q, s.G, s.D, scale, st,
        var.kind == Variant::kF32 ? launch::AttentionKernel::kF32 : launch::AttentionKernel::kAuto,
        var.deterministic ? b.dq_turns.data<int32_t>() : nullptr,
        var.packed ? launch::AttentionDocs{b.docs.data<int64_t>(), b.docs.numel() - 1} : launch::AttentionDocs{}));
  }
  CUDA_CHECK(launch::cast_f32_to_bf16(b.dq_accum.data<float>(), bits(b.dq), b.dq_accum.numel(), st));
  return true;
}

// Mean milliseconds of step(set) over the rotated sets (bench/cuda_timing.h); nan when the variant
// has no such kernel (step(0) enqueues nothing and returns false).
double time_ms(const std::function<bool(Buffers&)>& step, std::vector<Buffers>& sets, const Args& args,
               cudaStream_t st) {
  if (!step(sets[0])) return NAN;
  const size_t n = sets.size();
  return bench::time_loop(st, args.iters, args.warmup, 0, [&](int i, const bench::Mark&) { step(sets[i % n]); }).ms;
}

std::vector<float> host_f32(const Tensor& t) { return t.to(Device::kCpu).to(DType::kF32).to_vector<float>(); }

// max |a − b| / max |b|.
double rel_max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    ref = std::max(ref, std::fabs(static_cast<double>(b[i])));
  }
  return ref > 0 ? diff / ref : diff;
}

// Tensor-core results against the f32 kernel's on the same inputs.
void print_check(const Shape5& s, Buffers& b, cudaStream_t st) {
  auto run_all = [&](const Variant& var) {
    forward(var, s, b, st);
    backward(var, s, b, st);
    CUDA_CHECK(cudaStreamSynchronize(st));
    return std::vector<std::vector<float>>{host_f32(b.out), host_f32(b.dq), host_f32(b.dk), host_f32(b.dv)};
  };
  const auto ref = run_all({"f32", Variant::kF32});
  const auto tc = run_all({"moetp", Variant::kAuto});
  std::printf("  check %s: max|tc - f32| / max|f32|: out %.2e, dq %.2e, dk %.2e, dv %.2e\n", s.name.c_str(),
              rel_max_diff(tc[0], ref[0]), rel_max_diff(tc[1], ref[1]), rel_max_diff(tc[2], ref[2]),
              rel_max_diff(tc[3], ref[3]));
}

// torch_attention.py --json: {"cases": [{"name": ..., "fwd_ms": ..., "bwd_ms": ..., "ms": ...}, ...]}
std::map<std::string, double> read_torch_results(const std::string& path) {
  std::ifstream f(path);
  MOETP_CHECK(f.good(), "cannot open --torch-results file '{}'", path);
  const nlohmann::json j = nlohmann::json::parse(f);
  std::map<std::string, double> ms;
  for (const auto& c : j.at("cases")) ms[c.at("name").get<std::string>()] = c.at("ms").get<double>();
  return ms;
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  const std::map<std::string, double> torch_ms =
      args.torch_results.empty() ? std::map<std::string, double>{} : read_torch_results(args.torch_results);
  MOETP_CHECK(cuda::device_count() > 0, "attention_cuda_bench needs a GPU: {}", cuda::unavailable_reason());
  cuda::init(0);
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::printf("attention_cuda_bench: %s (%d SMs); %s; torch baseline: %s\n", prop.name, prop.multiProcessorCount,
              bench::timing_method(args.iters, args.warmup).c_str(),
              args.torch_results.empty() ? "(none: --torch-results not given)" : args.torch_results.c_str());
  std::printf("%-22s %-7s %8s %8s %8s %8s %9s %7s %9s %8s\n", "case", "kernel", "fwd_ms", "fwd_TF/s", "bwd_ms",
              "bwd_TF/s", "total_ms", "vs_f32", "torch_ms", "torch/me");
  nlohmann::json out_json;
  out_json["device"] = prop.name;
  out_json["timing"] = bench::timing_method(args.iters, args.warmup);
  out_json["cases"] = nlohmann::json::array();
  for (const Shape5& s : kShapes) {
    std::vector<Buffers> sets;
    const int n_sets = bench::rotation_sets(input_bytes(s));
    for (int i = 0; i < n_sets; ++i) sets.push_back(make_buffers(s, static_cast<uint64_t>(i)));
    Buffers& b = sets[0];
    CUDA_CHECK(cudaDeviceSynchronize());
    const bool tc = launch::attention_uses_tensor_cores(s.D);
    std::vector<Variant> variants = {{"f32", Variant::kF32}, {"moetp", Variant::kAuto}, {"determ", Variant::kAuto, 0, true}};
    double packed_fwd_flops = 0;
    if (tc && s.S >= 4096) {
      const std::vector<int64_t> docs = packed_documents(s, &packed_fwd_flops);
      for (Buffers& set : sets) {
        set.docs = Tensor::from_vector<int64_t>(docs, {static_cast<int64_t>(docs.size())}).to(Device::kCuda);
      }
      variants.push_back({"packed", Variant::kAuto, 0, false, true});
    }
    if (tc) {
      for (int c = 0; c < std::max(launch::kAttentionForwardTcConfigs, launch::kAttentionBackwardTcConfigs); ++c) {
        variants.push_back({fmt::format("tc_cfg{}", c), Variant::kTc, c});
      }
      if (s.S >= 4096) {  // packed documents through every forward configuration (backward: config 0)
        for (int c = 0; c < launch::kAttentionForwardTcConfigs; ++c) {
          variants.push_back({fmt::format("pk_cfg{}", c), Variant::kTc, c, false, true});
        }
      }
    }
    const double fwd_flops_all = 2.0 * s.B * s.Q * static_cast<double>(s.S) * s.S * s.D;
    double f32_total = NAN;
    for (const Variant& var : variants) {
      // Packed rows count FLOPs per document.
      const double fwd_flops = var.packed ? packed_fwd_flops : fwd_flops_all;
      const double bwd_flops = 2.5 * fwd_flops;
      auto fwd = [&](Buffers& set) { return forward(var, s, set, st); };
      const double fwd_ms = time_ms(fwd, sets, args, st);
      for (Buffers& set : sets) fwd(set);  // the backward reads out and lse of this variant's forward
      const double bwd_ms = time_ms([&](Buffers& set) { return backward(var, s, set, st); }, sets, args, st);
      const double total = fwd_ms + bwd_ms;
      if (var.kind == Variant::kF32) f32_total = total;
      std::string torch_col = "-", ratio_col = "-";
      if (const auto it = torch_ms.find(s.name); it != torch_ms.end() && var.kind == Variant::kAuto) {
        torch_col = fmt::format("{:.3f}", it->second);
        ratio_col = fmt::format("{:.2f}", it->second / total);
      }
      std::printf("%-22s %-7s %8.3f %8.1f %8.3f %8.1f %9.3f %7.2f %9s %8s\n", s.name.c_str(), var.name.c_str(), fwd_ms,
                  fwd_flops / (fwd_ms * 1e-3) / 1e12, bwd_ms, bwd_flops / (bwd_ms * 1e-3) / 1e12, total,
                  f32_total / total, torch_col.c_str(), ratio_col.c_str());
      std::fflush(stdout);
      out_json["cases"].push_back({{"name", s.name},
                                   {"kernel", var.name},
                                   {"fwd_ms", fwd_ms},
                                   {"bwd_ms", bwd_ms},
                                   {"ms", total},
                                   {"fwd_tflops", fwd_flops / (fwd_ms * 1e-3) / 1e12},
                                   {"bwd_tflops", bwd_flops / (bwd_ms * 1e-3) / 1e12}});
    }
    if (tc) print_check(s, b, st);
  }
  CUDA_CHECK(cudaStreamDestroy(st));
  if (!args.json_out.empty()) {
    std::ofstream f(args.json_out);
    MOETP_CHECK(f.good(), "cannot write --json file '{}'", args.json_out);
    f << out_json.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace moetp

int main(int argc, char** argv) { return moetp::bench::plain_main("attention_cuda_bench", argc, argv, moetp::run); }
