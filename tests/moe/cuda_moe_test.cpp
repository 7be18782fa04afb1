// The single-GPU MoE layer (moe/cuda_moe.h) against the CPU MoE block (moe/moe_block.h at one rank,
// dispatcher `local`). Parameters, inputs and upstream gradients are drawn in f32 and rounded to
// bf16; the GPU takes the bf16 values, the CPU block computes in f32 from the same rounded values.
//
// Checked per case: the top-k ids (exact: both sides select on f32 probabilities of the same bf16
// operands; a failure here names a near-tie, not an arithmetic error), the routing weights (f32),
// the per-expert counts (exact), the dispatched row order (expert, then token, then slot, with x_MH
// rows bit-exact copies of x rows), and out, dx, dwg, dw13, dw2 with the tolerance below.
//
// Tolerance (kGlobalRel, kBlockRel): the GPU rounds to bf16 where the CPU keeps f32 (h, a, y and
// out forward; dy, da, dh, dx_MH, dlogits and dx backward), each a relative error of at most 2^-9
// (RMS about 1.1e-3); a chain of about six such roundings gives about 3e-3 relative in the L2 norm.
//   - no NaN or Inf;
//   - ‖a − b‖₂ / ‖b‖₂ <= 1e-2 over the whole tensor (bf16 operands land in 1e-3..1e-2);
//   - the same per block (a row of out, dx and dwg; one expert's slab of dw13 and dw2) <= 3e-2, so a
//     wrong row or expert cannot hide in the global norm; a block whose reference is exactly zero (an
//     expert that got no tokens) must be exactly zero.
// A CPU emulation of the GPU's rounding points on these cases (seed 11) measured 1.5e-3..5.3e-3
// globally and at most 8.3e-3 per block. An element-wise relative bound does not fit: elements near
// zero through cancellation in the long sums have unbounded relative error. Each comparison prints
// its measured errors (the margins).
//
// Runs under mpirun -np 1 (the CPU block needs a one-rank mesh); the GPU part skips without a GPU.
//
// The expert-parallel layer on 2 and 4 GPUs (CudaMoeLayerDist, mpirun -np 2 / -np 4, one GPU per
// rank, NCCL) at every (ep, etp) with ep·etp = world size, ragged token counts per rank (one rank
// with none in one case) and skewed routing (an expert nobody picks):
//   - each case runs with both CUDA dispatchers, `all2all` and `vexpert`;
//   - dispatch on NCCL against dispatch on MPI, bit-exact: the CPU dispatcher of the same name
//     (moe/dispatch_all2all.cpp or moe/dispatch_vexpert.cpp over MPI) given the GPU's routing
//     produces exactly the GPU layer's expert-side rows x_RH and offsets;
//   - against one GPU: every rank also runs the one-GPU layer on the whole batch (every rank's
//     tokens, concatenated in rank order) with the full weights: the top-k ids of its own tokens
//     are identical, and out, dx (its rows), dwg (summed over ranks), dw13 and dw2 (its shard of the
//     full gradients) agree within the tolerance above. The layouts add roundings the one-GPU layer
//     has not (each etp partial of y and dx is rounded to bf16 and the partials are summed in bf16
//     by NCCL), within the same budget. `vexpert` rounds each etp partial of y and dx to bf16 too
//     but folds and sums them in f32 (fewer roundings than `all2all`).
#include "moe/cuda_moe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "comm/mesh.h"
#include "core/bf16.h"
#include "dist/mpi_env.h"
#include "dist/nccl_env.h"
#include "kernels/cpu/experts.h"
#include "kernels/cuda/runtime.h"
#include "moe/cuda_moe_kernels.h"
#include "moe/moe_block.h"
#include "moe/row_ops.h"
#include "shard/layout.h"
#include "testing.h"

