// Device kernels of the single-GPU MoE layer (moe/cuda_moe.h) that no op of kernels/cuda covers
// yet: the routing plan, forced-balance routing, the gather-side combine and the combine backward.
// Launchers only (raw pointers, no Tensor): host code calls them, device code lives in
// cuda_moe_kernels.cu. The host wrapper (CudaMoeLayer) checks every shape before a launch.
//
// CPU references (the same functions in f32):
//   routing_plan      the row order of moe/dispatcher.h (plan_local in dispatcher.cpp): rows sorted by
//                     expert, then token, then slot
//   combine_rows      moe::fold_weighted (combine) and moe::scatter_add_rows (dispatch backward)
//   combine_backward  moe::weighted_gather (dy) and moe::dot_rows (routing-weight gradient)
//
// Legend: N tokens, H hidden, E experts, K top-k, M = N·K dispatched rows. bf16 tensors are raw
// uint16_t bits. Every launcher enqueues on `stream` and returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moetp::moe::launch {

// Scratch bytes routing_plan needs for M = N·K rows (M <= INT32_MAX), for any E <= 1024.
size_t routing_plan_workspace_bytes(int64_t M);

// A stable radix sort of the M (token, slot) pairs by expert id, so rows come out sorted by expert,
// then token, then slot (the pairs start in n·K + k order).
//   topk_idx_NK [IN]  (N, K) i32, every id in [0, E) (not checked: ids come from the router);
//                     1 <= E <= 1024 (the router's limit), else cudaErrorInvalidValue
//   flat_M      [OUT] (M) i32: row i holds pair n·K + k
//   token_M     [OUT] (M) i64: row i holds token n (the gather index of cuda::gather_rows)
//   pos_NK      [OUT] (N, K) i32: pair (n, k) went to row pos[n, k] (the inverse of flat_M)
//   counts_E    [OUT] (E) i32: rows per expert
cudaError_t routing_plan(const int32_t* topk_idx_NK, int64_t N, int64_t K, int64_t E, void* workspace,
                         size_t workspace_bytes, int32_t* flat_M, int64_t* token_M, int32_t* pos_NK, int32_t* counts_E,
                         cudaStream_t stream);

// Round-robin routing for benchmarks: topk_idx[n, k] = (n·K + k) % E, topk_weight[n, k] = 1/K.
cudaError_t force_balance_routing(int32_t* topk_idx_NK, float* topk_weight_NK, int64_t N, int64_t K, int64_t E,
                                  cudaStream_t stream);

// out[n] = bf16(Σ_k w[n, k] · src[pos[n, k]] + add[n]), summed in f32 over k in slot order (the
// f32 multiply and add rounded separately, as the CPU fold). One block per token.
//   src_MH    [IN]  (M, H) bf16
//   pos_NK    [IN]  (N, K) i32 rows of src
//   weight_NK [IN]  (N, K) f32, or null: every weight 1 (a plain sum, the dispatch backward)
//   add_NH    [IN]  (N, H) f32, or null: nothing added
//   out_NH    [OUT] (N, H) bf16, OVERWRITTEN; must not alias the inputs
cudaError_t combine_rows(const uint16_t* src_MH, const int32_t* pos_NK, const float* weight_NK, const float* add_NH,
                         uint16_t* out_NH, int64_t N, int64_t K, int64_t H, cudaStream_t stream);

// Backward of the combine out[n] = Σ_k w[n, k] · y[pos[n, k]]; one block per dispatched row i with
// pair f = flat[i] = n·K + k:
//   dy[i]         = bf16(w[f] · dout[n])           (f32 multiply, one rounding)
//   dweight[f]    = Σ_h dout[n, h] · y[i, h]        (f32, fixed block-tree order)
//   dout_NH    [IN]  (N, H) bf16
//   y_MH       [IN]  (M, H) bf16, the forward's expert outputs
//   flat_M     [IN]  (M) i32 from routing_plan
//   weight_NK  [IN]  (N, K) f32
//   dy_MH      [OUT] (M, H) bf16, OVERWRITTEN; must not alias y_MH
//   dweight_NK [OUT] (N, K) f32, OVERWRITTEN (every pair is one row); null: not computed
cudaError_t combine_backward(const uint16_t* dout_NH, const uint16_t* y_MH, const int32_t* flat_M,
                             const float* weight_NK, uint16_t* dy_MH, float* dweight_NK, int64_t M, int64_t K,
                             int64_t H, cudaStream_t stream);

// `vexpert` (etp_spec §6.5) combine backward on the expert side: expert-side row i is entry
// c = cols[i] of received row q = rows[i] (moe/vexpert_plan.h). One block per row i:
//   dy[i]          = bf16(w[q, c] · dz[q])          (f32 multiply, one rounding; moe::weighted_gather)
//   dweight[q, c]  = Σ_h dz[q, h] · y[i, h]          (f32, fixed block-tree order; moe::dot_rows: each
//                                                    (q, c) is one row i, so "+=" is "=")
//   dz_QH      [IN]  (Q, H) bf16 the output gradient of each received row
//   y_RH       [IN]  (R, H) bf16 the forward's expert outputs (this rank's TP partials)
//   rows_R, cols_R [IN] (R) i64
//   weight_QC  [IN]  (Q, C) f32 the received weights
//   dy_RH      [OUT] (R, H) bf16, OVERWRITTEN; must not alias y_RH or dz_QH
//   dweight_QC [OUT] (Q, C) f32: the entries named by (rows, cols) written, the others untouched
//                    (the caller zeroes it); null: not computed
cudaError_t vexpert_combine_backward(const uint16_t* dz_QH, const uint16_t* y_RH, const int64_t* rows_R,
                                     const int64_t* cols_R, const float* weight_QC, int64_t C, uint16_t* dy_RH,
                                     float* dweight_QC, int64_t R, int64_t H, cudaStream_t stream);

// `vexpert` backward of the weight repetition (moe::vexpert_fold_weight_grad, the same order, so
// bit-identical): dweight[n, k] = Σ_{b in [tok_begin[n], tok_begin[n+1])} dw_sent[tok_rows[b], k].
//   dw_sent_SK   [IN]  (S, K) f32 in send order (vexpert_plan.h: entry k of a row to (p, t))
//   tok_begin_N1 [IN]  (N + 1) i64, tok_rows_S [IN] (S) i64 (moe::vexpert_token_rows)
//   dweight_NK   [OUT] (N, K) f32, OVERWRITTEN
cudaError_t vexpert_weight_grad(const float* dw_sent_SK, const int64_t* tok_begin_N1, const int64_t* tok_rows_S,
                                float* dweight_NK, int64_t N, int64_t K, cudaStream_t stream);

// out[i] = bf16(a[i] + b[i]) (f32 add, one rounding), or bf16(a[i]) when b is null.
cudaError_t add_to_bf16(const float* a, const float* b, uint16_t* out, int64_t n, cudaStream_t stream);

}  // namespace moetp::moe::launch
