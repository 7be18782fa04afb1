// Host side of the Hopper grouped GEMM (grouped_gemm.h): argument checks quoting the shapes, output
// allocation, the trivial cases (M = 0, an empty reduction), and the launches of grouped_gemm.cu.
#include "kernels/cuda/grouped_gemm.h"

#include <cstdint>
#include <limits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/grouped_gemm_launch.h"

namespace moetp::cuda {

namespace {

constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

void check_operand(const Tensor& t, DType dtype, int64_t ndim, const char* name) {
  MOETP_CHECK(t.defined(), "{}: tensor is undefined", name);
  MOETP_CHECK(t.ndim() == ndim, "{}: expected {} dimensions, got {}", name, ndim, t.describe());
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
  MOETP_CHECK(reinterpret_cast<uintptr_t>(t.raw_data()) % 16 == 0, "{}: data of {} is not 16-byte aligned (TMA)",
              name, t.describe());
}

// Checks offsets_L1 and the sizes every product shares; returns L.
int64_t check_common(const char* op, const Tensor& offsets_L1, int64_t M, int64_t N, int64_t K, int64_t L) {
  MOETP_CHECK(offsets_L1.defined() && offsets_L1.ndim() == 1, "{}: offsets_L1 must be a 1-D tensor, got {}", op,
              offsets_L1.defined() ? offsets_L1.describe() : std::string("undefined"));
  check_dtype(offsets_L1, DType::kI64, "grouped_gemm offsets_L1");
  check_device(offsets_L1, Device::kCuda, "grouped_gemm offsets_L1");
  check_contiguous(offsets_L1, "grouped_gemm offsets_L1");
  MOETP_CHECK(offsets_L1.size(0) == L + 1, "{}: offsets_L1 has {} entries, expected L + 1 = {}", op,
              offsets_L1.size(0), L + 1);
  MOETP_CHECK(L >= 1 && L <= launch::kGroupedGemmMaxGroups, "{}: L = {} groups, supported 1 .. {}", op, L,
              launch::kGroupedGemmMaxGroups);
  MOETP_CHECK(N % 8 == 0 && K % 8 == 0, "{}: N ({}) and K ({}) must be multiples of 8 (TMA row strides)", op, N, K);
  MOETP_CHECK(M <= kMaxDim && N <= kMaxDim && K <= kMaxDim, "{}: sizes exceed int32 (M = {}, N = {}, K = {})", op, M,
              N, K);
  MOETP_CHECK(launch::kGroupedGemmConfigs > 0, "{}: no configurations", op);
  return L;
}

void check_config(const char* op, int config) {
  MOETP_CHECK(config >= -1 && config < launch::kGroupedGemmConfigs, "{}: config {} not in [-1, {})", op, config,
              launch::kGroupedGemmConfigs);
}

void zero_async(Tensor& t, cudaStream_t stream) {
  if (t.numel() > 0) CUDA_CHECK(cudaMemsetAsync(t.raw_data(), 0, t.num_bytes(), stream));
}

const uint16_t* bits(const Tensor& t) { return static_cast<const uint16_t*>(t.raw_data()); }
uint16_t* bits(Tensor& t) { return static_cast<uint16_t*>(t.raw_data()); }

// The bf16 (rows, cols) output of fwd / dgrad: allocated when undefined, else checked; zeroed when
// the reduction is empty. Returns whether there is anything left to launch.
bool prepare_bf16_output(Tensor& out, int64_t rows, int64_t cols, int64_t reduction, const char* name,
                         cudaStream_t stream) {
  if (!out.defined()) out = Tensor::empty({rows, cols}, DType::kBF16, Device::kCuda);
  check_operand(out, DType::kBF16, 2, name);
  check_shape(out, {rows, cols}, name);
  if (rows == 0 || cols == 0) return false;
  if (reduction == 0) {
    zero_async(out, stream);
    return false;
  }
  return true;
}

void check_launch(cudaError_t err, const char* op, int64_t M, int64_t N, int64_t K, int64_t L, int config) {
  MOETP_CHECK(err == cudaSuccess, "{}(M = {}, N = {}, K = {}, L = {}, config = {}) failed: {}", op, M, N, K, L, config,
              cudaGetErrorString(err));
}

}  // namespace

void grouped_gemm_fwd(const Tensor& x_MK, const Tensor& offsets_L1, const Tensor& w_LNK, Tensor& y_MN,
                      cudaStream_t stream, int config) {
  const char* op = "cuda::grouped_gemm_fwd";
  check_operand(x_MK, DType::kBF16, 2, "cuda::grouped_gemm_fwd x_MK");
  check_operand(w_LNK, DType::kBF16, 3, "cuda::grouped_gemm_fwd w_LNK");
  check_config(op, config);
  const int64_t M = x_MK.size(0), K = x_MK.size(1), L = w_LNK.size(0), N = w_LNK.size(1);
  MOETP_CHECK(w_LNK.size(2) == K, "{}: w_LNK {} does not match x_MK {} (K = {})", op, w_LNK.describe(),
              x_MK.describe(), K);
  check_common(op, offsets_L1, M, N, K, L);
  if (!prepare_bf16_output(y_MN, M, N, K, "cuda::grouped_gemm_fwd y_MN", stream)) return;
  check_launch(launch::grouped_gemm_fwd(bits(x_MK), bits(w_LNK), offsets_L1.data<int64_t>(), bits(y_MN), M, N, K, L,
                                        stream, config),
               op, M, N, K, L, config);
}

void grouped_gemm_dgrad(const Tensor& dy_MN, const Tensor& offsets_L1, const Tensor& w_LNK, Tensor& dx_MK,
                        cudaStream_t stream, int config) {
  const char* op = "cuda::grouped_gemm_dgrad";
  check_operand(dy_MN, DType::kBF16, 2, "cuda::grouped_gemm_dgrad dy_MN");
  check_operand(w_LNK, DType::kBF16, 3, "cuda::grouped_gemm_dgrad w_LNK");
  check_config(op, config);
  const int64_t M = dy_MN.size(0), N = dy_MN.size(1), L = w_LNK.size(0), K = w_LNK.size(2);
  MOETP_CHECK(w_LNK.size(1) == N, "{}: w_LNK {} does not match dy_MN {} (N = {})", op, w_LNK.describe(),
              dy_MN.describe(), N);
  check_common(op, offsets_L1, M, N, K, L);
  if (!prepare_bf16_output(dx_MK, M, K, N, "cuda::grouped_gemm_dgrad dx_MK", stream)) return;
  check_launch(launch::grouped_gemm_dgrad(bits(dy_MN), bits(w_LNK), offsets_L1.data<int64_t>(), bits(dx_MK), M, N, K,
                                          L, stream, config),
               op, M, N, K, L, config);
}

void grouped_gemm_wgrad(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& offsets_L1, Tensor& dw_LNK,
                        cudaStream_t stream, int config, bool accumulate) {
  const char* op = "cuda::grouped_gemm_wgrad";
  check_operand(dy_MN, DType::kBF16, 2, "cuda::grouped_gemm_wgrad dy_MN");
  check_operand(x_MK, DType::kBF16, 2, "cuda::grouped_gemm_wgrad x_MK");
  check_operand(dw_LNK, DType::kF32, 3, "cuda::grouped_gemm_wgrad dw_LNK");
  check_config(op, config);
  const int64_t M = x_MK.size(0), K = x_MK.size(1), N = dy_MN.size(1), L = dw_LNK.size(0);
  MOETP_CHECK(dy_MN.size(0) == M, "{}: dy_MN {} and x_MK {} must have the same rows", op, dy_MN.describe(),
              x_MK.describe());
  check_shape(dw_LNK, {L, N, K}, "cuda::grouped_gemm_wgrad dw_LNK");
  check_common(op, offsets_L1, M, N, K, L);
  if (M == 0 || N == 0 || K == 0) {  // nothing to add; overwriting, dw = 0
    if (!accumulate && dw_LNK.numel() > 0) {
      CUDA_CHECK(cudaMemsetAsync(dw_LNK.raw_data(), 0, dw_LNK.num_bytes(), stream));
    }
    return;
  }
  check_launch(launch::grouped_gemm_wgrad(bits(dy_MN), bits(x_MK), offsets_L1.data<int64_t>(), dw_LNK.data<float>(), M,
                                          N, K, L, stream, config, accumulate),
               op, M, N, K, L, config);
}

}  // namespace moetp::cuda
