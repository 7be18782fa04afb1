// The CUDA ops of kernels/cuda/ops.h against their CPU references (kernels/cpu/*, moe/row_ops.h,
// cpu::adamw_step) on random inputs. Inputs are rounded to bf16 first, so both sides see the same values;
// the CPU reference then computes in f32/double from those values.
//
// Tolerances (testing.h's table):
//   kBF16      bf16 outputs of O(1) values (bf16 rounding alone is 2^-9 relative)
//   kBF16Rel   bf16 outputs with no cancellation but small magnitudes (softmax gradients):
//              1% of each element, no absolute floor to hide behind
//   kF32Op     f32 outputs of f32 math with short reductions (expf vs glibc exp, f32 vs double
//              intermediates): 1e-5 relative
//   kF32Sum    f32 outputs of long f32 reductions with cancellation (RMSNorm dw): 1e-4 relative,
//              or 1e-5 of the tensor's largest element
//   bit-exact  row movement, embedding, scatter-add/fold (same order of the same f32 operations),
//              AdamW (same formula, no FMA contraction on either side), router top-k indices
// Guard rows: outputs the caller passes are views of a tensor with one more row filled with a byte
// pattern; the test checks the pattern survives.
// Label `cuda`: skips with a message where no GPU is visible.
#include "kernels/cuda/ops.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/experts.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/router.h"
#include "kernels/cuda/runtime.h"
#include "moe/row_ops.h"
#include "testing.h"
#include "kernels/cpu/optim.h"

namespace moetp {
namespace {

using testing::bit_equal;
using testing::close;
using testing::kBF16;
using testing::random_tensor;
using testing::Tolerance;

using testing::kBF16Rel;
using testing::kF32Op;
using testing::kF32Sum;

constexpr unsigned char kGuardByte = 0x5a;

// ---- helpers ------------------------------------------------------------------------------------

Tensor rounded(const Tensor& f32) { return f32.to(DType::kBF16).to(DType::kF32); }
Tensor gpu(const Tensor& t) { return t.to(Device::kCuda); }
Tensor gpu_bf16(const Tensor& f32) { return f32.to(DType::kBF16).to(Device::kCuda); }
Tensor host(const Tensor& t) { return t.to(Device::kCpu); }
Tensor host_f32(const Tensor& t) {
  Tensor c = t.to(Device::kCpu);
  return c.dtype() == DType::kF32 ? c : c.to(DType::kF32);
}

Tensor i32_tensor(const std::vector<int32_t>& v) {
  return Tensor::from_vector<int32_t>(v, {static_cast<int64_t>(v.size())});
}
Tensor i64_tensor(const std::vector<int64_t>& v) {
  return Tensor::from_vector<int64_t>(v, {static_cast<int64_t>(v.size())});
}

// Random integers in [lo, hi] (as f32), never 0, for exact sums.
Tensor random_ints(Shape shape, uint64_t seed, int lo, int hi) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  Tensor t = Tensor::empty(std::move(shape), DType::kF32);
  for (int64_t i = 0; i < t.numel(); ++i) {
    int v = 0;
    while (v == 0) v = dist(rng);
    t.data<float>()[i] = static_cast<float>(v);
  }
  return t;
}

std::vector<int64_t> random_indices(int64_t n, int64_t limit, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> dist(0, limit - 1);
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t& x : v) x = dist(rng);
  return v;
}

// A GPU copy of `t` (CPU) with one extra row of kGuardByte appended: `full` owns it, `view` is the
// first t.rows() rows (contiguous, the tensor to hand to the op).
struct Guarded {
  Tensor full;
  Tensor view;
};
Guarded guarded(const Tensor& t) {
  Shape shape = t.shape();
  shape[0] += 1;
  Tensor c = Tensor::empty(shape, t.dtype());
  const size_t row_bytes = static_cast<size_t>(t.row_numel()) * t.element_size();
  std::memcpy(c.raw_data(), t.contiguous().raw_data(), t.num_bytes());
  std::memset(static_cast<char*>(c.raw_data()) + t.num_bytes(), kGuardByte, row_bytes);
  Guarded g;
  g.full = gpu(c);
  g.view = g.full.narrow_rows(0, t.rows());
  return g;
}

::testing::AssertionResult guard_intact(const Guarded& g) {
  Tensor c = host(g.full);
  const size_t row_bytes = static_cast<size_t>(c.row_numel()) * c.element_size();
  const auto* p = static_cast<const unsigned char*>(c.raw_data()) + (c.num_bytes() - row_bytes);
  for (size_t i = 0; i < row_bytes; ++i) {
    if (p[i] != kGuardByte) return ::testing::AssertionFailure() << "guard row overwritten at byte " << i;
  }
  return ::testing::AssertionSuccess();
}

// Runs `op`, expecting the next check_index_faults() to throw a message containing `needle`.
template <typename Op>
void expect_fault(Op op, const std::string& needle) {
  op();
  try {
    cuda::check_index_faults();
    ADD_FAILURE() << "expected an index fault containing \"" << needle << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
    ready_ = true;
  }
  void TearDown() override {
    if (!ready_) return;
    try {
      cuda::check_index_faults();
    } catch (const Error& e) {
      ADD_FAILURE() << "unexpected index fault: " << e.what();
    }
  }
  bool ready_ = false;
};

