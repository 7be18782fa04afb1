// The backend-parity harness, op level: every operation of backend::Backend, called through the
// interface on the CPU backend (f32, the specification) and on the CUDA backend (bf16 activations
// and working weights, f32 accumulators) from the same inputs, and compared. Inputs are random
// values that bf16 represents exactly, so both backends read the same numbers and a difference
// measures only the CUDA backend's own roundings (backend.h's precision policy). Every op runs at
// two sizes, one of them ragged (no multiples of 8 or of any tile). A new op of the interface gets a
// case here.
//
// The other two levels of the harness run the same way, CPU against CUDA from the same inputs:
//   - the MoE layer at every layout (tests/moe/cuda_moe_test.cpp: one GPU here and there; ep / etp
//     layouts over NCCL against the CPU dispatchers over MPI at np 2 and 4);
//   - a whole training step and AdamW steps (tests/model/cuda_model_test.cpp, np 1, 2 and 4).
// `ctest -L parity` runs all three. Label `cuda`: skips where no GPU is visible (or in a CPU-only build).
//
// Tolerances (tests/testing.h): bit-exact for data movement, casts, scaling and AdamW (same formula,
// element by element); 1e-12 relative for the double sums of squares; kBackendBF16 for one bf16 store
// of f32 math; kF32Sum for f32 reductions over rows;
// the attention tolerances of tests/kernels/cuda_attention_test.cpp; the MoE layer's relative L2.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "comm/mesh.h"
#include "core/bf16.h"
#include "dist/mpi_env.h"
#include "testing.h"

namespace moetp {
namespace {

using backend::Backend;
using testing::bit_equal;
using testing::close;
using testing::kAttnLse;
using testing::kAttnTensorCoreVsSpec;
using testing::kBackendBF16;
using testing::kF32Sum;
using testing::Tolerance;

// Random f32 values in [lo, hi) rounded to bf16 (exactly representable in both dtypes).
Tensor input(Shape shape, uint64_t stream, float lo = -1.0f, float hi = 1.0f) {
  Tensor t = testing::random_tensor(std::move(shape), 1234, stream, lo, hi);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = round_bf16(p[i]);
  return t;
}

Tensor ids(int64_t n, int32_t bound, uint64_t stream) {
  const Tensor r = testing::random_tensor({n}, 777, stream, 0.0f, static_cast<float>(bound));
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<int32_t>(r.data<float>()[i]);
  return Tensor::from_vector<int32_t>(v, {n});
}

// The two sizes every op runs at: aligned, and ragged.
struct Size {
  int64_t rows, cols;
};
constexpr Size kSizes[] = {{64, 128}, {37, 72}};

class BackendParity : public ::testing::Test {
 protected:
  void SetUp() override {
    MOETP_REQUIRE_WORLD_SIZE(1);
    gpu_ = backend::find(Device::kCuda);
    if (gpu_ == nullptr) GTEST_SKIP() << "CUDA test skipped: this build has no CUDA backend";
    if (gpu_->visible_devices() < 1) GTEST_SKIP() << "CUDA test skipped: " << gpu_->unavailable_reason();
    gpu_->init(0, AllocatorChoice::kAuto);
  }

  Backend& cpu() { return backend::get(Device::kCpu); }
  Backend& gpu() { return *gpu_; }

  // `t` (f32, host) on backend b in its compute dtype (activations, working weights).
  static Tensor act(Backend& b, const Tensor& t) {
    Tensor out = b.empty(t.shape(), b.compute_dtype());
    b.cast_into(b.to_device(t), out);
    return out;
  }
  // `t` on backend b in f32 (gradients, masters, moments, router statistics), a copy.
  static Tensor f32(Backend& b, const Tensor& t) {
    Tensor out = b.empty(t.shape(), DType::kF32);
    out.copy_from(t);
    return out;
  }
  // A backend tensor on the host in f32.
  static Tensor host(const Tensor& t) {
    Tensor h = t.to(Device::kCpu);
    return h.dtype() == DType::kF32 ? h : h.to(DType::kF32);
  }

