// cuBLAS behind the row-major interface of gemm.h. cuBLAS is column-major: a row-major (R, C)
// matrix with row stride ld is the column-major (C, R) matrix with leading dimension ld, so the
// row-major product Y = A · B is computed as the column-major Yᵀ = Bᵀ · Aᵀ with operands swapped.
// Every call is cublasGemmEx with bf16 A/B, CUBLAS_COMPUTE_32F and a bf16 or f32 C.
#include "kernels/cuda/gemm.h"

#include <limits>
#include <memory>
#include <unordered_map>

#include "kernels/cuda/cuda_check.h"

namespace moetp::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

// One device's cuBLAS state for one thread. Destruction runs at thread exit (for the main thread,
// before the CUDA runtime's own teardown); errors there are ignored since nothing can act on them.
struct DeviceBlas {
  int device = 0;
  cublasHandle_t handle = nullptr;
  cublasLtHandle_t lt = nullptr;
  std::unordered_map<cudaStream_t, void*> workspaces;

  DeviceBlas() = default;
  DeviceBlas(const DeviceBlas&) = delete;
  DeviceBlas& operator=(const DeviceBlas&) = delete;
  ~DeviceBlas() {
    int current = 0;
    const bool restore = cudaGetDevice(&current) == cudaSuccess && current != device;
    if (restore) cudaSetDevice(device);
    if (handle != nullptr) cublasDestroy(handle);
    if (lt != nullptr) cublasLtDestroy(lt);
    for (auto& [stream, ptr] : workspaces) cudaFree(ptr);
    if (restore) cudaSetDevice(current);
  }
};

#define CUBLAS_CHECK(call) MOETP_STATUS_CHECK(call, CUBLAS_STATUS_SUCCESS, cublasGetStatusString)

DeviceBlas& device_blas() {
  thread_local std::unordered_map<int, std::unique_ptr<DeviceBlas>> per_device;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  std::unique_ptr<DeviceBlas>& slot = per_device[device];
  if (!slot) {
    auto blas = std::make_unique<DeviceBlas>();
    blas->device = device;
    CUBLAS_CHECK(cublasCreate(&blas->handle));
    // f32 accumulation end to end: no split-K reductions in bf16.
    const auto math = static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    CUBLAS_CHECK(cublasSetMathMode(blas->handle, math));
    slot = std::move(blas);
  }
  return *slot;
}

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// Column-major C (m × n, ldc) = alpha · op(A) · op(B) + beta · C through cublasGemmEx.
// `what` names the caller and its row-major shapes for error messages.
void gemm_ex(const char* what, const Tensor& x_hint, cudaStream_t stream, cublasOperation_t op_a,
             cublasOperation_t op_b, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B,
             int64_t ldb, float beta, void* C, cudaDataType_t c_type, int64_t ldc) {
  MOETP_CHECK(m <= kIntMax && n <= kIntMax && k <= kIntMax && lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax,
              "{}: GEMM sizes exceed int32 (m = {}, n = {}, k = {}, lda = {}, ldb = {}, ldc = {}; x {})", what, m, n, k,
              lda, ldb, ldc, x_hint.describe());
  const float alpha = 1.0f;
  cublasHandle_t handle = cublas_handle(stream);
  const cublasStatus_t status =
      cublasGemmEx(handle, op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, A,
                   CUDA_R_16BF, static_cast<int>(lda), B, CUDA_R_16BF, static_cast<int>(ldb), &beta, C, c_type,
                   static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  MOETP_CHECK(status == CUBLAS_STATUS_SUCCESS,
              "{}: cublasGemmEx(op_a = {}, op_b = {}, m = {}, n = {}, k = {}, lda = {}, ldb = {}, ldc = {}) failed: {} "
              "(x {})",
              what, op_a == CUBLAS_OP_T ? "T" : "N", op_b == CUBLAS_OP_T ? "T" : "N", m, n, k, lda, ldb, ldc,
              cublasGetStatusString(status), x_hint.describe());
}

void check_cuda_2d(const Tensor& t, DType dtype, int64_t ndim, const char* name) {
  MOETP_CHECK(t.defined(), "{}: tensor is undefined", name);
  MOETP_CHECK(t.ndim() == ndim, "{}: expected {} dimensions, got {}", name, ndim, t.describe());
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
}

void zero_async(Tensor& t, cudaStream_t stream) {
  if (t.numel() > 0) CUDA_CHECK(cudaMemsetAsync(t.raw_data(), 0, t.num_bytes(), stream));
}

const bf16* bf16_at(const Tensor& t, int64_t offset) { return t.data<bf16>() + offset; }

// Offsets of `op`: L + 1 entries, 0 = offsets[0] <= ... <= offsets[L] = M.
void check_offsets(const char* op, std::span<const int64_t> offsets, int64_t L, int64_t M) {
  MOETP_CHECK(static_cast<int64_t>(offsets.size()) == L + 1, "{}: offsets has {} entries, expected L + 1 = {}", op,
              offsets.size(), L + 1);
  MOETP_CHECK(offsets[0] == 0 && offsets[L] == M, "{}: offsets must run from 0 to M = {}, got {} .. {}", op, M,
              offsets[0], offsets[L]);
  for (int64_t l = 0; l < L; ++l) {
    MOETP_CHECK(offsets[l] <= offsets[l + 1], "{}: offsets decrease at group {} ({} > {})", op, l, offsets[l],
                offsets[l + 1]);
  }
}

}  // namespace

