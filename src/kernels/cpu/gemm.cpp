// cblas_sgemm behind a checked row-major interface. Shape and leading-dimension checks happen here
// rather than in OpenBLAS, whose xerbla prints and returns instead of throwing. Threading: fixed
// blocks over OpenMP, OpenBLAS single-threaded (gemm.h says why).
#include "kernels/cpu/gemm.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <mutex>

namespace moetp::cpu {

namespace {
constexpr int64_t kBlasIntMax = std::numeric_limits<int>::max();


void check_blas_int(int64_t v, const char* name) {
  MOETP_CHECK(v >= 0 && v <= kBlasIntMax, "gemm: {} = {} is outside [0, {}]", name, v, kBlasIntMax);
}

void use_single_threaded_blas() {
#ifdef OPENBLAS_VERSION
  static std::once_flag once;
  std::call_once(once, [] {
    // OpenBLAS's OpenMP build sets the caller's OpenMP thread count too (goto_set_num_threads ->
    // omp_set_num_threads): keep the application's.
    const int app_threads = omp_get_max_threads();
    openblas_set_num_threads(1);
    omp_set_num_threads(app_threads);
  });
#endif
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B,
              static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}
}  // namespace

void check_f32_cpu(const Tensor& t, int64_t ndim, const char* name) {
  MOETP_CHECK(t.defined(), "{}: tensor is undefined", name);
  MOETP_CHECK(t.ndim() == ndim, "{}: expected {} dimensions, got {}", name, ndim, t.describe());
  check_dtype(t, DType::kF32, name);
  check_device(t, Device::kCpu, name);
  check_contiguous(t, name);
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_blas_int(M, "M");
  check_blas_int(N, "N");
  check_blas_int(K, "K");
  if (M == 0 || N == 0) return;
  // Row-major leading dimensions: the row length of each stored matrix.
  const int64_t a_cols = trans_a ? M : K;
  const int64_t b_cols = trans_b ? K : N;
  MOETP_CHECK(ldc >= N && ldc <= kBlasIntMax, "gemm: ldc ({}) < N ({})", ldc, N);
  MOETP_CHECK(C != nullptr, "gemm: C is null (M = {}, N = {})", M, N);
  if (K == 0 || alpha == 0.0f) {
    // Nothing to multiply: only beta applies. beta == 0 overwrites (BLAS), so NaN in C does not survive.
    if (beta == 1.0f) return;
    for (int64_t r = 0; r < M; ++r) {
      float* c = C + r * ldc;
      if (beta == 0.0f) {
        std::fill(c, c + N, 0.0f);
      } else {
        for (int64_t j = 0; j < N; ++j) c[j] *= beta;
      }
    }
    return;
  }
  MOETP_CHECK(lda >= std::max<int64_t>(1, a_cols) && lda <= kBlasIntMax,
              "gemm: lda ({}) < {} (trans_a = {}, M = {}, K = {})", lda, a_cols, trans_a, M, K);
  MOETP_CHECK(ldb >= std::max<int64_t>(1, b_cols) && ldb <= kBlasIntMax,
              "gemm: ldb ({}) < {} (trans_b = {}, K = {}, N = {})", ldb, b_cols, trans_b, K, N);
  MOETP_CHECK(A != nullptr && B != nullptr, "gemm: null operand (M = {}, N = {}, K = {})", M, N, K);
  use_single_threaded_blas();
  const int64_t row_tiles = (M + kGemmBlock - 1) / kGemmBlock, col_tiles = (N + kGemmTileCols - 1) / kGemmTileCols;
  const int64_t tiles = row_tiles * col_tiles;
  if (tiles == 1) {
    sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = (t / col_tiles) * kGemmBlock, m = std::min(kGemmBlock, M - r0);
    const int64_t c0 = (t % col_tiles) * kGemmTileCols, n = std::min(kGemmTileCols, N - c0);
    // Rows of op(A) are columns of A when transposed; columns of op(B) are rows of B when transposed.
    const float* a = trans_a ? A + r0 : A + r0 * lda;
    const float* b = trans_b ? B + c0 * ldb : B + c0;
    sgemm(trans_a, trans_b, m, n, K, alpha, a, lda, b, ldb, beta, C + r0 * ldc + c0, ldc);
  }
}

Tensor linear(const Tensor& x_MK, const Tensor& w_NK) {
  check_f32_cpu(x_MK, 2, "linear x_MK");
  check_f32_cpu(w_NK, 2, "linear w_NK");
  const int64_t M = x_MK.size(0), K = x_MK.size(1), N = w_NK.size(0);
  MOETP_CHECK(w_NK.size(1) == K, "linear: w_NK {} does not match x_MK {} (K = {})", w_NK.describe(),
              x_MK.describe(), K);
  Tensor y_MN = Tensor::empty({M, N}, DType::kF32);
  gemm(false, true, M, N, K, 1.0f, x_MK.data<float>(), K, w_NK.data<float>(), K, 0.0f, y_MN.data<float>(), N);
  return y_MN;
}

void linear_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, Tensor* dx_MK, Tensor* dw_NK) {
  check_f32_cpu(x_MK, 2, "linear_backward x_MK");
  check_f32_cpu(w_NK, 2, "linear_backward w_NK");
  check_f32_cpu(dy_MN, 2, "linear_backward dy_MN");
  const int64_t M = x_MK.size(0), K = x_MK.size(1), N = w_NK.size(0);
  MOETP_CHECK(w_NK.size(1) == K, "linear_backward: w_NK {} does not match x_MK {} (K = {})", w_NK.describe(),
              x_MK.describe(), K);
  check_shape(dy_MN, {M, N}, "linear_backward dy_MN");
  if (dx_MK != nullptr) {
    if (!dx_MK->defined()) *dx_MK = Tensor::empty({M, K}, DType::kF32);
    check_f32_cpu(*dx_MK, 2, "linear_backward dx_MK");
    check_shape(*dx_MK, {M, K}, "linear_backward dx_MK");
    gemm(false, false, M, K, N, 1.0f, dy_MN.data<float>(), N, w_NK.data<float>(), K, 0.0f, dx_MK->data<float>(),
         K);
  }
  if (dw_NK != nullptr) {
    check_f32_cpu(*dw_NK, 2, "linear_backward dw_NK");
    check_shape(*dw_NK, {N, K}, "linear_backward dw_NK");
    gemm(true, false, N, K, M, 1.0f, dy_MN.data<float>(), N, x_MK.data<float>(), K, 1.0f, dw_NK->data<float>(),
         K);
  }
}

}  // namespace moetp::cpu