namespace moetp {
namespace {

constexpr double kGlobalRel = testing::kMoeGlobalRel;
constexpr double kBlockRel = testing::kMoeBlockRel;
// Routing weights: f32 softmax of logits from two f32 GEMMs with different summation orders
// (about 1e-6 apart), expf vs exp in double.
using testing::kRoutingWeight;

enum class Routing { kRandom, kSkewed };

struct Case {
  const char* name;
  int64_t N, H, E, K, I;
  bool norm_topk_prob;
  Routing routing;
  bool aux_grad;  // pass a d_probs_NE (the aux-loss gradient) to backward
};

// Skewed: expert 0 is every token's first choice, expert E-1 nobody's (an expert with no tokens).
// Ragged: sizes that are no multiple of 8 (the scalar paths of the row kernels). Smallest: N = 1.
const Case kCases[] = {
    {"skewed_N32_H16_E8_K2_I8", 32, 16, 8, 2, 8, true, Routing::kSkewed, false},
    {"ragged_N7_H36_E6_K3_I20", 7, 36, 6, 3, 20, false, Routing::kRandom, false},
    {"smallest_N1_H8_E2_K1_I8", 1, 8, 2, 1, 8, false, Routing::kRandom, false},
    {"real_N512_H256_E16_K4_I128", 512, 256, 16, 4, 128, true, Routing::kRandom, true},
};

Tensor rounded(const Tensor& f32) { return f32.to(DType::kBF16).to(DType::kF32); }
Tensor gpu_bf16(const Tensor& f32) { return f32.to(DType::kBF16).to(Device::kCuda); }
Tensor host(const Tensor& t) { return t.to(Device::kCpu); }
std::vector<float> host_f32(const Tensor& t) {
  Tensor c = t.to(Device::kCpu);
  return (c.dtype() == DType::kF32 ? c : c.to(DType::kF32)).to_vector<float>();
}

struct Inputs {
  moe::MoeParams params;  // f32, bf16-representable
  Tensor x_NH, dout_NH;   // f32, bf16-representable
  Tensor d_probs_NE;      // f32 or undefined
};

Inputs make_inputs(const Case& c, uint64_t seed) {
  const float a_in = 2.0f / std::sqrt(static_cast<float>(c.H)), a_ffn = 2.0f / std::sqrt(static_cast<float>(c.I));
  Inputs in;
  const bool skewed = c.routing == Routing::kSkewed;
  in.x_NH = rounded(testing::random_tensor({c.N, c.H}, seed, 1, skewed ? 0.0f : -1.0f, 1.0f));
  Tensor wg = testing::random_tensor({c.E, c.H}, seed, 2, -a_in, a_in);
  if (skewed) {  // x >= 0, so these shift the logits by about ±5 (the others spread about ±0.7)
    const float bias = 10.0f / static_cast<float>(c.H);
    for (int64_t h = 0; h < c.H; ++h) {
      wg.data<float>()[h] += bias;
      wg.data<float>()[(c.E - 1) * c.H + h] -= bias;
    }
  }
  in.params.wg_EH = rounded(wg);
  in.params.w13_L2iH = rounded(testing::random_tensor({c.E, 2 * c.I, c.H}, seed, 3, -a_in, a_in));
  in.params.w2_LHi = rounded(testing::random_tensor({c.E, c.H, c.I}, seed, 4, -a_ffn, a_ffn));
  in.dout_NH = rounded(testing::random_tensor({c.N, c.H}, seed, 5));
  if (c.aux_grad) in.d_probs_NE = testing::random_tensor({c.N, c.E}, seed, 6, -0.05f, 0.05f);
  return in;
}

// The norm-wise comparison of the file header. `block` = elements per block.
::testing::AssertionResult layer_close(const char* what, const Tensor& actual, const Tensor& expected, int64_t block) {
  if (actual.shape() != expected.shape()) {
    return ::testing::AssertionFailure() << what << ": shape " << actual.describe() << " vs " << expected.describe();
  }
  const std::vector<float> a = host_f32(actual), b = host_f32(expected);
  if (testing::all_zero(b)) return ::testing::AssertionFailure() << what << ": reference is all zeros";
  double diff2 = 0, ref2 = 0, worst = 0;
  int64_t worst_block = -1;
  const int64_t n = static_cast<int64_t>(b.size());
  // A block far below the tensor's typical block (e.g. the router row of an expert that almost
  // never wins, whose gradient is cancellation of small terms) is judged against a floor of 0.1 x
  // the typical block norm instead of its own norm, where bf16 rounding of the inputs is unbounded
  // in relative terms.
  double total2 = 0;
  for (float v : b) total2 += static_cast<double>(v) * v;
  const double floor2 = 0.01 * total2 / static_cast<double>((n + block - 1) / block);
  for (int64_t start = 0; start < n; start += block) {
    double d2 = 0, r2 = 0;
    for (int64_t i = start; i < std::min(n, start + block); ++i) {
      if (!std::isfinite(a[i])) {
        return ::testing::AssertionFailure()
               << what << ": non-finite " << a[i] << " at " << testing::coords_str(actual.shape(), i);
      }
      const double d = static_cast<double>(a[i]) - b[i];
      d2 += d * d;
      r2 += static_cast<double>(b[i]) * b[i];
    }
    diff2 += d2;
    ref2 += r2;
    if (r2 == 0.0 && d2 != 0.0) {
      return ::testing::AssertionFailure()
             << what << ": block " << start / block << " should be exactly zero (its reference is), |diff|² = " << d2;
    }
    const double rel = r2 == 0.0 ? 0.0 : std::sqrt(d2 / std::max(r2, floor2));
    if (rel > worst) {
      worst = rel;
      worst_block = start / block;
    }
  }
  const double global = std::sqrt(diff2 / ref2);
  std::printf("    %-5s rel L2 %.2e (limit %.0e), worst block %lld: %.2e (limit %.0e)\n", what, global, kGlobalRel,
              static_cast<long long>(worst_block), worst, kBlockRel);
  if (global <= kGlobalRel && worst <= kBlockRel) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": rel L2 " << global << " (limit " << kGlobalRel << "), block "
                                       << worst_block << " of " << block << " elements at " << worst << " (limit "
                                       << kBlockRel << ")";
}

class CudaMoeLayer : public ::testing::Test {
 protected:
  void SetUp() override {
    MOETP_REQUIRE_WORLD_SIZE(1);
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

// Rows of the dispatched order are sorted by (expert, token, slot) and counted per expert; x_MH rows
// are bit-exact copies of their tokens' rows.
void check_dispatch_order(const moe::CudaMoeSaved& s, const Tensor& x_NH, int64_t K) {
  const std::vector<int32_t> flat = host(s.flat_M).to_vector<int32_t>();
  const std::vector<int32_t> idx = host(s.topk_idx_NK).to_vector<int32_t>();
  const std::vector<int64_t> token = host(s.token_M).to_vector<int64_t>();
  const std::vector<int32_t> pos = host(s.pos_NK).to_vector<int32_t>();
  ASSERT_EQ(flat.size(), idx.size());
  std::vector<int64_t> rows(flat.size());
  for (size_t i = 0; i < flat.size(); ++i) {
    const int32_t f = flat[i], e = idx[f];
    ASSERT_GE(static_cast<int64_t>(i), s.offsets[e]) << "row " << i << " (expert " << e << ") before its expert's rows";
    ASSERT_LT(static_cast<int64_t>(i), s.offsets[e + 1])
        << "row " << i << " (expert " << e << ") after its expert's rows";
    if (i > 0) {
      const int32_t pf = flat[i - 1];
      ASSERT_TRUE(idx[pf] < e || (idx[pf] == e && pf < f)) << "rows " << i - 1 << " and " << i << " out of order";
    }
    ASSERT_EQ(token[i], f / K) << "token of row " << i;
    ASSERT_EQ(pos[f], static_cast<int32_t>(i)) << "pos of pair " << f;
    rows[i] = f / K;
  }
  EXPECT_TRUE(testing::bit_equal(s.x_MH, moe::gather_rows(x_NH, rows).to(DType::kBF16))) << "x_MH";
}

// The bf16 bits of a tensor, as the launchers take them.
uint16_t* u16(const Tensor& t) { return static_cast<uint16_t*>(t.raw_data()); }

// The combine-backward kernels on their own (both the 16-byte path, H % 8 == 0, and the scalar
// one): dy rows are bf16(w · dout row) with one f32 multiply, bit-exact; the routing-weight
// gradient is the f32 dot product of the dout and y rows (a block-tree sum: 1e-5 relative); entries
// of dweight that no row names stay untouched (vexpert) and an empty launch is a no-op.
TEST_F(CudaMoeLayer, CombineBackwardKernelsMatchTheirFormulas) {
  for (const int64_t H : {int64_t{2048}, int64_t{100}}) {
    SCOPED_TRACE("H = " + std::to_string(H));
    // Slot side: N tokens, K slots, M = N·K rows in a shuffled order.
    const int64_t N = 37, K = 4, M = N * K;
    const Tensor dout = testing::random_tensor({N, H}, 5, 1).to(DType::kBF16);
    const Tensor y = testing::random_tensor({M, H}, 5, 2).to(DType::kBF16);
    const Tensor weight = testing::random_tensor({N, K}, 5, 3, 0.0f, 1.0f);
    std::vector<int32_t> flat(static_cast<size_t>(M));
    for (int64_t i = 0; i < M; ++i) flat[i] = static_cast<int32_t>((i * 53) % M);  // 53 is prime to M = 148
    const Tensor flat_t = Tensor::from_vector(flat, {M});
    // vexpert side: Q received rows of C entries, R rows naming distinct (row, col) pairs.
    const int64_t Q = 29, C = 6, R = 61;
    const Tensor dz = testing::random_tensor({Q, H}, 6, 1).to(DType::kBF16);
    const Tensor yr = testing::random_tensor({R, H}, 6, 2).to(DType::kBF16);
    const Tensor wq = testing::random_tensor({Q, C}, 6, 3, 0.0f, 1.0f);
    std::vector<int64_t> rows(static_cast<size_t>(R)), cols(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) {
      const int64_t f = (i * 7) % (Q * C);  // distinct pairs, most of (Q, C) left unnamed
      rows[i] = f / C;
      cols[i] = f % C;
    }
    const Tensor rows_t = Tensor::from_vector(rows, {R}), cols_t = Tensor::from_vector(cols, {R});

    const Tensor g_dout = dout.to(Device::kCuda), g_y = y.to(Device::kCuda), g_w = weight.to(Device::kCuda);
    const Tensor g_flat = flat_t.to(Device::kCuda);
    Tensor g_dy = Tensor::empty({M, H}, DType::kBF16, Device::kCuda);
    Tensor g_dw = Tensor::empty({N, K}, DType::kF32, Device::kCuda);
    ASSERT_EQ(moe::launch::combine_backward(u16(g_dout), u16(g_y), g_flat.data<int32_t>(),
                                            g_w.data<float>(), u16(g_dy), g_dw.data<float>(), M, K, H,
                                            nullptr),
              cudaSuccess);
    const Tensor g_dz = dz.to(Device::kCuda), g_yr = yr.to(Device::kCuda), g_wq = wq.to(Device::kCuda);
    const Tensor g_rows = rows_t.to(Device::kCuda), g_cols = cols_t.to(Device::kCuda);
    Tensor g_dyr = Tensor::empty({R, H}, DType::kBF16, Device::kCuda);
    Tensor g_dwq = Tensor::full<float>({Q, C}, -7.0f).to(Device::kCuda);  // unnamed entries must keep -7
    ASSERT_EQ(moe::launch::vexpert_combine_backward(u16(g_dz), u16(g_yr),
                                                    g_rows.data<int64_t>(), g_cols.data<int64_t>(), g_wq.data<float>(),
                                                    C, u16(g_dyr), g_dwq.data<float>(), R, H, nullptr),
              cudaSuccess);
    // An empty launch touches nothing.
    ASSERT_EQ(moe::launch::vexpert_combine_backward(u16(g_dz), u16(g_yr),
                                                    g_rows.data<int64_t>(), g_cols.data<int64_t>(), g_wq.data<float>(),
                                                    C, u16(g_dyr), g_dwq.data<float>(), 0, H, nullptr),
              cudaSuccess);

    // Reference on the host from the same bf16 values.
    const auto check = [&](const Tensor& d_src, const Tensor& y_src, const Tensor& w_src, const Tensor& got_dy,
                           const Tensor& got_dw, int64_t rows_n, auto src_row, auto entry) {
      const Tensor d = d_src.to(DType::kF32), yy = y_src.to(DType::kF32), dy = host(got_dy).to(DType::kF32);
      const Tensor dw = host(got_dw);
      for (int64_t i = 0; i < rows_n; ++i) {
        const int64_t q = src_row(i), f = entry(i);
        const float w = w_src.data<float>()[f];
        double dot = 0;
        for (int64_t h = 0; h < H; ++h) {
          const float dv = d.data<float>()[q * H + h];
          ASSERT_EQ(dy.data<float>()[i * H + h], round_bf16(w * dv)) << "dy row " << i << " column " << h;
          dot += static_cast<double>(dv) * yy.data<float>()[i * H + h];
        }
        EXPECT_NEAR(dw.data<float>()[f], dot, 1e-5 * std::max(1.0, std::abs(dot))) << "dweight entry " << f;
      }
    };
    check(dout, y, weight, g_dy, g_dw, M, [&](int64_t i) { return static_cast<int64_t>(flat[i]) / K; },
          [&](int64_t i) { return static_cast<int64_t>(flat[i]); });
    check(dz, yr, wq, g_dyr, g_dwq, R, [&](int64_t i) { return rows[i]; },
          [&](int64_t i) { return rows[i] * C + cols[i]; });
    // Without the weight gradient (dweight null, as under force_balance): the same dy rows.
    Tensor g_dy0 = Tensor::empty({M, H}, DType::kBF16, Device::kCuda);
    Tensor g_dyr0 = Tensor::empty({R, H}, DType::kBF16, Device::kCuda);
    ASSERT_EQ(moe::launch::combine_backward(u16(g_dout), u16(g_y), g_flat.data<int32_t>(), g_w.data<float>(),
                                            u16(g_dy0), nullptr, M, K, H, nullptr),
              cudaSuccess);
    ASSERT_EQ(moe::launch::vexpert_combine_backward(u16(g_dz), u16(g_yr), g_rows.data<int64_t>(),
                                                    g_cols.data<int64_t>(), g_wq.data<float>(), C, u16(g_dyr0),
                                                    nullptr, R, H, nullptr),
              cudaSuccess);
    EXPECT_TRUE(testing::bit_equal(host(g_dy0), host(g_dy))) << "slot-side dy without dweight";
    EXPECT_TRUE(testing::bit_equal(host(g_dyr0), host(g_dyr))) << "vexpert dy without dweight";
    const Tensor dwq = host(g_dwq);
    std::vector<bool> named(static_cast<size_t>(Q * C), false);
    for (int64_t i = 0; i < R; ++i) named[rows[i] * C + cols[i]] = true;
    for (int64_t f = 0; f < Q * C; ++f) {
      if (!named[f]) {
        EXPECT_EQ(dwq.data<float>()[f], -7.0f) << "unnamed dweight entry " << f << " was written";
      }
    }
  }
}

TEST_F(CudaMoeLayer, MatchesCpuBlock) {
  auto& world = testing::world();
  comm::Mesh mesh(world, 1, 1);
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    std::printf("  %s\n", c.name);
    const Inputs in = make_inputs(c, 11);
    const moe::MoeConfig cfg{c.H, c.E, c.K, c.I, c.norm_topk_prob, DispatcherKind::kLocal};

    moe::MoeBlock block(cfg, mesh);
    moe::MoeSaved cpu_saved;
    const Tensor cpu_out = block.forward(in.x_NH, in.params, cpu_saved);
    const Tensor cpu_idx = cpu_saved.router.topk_idx_NK.clone();
    const Tensor cpu_weight = cpu_saved.router.topk_weight_NK.clone();
    const std::vector<float> cpu_counts = cpu_saved.counts_E.to_vector<float>();
    moe::MoeParams cpu_grads = block.zeros_like_params();
    const Tensor cpu_dx = block.backward(in.dout_NH, in.d_probs_NE, in.params, cpu_saved, cpu_grads);

    // The grouped GEMM (where the sizes allow it: multiples of 8), and cuBLAS per expert on one
    // stream and in three chunks on side streams (the same function).
    const std::pair<moe::ExpertGemm, int> variants[] = {
        {moe::ExpertGemm::kGrouped, 1}, {moe::ExpertGemm::kCublas, 1}, {moe::ExpertGemm::kCublas, 3}};
    for (const auto& [gemm, streams] : variants) {
      if (gemm == moe::ExpertGemm::kGrouped && !moe::grouped_gemm_fits(c.H, c.I)) {
        std::printf("   grouped: not for H = %lld, I = %lld (not multiples of 8); rejected as below\n",
                    static_cast<long long>(c.H), static_cast<long long>(c.I));
        moe::CudaMoeOptions grouped;
        grouped.expert_gemm = gemm;
        EXPECT_THROW(moe::CudaMoeLayer(cfg, grouped), Error);
        continue;
      }
      SCOPED_TRACE(fmt::format("expert_gemm = {}, expert_streams = {}", moe::expert_gemm_name(gemm), streams));
      std::printf("   expert_gemm = %s, expert_streams = %d\n", moe::expert_gemm_name(gemm), streams);
      moe::CudaMoeOptions opts;
      opts.expert_gemm = gemm;
      opts.expert_streams = streams;
      moe::CudaMoeLayer layer(cfg, opts);
      layer.set_params(in.params);
      const Tensor x = gpu_bf16(in.x_NH);
      const Tensor out = layer.forward(x);
      const moe::CudaMoeSaved& s = layer.saved();
      ASSERT_TRUE(testing::bit_equal(s.topk_idx_NK, cpu_idx)) << "top-k ids differ (a near-tie in the probabilities?)";
      EXPECT_TRUE(testing::close(s.topk_weight_NK, cpu_weight, kRoutingWeight)) << "routing weights";
      ASSERT_EQ(layer.counts_E().size(), cpu_counts.size());
      for (size_t e = 0; e < cpu_counts.size(); ++e) {
        EXPECT_EQ(layer.counts_E()[e], static_cast<int64_t>(cpu_counts[e])) << "expert " << e;
      }
      if (c.routing == Routing::kSkewed) {
        EXPECT_EQ(layer.counts_E()[0], c.N) << "expert 0 should get every token";
        EXPECT_EQ(layer.counts_E()[c.E - 1], 0) << "expert E-1 should get no token";
      }
      check_dispatch_order(s, in.x_NH, c.K);

      Tensor d_probs = in.d_probs_NE.defined() ? in.d_probs_NE.to(Device::kCuda) : Tensor();
      const Tensor dx = layer.backward(gpu_bf16(in.dout_NH), d_probs);
      EXPECT_TRUE(layer_close("out", out, cpu_out, c.H));
      EXPECT_TRUE(layer_close("dx", dx, cpu_dx, c.H));
      EXPECT_TRUE(layer_close("dwg", layer.grads().wg_EH, cpu_grads.wg_EH, c.H));
      EXPECT_TRUE(layer_close("dw13", layer.grads().w13_L2iH, cpu_grads.w13_L2iH, 2 * c.I * c.H));
      EXPECT_TRUE(layer_close("dw2", layer.grads().w2_LHi, cpu_grads.w2_LHi, c.H * c.I));
    }
  }
}

// Gradients accumulate: two backward passes give twice one (to f32 rounding of the sum).
TEST_F(CudaMoeLayer, GradientsAccumulate) {
  const Case c = kCases[3];
  const Inputs in = make_inputs(c, 12);
  moe::CudaMoeLayer layer({c.H, c.E, c.K, c.I, c.norm_topk_prob, DispatcherKind::kLocal});
  layer.set_params(in.params);
  const Tensor x = gpu_bf16(in.x_NH), dout = gpu_bf16(in.dout_NH);
  layer.forward(x);
  layer.backward(dout);
  const Tensor once = host(layer.grads().w13_L2iH);
  layer.forward(x);
  layer.backward(dout);
  std::vector<float> twice_expected = once.to_vector<float>();
  for (float& v : twice_expected) v *= 2.0f;
  EXPECT_TRUE(testing::close(layer.grads().w13_L2iH, Tensor::from_vector<float>(twice_expected, once.shape()),
                             testing::kF32Exactish));
  layer.zero_grads();
  EXPECT_TRUE(testing::all_zero(host_f32(layer.grads().w13_L2iH)));
  // zero_grads defers the expert gradients' zeroing to the next backward, which then overwrites
  // (grouped GEMM) or zeroes first (cuBLAS loop, also with several expert streams, whose chunks
  // without rows are skipped). Two passes over all N tokens leave gradients in every expert; after
  // zero_grads one backward over 8 copies of one token (K of E experts used, 8 rows each, the
  // others empty) must give exactly what a fresh layer gives for them (w13 and w2, the empty
  // experts zero), and a second backward exactly twice that (accumulating after the overwrite).
  // With K + 1 streams the chunks split the rows 8 / 8 / 8 / 8 / 0: the last chunk, the experts after
  // the last used one, has no rows and is skipped (the token is one that leaves expert E - 1 unused).
  auto copies_of = [&](const Tensor& rows_NH, int64_t n) {
    Tensor out = Tensor::zeros({8, c.H}, DType::kF32);
    for (int64_t r = 0; r < 8; ++r) out.narrow_rows(r, 1).copy_from(rows_NH.narrow_rows(n, 1));
    return gpu_bf16(out);
  };
  int64_t token = -1;
  for (int64_t n = 0; n < c.N && token < 0; ++n) {
    moe::CudaMoeLayer probe({c.H, c.E, c.K, c.I, c.norm_topk_prob, DispatcherKind::kLocal});
    probe.set_params(in.params);
    probe.forward(copies_of(in.x_NH, n));
    if (probe.counts_E().back() == 0) token = n;
  }
  ASSERT_GE(token, 0) << "no token leaves expert E - 1 unused";
  const Tensor x1 = copies_of(in.x_NH, token), dout1 = copies_of(in.dout_NH, token);
  const std::vector<std::pair<moe::ExpertGemm, int>> variants = {{moe::ExpertGemm::kGrouped, 1},
                                                                  {moe::ExpertGemm::kCublas, 1},
                                                                  {moe::ExpertGemm::kCublas, 2},
                                                                  {moe::ExpertGemm::kCublas, static_cast<int>(c.K) + 1}};
  for (const auto& [gemm, streams] : variants) {
    const std::string what = std::string(moe::expert_gemm_name(gemm)) + " streams " + std::to_string(streams);
    moe::CudaMoeOptions opts;
    opts.expert_gemm = gemm;
    opts.expert_streams = streams;
    moe::CudaMoeLayer fresh({c.H, c.E, c.K, c.I, c.norm_topk_prob, DispatcherKind::kLocal}, opts);
    fresh.set_params(in.params);
    fresh.forward(x1);
    fresh.backward(dout1);
    ASSERT_EQ(fresh.counts_E().back(), 0) << what << ": the last expert must be unused (an empty last chunk)";
    ASSERT_EQ(std::count(fresh.counts_E().begin(), fresh.counts_E().end(), int64_t{8}), c.K) << what;
    moe::CudaMoeLayer l2({c.H, c.E, c.K, c.I, c.norm_topk_prob, DispatcherKind::kLocal}, opts);
    l2.set_params(in.params);
    for (int pass = 0; pass < 2; ++pass) {
      l2.forward(x);
      l2.backward(dout);
    }
    ASSERT_FALSE(testing::all_zero(host_f32(l2.grads().w2_LHi))) << what;
    l2.zero_grads();
    l2.forward(x1);
    l2.backward(dout1);
    EXPECT_TRUE(testing::bit_equal(host(l2.grads().w13_L2iH), host(fresh.grads().w13_L2iH))) << what;
    EXPECT_TRUE(testing::bit_equal(host(l2.grads().w2_LHi), host(fresh.grads().w2_LHi))) << what;
    l2.forward(x1);
    l2.backward(dout1);
    for (const auto& [got, one] : {std::pair{&l2.grads().w13_L2iH, &fresh.grads().w13_L2iH},
                                   std::pair{&l2.grads().w2_LHi, &fresh.grads().w2_LHi}}) {
      std::vector<float> twice = host_f32(*one);
      for (float& v : twice) v *= 2.0f;  // a + a is exact in f32
      EXPECT_TRUE(testing::bit_equal(host(*got), Tensor::from_vector<float>(twice, one->shape())))
          << what << ": the second backward after zero_grads accumulates";
    }
  }
}

// Recomputation (release_rows + recompute_forward): the backward after a recompute gives the same
// bits as after the forward, and the recompute reuses the forward's routing: it runs with a router
// weight that routes differently (restored before the backward), and nothing changes. Both expert
// GEMM paths; a case with empty experts.
TEST_F(CudaMoeLayer, RecomputeReusesTheForwardRouting) {
  for (const Case& c : {kCases[0], kCases[1], kCases[3]}) {
    for (const moe::ExpertGemm gemm : {moe::ExpertGemm::kGrouped, moe::ExpertGemm::kCublas}) {
      if (gemm == moe::ExpertGemm::kGrouped && !moe::grouped_gemm_fits(c.H, c.I)) continue;
      SCOPED_TRACE(fmt::format("{} {}", c.name, moe::expert_gemm_name(gemm)));
      const Inputs in = make_inputs(c, 31);
      moe::MoeParams other = in.params;
      other.wg_EH = rounded(testing::random_tensor({c.E, c.H}, 31, 99, -3.0f, 3.0f));
      const Tensor x = gpu_bf16(in.x_NH), dout = gpu_bf16(in.dout_NH);
      const Tensor d_probs = in.d_probs_NE.defined() ? in.d_probs_NE.to(Device::kCuda) : Tensor();
      moe::CudaMoeOptions opts;
      opts.expert_gemm = gemm;
      auto run = [&](bool recompute, const moe::MoeParams& fwd) {
        moe::CudaMoeLayer layer({c.H, c.E, c.K, c.I, c.norm_topk_prob, DispatcherKind::kLocal}, opts);
        layer.set_params(fwd);
        const Tensor out = host(layer.forward(x));
        const std::vector<int64_t> counts = layer.counts_E();
        if (recompute) {
          layer.release_rows();
          EXPECT_THROW(layer.backward(dout, d_probs), Error) << "backward without the rows";
          layer.set_params(other);
          layer.recompute_forward(x);
          layer.set_params(in.params);
        }
        const Tensor dx = host(layer.backward(dout, d_probs));
        return std::tuple{out, dx, host(layer.grads().wg_EH), host(layer.grads().w13_L2iH),
                          host(layer.grads().w2_LHi), counts};
      };
      const auto ref = run(false, in.params);
      const auto rec = run(true, in.params);
      EXPECT_TRUE(testing::bit_equal(std::get<1>(rec), std::get<1>(ref))) << "dx";
      EXPECT_TRUE(testing::bit_equal(std::get<2>(rec), std::get<2>(ref))) << "router gradient";
      EXPECT_TRUE(testing::bit_equal(std::get<3>(rec), std::get<3>(ref))) << "w13 gradient";
      EXPECT_TRUE(testing::bit_equal(std::get<4>(rec), std::get<4>(ref))) << "w2 gradient";
      EXPECT_NE(std::get<5>(run(false, other)), std::get<5>(ref)) << "the second router weight routes like the first";
    }
  }
  moe::CudaMoeLayer fresh({16, 8, 2, 8, true, DispatcherKind::kLocal});
  testing::expect_error([&] { fresh.recompute_forward(gpu_bf16(testing::random_tensor({4, 16}, 1, 1))); },
                        {"recompute_forward needs a forward"});
}

// Forced balance: token n slot k -> expert (n·K + k) % E, weight 1/K. The reference is the CPU
// pipeline of the `local` dispatcher with that routing (row ops + cpu experts), and the router gets
// no gradient.
TEST_F(CudaMoeLayer, ForceBalanceRoundRobin) {
  const int64_t N = 64, H = 32, E = 8, K = 2, I = 16;
  const Case c{"balanced", N, H, E, K, I, true, Routing::kRandom, false};
  const Inputs in = make_inputs(c, 13);
  moe::CudaMoeOptions opts;
  opts.force_balance = true;
  opts.expert_gemm = moe::ExpertGemm::kCublas;
  opts.expert_streams = 4;  // four chunks of two experts
  moe::CudaMoeLayer layer({H, E, K, I, true, DispatcherKind::kLocal}, opts);
  layer.set_params(in.params);
  const Tensor out = layer.forward(gpu_bf16(in.x_NH));
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(layer.counts_E()[e], N * K / E) << "expert " << e;
  check_dispatch_order(layer.saved(), in.x_NH, K);
  const Tensor dx = layer.backward(gpu_bf16(in.dout_NH));

  // CPU reference: rows sorted by expert, then token, then slot.
  std::vector<int64_t> token, slot, offsets(1, 0);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        if ((n * K + k) % E != e) continue;
        token.push_back(n);
        slot.push_back(k);
      }
    }
    offsets.push_back(static_cast<int64_t>(token.size()));
  }
  const Tensor w_NK = Tensor::full<float>({N, K}, 1.0f / static_cast<float>(K));
  const Tensor x_MH = moe::gather_rows(in.x_NH, token);
  cpu::ExpertsSaved saved;
  const Tensor y_MH = cpu::experts_forward(x_MH, offsets, in.params.w13_L2iH, in.params.w2_LHi, &saved);
  Tensor ref_out = Tensor::zeros({N, H}, DType::kF32);
  moe::fold_weighted(y_MH, token, slot, w_NK, ref_out);
  const Tensor dy_MH = moe::weighted_gather(in.dout_NH, token, slot, w_NK);
  Tensor dx_MH, dw13 = Tensor::zeros({E, 2 * I, H}, DType::kF32), dw2 = Tensor::zeros({E, H, I}, DType::kF32);
  cpu::experts_backward(dy_MH, x_MH, offsets, in.params.w13_L2iH, in.params.w2_LHi, saved, dx_MH, dw13, dw2);
  Tensor ref_dx = Tensor::zeros({N, H}, DType::kF32);
  moe::scatter_add_rows(dx_MH, token, ref_dx);

