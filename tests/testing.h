// Shared test helpers: the one tolerance table and the comparison helpers every test uses.
//   - data movement and file round trips: bit-exact (expect_bit_equal)
//   - arithmetic: max relative error (|a-b| / max(|b|, floor)) plus max-abs, printing the first
//     mismatches with their coordinates (expect_close)
// Comparisons assert the reference is not all zeros, so a test cannot pass on empty output.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace moetp::testing {

// The tolerance table.
// An element passes when |a - b| <= rel · max(|b|, abs_floor, scale_floor · max_j |b_j|): relative
// error for elements of the tensor's own scale, and an absolute bound (relative to the tensor's
// largest element) for elements that are near zero through cancellation, where the relative error
// of a reordered f32 sum is unbounded.
struct Tolerance {
  double rel;
  double abs_floor;
  double scale_floor = 0.0;
};
inline constexpr Tolerance kF32Exactish{1e-6, 1e-6};       // same math, different summation order
inline constexpr Tolerance kF32Parallel{1e-5, 1e-6, 0.1};  // parallel layouts vs single rank (docs/moe.md)
inline constexpr Tolerance kBF16{2e-2, 1e-2};              // bf16 storage, f32 accumulation
// CUDA ops against their CPU references (tests/kernels/cuda_*_test.cpp):
inline constexpr Tolerance kBF16Rel{1e-2, 1e-12};   // bf16 outputs without cancellation, small magnitudes
inline constexpr Tolerance kF32Op{1e-5, 1e-6};      // f32 math, short reductions (expf vs exp, f32 vs double)
inline constexpr Tolerance kF32Sum{1e-4, 1e-6, 0.1};  // long f32 reductions with cancellation
inline constexpr Tolerance kRoutingWeight{1e-4, 1e-6};  // f32 softmax of two differently ordered GEMMs

// f32 CPU kernels against fp64 references (tests/kernels/cpu_*_test.cpp): absolute below magnitude
// 1, relative above.
inline constexpr Tolerance kF32DotVsF64{1e-5, 1.0};        // one f32 dot product of up to ~100 terms
inline constexpr Tolerance kF32ChainVsF64{2e-5, 1.0};      // chains of f32 GEMMs (experts, attention)
inline constexpr Tolerance kF32ElementwiseVsF64{2e-6, 1e-3};  // a few f32 roundings per element

// CUDA attention (tests/kernels/cuda_attention_test.cpp, tests/backend). The saved log-sum-exp is f32
// on both sides; only the summation order differs.
inline constexpr Tolerance kAttnLse{1e-3, 1e-3};
// GPU gradients vs the CPU spec. Flash-attention-2 takes delta = rowsum(dout ⊙ out) from the bf16
// `out` (relative error 2^-9 per element), where the spec uses rowsum(P ⊙ dP) of the exact softmax;
// dS = P ⊙ (dP − delta) then carries an error P · O(2^-9 · |dout| · |out| · sqrt(D)) that does not
// cancel the way dS's rows do: small dq/dk elements are off by up to 0.13 · 2% of the tensor's largest
// element (H100). Bounded by 2% of max(|ref|, 0.01, 0.3 · max |ref|); the kernel's own arithmetic is
// held to kBF16 against an fp64 flash-attention-2 reference, where every case passes unscaled.
inline constexpr Tolerance kAttnFlashVsSpec{2e-2, 1e-2, 0.3};
// Tensor-core kernels against a reference on the same inputs: P and dS enter the mma as bf16, an
// error of ~2^-9 (0.2%) per term; near-zero outputs (cancellation) keep an absolute error of a few
// 1e-3 of the tensor's largest element, so the floor is 25% of it (2% of that: 0.5%).
inline constexpr Tolerance kAttnTensorCore{2e-2, 1e-2, 0.25};
// Against the CPU spec the tensor-core kernels carry both errors above: 1% of the largest element.
inline constexpr Tolerance kAttnTensorCoreVsSpec{2e-2, 1e-2, 0.5};
// Backend ops through backend::Backend (tests/backend): a bf16 output of f32 math against the f32
// CPU backend on the same (bf16-representable) inputs: 2^-9 relative from the store, plus f32
// summation-order differences that matter only next to cancellation (floor: 1e-3 of the largest).
inline constexpr Tolerance kBackendBF16{1e-2, 1e-6, 1e-3};

// Relative L2 bounds of the CUDA path against the CPU path (bf16 activations, f32 accumulation;
// each bf16 rounding is at most 2^-9 relative, a chain of about six gives about 3e-3 in L2):
inline constexpr double kMoeGlobalRel = 1e-2;  // MoE layer: ‖a − b‖₂ / ‖b‖₂ over a whole tensor
inline constexpr double kMoeBlockRel = 3e-2;   // MoE layer: the same per row / per expert slab
inline constexpr double kModelCeRel = 1e-3;    // model: cross-entropy of one micro-batch
inline constexpr double kModelAuxRel = 1e-3;   // model: aux loss of one micro-batch
inline constexpr double kModelGradRel = 5e-2;  // model: each parameter's gradient (rel L2)
inline constexpr double kModelAdamLossRel = 2e-2;  // model: loss after a few AdamW steps on both
// The same CUDA computation twice where f32 atomics add in a run-dependent order (the attention
// backward's dq): each gradient tensor's relative L2 difference.
inline constexpr double kAtomicOrderRel = 1e-4;