  Backend* gpu_ = nullptr;
};

TEST_F(BackendParity, CastIntoRoundsToNearestEvenBitExactly) {
  for (const Size s : kSizes) {
    const Tensor x = testing::random_tensor({s.rows, s.cols}, 5, 1);  // not bf16-exact: rounding happens
    Tensor c = cpu().empty(x.shape(), DType::kBF16), g = gpu().empty(x.shape(), DType::kBF16);
    cpu().cast_into(x, c);
    gpu().cast_into(x.to(Device::kCuda), g);
    EXPECT_TRUE(bit_equal(g, c)) << s.rows << " x " << s.cols;
  }
}

TEST_F(BackendParity, Embedding) {
  for (const Size s : kSizes) {
    const int64_t V = s.cols / 2 + 3, H = s.cols;
    const Tensor table = input({V, H}, 2), tok = ids(s.rows, static_cast<int32_t>(V), 3), dy = input({s.rows, H}, 4);
    const Tensor yc = cpu().embedding_forward(tok, act(cpu(), table));
    const Tensor yg = gpu().embedding_forward(tok.to(Device::kCuda), act(gpu(), table));
    EXPECT_TRUE(bit_equal(host(yg), yc)) << "rows are copies";
    Tensor dc = input({V, H}, 5), dg = f32(gpu(), dc);
    cpu().embedding_backward(tok, act(cpu(), dy), dc);
    gpu().embedding_backward(tok.to(Device::kCuda), act(gpu(), dy), dg);
    EXPECT_TRUE(bit_equal(host(dg), dc)) << "repeated ids add in token order on both";
  }
}

TEST_F(BackendParity, RmsNorm) {
  for (const Size s : kSizes) {
    const Tensor x = input({s.rows, s.cols}, 6), w = input({s.cols}, 7, 0.5f, 1.5f), dy = input({s.rows, s.cols}, 8);
    Tensor rc, rg;
    const Tensor yc = cpu().rmsnorm_forward(act(cpu(), x), act(cpu(), w), 1e-6f, &rc);
    const Tensor yg = gpu().rmsnorm_forward(act(gpu(), x), act(gpu(), w), 1e-6f, &rg);
    EXPECT_TRUE(close(host(yg), yc, kBackendBF16)) << "y";
    EXPECT_TRUE(close(host(rg), rc, testing::kF32Op)) << "rstd";
    Tensor dxc = cpu().empty(x.shape(), DType::kF32), dxg = gpu().empty(x.shape(), DType::kBF16);
    Tensor dwc = input({s.cols}, 9), dwg = f32(gpu(), dwc);
    cpu().rmsnorm_backward(act(cpu(), dy), act(cpu(), x), act(cpu(), w), rc, dxc, dwc);
    gpu().rmsnorm_backward(act(gpu(), dy), act(gpu(), x), act(gpu(), w), rg, dxg, dwg);
    EXPECT_TRUE(close(host(dxg), dxc, kBackendBF16)) << "dx";
    EXPECT_TRUE(close(host(dwg), dwc, kF32Sum)) << "dw (accumulated)";
  }
}

TEST_F(BackendParity, LinearAndStackedLinear) {
  for (const Size s : kSizes) {
    const int64_t M = s.rows, K = s.cols, N = s.cols + 24, n0 = N / 3;
    const Tensor x = input({M, K}, 10), w = input({N, K}, 11, -0.2f, 0.2f), dy = input({M, N}, 12);
    EXPECT_TRUE(close(host(gpu().linear(act(gpu(), x), act(gpu(), w))), cpu().linear(act(cpu(), x), act(cpu(), w)),
                      kBackendBF16))
        << "linear y";
    Tensor dxc = cpu().empty({M, K}, DType::kF32), dxg = gpu().empty({M, K}, DType::kBF16);
    Tensor dwc = input({N, K}, 13), dwg = f32(gpu(), dwc);
    cpu().linear_backward(act(cpu(), dy), act(cpu(), x), act(cpu(), w), &dxc, &dwc);
    gpu().linear_backward(act(gpu(), dy), act(gpu(), x), act(gpu(), w), &dxg, &dwg);
    EXPECT_TRUE(close(host(dxg), dxc, kBackendBF16)) << "linear dx";
    EXPECT_TRUE(close(host(dwg), dwc, kF32Sum)) << "linear dw (accumulated)";

    // Stacked: the CPU runs two GEMMs, the CUDA backend one; the same function.
    EXPECT_TRUE(close(host(gpu().linear_stacked(act(gpu(), x), act(gpu(), w), n0)),
                      cpu().linear_stacked(act(cpu(), x), act(cpu(), w), n0), kBackendBF16))
        << "stacked y";
    Tensor sdxc = cpu().empty({M, K}, DType::kF32), sdxg = gpu().empty({M, K}, DType::kBF16);
    Tensor sdwc = input({N, K}, 14), sdwg = f32(gpu(), sdwc);
    cpu().linear_stacked_backward(act(cpu(), dy), act(cpu(), x), act(cpu(), w), n0, sdxc, sdwc);
    gpu().linear_stacked_backward(act(gpu(), dy), act(gpu(), x), act(gpu(), w), n0, sdxg, sdwg);
    EXPECT_TRUE(close(host(sdxg), sdxc, kBackendBF16)) << "stacked dx";
    EXPECT_TRUE(close(host(sdwg), sdwc, kF32Sum)) << "stacked dw (accumulated)";
  }
}

TEST_F(BackendParity, Rope) {
  for (const Size s : kSizes) {
    const int64_t h = 3, D = s.cols / 4 * 2;  // even head dim
    const Tensor x = input({s.rows, h, D}, 15);
    const Tensor pos = ids(s.rows, 4096, 16);
    Tensor xc = act(cpu(), x), xg = act(gpu(), x);
    cpu().rope_forward(xc, pos, 1e6);
    gpu().rope_forward(xg, pos.to(Device::kCuda), 1e6);
    EXPECT_TRUE(close(host(xg), xc, kBackendBF16)) << "forward";
    const Tensor dy = input({s.rows, h, D}, 28);
    Tensor dc = act(cpu(), dy), dg = act(gpu(), dy);
    cpu().rope_backward(dc, pos, 1e6);
    gpu().rope_backward(dg, pos.to(Device::kCuda), 1e6);
    EXPECT_TRUE(close(host(dg), dc, kBackendBF16)) << "backward";
  }
}

TEST_F(BackendParity, Attention) {
  struct Shape4 {
    int64_t B, S, Q, G, D;
  };
  for (const Shape4 a : {Shape4{2, 64, 4, 2, 64}, Shape4{1, 77, 4, 1, 128}}) {
    SCOPED_TRACE(::testing::Message() << "B " << a.B << " S " << a.S << " heads " << a.Q << "/" << a.G << " D " << a.D);
    const Tensor q = input({a.B, a.S, a.Q, a.D}, 17), k = input({a.B, a.S, a.G, a.D}, 18),
                 v = input({a.B, a.S, a.G, a.D}, 19), dout = input({a.B, a.S, a.Q, a.D}, 20);
    Tensor lc, lg;
    const Tensor oc = cpu().attention_forward(act(cpu(), q), act(cpu(), k), act(cpu(), v), lc, {});
    const Tensor og = gpu().attention_forward(act(gpu(), q), act(gpu(), k), act(gpu(), v), lg, {});
    EXPECT_TRUE(close(host(og), oc, kAttnTensorCoreVsSpec)) << "out";
    EXPECT_TRUE(close(host(lg), lc, kAttnLse)) << "lse";
    Tensor dqc, dkc, dvc, dqg, dkg, dvg;
    cpu().attention_backward(act(cpu(), dout), act(cpu(), q), act(cpu(), k), act(cpu(), v), oc, lc, dqc, dkc, dvc, {});
    gpu().attention_backward(act(gpu(), dout), act(gpu(), q), act(gpu(), k), act(gpu(), v), og, lg, dqg, dkg, dvg, {});
    EXPECT_TRUE(close(host(dqg), dqc, kAttnTensorCoreVsSpec)) << "dq";
    EXPECT_TRUE(close(host(dkg), dkc, kAttnTensorCoreVsSpec)) << "dk";
    EXPECT_TRUE(close(host(dvg), dvc, kAttnTensorCoreVsSpec)) << "dv";
    // One document per row spelled out is the same as none.
    std::vector<int64_t> rows;
    for (int64_t b = 0; b <= a.B; ++b) rows.push_back(b * a.S);
    Tensor lr;
    EXPECT_TRUE(bit_equal(gpu().attention_forward(act(gpu(), q), act(gpu(), k), act(gpu(), v), lr, rows), og));
    // Packed documents (at B = 2 one continues into the next row): both backends agree.
    const std::vector<int64_t> packed = {0, 1, 5, a.B * a.S / 2 + 3, a.B * a.S};
    Tensor lpc, lpg;
    const Tensor opc = cpu().attention_forward(act(cpu(), q), act(cpu(), k), act(cpu(), v), lpc, packed);
    const Tensor opg = gpu().attention_forward(act(gpu(), q), act(gpu(), k), act(gpu(), v), lpg, packed);
    EXPECT_TRUE(close(host(opg), opc, kAttnTensorCoreVsSpec)) << "packed out";
    EXPECT_TRUE(close(host(lpg), lpc, kAttnLse)) << "packed lse";
    Tensor pqc, pkc, pvc, pqg, pkg, pvg;
    cpu().attention_backward(act(cpu(), dout), act(cpu(), q), act(cpu(), k), act(cpu(), v), opc, lpc, pqc, pkc, pvc,
                             packed);
    gpu().attention_backward(act(gpu(), dout), act(gpu(), q), act(gpu(), k), act(gpu(), v), opg, lpg, pqg, pkg, pvg,
                             packed);
    EXPECT_TRUE(close(host(pqg), pqc, kAttnTensorCoreVsSpec)) << "packed dq";
    EXPECT_TRUE(close(host(pkg), pkc, kAttnTensorCoreVsSpec)) << "packed dk";
    EXPECT_TRUE(close(host(pvg), pvc, kAttnTensorCoreVsSpec)) << "packed dv";
  }
}

TEST_F(BackendParity, SwiGlu) {
  for (const Size s : kSizes) {
    const Tensor hh = input({s.rows, s.cols}, 21, -3.0f, 3.0f), da = input({s.rows, s.cols / 2}, 22);
    EXPECT_TRUE(close(host(gpu().swiglu_forward(act(gpu(), hh))), cpu().swiglu_forward(act(cpu(), hh)), kBackendBF16))
        << "forward";
    EXPECT_TRUE(close(host(gpu().swiglu_backward(act(gpu(), hh), act(gpu(), da))),
                      cpu().swiglu_backward(act(cpu(), hh), act(cpu(), da)), kBackendBF16))
        << "backward";
  }
}

TEST_F(BackendParity, AddIntoRoundsOnce) {
  for (const Size s : kSizes) {
    const Tensor d = input({s.rows, s.cols}, 23), a = input({s.rows, s.cols}, 24), b = input({s.rows, s.cols}, 25);
    Tensor dc = act(cpu(), d), dg = act(gpu(), d);
    cpu().add_into(dc, act(cpu(), a), act(cpu(), b));
    gpu().add_into(dg, act(gpu(), a), act(gpu(), b));
    // The CUDA backend adds in f32 and stores once: exactly the CPU's f32 sum rounded to bf16.
    Tensor expected = dc.to(DType::kBF16);
    EXPECT_TRUE(bit_equal(dg.to(Device::kCpu), expected));
    Tensor dg2 = act(gpu(), d), dc2 = act(cpu(), d);
    cpu().add_into(dc2, act(cpu(), a));
    gpu().add_into(dg2, act(gpu(), a));
    EXPECT_TRUE(bit_equal(dg2.to(Device::kCpu), dc2.to(DType::kBF16))) << "one addend";
  }
}

TEST_F(BackendParity, CrossEntropy) {
  for (const Size s : kSizes) {
    const int64_t V = s.cols * 3 + 5;
    const Tensor logits = input({s.rows, V}, 26, -4.0f, 4.0f);
    std::vector<int32_t> t = ids(s.rows, static_cast<int32_t>(V), 27).to_vector<int32_t>();
    t[1] = -100;  // ignored rows: zero loss and gradient on both
    const Tensor targets = Tensor::from_vector<int32_t>(t, {s.rows});
    double lc = 0.25, lg = 0.25;  // adds to what is there
    Tensor dc = act(cpu(), logits), dg = act(gpu(), logits);
    cpu().cross_entropy(dc, targets, &dc, 0.5f, lc);  // dlogits in place of the logits
    gpu().cross_entropy(dg, targets.to(Device::kCuda), &dg, 0.5f, lg);
    EXPECT_NEAR(lg, lc, 1e-5 * std::fabs(lc)) << "loss sum";
    EXPECT_TRUE(close(host(dg), dc, kBackendBF16)) << "dlogits";
    EXPECT_GE(gpu().logit_chunk_rows(V), 1);
    EXPECT_GE(cpu().logit_chunk_rows(V), 1);
  }
}

TEST_F(BackendParity, OptimizerOps) {
  for (const Size s : kSizes) {
    const Shape sh{s.rows, s.cols};
    const Tensor g = testing::random_tensor(sh, 31, 1);  // full f32 values: the optimizer never rounds
    // Both sum in double, in orders of their own (each fixed by numel).
    const double ssq = cpu().sum_of_squares(g);
    EXPECT_NEAR(gpu().sum_of_squares(f32(gpu(), g)), ssq, 1e-12 * ssq) << "sum of squares";
    // Batched: the same bits as one at a time, on both backends (an empty tensor sums to 0).
    const Tensor g_dev = f32(gpu(), g), empty_dev = gpu().empty({0}, DType::kF32);
    const std::vector<Tensor> dev{g_dev, empty_dev, g_dev.view({-1}).slice(0, 1, g_dev.numel())};
    const std::vector<double> many = gpu().sums_of_squares(dev);
    ASSERT_EQ(many.size(), 3u);
    EXPECT_EQ(many[0], gpu().sum_of_squares(g_dev));
    EXPECT_EQ(many[1], 0.0);
    EXPECT_EQ(many[2], gpu().sum_of_squares(dev[2]));
    const std::vector<Tensor> host{g};
    EXPECT_EQ(cpu().sums_of_squares(host)[0], ssq);
    const Tensor g_gpu = f32(gpu(), g);
    Tensor gc = g.clone(), gg = f32(gpu(), g);
    cpu().scale(gc, 0.37f);
    gpu().scale(gg, 0.37f);
    EXPECT_TRUE(bit_equal(gg, gc)) << "scale";

    // AdamW with f32 moments and with bf16 moments (optim.state_dtype).
    for (const DType moments : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(::testing::Message() << "moments " << dtype_name(moments));
      Tensor wc = testing::random_tensor(sh, 31, 2), mc = testing::random_tensor(sh, 31, 3, -0.1f, 0.1f).to(moments),
             vc = testing::random_tensor(sh, 31, 4, 0.0f, 0.01f).to(moments);
      Tensor wg = f32(gpu(), wc), mg = gpu().to_device(mc), vg = gpu().to_device(vc);
      Tensor workc = cpu().empty(sh, cpu().compute_dtype()), workg = gpu().empty(sh, gpu().compute_dtype());
      backend::AdamWHyper hyper;
      hyper.lr = 3e-4;
      hyper.weight_decay = 0.1;
      for (int64_t step = 1; step <= 3; ++step) {
        hyper.step = step;
        cpu().adamw_step(wc, g, mc, vc, hyper, &workc);
        gpu().adamw_step(wg, g_gpu, mg, vg, hyper, &workg);
      }
      EXPECT_TRUE(bit_equal(wg, wc)) << "AdamW master weights";
      EXPECT_TRUE(bit_equal(mg, mc)) << "AdamW first moment";
      EXPECT_TRUE(bit_equal(vg, vc)) << "AdamW second moment";
      EXPECT_TRUE(bit_equal(workg, wc.to(DType::kBF16))) << "working copy = bf16(master)";
    }
  }
}

// The MoE layer each backend builds (make_moe_layer, bound to views as the model binds them), at the
// one-process layout; the other layouts are tests/moe/cuda_moe_test.cpp. The router reads the same
// bf16-exact inputs on both sides, so the logits differ only in f32 summation order and the routing
// is the same (checked through the expert counts).
TEST_F(BackendParity, MoeLayer) {
  comm::Mesh mesh(testing::world(), 1, 1);
  struct MoeCase {
    int64_t N, H, E, K, I;
  };
  for (const MoeCase c : {MoeCase{64, 64, 8, 2, 32}, MoeCase{37, 40, 6, 3, 24}}) {
    SCOPED_TRACE(::testing::Message() << "N " << c.N << " H " << c.H << " E " << c.E << " K " << c.K << " I " << c.I);
    const moe::MoeConfig cfg{c.H, c.E, c.K, c.I, true, DispatcherKind::kLocal};
    const Tensor x = input({c.N, c.H}, 40), dout = input({c.N, c.H}, 41);
    const Tensor wg = input({c.E, c.H}, 42), w13 = input({c.E, 2 * c.I, c.H}, 43, -0.2f, 0.2f),
                 w2 = input({c.E, c.H, c.I}, 44, -0.2f, 0.2f), d_probs = input({c.N, c.E}, 45, -0.1f, 0.1f);
    struct Run {
      Tensor out, dx, dwg, dw13, dw2;
      moe::RoutingStats stats;
    };
    auto run = [&](Backend& b) {
      moe::MoeLayerOptions opts;
      opts.mesh = &mesh;
      std::unique_ptr<moe::MoeLayer> layer = b.make_moe_layer(cfg, opts);
      EXPECT_EQ(layer->num_local_experts(), c.E);
      EXPECT_EQ(layer->local_intermediate(), c.I);
      const moe::MoeParams work{act(b, wg), act(b, w13), act(b, w2)};
      moe::MoeParams grads{b.zeros(wg.shape(), DType::kF32), b.zeros(w13.shape(), DType::kF32),
                           b.zeros(w2.shape(), DType::kF32)};
      layer->bind(work, grads);
      layer->zero_grads();
      Run r;
      r.out = host(layer->forward(act(b, x)));
      r.stats = layer->routing_stats();
      r.dx = host(layer->backward(act(b, dout), f32(b, d_probs)));
      layer->materialize_grads();
      r.dwg = host(grads.wg_EH);
      r.dw13 = host(grads.w13_L2iH);
      r.dw2 = host(grads.w2_LHi);
      return r;
    };
    const Run rc = run(cpu()), rg = run(gpu());
    ASSERT_EQ(rg.stats.counts_E, rc.stats.counts_E) << "routing differs";
    for (int64_t e = 0; e < c.E; ++e) {
      EXPECT_NEAR(rg.stats.prob_sums_E[e], rc.stats.prob_sums_E[e], 1e-4 * c.N) << "probability sum of expert " << e;
    }
    for (const auto& [name, a, b] : {std::tuple{"out", rg.out, rc.out}, std::tuple{"dx", rg.dx, rc.dx},
                                     std::tuple{"dwg", rg.dwg, rc.dwg}, std::tuple{"dw13", rg.dw13, rc.dw13},
                                     std::tuple{"dw2", rg.dw2, rc.dw2}}) {
      const std::vector<float> va = a.to_vector<float>(), vb = b.to_vector<float>();
      double num = 0, den = 0;
      for (size_t i = 0; i < va.size(); ++i) {
        num += (static_cast<double>(va[i]) - vb[i]) * (static_cast<double>(va[i]) - vb[i]);
        den += static_cast<double>(vb[i]) * vb[i];
      }
      ASSERT_GT(den, 0) << name << ": the reference is zero";
      EXPECT_LE(std::sqrt(num / den), testing::kMoeGlobalRel) << name << " (relative L2)";
    }
  }
}

}  // namespace
}  // namespace moetp