  EXPECT_TRUE(layer_close("out", out, ref_out, H));
  EXPECT_TRUE(layer_close("dx", dx, ref_dx, H));
  EXPECT_TRUE(layer_close("dw13", layer.grads().w13_L2iH, dw13, 2 * I * H));
  EXPECT_TRUE(layer_close("dw2", layer.grads().w2_LHi, dw2, H * I));
  EXPECT_TRUE(testing::all_zero(host_f32(layer.grads().wg_EH))) << "forced routing must not reach the router";
}

TEST_F(CudaMoeLayer, ForceBalanceRaggedCounts) {
  // 7·2 = 14 rows over 4 experts: pairs 0..13 go to j % 4, so experts 0, 1 get 4 and 2, 3 get 3.
  const Case c{"balanced_ragged", 7, 16, 4, 2, 8, true, Routing::kRandom, false};
  const Inputs in = make_inputs(c, 14);
  moe::CudaMoeOptions opts;
  opts.force_balance = true;
  moe::CudaMoeLayer layer({c.H, c.E, c.K, c.I, true, DispatcherKind::kLocal}, opts);
  layer.set_params(in.params);
  layer.forward(gpu_bf16(in.x_NH));
  EXPECT_EQ(layer.counts_E(), (std::vector<int64_t>{4, 4, 3, 3}));
}