class CudaEmbedding : public CudaOps {};
class CudaRmsNorm : public CudaOps {};
class CudaRope : public CudaOps {};
class CudaSwiglu : public CudaOps {};
class CudaRouter : public CudaOps {};
class CudaRowOps : public CudaOps {};
class CudaCrossEntropy : public CudaOps {};
class CudaAdamW : public CudaOps {};

// ---- embedding ----------------------------------------------------------------------------------

TEST_F(CudaEmbedding, ForwardCopiesRowsBitExactly) {
  struct Case {
    int64_t N, V, H;
  };
  // H = 33: 66-byte rows (2-byte copies); H = 64: 16-byte copies; H = 1: smallest.
  for (const Case c : {Case{7, 1000, 33}, Case{7, 1000, 64}, Case{1, 1, 1}, Case{300, 50, 2048}}) {
    const Tensor table = rounded(random_tensor({c.V, c.H}, 1, 1));
    std::vector<int64_t> idx = random_indices(c.N, c.V, 2);
    idx[0] = c.V - 1;
    std::vector<int32_t> ids(idx.begin(), idx.end());
    const Tensor expected = cpu::embedding_forward(i32_tensor(ids), table).to(DType::kBF16);
    const Tensor y = cuda::embedding_forward(gpu(i32_tensor(ids)), gpu_bf16(table));
    EXPECT_TRUE(bit_equal(y, expected)) << "N=" << c.N << " V=" << c.V << " H=" << c.H;
  }
}

TEST_F(CudaEmbedding, ForwardEmpty) {
  const Tensor y = cuda::embedding_forward(gpu(i32_tensor({})), gpu_bf16(random_tensor({10, 33}, 1, 1)));
  EXPECT_EQ(y.shape(), (Shape{0, 33}));
}

TEST_F(CudaEmbedding, BackwardMatchesCpuBitExactly) {
  struct Case {
    int64_t N, V, H;
  };
  for (const Case c : {Case{7, 1000, 33}, Case{4096, 50, 64}, Case{1, 1, 1}}) {
    const Tensor dy = rounded(random_tensor({c.N, c.H}, 3, 1));
    std::vector<int64_t> idx = random_indices(c.N, c.V, 4);
    if (c.N >= 7) {  // repeated ids, in scattered positions
      idx[0] = idx[2] = idx[5] = c.V - 1;
      idx[1] = idx[6] = 0;
    }
    std::vector<int32_t> ids(idx.begin(), idx.end());
    Tensor expected = random_tensor({c.V, c.H}, 5, 1);
    Guarded dtable = guarded(expected);
    cpu::embedding_backward(i32_tensor(ids), dy, expected);
    cuda::embedding_backward(gpu(i32_tensor(ids)), gpu_bf16(dy), dtable.view);
    EXPECT_TRUE(bit_equal(dtable.view, expected)) << "N=" << c.N << " V=" << c.V << " H=" << c.H;
    EXPECT_TRUE(guard_intact(dtable));
  }
}

TEST_F(CudaEmbedding, BackwardEmptyLeavesTableUntouched) {
  const Tensor init = random_tensor({10, 33}, 5, 1);
  Guarded dtable = guarded(init);
  cuda::embedding_backward(gpu(i32_tensor({})), gpu_bf16(Tensor::empty({0, 33}, DType::kF32)), dtable.view);
  EXPECT_TRUE(bit_equal(dtable.view, init));
}

TEST_F(CudaEmbedding, BadIdIsReportedAndSkipped) {
  const Tensor table = rounded(random_tensor({10, 33}, 1, 1));
  Tensor y;
  expect_fault([&] { y = cuda::embedding_forward(gpu(i32_tensor({1, 2, 10, 3})), gpu_bf16(table)); },
               "embedding_forward: token id 10 at position 2 is not in [0, 10)");
  const std::vector<float> row2 = host_f32(y).to_vector<float>();
  for (int64_t c = 0; c < 33; ++c) EXPECT_EQ(row2[2 * 33 + c], 0.0f);

  const Tensor init = random_tensor({10, 33}, 5, 1);
  Guarded dtable = guarded(init);
  expect_fault([&] { cuda::embedding_backward(gpu(i32_tensor({-1})), gpu_bf16(table.narrow_rows(0, 1)), dtable.view); },
               "embedding_backward: token id -1 at position 0");
  EXPECT_TRUE(bit_equal(dtable.view, init));
}

// ---- RMSNorm ------------------------------------------------------------------------------------

struct NormCase {
  int64_t R, D;
};
const NormCase kNormCases[] = {{7, 33}, {1, 1}, {64, 128}, {5, 2048}, {300, 96}};

TEST_F(CudaRmsNorm, ForwardMatchesCpu) {
  for (const NormCase c : kNormCases) {
    const Tensor x = rounded(random_tensor({c.R, c.D}, 11, 1, -2.0f, 2.0f));
    const Tensor w = rounded(random_tensor({c.D}, 11, 2, 0.5f, 1.5f));
    Tensor rstd_ref;
    const Tensor y_ref = cpu::rmsnorm_forward(x, w, 1e-6f, &rstd_ref);
    Tensor rstd;
    const Tensor y = cuda::rmsnorm_forward(gpu_bf16(x), gpu_bf16(w), 1e-6f, &rstd);
    EXPECT_TRUE(close(y, y_ref, kBF16)) << "R=" << c.R << " D=" << c.D;
    EXPECT_TRUE(close(rstd, rstd_ref, kF32Op)) << "R=" << c.R << " D=" << c.D;
    const Tensor y_no_rstd = cuda::rmsnorm_forward(gpu_bf16(x), gpu_bf16(w), 1e-6f, nullptr);
    EXPECT_TRUE(bit_equal(y_no_rstd, y));
  }
}

