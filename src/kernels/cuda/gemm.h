// cuBLAS GEMMs for the CUDA path: nn.Linear forward/backward (attention projections, router, lm
// head) and the grouped expert GEMMs of the SwiGLU experts (kernels/cpu/experts.h), with bf16
// operands and f32 accumulation. CPU references: cpu::linear / cpu::linear_backward
// (kernels/cpu/gemm.h) applied per group. Pure functions: no communication, no configuration.
//
// Shape legend: M rows, N output features, K input features (the reduction), L groups (local
// experts). Grouped rows are group-major: group l owns rows [offsets[l], offsets[l+1]); empty groups
// are allowed (offsets on the host, L + 1 entries, offsets[0] == 0, offsets[L] == M, non-decreasing).
//
// All tensors are CUDA, contiguous, row-major. Work is enqueued on `stream` (nullptr = legacy
// default stream) and the calls return without waiting. Reductions never run in reduced precision
// (CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION); bf16 outputs are rounded once from f32.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "core/tensor.h"

namespace moetp::cuda {

// This thread's cuBLAS handle for the current device, created on first use (RAII: destroyed with
// its workspaces at thread exit), bound to `stream` and to a workspace of its own for this
// (thread, device, stream) (32 MiB, the size cuBLAS recommends for Hopper), so calls on different
// streams never share scratch memory. Valid until the next call on this thread.
cublasHandle_t cublas_handle(cudaStream_t stream);
// This thread's cuBLASLt handle for the current device (same lifetime rules), for kernels that go
// through cublasLt (epilogues, the future grouped path).
cublasLtHandle_t cublaslt_handle();

// y = x · wᵀ (nn.Linear without bias).
//   x_MK [IN]  (M, K) bf16
//   w_NK [IN]  (N, K) bf16
//   returns y_MN (M, N) bf16, freshly allocated; f32 accumulation
Tensor linear(const Tensor& x_MK, const Tensor& w_NK, cudaStream_t stream = nullptr);

// Backward of linear: dx = dy · w, dw += dyᵀ · x.
//   dy_MN [IN]  (M, N) bf16
//   x_MK  [IN]  (M, K) bf16
//   w_NK  [IN]  (N, K) bf16
//   dx_MK [OUT] (M, K) bf16, OVERWRITTEN; may be null (not computed); allocated when undefined
//   dw_NK [OUT] (N, K) f32, ACCUMULATED (+=); may be null (not computed); must be defined
// Outputs must not alias inputs.
void linear_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, Tensor* dx_MK, Tensor* dw_NK,
                     cudaStream_t stream = nullptr);

// Grouped linear: y[rows of l] = x[rows of l] · w[l]ᵀ for every group l (one cublasGemmEx per
// non-empty group for now).
//   x_MK    [IN]  (M, K) bf16
//   offsets [IN]  host, L + 1 entries (see the legend)
//   w_LNK   [IN]  (L, N, K) bf16
//   y_MN    [OUT] (M, N) bf16, OVERWRITTEN (allocated when undefined); must not alias x_MK
void grouped_linear(const Tensor& x_MK, std::span<const int64_t> offsets, const Tensor& w_LNK, Tensor& y_MN,
                    cudaStream_t stream = nullptr);

// Backward of grouped_linear: dx[rows of l] = dy[rows of l] · w[l], dw[l] += dy[rows of l]ᵀ · x[rows of l].
//   dy_MN   [IN]  (M, N) bf16
//   x_MK, offsets, w_LNK [IN] as in grouped_linear
//   dx_MK   [OUT] (M, K) bf16, OVERWRITTEN; may be null (not computed); allocated when undefined
//   dw_LNK  [OUT] (L, N, K) f32, ACCUMULATED (+=; empty groups untouched); may be null; must be defined
void grouped_linear_backward(const Tensor& dy_MN, const Tensor& x_MK, std::span<const int64_t> offsets,
                             const Tensor& w_LNK, Tensor* dx_MK, Tensor* dw_LNK, cudaStream_t stream = nullptr);

}  // namespace moetp::cuda
