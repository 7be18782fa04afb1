// RMSNorm forward/backward, one row per OpenMP iteration. Row reductions accumulate in double; the
// weight gradient is summed over rows in a fixed order so it does not depend on the thread count.
#include "kernels/cpu/rmsnorm.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

namespace {

// Shared shape check: x (R, D) and w (D). Returns D.
int64_t check_rmsnorm_shapes(const Tensor& x_RD, const Tensor& w_D, const char* op) {
  check_f32_cpu(x_RD, 2, "rmsnorm x_RD");
  check_f32_cpu(w_D, 1, "rmsnorm w_D");
  const int64_t D = x_RD.size(1);
  MOETP_CHECK(w_D.size(0) == D, "{}: w_D {} does not match x_RD {} (D = {})", op, w_D.describe(), x_RD.describe(),
              D);
  MOETP_CHECK(D >= 1, "{}: normalised size D must be >= 1, got x_RD {}", op, x_RD.describe());
  return D;
}

}  // namespace

Tensor rmsnorm_forward(const Tensor& x_RD, const Tensor& w_D, float eps, Tensor* rstd_R) {
  const int64_t D = check_rmsnorm_shapes(x_RD, w_D, "rmsnorm_forward");
  MOETP_CHECK(eps > 0.0f, "rmsnorm_forward: eps ({}) must be > 0", eps);
  const int64_t R = x_RD.size(0);
  Tensor y_RD = Tensor::empty({R, D}, DType::kF32);
  Tensor rstd = Tensor::empty({R}, DType::kF32);
  const float* x = x_RD.data<float>();
  const float* w = w_D.data<float>();
  float* y = y_RD.data<float>();
  float* rs = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    double sum_sq = 0.0;
    for (int64_t d = 0; d < D; ++d) sum_sq += static_cast<double>(xr[d]) * xr[d];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(D) + eps));
    rs[r] = inv;
    for (int64_t d = 0; d < D; ++d) y[r * D + d] = w[d] * (xr[d] * inv);
  }
  if (rstd_R != nullptr) *rstd_R = std::move(rstd);
  return y_RD;
}

void rmsnorm_backward(const Tensor& dy_RD, const Tensor& x_RD, const Tensor& w_D, const Tensor& rstd_R,
                      Tensor& dx_RD, Tensor& dw_D) {
  const int64_t D = check_rmsnorm_shapes(x_RD, w_D, "rmsnorm_backward");
  const int64_t R = x_RD.size(0);
  check_f32_cpu(dy_RD, 2, "rmsnorm dy_RD");
  check_shape(dy_RD, {R, D}, "rmsnorm dy_RD");
  check_f32_cpu(rstd_R, 1, "rmsnorm rstd_R (saved by the forward)");
  check_shape(rstd_R, {R}, "rmsnorm rstd_R");
  if (!dx_RD.defined()) dx_RD = Tensor::empty({R, D}, DType::kF32);
  check_f32_cpu(dx_RD, 2, "rmsnorm dx_RD");
  check_shape(dx_RD, {R, D}, "rmsnorm dx_RD");
  check_f32_cpu(dw_D, 1, "rmsnorm dw_D (accumulated into; must be defined)");
  check_shape(dw_D, {D}, "rmsnorm dw_D");

  const float* dy = dy_RD.data<float>();
  const float* x = x_RD.data<float>();
  const float* w = w_D.data<float>();
  const float* rs = rstd_R.data<float>();
  float* dx = dx_RD.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const float* dyr = dy + r * D;
    const float* xr = x + r * D;
    double dot = 0.0;  // Σ_d (dy ⊙ w)[d] · x[d]
    for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(dyr[d]) * w[d] * xr[d];
    const double inv = rs[r];
    const double coef = inv * inv * dot / static_cast<double>(D);
    for (int64_t d = 0; d < D; ++d) {
      dx[r * D + d] = static_cast<float>(inv * (static_cast<double>(dyr[d]) * w[d] - xr[d] * coef));
    }
  }
  std::vector<double> dw_acc(D, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const double inv = rs[r];
    for (int64_t d = 0; d < D; ++d) dw_acc[d] += static_cast<double>(dy[r * D + d]) * x[r * D + d] * inv;
  }
  float* dw = dw_D.data<float>();
  for (int64_t d = 0; d < D; ++d) dw[d] += static_cast<float>(dw_acc[d]);
}

}  // namespace moetp::cpu