TEST_F(CudaRmsNorm, BackwardMatchesCpu) {
  for (const NormCase c : kNormCases) {
    const Tensor x = rounded(random_tensor({c.R, c.D}, 12, 1, -2.0f, 2.0f));
    const Tensor w = rounded(random_tensor({c.D}, 12, 2, 0.5f, 1.5f));
    const Tensor dy = rounded(random_tensor({c.R, c.D}, 12, 3));
    Tensor rstd;
    cpu::rmsnorm_forward(x, w, 1e-6f, &rstd);
    Tensor dx_ref;
    Tensor dw_ref = random_tensor({c.D}, 12, 4);
    Guarded dw = guarded(dw_ref);
    Guarded dx = guarded(Tensor::zeros({c.R, c.D}, DType::kBF16));
    cpu::rmsnorm_backward(dy, x, w, rstd, dx_ref, dw_ref);
    cuda::rmsnorm_backward(gpu_bf16(dy), gpu_bf16(x), gpu_bf16(w), gpu(rstd), dx.view, dw.view);
    EXPECT_TRUE(close(dx.view, dx_ref, kBF16)) << "R=" << c.R << " D=" << c.D;
    EXPECT_TRUE(close(dw.view, dw_ref, kF32Sum)) << "R=" << c.R << " D=" << c.D;
    EXPECT_TRUE(guard_intact(dx));
    EXPECT_TRUE(guard_intact(dw));
    // dx allocated when undefined; deterministic dw.
    Tensor dx2;
    Tensor dw2 = gpu(random_tensor({c.D}, 12, 4));
    cuda::rmsnorm_backward(gpu_bf16(dy), gpu_bf16(x), gpu_bf16(w), gpu(rstd), dx2, dw2);
    EXPECT_TRUE(bit_equal(dx2, dx.view));
    EXPECT_TRUE(bit_equal(dw2, dw.view));
  }
}

TEST_F(CudaRmsNorm, EmptyRows) {
  const Tensor w = rounded(random_tensor({33}, 13, 1));
  Tensor rstd;
  const Tensor y = cuda::rmsnorm_forward(gpu_bf16(Tensor::empty({0, 33}, DType::kF32)), gpu_bf16(w), 1e-6f, &rstd);
  EXPECT_EQ(y.shape(), (Shape{0, 33}));
  EXPECT_EQ(rstd.shape(), (Shape{0}));
  const Tensor init = random_tensor({33}, 13, 2);
  Tensor dw = gpu(init);
  Tensor dx;
  const Tensor empty = gpu_bf16(Tensor::empty({0, 33}, DType::kF32));
  cuda::rmsnorm_backward(empty, empty, gpu_bf16(w), rstd, dx, dw);
  EXPECT_TRUE(bit_equal(dw, init));
  EXPECT_EQ(dx.shape(), (Shape{0, 33}));
}

TEST_F(CudaRmsNorm, RejectsMismatchedWeight) {
  const Tensor x = gpu_bf16(random_tensor({4, 8}, 1, 1));
  const Tensor w = gpu_bf16(random_tensor({7}, 1, 2));
  EXPECT_THROW(cuda::rmsnorm_forward(x, w, 1e-6f, nullptr), Error);
  EXPECT_THROW(cuda::rmsnorm_forward(x.to(Device::kCpu), w, 1e-6f, nullptr), Error);
}

// ---- RoPE ---------------------------------------------------------------------------------------

struct RopeCase {
  int64_t N, h, D;
  double theta;
};
const RopeCase kRopeCases[] = {{7, 3, 64, 1e6}, {33, 4, 128, 1e6}, {5, 1, 2, 1e4}, {16, 2, 256, 1e4}};

std::vector<int32_t> rope_positions(int64_t N, uint64_t seed) {
  std::vector<int64_t> p = random_indices(N, 40000, seed);
  std::vector<int32_t> pos(p.begin(), p.end());
  pos[0] = 0;
  if (N > 1) pos[1] = 32767;
  return pos;
}

TEST_F(CudaRope, ForwardAndBackwardMatchCpu) {
  for (const RopeCase c : kRopeCases) {
    const Tensor x = rounded(random_tensor({c.N, c.h, c.D}, 21, 1));
    const Tensor positions = i32_tensor(rope_positions(c.N, 22));
    for (const bool forward : {true, false}) {
      Tensor ref = x.clone();
      Guarded out = guarded(x.to(DType::kBF16));
      if (forward) {
        cpu::rope_forward(ref, positions, c.theta);
        cuda::rope_forward(out.view, gpu(positions), c.theta);
      } else {
        cpu::rope_backward(ref, positions, c.theta);
        cuda::rope_backward(out.view, gpu(positions), c.theta);
      }
      EXPECT_TRUE(close(out.view, ref, kBF16)) << (forward ? "forward" : "backward") << " N=" << c.N << " h=" << c.h
                                               << " D=" << c.D;
      EXPECT_TRUE(guard_intact(out));
    }
  }
}

TEST_F(CudaRope, BackwardUndoesForward) {
  const Tensor x = rounded(random_tensor({7, 3, 64}, 23, 1));
  const Tensor positions = gpu(i32_tensor(rope_positions(7, 24)));
  Tensor y = gpu_bf16(x);
  cuda::rope_forward(y, positions, 1e6);
  cuda::rope_backward(y, positions, 1e6);
  // Two bf16 roundings, each up to half an ulp of the pair's larger element (|x| < 1, so a pair is
  // below 2 and an ulp at most 2^-7): absolute 1e-2 below 0.5, 2% above.
  EXPECT_TRUE(close(y, x, Tolerance{2e-2, 0.5}));
}