TEST_F(CudaMoeLayer, RejectsBadCallsWithTheValues) {
  EXPECT_NE(testing::error_of([] { moe::CudaMoeLayer l({16, 4, 5, 8, true, DispatcherKind::kLocal}); }).find("top_k (5)"), std::string::npos);
  EXPECT_NE(testing::error_of([] {
              moe::CudaMoeLayer l({16, 2000, 2, 8, true, DispatcherKind::kLocal});
            }).find("num_experts (2000)"),
            std::string::npos);
  moe::CudaMoeLayer layer({16, 4, 2, 8, true, DispatcherKind::kLocal});
  const Tensor wrong = gpu_bf16(testing::random_tensor({3, 12}, 1, 1));
  EXPECT_NE(testing::error_of([&] { layer.forward(wrong); }).find("(N, 16)"), std::string::npos);
  EXPECT_NE(testing::error_of([&] {
              layer.backward(gpu_bf16(testing::random_tensor({3, 16}, 1, 2)));
            }).find("forward first"),
            std::string::npos);
  const Tensor x = gpu_bf16(testing::random_tensor({3, 16}, 1, 3));
  layer.forward(x);
  layer.backward(gpu_bf16(testing::random_tensor({3, 16}, 1, 4)));
  EXPECT_NE(testing::error_of([&] {
              layer.backward(gpu_bf16(testing::random_tensor({3, 16}, 1, 4)));
            }).find("forward first"),
            std::string::npos);
}