// Flat index -> "[i, j, k]".
inline std::string coords_str(const Shape& shape, int64_t flat) {
  std::vector<int64_t> c(shape.size());
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    c[d] = shape[d] == 0 ? 0 : flat % shape[d];
    flat = shape[d] == 0 ? 0 : flat / shape[d];
  }
  std::string s = "[";
  for (size_t i = 0; i < c.size(); ++i) s += (i ? ", " : "") + std::to_string(c[i]);
  return s + "]";
}

inline bool all_zero(const std::vector<float>& v) {
  for (float x : v) {
    if (x != 0.0f) return false;
  }
  return true;
}

// Bit-exact comparison of two tensors of any dtype (same shape and dtype required).
inline ::testing::AssertionResult bit_equal(const Tensor& actual, const Tensor& expected) {
  if (actual.shape() != expected.shape() || actual.dtype() != expected.dtype()) {
    return ::testing::AssertionFailure() << "shape/dtype differ: " << actual.describe() << " vs "
                                         << expected.describe();
  }
  Tensor a = actual.to(Device::kCpu).contiguous();
  Tensor b = expected.to(Device::kCpu).contiguous();
  const size_t es = a.element_size();
  const char* pa = static_cast<const char*>(a.raw_data());
  const char* pb = static_cast<const char*>(b.raw_data());
  int shown = 0;
  int64_t mismatches = 0;
  std::string detail;
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::memcmp(pa + i * es, pb + i * es, es) != 0) {
      ++mismatches;
      if (shown++ < 5) detail += " at " + coords_str(a.shape(), i);
    }
  }
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << mismatches << " of " << a.numel() << " elements differ" << detail;
}

// Relative-error comparison of f32 (or bf16, converted) tensors; reference must not be all zeros.
inline ::testing::AssertionResult close(const Tensor& actual, const Tensor& expected, Tolerance tol) {
  if (actual.shape() != expected.shape()) {
    return ::testing::AssertionFailure() << "shape differs: " << actual.describe() << " vs " << expected.describe();
  }
  auto as_f32 = [](const Tensor& t) {
    Tensor c = t.to(Device::kCpu);
    return c.dtype() == DType::kF32 ? c.to_vector<float>() : c.to(DType::kF32).to_vector<float>();
  };
  const std::vector<float> a = as_f32(actual);
  const std::vector<float> b = as_f32(expected);
  if (!b.empty() && all_zero(b)) return ::testing::AssertionFailure() << "reference is all zeros";
  double max_rel = 0, max_abs = 0, max_ref = 0;
  for (float v : b) max_ref = std::max(max_ref, std::fabs(static_cast<double>(v)));
  const double floor = std::max(tol.abs_floor, tol.scale_floor * max_ref);
  int64_t bad = 0;
  std::string detail;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(a[i]) - b[i]);
    const double rel = diff / std::max(std::fabs(static_cast<double>(b[i])), floor);
    max_abs = std::max(max_abs, diff);
    if (!(rel <= tol.rel)) {  // NaN counts as a mismatch
      if (bad++ < 5) {
        detail += " " + coords_str(actual.shape(), static_cast<int64_t>(i)) + ": " + std::to_string(a[i]) +
                  " vs " + std::to_string(b[i]) + ";";
      }
    }
    if (rel > max_rel || std::isnan(rel)) max_rel = std::isnan(rel) ? INFINITY : rel;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << a.size() << " elements beyond rel " << tol.rel
                                       << " (max rel " << max_rel << ", max abs " << max_abs << ", max |ref| " << max_ref << "):" << detail;
}

// The moetp::Error message of fn(), or "<no error>" when it does not throw.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const moetp::Error& e) {
    return e.what();
  }
  return "<no error>";
}

// Expects fn() to throw a moetp::Error whose message contains every one of `substrings` (the
// values an error must name); reports the message when one is missing.
inline void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> substrings) {
  try {
    fn();
  } catch (const moetp::Error& e) {
    const std::string message = e.what();
    for (const std::string& s : substrings) {
      EXPECT_NE(message.find(s), std::string::npos) << "missing '" << s << "' in: " << message;
    }
    return;
  }
  ADD_FAILURE() << "expected moetp::Error";
}

// Random f32 tensor from the counter RNG (never zeros: values in [lo, hi) with lo < hi).
inline Tensor random_tensor(Shape shape, uint64_t seed, uint64_t stream, float lo = -1.0f, float hi = 1.0f) {
  Tensor t = Tensor::empty(std::move(shape), DType::kF32);
  fill_uniform(std::span<float>(t.data<float>(), static_cast<size_t>(t.numel())), CounterRng(seed, stream), 0, lo,
               hi);
  return t;
}

}  // namespace moetp::testing