TEST_F(CudaRope, NegativePositionIsReportedAndSkipped) {
  const Tensor x = random_tensor({3, 2, 8}, 25, 1);
  Tensor y = gpu_bf16(x);
  expect_fault([&] { cuda::rope_forward(y, gpu(i32_tensor({0, -5, 3})), 1e4); }, "rope: position -5 at token 1");
  EXPECT_TRUE(bit_equal(y.narrow_rows(1, 1), x.to(DType::kBF16).narrow_rows(1, 1)));
}

TEST_F(CudaRope, EmptyAndOddHeadDim) {
  Tensor empty = gpu_bf16(Tensor::empty({0, 4, 64}, DType::kF32));
  cuda::rope_forward(empty, gpu(i32_tensor({})), 1e6);
  Tensor odd = gpu_bf16(random_tensor({2, 1, 5}, 1, 1));
  EXPECT_THROW(cuda::rope_forward(odd, gpu(i32_tensor({0, 1})), 1e6), Error);
}

// ---- SwiGLU -------------------------------------------------------------------------------------

struct SwigluCase {
  int64_t M, i;
};
const SwigluCase kSwigluCases[] = {{7, 33}, {1, 1}, {300, 96}, {64, 768}};

TEST_F(CudaSwiglu, ForwardMatchesCpu) {
  for (const SwigluCase c : kSwigluCases) {
    const Tensor h = rounded(random_tensor({c.M, 2 * c.i}, 31, 1, -3.0f, 3.0f));
    const Tensor a = cuda::swiglu_forward(gpu_bf16(h));
    EXPECT_TRUE(close(a, cpu::swiglu_forward(h), kBF16)) << "M=" << c.M << " i=" << c.i;
  }
}

TEST_F(CudaSwiglu, BackwardMatchesCpu) {
  for (const SwigluCase c : kSwigluCases) {
    const Tensor h = rounded(random_tensor({c.M, 2 * c.i}, 32, 1, -3.0f, 3.0f));
    const Tensor da = rounded(random_tensor({c.M, c.i}, 32, 2));
    const Tensor dh = cuda::swiglu_backward(gpu_bf16(h), gpu_bf16(da));
    EXPECT_TRUE(close(dh, cpu::swiglu_backward(h, da), kBF16)) << "M=" << c.M << " i=" << c.i;
  }
}

TEST_F(CudaSwiglu, EmptyRows) {
  const Tensor h = gpu_bf16(Tensor::empty({0, 66}, DType::kF32));
  EXPECT_EQ(cuda::swiglu_forward(h).shape(), (Shape{0, 33}));
  EXPECT_EQ(cuda::swiglu_backward(h, gpu_bf16(Tensor::empty({0, 33}, DType::kF32))).shape(), (Shape{0, 66}));
}

// ---- router -------------------------------------------------------------------------------------

// Logits with distinct, well separated values per token (a random permutation of an even grid), so
// the top-k order cannot depend on rounding.
Tensor distinct_logits(int64_t N, int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const double spacing = std::min(0.05, 16.0 / static_cast<double>(E));
  Tensor t = Tensor::empty({N, E}, DType::kF32);
  std::vector<int64_t> perm(static_cast<size_t>(E));
  for (int64_t n = 0; n < N; ++n) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t e = 0; e < E; ++e) {
      t.data<float>()[n * E + e] = static_cast<float>(spacing * (static_cast<double>(perm[e]) - E / 2.0));
    }
  }
  return t;
}

// cpu::router_forward on given logits: x = logits, wg = identity (the GEMM is exact).
cpu::RouterForward cpu_router(const Tensor& logits_NE, int64_t K, bool norm) {
  const int64_t E = logits_NE.size(1);
  Tensor eye = Tensor::zeros({E, E}, DType::kF32);
  for (int64_t e = 0; e < E; ++e) eye.data<float>()[e * E + e] = 1.0f;
  cpu::RouterForward fwd = cpu::router_forward(logits_NE, eye, K, norm);
  EXPECT_TRUE(bit_equal(fwd.logits_NE, logits_NE));
  return fwd;
}

struct RouterCase {
  int64_t N, E, K;
};
const RouterCase kRouterCases[] = {{7, 128, 8}, {257, 128, 8}, {5, 60, 4}, {3, 1, 1}, {4, 33, 33}, {9, 1024, 8}};

TEST_F(CudaRouter, ForwardMatchesCpu) {
  for (const RouterCase c : kRouterCases) {
    for (const bool norm : {true, false}) {
      const Tensor logits = distinct_logits(c.N, c.E, 41);
      const cpu::RouterForward ref = cpu_router(logits, c.K, norm);
      const cuda::RouterOutput out = cuda::router_forward(gpu(logits), c.K, norm);
      const std::string where = "N=" + std::to_string(c.N) + " E=" + std::to_string(c.E) +
                                " K=" + std::to_string(c.K) + " norm=" + std::to_string(norm);
      EXPECT_TRUE(bit_equal(out.topk_idx_NK, ref.topk_idx_NK)) << where;
      EXPECT_TRUE(close(out.probs_NE, ref.probs_NE, kF32Op)) << where;
      EXPECT_TRUE(close(out.topk_weight_NK, ref.topk_weight_NK, kF32Op)) << where;
    }
  }
}