cublasHandle_t cublas_handle(cudaStream_t stream) {
  DeviceBlas& blas = device_blas();
  void*& workspace = blas.workspaces[stream];
  if (workspace == nullptr) CUDA_CHECK(cudaMalloc(&workspace, kWorkspaceBytes));
  CUBLAS_CHECK(cublasSetStream(blas.handle, stream));
  // cublasSetStream resets the workspace to cuBLAS's default pool, so set ours after it.
  CUBLAS_CHECK(cublasSetWorkspace(blas.handle, workspace, kWorkspaceBytes));
  return blas.handle;
}

cublasLtHandle_t cublaslt_handle() {
  DeviceBlas& blas = device_blas();
  if (blas.lt == nullptr) CUBLAS_CHECK(cublasLtCreate(&blas.lt));
  return blas.lt;
}

Tensor linear(const Tensor& x_MK, const Tensor& w_NK, cudaStream_t stream) {
  check_cuda_2d(x_MK, DType::kBF16, 2, "cuda::linear x_MK");
  check_cuda_2d(w_NK, DType::kBF16, 2, "cuda::linear w_NK");
  const int64_t M = x_MK.size(0), K = x_MK.size(1), N = w_NK.size(0);
  MOETP_CHECK(w_NK.size(1) == K, "cuda::linear: w_NK {} does not match x_MK {} (K = {})", w_NK.describe(),
              x_MK.describe(), K);
  Tensor y_MN = Tensor::empty({M, N}, DType::kBF16, Device::kCuda);
  if (M == 0 || N == 0) return y_MN;
  if (K == 0) {
    zero_async(y_MN, stream);
    return y_MN;
  }
  // Row-major y (M, N) = x · wᵀ  <=>  column-major yᵀ (N × M) = wᵀ(op T of w's (K × N)) · x (K × M).
  gemm_ex("cuda::linear", x_MK, stream, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w_NK.data<bf16>(), K, x_MK.data<bf16>(), K,
          0.0f, y_MN.data<bf16>(), CUDA_R_16BF, N);
  return y_MN;
}

void linear_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, Tensor* dx_MK, Tensor* dw_NK,
                     cudaStream_t stream) {
  check_cuda_2d(x_MK, DType::kBF16, 2, "cuda::linear_backward x_MK");
  check_cuda_2d(w_NK, DType::kBF16, 2, "cuda::linear_backward w_NK");
  check_cuda_2d(dy_MN, DType::kBF16, 2, "cuda::linear_backward dy_MN");
  const int64_t M = x_MK.size(0), K = x_MK.size(1), N = w_NK.size(0);
  MOETP_CHECK(w_NK.size(1) == K, "cuda::linear_backward: w_NK {} does not match x_MK {} (K = {})", w_NK.describe(),
              x_MK.describe(), K);
  check_shape(dy_MN, {M, N}, "cuda::linear_backward dy_MN");
  if (dx_MK != nullptr) {
    if (!dx_MK->defined()) *dx_MK = Tensor::empty({M, K}, DType::kBF16, Device::kCuda);
    check_cuda_2d(*dx_MK, DType::kBF16, 2, "cuda::linear_backward dx_MK");
    check_shape(*dx_MK, {M, K}, "cuda::linear_backward dx_MK");
    if (N == 0) {
      zero_async(*dx_MK, stream);
    } else if (M > 0 && K > 0) {
      // Row-major dx (M, K) = dy · w  <=>  column-major dxᵀ (K × M) = w (K × N) · dy (N × M).
      gemm_ex("cuda::linear_backward dx", x_MK, stream, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, w_NK.data<bf16>(), K,
              dy_MN.data<bf16>(), N, 0.0f, dx_MK->data<bf16>(), CUDA_R_16BF, K);
    }
  }
  if (dw_NK != nullptr) {
    check_cuda_2d(*dw_NK, DType::kF32, 2, "cuda::linear_backward dw_NK");
    check_shape(*dw_NK, {N, K}, "cuda::linear_backward dw_NK");
    if (M > 0 && N > 0 && K > 0) {
      // Row-major dw (N, K) += dyᵀ · x  <=>  column-major dwᵀ (K × N) += x (K × M) · dy (N × M)ᵀ.
      gemm_ex("cuda::linear_backward dw", x_MK, stream, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, x_MK.data<bf16>(), K,
              dy_MN.data<bf16>(), N, 1.0f, dw_NK->data<float>(), CUDA_R_32F, K);
    }
  }
}

