// CPU benchmark of one MoE layer, forward + backward, single rank (dispatcher `local`), at a
// small shape. Baseline measured in the same run: the same expert FLOPs as three plain OpenBLAS
// GEMM pairs over all routed rows (no routing, no permutation), i.e. the GEMM floor of the layer.
// Counters: tokens/s, and the ratio layer time / GEMM-floor time.
//   bench/moe_layer_bench [--benchmark_min_time=...]
#include <benchmark/benchmark.h>

#include "comm/mesh.h"
#include "comm/mpi_comm.h"
#include "core/rng.h"
#include "kernels/cpu/gemm.h"
#include "moe/moe_block.h"

namespace moetp {
namespace {

struct Shape {
  int64_t N, H, E, K, I;
};
const Shape kShapes[] = {{512, 256, 16, 2, 128}, {1024, 512, 32, 4, 128}};

comm::MpiComm* g_world = nullptr;


Tensor randn(moetp::Shape shape, uint64_t stream, float std) {
  Tensor t = Tensor::empty(std::move(shape), DType::kF32);
  fill_normal(std::span<float>(t.data<float>(), static_cast<size_t>(t.numel())), CounterRng(1, stream), 0, 0.0f, std);
  return t;
}

void BM_MoeLayerFwdBwd(benchmark::State& state) {
  const Shape s = kShapes[state.range(0)];
  comm::Mesh mesh(*g_world, 1, 1);
  moe::MoeBlock block({s.H, s.E, s.K, s.I, true, DispatcherKind::kLocal}, mesh);
  moe::MoeParams p{randn({s.E, s.H}, 1, 0.1f), randn({s.E, 2 * s.I, s.H}, 2, 0.05f), randn({s.E, s.H, s.I}, 3, 0.05f)};
  const Tensor x = randn({s.N, s.H}, 4, 1.0f);
  const Tensor dout = randn({s.N, s.H}, 5, 1.0f);
  for (auto _ : state) {
    moe::MoeSaved saved;
    Tensor out = block.forward(x, p, saved);
    moe::MoeParams g = block.zeros_like_params();
    Tensor dx = block.backward(dout, Tensor(), p, saved, g);
    benchmark::DoNotOptimize(dx.raw_data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(s.N), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(fmt::format("N{}_H{}_E{}_K{}_I{}", s.N, s.H, s.E, s.K, s.I));
}

// Baseline: forward + backward GEMMs of the experts over all N·K routed rows as if one expert.
void BM_GemmFloor(benchmark::State& state) {
  const Shape s = kShapes[state.range(0)];
  const int64_t M = s.N * s.K;
  const Tensor x = randn({M, s.H}, 6, 1.0f), w13 = randn({2 * s.I, s.H}, 7, 0.05f), w2 = randn({s.H, s.I}, 8, 0.05f);
  const Tensor dy = randn({M, s.H}, 9, 1.0f);
  Tensor dw13 = Tensor::zeros({2 * s.I, s.H}, DType::kF32), dw2 = Tensor::zeros({s.H, s.I}, DType::kF32);
  for (auto _ : state) {
    Tensor h = cpu::linear(x, w13);                         // (M, 2I)
    Tensor a = h.slice(1, 0, s.I).contiguous();             // stand-in for SwiGLU's (M, I)
    Tensor y = cpu::linear(a, w2);                          // (M, H)
    Tensor da, dx;
    cpu::linear_backward(dy, a, w2, &da, &dw2);
    Tensor dh = Tensor::zeros({M, 2 * s.I}, DType::kF32);
    dh.slice(1, 0, s.I).copy_from(da);
    cpu::linear_backward(dh, x, w13, &dx, &dw13);
    benchmark::DoNotOptimize(y.raw_data());
    benchmark::DoNotOptimize(dx.raw_data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(s.N), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(fmt::format("N{}_H{}_E{}_K{}_I{}", s.N, s.H, s.E, s.K, s.I));
}

BENCHMARK(BM_MoeLayerFwdBwd)->DenseRange(0, 1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GemmFloor)->DenseRange(0, 1)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace moetp

int main(int argc, char** argv) {
  moetp::comm::MpiRuntime mpi(&argc, &argv);
  auto world = moetp::comm::MpiComm::world();
  moetp::g_world = world.get();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