TEST_F(CudaRouter, TiesGoToTheLowerExpertId) {
  // Token 0: all equal -> experts 0, 1, 2. Token 1: experts 5 and 2 tie for first -> 2, 5, then 0.
  std::vector<float> l(16, 0.0f);
  l[8 + 5] = 1.0f;
  l[8 + 2] = 1.0f;
  const Tensor logits = Tensor::from_vector<float>(l, {2, 8});
  const cuda::RouterOutput out = cuda::router_forward(gpu(logits), 3, true);
  EXPECT_EQ(host(out.topk_idx_NK).to_vector<int32_t>(), (std::vector<int32_t>{0, 1, 2, 2, 5, 0}));
  EXPECT_TRUE(bit_equal(out.topk_idx_NK, cpu_router(logits, 3, true).topk_idx_NK));
}

TEST_F(CudaRouter, LogitsGradMatchesCpu) {
  for (const RouterCase c : kRouterCases) {
    for (const bool norm : {true, false}) {
      for (const int grads : {1, 2, 3}) {  // 1: d_topk only, 2: d_probs only, 3: both
        const Tensor logits = distinct_logits(c.N, c.E, 42);
        const cpu::RouterForward ref_fwd = cpu_router(logits, c.K, norm);
        const Tensor d_topk = (grads & 1) ? random_tensor({c.N, c.K}, 43, 1) : Tensor();
        const Tensor d_probs = (grads & 2) ? random_tensor({c.N, c.E}, 43, 2) : Tensor();
        const Tensor ref = cpu::router_logits_grad(ref_fwd, norm, d_topk, d_probs);
        cuda::RouterOutput fwd{gpu(ref_fwd.probs_NE), gpu(ref_fwd.topk_idx_NK), gpu(ref_fwd.topk_weight_NK)};
        const Tensor dl = cuda::router_logits_grad(fwd, norm, d_topk.defined() ? gpu(d_topk) : Tensor(),
                                                   d_probs.defined() ? gpu(d_probs) : Tensor());
        const std::string where = "N=" + std::to_string(c.N) + " E=" + std::to_string(c.E) + " K=" +
                                  std::to_string(c.K) + " norm=" + std::to_string(norm) +
                                  " grads=" + std::to_string(grads);
        if (c.E == 1) {  // softmax over one expert has zero gradient
          EXPECT_TRUE(bit_equal(dl, Tensor::zeros({c.N, 1}, DType::kF32))) << where;
          continue;
        }
        if (c.K == c.E && norm && grads == 1) {
          // Renormalising all E probabilities gives weights independent of the logits: the reference
          // is zero up to rounding. Compare absolutely.
          const std::vector<float> a = host(dl).to_vector<float>(), b = ref.to_vector<float>();
          for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-6) << where << " at " << i;
          continue;
        }
        EXPECT_TRUE(close(dl, ref, Tolerance{1e-5, 1e-7, 1e-4})) << where;
      }
    }
  }
}

TEST_F(CudaRouter, NoGradientGivesZeros) {
  const Tensor logits = distinct_logits(7, 128, 44);
  const cuda::RouterOutput fwd = cuda::router_forward(gpu(logits), 8, true);
  const Tensor dl = cuda::router_logits_grad(fwd, true, Tensor(), Tensor());
  EXPECT_TRUE(bit_equal(dl, Tensor::zeros({7, 128}, DType::kF32)));
}

TEST_F(CudaRouter, EmptyAndBadK) {
  const cuda::RouterOutput out = cuda::router_forward(gpu(Tensor::empty({0, 128}, DType::kF32)), 8, true);
  EXPECT_EQ(out.topk_idx_NK.shape(), (Shape{0, 8}));
  EXPECT_EQ(cuda::router_logits_grad(out, true, Tensor(), Tensor()).shape(), (Shape{0, 128}));
  EXPECT_THROW(cuda::router_forward(gpu(distinct_logits(2, 8, 1)), 9, true), Error);
  EXPECT_THROW(cuda::router_forward(gpu(distinct_logits(2, 1025, 1)), 8, true), Error);
}

// ---- row movement -------------------------------------------------------------------------------

TEST_F(CudaRowOps, GatherIsBitExact) {
  struct Case {
    int64_t R, H;
    DType dtype;
  };
  for (const Case c : {Case{10, 33, DType::kBF16}, Case{10, 64, DType::kBF16}, Case{7, 1, DType::kF32},
                       Case{7, 33, DType::kF32}, Case{1, 2048, DType::kBF16}}) {
    Tensor src = random_tensor({c.R, c.H}, 51, 1).to(c.dtype);
    std::vector<int64_t> rows = random_indices(12, c.R, 52);
    rows[3] = c.R - 1;
    rows[4] = 0;
    rows[5] = rows[4];
    const Tensor expected = moe::gather_rows(src, rows);
    const Tensor out = cuda::gather_rows(gpu(src), gpu(i64_tensor(rows)));
    EXPECT_TRUE(bit_equal(out, expected)) << "R=" << c.R << " H=" << c.H;
  }
  const Tensor empty = cuda::gather_rows(gpu(random_tensor({5, 33}, 1, 1)), gpu(i64_tensor({})));
  EXPECT_EQ(empty.shape(), (Shape{0, 33}));
}