// ---- expert parallel on 2 and 4 GPUs ----

struct DistCase {
  const char* name;
  int64_t H, E, K, I;
  Routing routing;
  bool aux_grad;
  bool last_rank_empty;  // the last rank has no tokens
  moe::ExpertGemm gemm;   // I / T stays a multiple of 8 up to T = 4 for the grouped GEMM
};

const DistCase kDistCases[] = {
    {"random_H64_E8_K2_I32", 64, 8, 2, 32, Routing::kRandom, true, false, moe::ExpertGemm::kGrouped},
    {"skewed_H48_E8_K3_I32_last_rank_empty", 48, 8, 3, 32, Routing::kSkewed, false, true, moe::ExpertGemm::kGrouped},
    {"random_H64_E8_K2_I32_cublas", 64, 8, 2, 32, Routing::kRandom, true, false, moe::ExpertGemm::kCublas},
};

// Tokens of rank r: 40 + 13·r (ragged), or none for the last rank when asked.
int64_t tokens_of(const DistCase& c, int r, int W) { return c.last_rank_empty && r == W - 1 ? 0 : 40 + 13 * r; }

class CudaMoeLayerDist : public ::testing::TestWithParam<std::pair<int, int>> {
 protected:
  void SetUp() override {
    const auto [P, T] = GetParam();
    MOETP_REQUIRE_WORLD_SIZE(P * T);
    MOETP_REQUIRE_NCCL();
  }
};

