// Dense GEMM for the CPU reference path: a checked row-major wrapper over OpenBLAS cblas_sgemm,
// plus the nn.Linear forward/backward every other CPU kernel (router, experts) is built from.
// Pure functions: no communication, no configuration.
//
// Shape legend: M rows, N output features, K input features (the reduction dimension).
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace moetp::cpu {

// C = alpha · op(A) · op(B) + beta · C, all row-major, f32.
//   op(A) is (M, K): A is (M, K) with row stride lda ≥ K, or (K, M) with lda ≥ M when trans_a.
//   op(B) is (K, N): B is (K, N) with row stride ldb ≥ N, or (N, K) with ldb ≥ K when trans_b.
//   C     [IN/OUT] (M, N) with row stride ldc ≥ N; must not alias A or B.
// BLAS semantics for beta: beta == 0 overwrites C (NaN/Inf already in C does not survive);
// otherwise C is scaled and accumulated into. M == 0 or N == 0 is a no-op; K == 0 still applies
// beta (C = beta · C). Dimensions and leading dimensions must fit in int32 (cblas's blasint).
// Threads and bits: OpenBLAS runs single-threaded (with its own threads the bits change with their
// number: 10% to 70% of the elements of the products in cpu_gemm_test differ between 1 and 2-4
// threads, OpenBLAS 0.3.21 on x86-64), and C is computed in fixed tiles of kGemmBlock rows by
// kGemmTileCols columns, one OpenBLAS call each, run by OpenMP. OpenBLAS's result for an element
// depends on the extent of the call (M and N), not only on its row and column, so the tiles make an
// element's bits depend only on its own tile: the result is bit-identical for any OpenMP thread
// count, and rows [r0, r0 + m) of C computed by a call on those rows alone equal the same rows of
// the whole product whenever r0 and m are multiples of kGemmBlock (or the rows run to the end):
// row-chunked products (the LM head, micro-batch chunks) reproduce the unchunked ones bit for bit.
inline constexpr int64_t kGemmBlock = 128;
inline constexpr int64_t kGemmTileCols = 1024;
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// y = x · wᵀ (nn.Linear without bias).
//   x_MK [IN]  (M, K) f32, contiguous
//   w_NK [IN]  (N, K) f32, contiguous
//   returns y_MN (M, N) f32, freshly allocated
Tensor linear(const Tensor& x_MK, const Tensor& w_NK);

// Backward of linear: dx = dy · w, dw += dyᵀ · x.
//   dy_MN [IN]  (M, N) f32, contiguous
//   x_MK  [IN]  (M, K) f32, contiguous
//   w_NK  [IN]  (N, K) f32, contiguous
//   dx_MK [OUT] (M, K) f32, OVERWRITTEN; may be null (not computed). If it points to an undefined
//               Tensor, one is allocated.
//   dw_NK [OUT] (N, K) f32, ACCUMULATED (+=); may be null (not computed). Must be defined.
void linear_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, Tensor* dx_MK, Tensor* dw_NK);

// Argument check shared by the CPU kernels: t is a defined, contiguous, CPU f32 tensor with `ndim`
// dimensions. Messages name the tensor.
void check_f32_cpu(const Tensor& t, int64_t ndim, const char* name);

}  // namespace moetp::cpu