TEST_F(CudaRowOps, GatherBadRowIsReportedAndZeroed) {
  const Tensor src = random_tensor({5, 3}, 53, 1);
  Tensor out;
  expect_fault([&] { out = cuda::gather_rows(gpu(src), gpu(i64_tensor({0, 5, 1}))); },
               "gather_rows: row index rows[1] = 5 out of range [0, 5)");
  const std::vector<float> v = host(out).to_vector<float>();
  EXPECT_EQ(v[3], 0.0f);
  EXPECT_EQ(v[4], 0.0f);
  EXPECT_EQ(v[5], 0.0f);
}

// A combine-shaped case: N tokens each routed to K of E experts, none to expert 2 (an empty expert);
// dispatched rows are expert-major, rows = their token, cols = their slot.
struct Dispatch {
  int64_t N = 7, K = 2, E = 4;
  std::vector<int64_t> rows, cols;
};
Dispatch make_dispatch() {
  Dispatch d;
  const int32_t topk[7][2] = {{0, 1}, {3, 0}, {1, 3}, {0, 3}, {1, 0}, {3, 1}, {0, 1}};
  for (int64_t e = 0; e < d.E; ++e) {
    for (int64_t n = 0; n < d.N; ++n) {
      for (int64_t k = 0; k < d.K; ++k) {
        if (topk[n][k] == e) {
          d.rows.push_back(n);
          d.cols.push_back(k);
        }
      }
    }
  }
  return d;
}

TEST_F(CudaRowOps, ScatterAddMatchesCpuExactly) {
  const Dispatch d = make_dispatch();
  const int64_t M = static_cast<int64_t>(d.rows.size());
  // H 33: the one-column-per-thread kernel; H 64: the 8-columns-per-thread one (H % 8 == 0, aligned).
  for (const int64_t H : {int64_t{33}, int64_t{64}})
  for (const bool integer : {true, false}) {
    // Integer-valued data makes the sums exact whatever the order; random data checks the order too.
    const Tensor src = integer ? random_ints({M, H}, 54, -8, 8) : rounded(random_tensor({M, H}, 54, 1));
    const Tensor init = integer ? random_ints({d.N, H}, 55, -100, 100) : random_tensor({d.N, H}, 55, 1);
    for (const DType dtype : {DType::kBF16, DType::kF32}) {
      Tensor expected = init.clone();
      moe::scatter_add_rows(src, d.rows, expected);
      Guarded dst = guarded(init);
      cuda::scatter_add_rows(gpu(src.to(dtype)), gpu(i64_tensor(d.rows)), dst.view);
      EXPECT_TRUE(bit_equal(dst.view, expected)) << "H=" << H << " integer=" << integer << " " << dtype_name(dtype);
      EXPECT_TRUE(guard_intact(dst));
    }
  }
  // Many rows onto few destinations (long runs), one destination row never hit; both kernels.
  for (const int64_t H : {int64_t{60}, int64_t{64}}) {
    std::vector<int64_t> rows = random_indices(5000, 9, 56);
    const Tensor src = rounded(random_tensor({5000, H}, 56, 1));
    Tensor expected = random_tensor({10, H}, 57, 1);
    Guarded dst = guarded(expected);
    moe::scatter_add_rows(src, rows, expected);
    cuda::scatter_add_rows(gpu_bf16(src), gpu(i64_tensor(rows)), dst.view);
    EXPECT_TRUE(bit_equal(dst.view, expected)) << "H=" << H;
    EXPECT_TRUE(guard_intact(dst));
  }
}

TEST_F(CudaRowOps, FoldWeightedMatchesCpuExactly) {
  const Dispatch d = make_dispatch();
  const int64_t M = static_cast<int64_t>(d.rows.size());
  for (const int64_t H : {int64_t{33}, int64_t{64}})  // both kernels (see ScatterAddMatchesCpuExactly)
  for (const bool integer : {true, false}) {
    const Tensor y = integer ? random_ints({M, H}, 61, -8, 8) : rounded(random_tensor({M, H}, 61, 1));
    const Tensor w = integer ? random_ints({d.N, d.K}, 62, -4, 4) : random_tensor({d.N, d.K}, 62, 0.0f, 1.0f);
    const Tensor init = integer ? random_ints({d.N, H}, 63, -100, 100) : random_tensor({d.N, H}, 63, 1);
    for (const DType dtype : {DType::kBF16, DType::kF32}) {
      Tensor expected = init.clone();
      moe::fold_weighted(y, d.rows, d.cols, w, expected);
      Guarded dst = guarded(init);
      cuda::fold_weighted(gpu(y.to(dtype)), gpu(i64_tensor(d.rows)), gpu(i64_tensor(d.cols)), gpu(w), dst.view);
      EXPECT_TRUE(bit_equal(dst.view, expected)) << "H=" << H << " integer=" << integer << " " << dtype_name(dtype);
      EXPECT_TRUE(guard_intact(dst));
    }
  }
}

TEST_F(CudaRowOps, EmptyLeavesDestinationUntouched) {
  const Tensor init = random_tensor({7, 33}, 64, 1);
  Guarded dst = guarded(init);
  const Tensor none = gpu_bf16(Tensor::empty({0, 33}, DType::kF32));
  cuda::scatter_add_rows(none, gpu(i64_tensor({})), dst.view);
  cuda::fold_weighted(none, gpu(i64_tensor({})), gpu(i64_tensor({})), gpu(random_tensor({7, 2}, 64, 2)), dst.view);
  EXPECT_TRUE(bit_equal(dst.view, init));
  EXPECT_TRUE(guard_intact(dst));
}

