// Grouped SwiGLU as one pair of GEMMs per local expert over its contiguous row block. Experts run one
// after another; OpenBLAS threads inside each GEMM, OpenMP threads the elementwise SwiGLU.
#include "kernels/cpu/experts.h"

#include <cmath>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

namespace {

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

void check_saved(const ExpertsSaved& saved, const ExpertsDims& d) {
  check_f32_cpu(saved.h_M2i, 2, "experts saved.h_M2i");
  check_shape(saved.h_M2i, {d.M, 2 * d.i}, "experts saved.h_M2i");
  check_f32_cpu(saved.a_Mi, 2, "experts saved.a_Mi");
  check_shape(saved.a_Mi, {d.M, d.i}, "experts saved.a_Mi");
}

}  // namespace

ExpertsDims check_experts_shapes(const Tensor& x_MH, std::span<const int64_t> offsets, const Tensor& w13_L2iH,
                                 const Tensor& w2_LHi) {
  MOETP_CHECK(x_MH.defined() && x_MH.ndim() == 2, "experts: x_MH must be (M, H), got {}", x_MH.describe());
  MOETP_CHECK(!offsets.empty(), "experts: offsets must have L + 1 >= 2 entries, got 0");
  ExpertsDims d;
  d.M = x_MH.size(0);
  d.H = x_MH.size(1);
  d.L = static_cast<int64_t>(offsets.size()) - 1;
  MOETP_CHECK(d.L >= 1, "experts: offsets must have L + 1 >= 2 entries, got {}", offsets.size());
  MOETP_CHECK(offsets[0] == 0, "experts: offsets[0] = {}, expected 0", offsets[0]);
  for (int64_t j = 0; j < d.L; ++j) {
    MOETP_CHECK(offsets[j] <= offsets[j + 1], "experts: offsets decrease at local expert {}: {} > {}", j,
                offsets[j], offsets[j + 1]);
  }
  MOETP_CHECK(offsets[d.L] == d.M, "experts: offsets end at {} (offsets[{}]) but x_MH has M = {} rows",
              offsets[d.L], d.L, d.M);
  MOETP_CHECK(w2_LHi.defined() && w2_LHi.ndim() == 3 && w2_LHi.size(0) == d.L && w2_LHi.size(1) == d.H,
              "experts: w2_LHi must be (L, H, i) = ({}, {}, i) (L from offsets, H from x_MH), got {}", d.L, d.H,
              w2_LHi.describe());
  d.i = w2_LHi.size(2);
  MOETP_CHECK(w13_L2iH.defined() && w13_L2iH.ndim() == 3 && w13_L2iH.size(0) == d.L &&
                  w13_L2iH.size(1) == 2 * d.i && w13_L2iH.size(2) == d.H,
              "experts: w13_L2iH must be (L, 2i, H) = [{}, {}, {}] (L from offsets, H from x_MH, i = {} from "
              "w2_LHi), got {}",
              d.L, 2 * d.i, d.H, d.i, w13_L2iH.describe());
  return d;
}

Tensor swiglu_forward(const Tensor& h_M2i) {
  check_f32_cpu(h_M2i, 2, "swiglu h_M2i");
  MOETP_CHECK(h_M2i.size(1) % 2 == 0, "swiglu: h_M2i width {} is odd ({})", h_M2i.size(1), h_M2i.describe());
  const int64_t M = h_M2i.size(0), i = h_M2i.size(1) / 2;
  Tensor a_Mi = Tensor::empty({M, i}, DType::kF32);
  const float* h = h_M2i.data<float>();
  float* a = a_Mi.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const float* gate = h + m * 2 * i;
    const float* up = gate + i;
    for (int64_t c = 0; c < i; ++c) a[m * i + c] = gate[c] * sigmoid(gate[c]) * up[c];
  }
  return a_Mi;
}

Tensor swiglu_backward(const Tensor& h_M2i, const Tensor& da_Mi) {
  check_f32_cpu(h_M2i, 2, "swiglu_backward h_M2i");
  MOETP_CHECK(h_M2i.size(1) % 2 == 0, "swiglu_backward: h_M2i width {} is odd ({})", h_M2i.size(1),
              h_M2i.describe());
  const int64_t M = h_M2i.size(0), i = h_M2i.size(1) / 2;
  check_f32_cpu(da_Mi, 2, "swiglu_backward da_Mi");
  check_shape(da_Mi, {M, i}, "swiglu_backward da_Mi");
  Tensor dh_M2i = Tensor::empty({M, 2 * i}, DType::kF32);
  const float* h = h_M2i.data<float>();
  const float* da = da_Mi.data<float>();
  float* dh = dh_M2i.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const float* gate = h + m * 2 * i;
    const float* up = gate + i;
    float* dgate = dh + m * 2 * i;
    float* dup = dgate + i;
    for (int64_t c = 0; c < i; ++c) {
      const float g = gate[c];
      const float s = sigmoid(g);
      const float d = da[m * i + c];
      dgate[c] = d * up[c] * s * (1.0f + g * (1.0f - s));
      dup[c] = d * g * s;
    }
  }
  return dh_M2i;
}