void grouped_linear(const Tensor& x_MK, std::span<const int64_t> offsets, const Tensor& w_LNK, Tensor& y_MN,
                    cudaStream_t stream) {
  const char* op = "cuda::grouped_linear";
  check_cuda_2d(x_MK, DType::kBF16, 2, "cuda::grouped_linear x_MK");
  check_cuda_2d(w_LNK, DType::kBF16, 3, "cuda::grouped_linear w_LNK");
  const int64_t M = x_MK.size(0), K = x_MK.size(1), L = w_LNK.size(0), N = w_LNK.size(1);
  MOETP_CHECK(w_LNK.size(2) == K, "{}: w_LNK {} does not match x_MK {} (K = {})", op, w_LNK.describe(),
              x_MK.describe(), K);
  check_offsets(op, offsets, L, M);
  if (!y_MN.defined()) y_MN = Tensor::empty({M, N}, DType::kBF16, Device::kCuda);
  check_cuda_2d(y_MN, DType::kBF16, 2, "cuda::grouped_linear y_MN");
  check_shape(y_MN, {M, N}, "cuda::grouped_linear y_MN");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    zero_async(y_MN, stream);
    return;
  }
  const bf16* w = w_LNK.data<bf16>();
  bf16* y = y_MN.data<bf16>();
  for (int64_t l = 0; l < L; ++l) {
    const int64_t row0 = offsets[l], rows = offsets[l + 1] - offsets[l];
    if (rows == 0) continue;
    gemm_ex(op, x_MK, stream, CUBLAS_OP_T, CUBLAS_OP_N, N, rows, K, w + l * N * K, K, bf16_at(x_MK, row0 * K), K, 0.0f,
            y + row0 * N, CUDA_R_16BF, N);
  }
}

void grouped_linear_backward(const Tensor& dy_MN, const Tensor& x_MK, std::span<const int64_t> offsets,
                             const Tensor& w_LNK, Tensor* dx_MK, Tensor* dw_LNK, cudaStream_t stream) {
  const char* op = "cuda::grouped_linear_backward";
  check_cuda_2d(x_MK, DType::kBF16, 2, "cuda::grouped_linear_backward x_MK");
  check_cuda_2d(w_LNK, DType::kBF16, 3, "cuda::grouped_linear_backward w_LNK");
  check_cuda_2d(dy_MN, DType::kBF16, 2, "cuda::grouped_linear_backward dy_MN");
  const int64_t M = x_MK.size(0), K = x_MK.size(1), L = w_LNK.size(0), N = w_LNK.size(1);
  MOETP_CHECK(w_LNK.size(2) == K, "{}: w_LNK {} does not match x_MK {} (K = {})", op, w_LNK.describe(),
              x_MK.describe(), K);
  check_shape(dy_MN, {M, N}, "cuda::grouped_linear_backward dy_MN");
  check_offsets(op, offsets, L, M);
  const bf16* w = w_LNK.data<bf16>();
  const bf16* x = x_MK.data<bf16>();
  const bf16* dy = dy_MN.data<bf16>();
  if (dx_MK != nullptr) {
    if (!dx_MK->defined()) *dx_MK = Tensor::empty({M, K}, DType::kBF16, Device::kCuda);
    check_cuda_2d(*dx_MK, DType::kBF16, 2, "cuda::grouped_linear_backward dx_MK");
    check_shape(*dx_MK, {M, K}, "cuda::grouped_linear_backward dx_MK");
    if (N == 0) {
      zero_async(*dx_MK, stream);
    } else if (K > 0) {
      bf16* dx = dx_MK->data<bf16>();
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row0 = offsets[l], rows = offsets[l + 1] - offsets[l];
        if (rows == 0) continue;
        gemm_ex("cuda::grouped_linear_backward dx", x_MK, stream, CUBLAS_OP_N, CUBLAS_OP_N, K, rows, N, w + l * N * K,
                K, dy + row0 * N, N, 0.0f, dx + row0 * K, CUDA_R_16BF, K);
      }
    }
  }
  if (dw_LNK != nullptr) {
    check_cuda_2d(*dw_LNK, DType::kF32, 3, "cuda::grouped_linear_backward dw_LNK");
    check_shape(*dw_LNK, {L, N, K}, "cuda::grouped_linear_backward dw_LNK");
    if (N > 0 && K > 0) {
      float* dw = dw_LNK->data<float>();
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row0 = offsets[l], rows = offsets[l + 1] - offsets[l];
        if (rows == 0) continue;
        gemm_ex("cuda::grouped_linear_backward dw", x_MK, stream, CUBLAS_OP_N, CUBLAS_OP_T, K, N, rows, x + row0 * K,
                K, dy + row0 * N, N, 1.0f, dw + l * N * K, CUDA_R_32F, K);
      }
    }
  }
}

}  // namespace moetp::cuda