TEST_F(CudaRowOps, BadIndicesAreReportedAndSkipped) {
  // H = 3: the scalar kernel; H = 64: 8 columns per thread (16-byte loads).
  for (const int64_t H : {int64_t{3}, int64_t{64}}) {
    SCOPED_TRACE("H = " + std::to_string(H));
    const Tensor init = random_ints({4, H}, 65, -10, 10);
    const Tensor src = random_ints({2, H}, 66, -10, 10);
    Tensor dst = gpu(init);
    expect_fault([&] { cuda::scatter_add_rows(gpu_bf16(src), gpu(i64_tensor({1, 4})), dst); },
                 "scatter_add_rows: row index rows[1] = 4 out of range [0, 4)");
    Tensor expected = init.clone();
    moe::scatter_add_rows(src.narrow_rows(0, 1), std::vector<int64_t>{1}, expected);
    EXPECT_TRUE(bit_equal(dst, expected));

    Tensor dst2 = gpu(init);
    expect_fault(
        [&] {
          cuda::fold_weighted(gpu_bf16(src), gpu(i64_tensor({0, 2})), gpu(i64_tensor({0, 2})),
                              gpu(random_ints({4, 2}, 67, 1, 3)), dst2);
        },
        "fold_weighted (cols): column index cols[1] = 2 out of range [0, 2)");
  }
}

// ---- cross-entropy ------------------------------------------------------------------------------

// Per-row losses of the CPU reference (each row on its own) and its full dlogits.
std::vector<double> cpu_row_losses(const Tensor& logits, const std::vector<int32_t>& targets) {
  std::vector<double> loss(targets.size());
  for (size_t n = 0; n < targets.size(); ++n) {
    loss[n] = cpu::cross_entropy_forward(logits.narrow_rows(static_cast<int64_t>(n), 1), i32_tensor({targets[n]}),
                                         nullptr, 1.0f)
                  .loss_sum;
  }
  return loss;
}

std::vector<int32_t> ce_targets(int64_t N, int64_t V, uint64_t seed) {
  std::vector<int64_t> t = random_indices(N, V, seed);
  std::vector<int32_t> targets(t.begin(), t.end());
  if (N > 2) targets[1] = cpu::kIgnoreIndex;
  if (N > 3) targets[3] = static_cast<int32_t>(V - 1);
  return targets;
}

TEST_F(CudaCrossEntropy, MatchesCpu) {
  struct Case {
    int64_t N, V;
    DType dtype;
  };
  for (const Case c : {Case{7, 1000, DType::kF32}, Case{7, 1000, DType::kBF16}, Case{1, 1, DType::kF32},
                       Case{33, 4097, DType::kF32}, Case{33, 4097, DType::kBF16}, Case{300, 2048, DType::kBF16},
                       Case{5, 151936, DType::kBF16}}) {
    const Tensor logits = rounded(random_tensor({c.N, c.V}, 71, 1, -4.0f, 4.0f));
    const std::vector<int32_t> targets = ce_targets(c.N, c.V, 72);
    const int64_t num_targets =
        std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t != cpu::kIgnoreIndex; });
    const float scale = 1.0f / static_cast<float>(num_targets);
    Tensor dref;
    const cpu::CrossEntropyResult ref = cpu::cross_entropy_forward(logits, i32_tensor(targets), &dref, scale);
    const std::vector<double> row_ref = cpu_row_losses(logits, targets);

    Guarded dlogits = guarded(Tensor::zeros({c.N, c.V}, c.dtype));
    const Tensor loss = cuda::cross_entropy_forward(gpu(logits.to(c.dtype)), gpu(i32_tensor(targets)),
                                                    &dlogits.view, scale);
    const std::string where = "N=" + std::to_string(c.N) + " V=" + std::to_string(c.V) + " " +
                              std::string(dtype_name(c.dtype));
    const std::vector<float> rows = host(loss).to_vector<float>();
    double sum = 0.0;
    for (int64_t n = 0; n < c.N; ++n) {
      sum += rows[n];
      if (targets[n] == cpu::kIgnoreIndex) {
        EXPECT_EQ(rows[n], 0.0f) << where << " row " << n;
      } else {
        EXPECT_NEAR(rows[n], row_ref[n], 1e-5 * std::max(1.0, std::fabs(row_ref[n]))) << where << " row " << n;
      }
    }
    EXPECT_NEAR(sum, ref.loss_sum, 1e-5 * std::max(1.0, std::fabs(ref.loss_sum))) << where;
    if (c.V > 1) {  // V == 1: the gradient is exactly zero
      EXPECT_TRUE(close(dlogits.view, dref, c.dtype == DType::kF32 ? Tolerance{1e-5, 1e-12} : kBF16Rel)) << where;
    } else {
      EXPECT_TRUE(bit_equal(host_f32(dlogits.view), dref)) << where;
    }
    EXPECT_TRUE(guard_intact(dlogits)) << where;
    // Without dlogits: the same losses.
    EXPECT_TRUE(bit_equal(cuda::cross_entropy_forward(gpu(logits.to(c.dtype)), gpu(i32_tensor(targets)), nullptr,
                                                      scale),
                          loss))
        << where;
  }
}

