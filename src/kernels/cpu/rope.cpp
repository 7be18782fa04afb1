// RoPE as one rotation per (token, frequency) pair, applied to every head of the token. Each token's
// cos/sin are computed once in double and shared by its heads.
#include "kernels/cpu/rope.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

namespace {

// sign = +1 rotates by +angle (forward), −1 by −angle (backward).
void rotate(Tensor& x_NhD, const Tensor& positions_N, double theta, double sign, const char* op) {
  check_f32_cpu(x_NhD, 3, op);
  const int64_t N = x_NhD.size(0), h = x_NhD.size(1), D = x_NhD.size(2);
  MOETP_CHECK(D % 2 == 0, "{}: head_dim D ({}) must be even ({})", op, D, x_NhD.describe());
  MOETP_CHECK(theta > 0.0, "{}: rope theta ({}) must be > 0", op, theta);
  MOETP_CHECK(positions_N.defined() && positions_N.ndim() == 1 && positions_N.size(0) == N,
              "{}: positions_N must be (N) = ({}) to match x {}, got {}", op, N, x_NhD.describe(),
              positions_N.describe());
  check_dtype(positions_N, DType::kI32, "rope positions_N");
  check_device(positions_N, Device::kCpu, "rope positions_N");
  check_contiguous(positions_N, "rope positions_N");
  const int32_t* pos = positions_N.data<int32_t>();
  for (int64_t n = 0; n < N; ++n) {
    MOETP_CHECK(pos[n] >= 0, "{}: position {} at token {} is negative", op, pos[n], n);
  }

  const int64_t half = D / 2;
  std::vector<double> inv_freq(half);
  for (int64_t j = 0; j < half; ++j) {
    inv_freq[j] = std::pow(theta, -static_cast<double>(2 * j) / static_cast<double>(D));
  }
  float* x = x_NhD.data<float>();
#pragma omp parallel
  {
    std::vector<double> cos_j(half), sin_j(half);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < half; ++j) {
        const double angle = static_cast<double>(pos[n]) * inv_freq[j];
        cos_j[j] = std::cos(angle);
        sin_j[j] = sign * std::sin(angle);
      }
      for (int64_t head = 0; head < h; ++head) {
        float* xv = x + (n * h + head) * D;
        for (int64_t j = 0; j < half; ++j) {
          const double a = xv[j], b = xv[j + half];
          xv[j] = static_cast<float>(a * cos_j[j] - b * sin_j[j]);
          xv[j + half] = static_cast<float>(b * cos_j[j] + a * sin_j[j]);
        }
      }
    }
  }
}

}  // namespace

void rope_forward(Tensor& x_NhD, const Tensor& positions_N, double theta) {
  rotate(x_NhD, positions_N, theta, 1.0, "rope_forward x_NhD");
}

void rope_backward(Tensor& dx_NhD, const Tensor& positions_N, double theta) {
  rotate(dx_NhD, positions_N, theta, -1.0, "rope_backward dx_NhD");
}

}  // namespace moetp::cpu
