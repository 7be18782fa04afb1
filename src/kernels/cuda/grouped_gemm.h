// Hopper grouped GEMM for the expert shards (issue 7): the three products of the grouped expert linear
// layers as single persistent TMA + wgmma launches (grouped_gemm.cu) with the group boundaries read
// from device memory, so no host synchronisation and no per-group host calls. Same math as
// cuda::grouped_linear / grouped_linear_backward (gemm.h, one cuBLAS call per group), which stay the
// path the MoE layer uses until these are validated on the device; CPU reference: cpu::linear and
// cpu::linear_backward applied per group.
//
// Shape legend: M rows (group-major: group l owns rows [offsets[l], offsets[l+1])), N output features,
// K input features, L groups (local experts).
//   offsets_L1 [IN] CUDA int64, L + 1 entries, 0 = offsets[0] <= ... <= offsets[L] = M. Not checked
//              (it lives on the device); malformed offsets give meaningless results, never
//              out-of-bounds accesses. Empty groups are allowed.
// Requirements (checked, moetp::Error quoting the shapes): bf16 operands, CUDA, contiguous, 16-byte
// aligned; N % 8 == 0 and K % 8 == 0 (TMA row strides); 1 <= L <= 1024; sizes below 2^31.
// bf16 outputs are rounded once from f32 accumulators. Work is enqueued on `stream`; calls return
// without waiting. `config`: tile configuration (launch::kGroupedGemmConfigs, for tests and the
// benchmark); -1 picks one per shape (launch::grouped_gemm_auto_config_for).
#pragma once

#include <cuda_runtime.h>

#include "core/tensor.h"

namespace moetp::cuda {

// Forward: y[rows of l] = x[rows of l] · w[l]ᵀ.
//   x_MK  [IN]  (M, K) bf16
//   w_LNK [IN]  (L, N, K) bf16
//   y_MN  [OUT] (M, N) bf16, OVERWRITTEN (allocated when undefined); must not alias x_MK
void grouped_gemm_fwd(const Tensor& x_MK, const Tensor& offsets_L1, const Tensor& w_LNK, Tensor& y_MN,
                      cudaStream_t stream = nullptr, int config = -1);

// Input gradient: dx[rows of l] = dy[rows of l] · w[l].
//   dy_MN [IN]  (M, N) bf16
//   w_LNK [IN]  (L, N, K) bf16
//   dx_MK [OUT] (M, K) bf16, OVERWRITTEN (allocated when undefined); must not alias dy_MN
void grouped_gemm_dgrad(const Tensor& dy_MN, const Tensor& offsets_L1, const Tensor& w_LNK, Tensor& dx_MK,
                        cudaStream_t stream = nullptr, int config = -1);

// Weight gradient: dw[l] += dy[rows of l]ᵀ · x[rows of l] (beta = 1, as the cuBLAS path).
//   dy_MN  [IN]  (M, N) bf16
//   x_MK   [IN]  (M, K) bf16
//   dw_LNK [OUT] (L, N, K) f32, ACCUMULATED; empty groups untouched; must be defined. Deterministic.
//   accumulate = false: OVERWRITTEN instead (dw is not read; empty groups become zero).
void grouped_gemm_wgrad(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& offsets_L1, Tensor& dw_LNK,
                        cudaStream_t stream = nullptr, int config = -1, bool accumulate = true);

}  // namespace moetp::cuda