TEST_F(CudaCrossEntropy, DlogitsMayAliasLogits) {
  // f32, bf16 rows of 16-byte vectors (V % 8 == 0) and bf16 rows element by element.
  for (const auto& [dtype, V] : {std::pair{DType::kF32, int64_t{1000}}, std::pair{DType::kBF16, int64_t{1000}},
                                 std::pair{DType::kBF16, int64_t{1001}}}) {
    const Tensor logits = random_tensor({7, V}, 73, 1, -4.0f, 4.0f).to(dtype);
    const std::vector<int32_t> targets = ce_targets(7, V, 74);
    Tensor separate;
    const Tensor loss = cuda::cross_entropy_forward(gpu(logits), gpu(i32_tensor(targets)), &separate, 0.25f);
    Tensor in_place = gpu(logits);
    Tensor alias = in_place;
    const Tensor loss2 = cuda::cross_entropy_forward(in_place, gpu(i32_tensor(targets)), &alias, 0.25f);
    EXPECT_TRUE(bit_equal(loss2, loss)) << dtype_name(dtype) << " V=" << V;
    EXPECT_TRUE(bit_equal(in_place, separate)) << dtype_name(dtype) << " V=" << V;
  }
}

TEST_F(CudaCrossEntropy, EmptyAndBadTarget) {
  Tensor d;
  const Tensor loss = cuda::cross_entropy_forward(gpu(Tensor::empty({0, 1000}, DType::kF32)), gpu(i32_tensor({})),
                                                  &d, 1.0f);
  EXPECT_EQ(loss.shape(), (Shape{0}));
  EXPECT_EQ(d.shape(), (Shape{0, 1000}));

  const Tensor logits = random_tensor({3, 10}, 75, 1);
  Tensor loss3;
  Tensor d3;
  expect_fault([&] { loss3 = cuda::cross_entropy_forward(gpu(logits), gpu(i32_tensor({1, 10, 2})), &d3, 1.0f); },
               "cross_entropy: target 10 at position 1 is neither in [0, 10)");
  EXPECT_EQ(host(loss3).to_vector<float>()[1], 0.0f);
}

// ---- AdamW --------------------------------------------------------------------------------------

TEST_F(CudaAdamW, MatchesCpuAdamWBitExactly) {
  const double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  for (const bool decay : {true, false}) {
    for (const int64_t n : {int64_t{1}, int64_t{4097}, int64_t{1} << 16}) {
      Tensor ref_w = random_tensor({n}, 81, 1);
      Tensor ref_m = random_tensor({n}, 81, 3, -1e-3f, 1e-3f);
      Tensor ref_v = random_tensor({n}, 81, 4, 1e-8f, 1e-5f);
      Guarded w = guarded(ref_w);
      Guarded m = guarded(ref_m);
      Guarded v = guarded(ref_v);
      Guarded w16 = guarded(Tensor::zeros({n}, DType::kBF16));
      for (int64_t step = 5; step <= 7; ++step) {  // three steps, each with a fresh gradient
        const Tensor g = random_tensor({n}, 82, static_cast<uint64_t>(step), -1e-2f, 1e-2f);
        const double lr = 3e-4 * static_cast<double>(step);
        cpu::adamw_step(ref_w, g, ref_m, ref_v, lr, beta1, beta2, eps, decay ? weight_decay : 0.0, step);
        cuda::AdamWHyper hyper;
        hyper.lr = lr;
        hyper.beta1 = beta1;
        hyper.beta2 = beta2;
        hyper.eps = eps;
        hyper.weight_decay = decay ? weight_decay : 0.0;
        hyper.step = step;
        cuda::adamw_step(w.view, gpu(g), m.view, v.view, hyper, step == 7 ? &w16.view : nullptr);
      }
      const std::string where = "n=" + std::to_string(n) + " decay=" + std::to_string(decay);
      EXPECT_TRUE(bit_equal(w.view, ref_w)) << where;
      EXPECT_TRUE(bit_equal(m.view, ref_m)) << where;
      EXPECT_TRUE(bit_equal(v.view, ref_v)) << where;
      EXPECT_TRUE(bit_equal(w16.view, ref_w.to(DType::kBF16))) << where;
      for (const Guarded* g : {&w, &m, &v, &w16}) EXPECT_TRUE(guard_intact(*g)) << where;
    }
  }
}

TEST_F(CudaAdamW, EmptyAndBadStep) {
  Tensor w = gpu(Tensor::empty({0}, DType::kF32));
  Tensor m = w.clone(), v = w.clone();
  cuda::AdamWHyper hyper;
  hyper.lr = 1e-3;
  cuda::adamw_step(w, w.clone(), m, v, hyper);
  hyper.step = 0;
  EXPECT_THROW(cuda::adamw_step(w, w.clone(), m, v, hyper), Error);
}

TEST_F(CudaAdamW, SumOfSquaresIsDeterministicAndMatchesCpu) {
  for (const int64_t n : {int64_t{1}, int64_t{4097}, (int64_t{1} << 22) + 3}) {
    const Tensor g = random_tensor({n}, 83, 1);
    double ref = 0.0;
    for (const float x : g.to_vector<float>()) ref += static_cast<double>(x) * x;
    const Tensor g_gpu = gpu(g);
    const double s = cuda::sum_of_squares(g_gpu);
    EXPECT_NEAR(s, ref, 1e-9 * ref) << "n=" << n;  // both double sums, in different orders
    EXPECT_EQ(cuda::sum_of_squares(g_gpu), s) << "n=" << n;
  }
  EXPECT_EQ(cuda::sum_of_squares(gpu(Tensor::empty({0}, DType::kF32))), 0.0);
}

}  // namespace
}  // namespace moetp