TEST_P(CudaMoeLayerDist, MatchesOneGpuAndMpiDispatch) {
  const auto [P, T] = GetParam();
  auto& w = testing::world();
  const int W = w.size(), r = w.rank();
  comm::NcclComm& nccl = *testing::nccl_env().comm();
  comm::Mesh gpu_mesh(nccl, P, T), cpu_mesh(w, P, T);
  const int p = gpu_mesh.coords().p, t = gpu_mesh.coords().t;
  for (const DispatcherKind dispatcher : {DispatcherKind::kAll2all, DispatcherKind::kVexpert}) {
    for (const DistCase& c : kDistCases) {
      SCOPED_TRACE(std::string(option_name(dispatcher)) + " " + c.name);
      if (r == 0) std::printf("  ep %d x etp %d, %s: %s (%s GEMM)\n", P, T, option_name(dispatcher).data(), c.name, moe::expert_gemm_name(c.gemm));
      std::vector<int64_t> counts;
      for (int q = 0; q < W; ++q) counts.push_back(tokens_of(c, q, W));
      const int64_t N_all = comm::sum_counts(counts), N = counts[static_cast<size_t>(r)];
      int64_t first = 0;
      for (int q = 0; q < r; ++q) first += counts[static_cast<size_t>(q)];
      // Every rank draws the whole batch (same seed): its own rows are [first, first + N).
      const Inputs in = make_inputs({c.name, N_all, c.H, c.E, c.K, c.I, true, c.routing, c.aux_grad}, 21);
      const moe::MoeConfig cfg{c.H, c.E, c.K, c.I, true, dispatcher};

      // This rank's shards of the full weights.
      const shard::ShardSpec s13 = shard::w13_spec(c.E, c.I, c.H, P, p, T, t), s2 = shard::w2_spec(c.E, c.I, c.H, P, p, T, t);
      const int64_t L = c.E / P, i = c.I / T;
      moe::MoeParams local{in.params.wg_EH,
                           shard::extract_local(in.params.w13_L2iH.view({c.E * 2 * c.I, c.H}), s13).view({L, 2 * i, c.H}),
                           shard::extract_local(in.params.w2_LHi.view({c.E * c.H, c.I}), s2).view({L, c.H, i})};
      moe::CudaMoeOptions opts;
      opts.mesh = &gpu_mesh;
      opts.expert_gemm = c.gemm;
      moe::CudaMoeLayer layer(cfg, opts);
      layer.set_params(local);
      const Tensor x_own = in.x_NH.narrow_rows(first, N).contiguous();
      const Tensor out = layer.forward(gpu_bf16(x_own));
      const moe::CudaMoeSaved& s = layer.saved();

      // Dispatch on NCCL == dispatch on MPI, bit for bit, given the same routing.
      {
        auto cpu_disp = moe::make_dispatcher(dispatcher, cpu_mesh, {c.E, c.K});
        std::unique_ptr<moe::DispatchState> state;
        const moe::Dispatched d = cpu_disp->dispatch(x_own, host(s.topk_idx_NK), host(s.topk_weight_NK), state);
        EXPECT_EQ(s.offsets, d.offsets) << "expert-side offsets, rank " << r;
        EXPECT_TRUE(testing::bit_equal(host(s.x_RH).to(DType::kF32), d.x_MH)) << "dispatched rows, rank " << r;
      }

      Tensor d_probs = in.d_probs_NE.defined() ? in.d_probs_NE.narrow_rows(first, N).contiguous().to(Device::kCuda)
                                               : Tensor();
      const Tensor dx = layer.backward(gpu_bf16(in.dout_NH.narrow_rows(first, N).contiguous()), d_probs);

      // One GPU, the whole batch.
      moe::CudaMoeLayer ref({c.H, c.E, c.K, c.I, true, DispatcherKind::kLocal});
      ref.set_params(in.params);
      const Tensor ref_out = host(ref.forward(gpu_bf16(in.x_NH)));
      ASSERT_TRUE(testing::bit_equal(host(s.topk_idx_NK), host(ref.saved().topk_idx_NK).narrow_rows(first, N).contiguous()))
          << "top-k ids differ from the one-GPU layer's (a near-tie?), rank " << r;
      const Tensor ref_dx = host(ref.backward(gpu_bf16(in.dout_NH), in.d_probs_NE.defined() ? in.d_probs_NE.to(Device::kCuda) : Tensor()));
      if (N > 0) {
        EXPECT_TRUE(layer_close("out", out, ref_out.narrow_rows(first, N).contiguous(), c.H));
        EXPECT_TRUE(layer_close("dx", dx, ref_dx.narrow_rows(first, N).contiguous(), c.H));
      } else {
        EXPECT_EQ(out.size(0), 0);
        EXPECT_EQ(dx.size(0), 0);
      }
      Tensor dwg = host(layer.grads().wg_EH);
      w.all_reduce(dwg, comm::ReduceOp::kSum);
      EXPECT_TRUE(layer_close("dwg", dwg, host(ref.grads().wg_EH), c.H));
      const Tensor ref_dw13 = shard::extract_local(host(ref.grads().w13_L2iH).view({c.E * 2 * c.I, c.H}), s13);
      const Tensor ref_dw2 = shard::extract_local(host(ref.grads().w2_LHi).view({c.E * c.H, c.I}), s2);
      EXPECT_TRUE(layer_close("dw13", host(layer.grads().w13_L2iH).view(ref_dw13.shape()), ref_dw13, 2 * i * c.H));
      EXPECT_TRUE(layer_close("dw2", host(layer.grads().w2_LHi).view(ref_dw2.shape()), ref_dw2, c.H * i));

      // Recomputation over the mesh: the same routing and exchange plan, the same bits.
      moe::CudaMoeLayer again(cfg, opts);
      again.set_params(local);
      again.forward(gpu_bf16(x_own));
      again.release_rows();
      again.recompute_forward(gpu_bf16(x_own));
      const Tensor dx2 = again.backward(gpu_bf16(in.dout_NH.narrow_rows(first, N).contiguous()), d_probs);
      EXPECT_TRUE(testing::bit_equal(host(dx2), host(dx))) << "dx after recompute, rank " << r;
      EXPECT_TRUE(testing::bit_equal(host(again.grads().w13_L2iH), host(layer.grads().w13_L2iH)))
          << "dw13 after recompute, rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaMoeLayerDist,
                         ::testing::Values(std::pair{2, 1}, std::pair{1, 2}, std::pair{4, 1}, std::pair{2, 2},
                                           std::pair{1, 4}),
                         [](const auto& info) {
                           return fmt::format("ep{}_etp{}", info.param.first, info.param.second);
                         });

TEST(CudaMoeLayerDistErrors, RejectsOtherDispatchersAndHostGroups) {
  auto& w = testing::world();
  if (w.size() < 2) GTEST_SKIP() << "needs 2 or more ranks (an expert count that ep does not divide)";
  MOETP_REQUIRE_NCCL();
  comm::Mesh gpu_mesh(*testing::nccl_env().comm(), w.size(), 1), cpu_mesh(w, w.size(), 1);
  const int64_t E = 4 * w.size();
  moe::CudaMoeOptions opts;
  opts.mesh = &gpu_mesh;
  EXPECT_NE(testing::error_of([&] { moe::CudaMoeLayer l({16, E, 2, 8, true, DispatcherKind::kAllgather}, opts); })
                .find("dispatcher 'allgather' is not implemented on the CUDA backend"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { moe::CudaMoeLayer l({16, E + 1, 2, 8, true, DispatcherKind::kAll2all}, opts); }).find("% ep"),
            std::string::npos);
  opts.mesh = &cpu_mesh;
  EXPECT_NE(testing::error_of([&] { moe::CudaMoeLayer l({16, E, 2, 8, true, DispatcherKind::kAll2all}, opts); }).find("needs NCCL"),
            std::string::npos);
}

}  // namespace
}  // namespace moetp