Tensor experts_forward(const Tensor& x_MH, std::span<const int64_t> offsets, const Tensor& w13_L2iH,
                       const Tensor& w2_LHi, ExpertsSaved* saved) {
  const ExpertsDims d = check_experts_shapes(x_MH, offsets, w13_L2iH, w2_LHi);
  check_f32_cpu(x_MH, 2, "experts x_MH");
  check_f32_cpu(w13_L2iH, 3, "experts w13_L2iH");
  check_f32_cpu(w2_LHi, 3, "experts w2_LHi");
  const int64_t H = d.H, i = d.i;
  const float* x = x_MH.data<float>();
  const float* w13 = w13_L2iH.data<float>();
  const float* w2 = w2_LHi.data<float>();

  Tensor h_M2i = Tensor::empty({d.M, 2 * i}, DType::kF32);
  for (int64_t j = 0; j < d.L; ++j) {
    const int64_t r0 = offsets[j], rows = offsets[j + 1] - offsets[j];
    gemm(false, true, rows, 2 * i, H, 1.0f, x + r0 * H, H, w13 + j * 2 * i * H, H, 0.0f,
         h_M2i.data<float>() + r0 * 2 * i, 2 * i);
  }
  Tensor a_Mi = swiglu_forward(h_M2i);
  Tensor y_MH = Tensor::empty({d.M, H}, DType::kF32);
  for (int64_t j = 0; j < d.L; ++j) {
    const int64_t r0 = offsets[j], rows = offsets[j + 1] - offsets[j];
    gemm(false, true, rows, H, i, 1.0f, a_Mi.data<float>() + r0 * i, i, w2 + j * H * i, i, 0.0f,
         y_MH.data<float>() + r0 * H, H);
  }
  if (saved != nullptr) {
    saved->h_M2i = std::move(h_M2i);
    saved->a_Mi = std::move(a_Mi);
  }
  return y_MH;
}

void experts_backward(const Tensor& dy_MH, const Tensor& x_MH, std::span<const int64_t> offsets,
                      const Tensor& w13_L2iH, const Tensor& w2_LHi, const ExpertsSaved& saved, Tensor& dx_MH,
                      Tensor& dw13_L2iH, Tensor& dw2_LHi) {
  const ExpertsDims d = check_experts_shapes(x_MH, offsets, w13_L2iH, w2_LHi);
  const int64_t M = d.M, H = d.H, L = d.L, i = d.i;
  check_f32_cpu(x_MH, 2, "experts x_MH");
  check_f32_cpu(w13_L2iH, 3, "experts w13_L2iH");
  check_f32_cpu(w2_LHi, 3, "experts w2_LHi");
  check_f32_cpu(dy_MH, 2, "experts dy_MH");
  check_shape(dy_MH, {M, H}, "experts dy_MH");
  check_saved(saved, d);
  if (!dx_MH.defined()) dx_MH = Tensor::empty({M, H}, DType::kF32);
  check_f32_cpu(dx_MH, 2, "experts dx_MH");
  check_shape(dx_MH, {M, H}, "experts dx_MH");
  check_f32_cpu(dw13_L2iH, 3, "experts dw13_L2iH (accumulated into; must be defined)");
  check_shape(dw13_L2iH, {L, 2 * i, H}, "experts dw13_L2iH");
  check_f32_cpu(dw2_LHi, 3, "experts dw2_LHi (accumulated into; must be defined)");
  check_shape(dw2_LHi, {L, H, i}, "experts dw2_LHi");

  const float* dy = dy_MH.data<float>();
  const float* x = x_MH.data<float>();
  const float* w13 = w13_L2iH.data<float>();
  const float* w2 = w2_LHi.data<float>();
  const float* a = saved.a_Mi.data<float>();

  // da = dy · w2;  dw2 += dyᵀ · a
  Tensor da_Mi = Tensor::empty({M, i}, DType::kF32);
  for (int64_t j = 0; j < L; ++j) {
    const int64_t r0 = offsets[j], rows = offsets[j + 1] - offsets[j];
    gemm(false, false, rows, i, H, 1.0f, dy + r0 * H, H, w2 + j * H * i, i, 0.0f, da_Mi.data<float>() + r0 * i, i);
    gemm(true, false, H, i, rows, 1.0f, dy + r0 * H, H, a + r0 * i, i, 1.0f, dw2_LHi.data<float>() + j * H * i, i);
  }
  const Tensor dh_M2i = swiglu_backward(saved.h_M2i, da_Mi);
  const float* dh = dh_M2i.data<float>();
  // dx = dh · w13;  dw13 += dhᵀ · x
  for (int64_t j = 0; j < L; ++j) {
    const int64_t r0 = offsets[j], rows = offsets[j + 1] - offsets[j];
    gemm(false, false, rows, H, 2 * i, 1.0f, dh + r0 * 2 * i, 2 * i, w13 + j * 2 * i * H, H, 0.0f,
         dx_MH.data<float>() + r0 * H, H);
    gemm(true, false, 2 * i, H, rows, 1.0f, dh + r0 * 2 * i, 2 * i, x + r0 * H, H, 1.0f,
         dw13_L2iH.data<float>() + j * 2 * i * H, H);
  }
}

}  // namespace moetp::cpu
