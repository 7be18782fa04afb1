// CUDA ops of the training step other than GEMM and attention: embedding, RMSNorm, RoPE, SwiGLU,
// router softmax/top-k, the dispatchers' row movement, fused cross-entropy, AdamW and the gradient
// norm. Each is held to its CPU reference (named per op) by tests/kernels/cuda_ops_test.cpp.
//
// Shape legend: N tokens on this rank, H hidden, V vocabulary, R rows, D normalised size / head_dim,
// h heads, E experts, K top-k, M rows after dispatch, i local expert FFN width, C weight columns.
//
// Common contract (every function below):
//   - Every tensor is defined, contiguous and on Device::kCuda; dtypes are as listed. Shape, dtype and
//     device errors throw moetp::Error before anything is launched, worded as the CPU kernels'.
//   - Storage: activations and parameters bf16, accumulators and master weights f32; all math in f32
//     (double where stated), one rounding on store.
//   - Asynchronous: work is queued on `stream` (nullptr = the legacy default stream) and the call
//     returns without waiting, except where a function says it synchronises. Functions marked
//     "uses workspace" allocate scratch memory (cudaMalloc through Tensor), synchronise `stream`
//     and free it before returning: they are synchronous for now.
//   - Sizes of 0 are no-ops (outputs of 0 elements are still returned/allocated).
//   - Values inside index tensors (token ids, rows, columns, targets, positions) are NOT checked on the
//     host (that would need a copy and a sync). Kernels never access memory out of bounds: a bad index
//     is skipped as each op documents and recorded; check_index_faults() reports the first one.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.h"

namespace moetp::cuda {

// Synchronises `stream`, then throws moetp::Error describing the first bad index any op has seen
// since the last call (op, position, value, bound, and how many were bad), and clears the record.
// Returns normally when there were none. Call it once per step (it costs one sync). The record is one
// per process, on the device current when the first op ran (one GPU per process).
void check_index_faults(cudaStream_t stream = nullptr);

// ---- embedding (cpu/embedding.h) ----------------------------------------------------------------

// y[n, :] = table[ids[n], :], bit-exact row copies.
//   ids_N    [IN] (N) i32; a bad id (not in [0, V)) gives a zero row and a fault
//   table_VH [IN] (V, H) bf16
//   returns y_NH (N, H) bf16, freshly allocated
Tensor embedding_forward(const Tensor& ids_N, const Tensor& table_VH, cudaStream_t stream = nullptr);

// dtable[ids[n], :] += f32(dy[n, :]). Deterministic: repeated ids add in token order, exactly the CPU
// reference's sequence of f32 additions (bit-identical to it). Uses workspace.
//   ids_N     [IN]  (N) i32; bad ids are skipped (fault)
//   dy_NH     [IN]  (N, H) bf16
//   dtable_VH [OUT] (V, H) f32, ACCUMULATED (+=); must be defined
void embedding_backward(const Tensor& ids_N, const Tensor& dy_NH, Tensor& dtable_VH, cudaStream_t stream = nullptr);

// ---- RMSNorm (cpu/rmsnorm.h) --------------------------------------------------------------------

// y[r, d] = bf16(w[d] · (x[r, d] · rstd[r])), rstd[r] = 1 / sqrt(mean_d x² + eps) in f32.
//   x_RD   [IN]  (R, D) bf16 (view (N, h, D) as (N·h, D) for the q/k norms); D >= 1
//   w_D    [IN]  (D) bf16
//   eps    > 0
//   rstd_R [OUT] may be null; else (re)allocated as (R) f32 for backward
//   returns y_RD (R, D) bf16, freshly allocated
Tensor rmsnorm_forward(const Tensor& x_RD, const Tensor& w_D, float eps, Tensor* rstd_R,
                       cudaStream_t stream = nullptr);

// dx = rstd · (g − x · rstd² · (Σ_d g·x) / D), g = dy ⊙ w;  dw[d] += Σ_r dy[r, d] · x[r, d] · rstd[r].
// dw is summed over fixed 64-row chunks, then over chunks in a fixed tree: deterministic. Uses
// workspace. R <= 65535 · 64 rows per call.
//   dy_RD, x_RD [IN] (R, D) bf16;  w_D [IN] (D) bf16;  rstd_R [IN] (R) f32 from the forward
//   dx_RD  [OUT] (R, D) bf16, OVERWRITTEN (allocated when undefined); must not alias dy_RD or x_RD
//   dw_D   [OUT] (D) f32, ACCUMULATED (+=); must be defined
void rmsnorm_backward(const Tensor& dy_RD, const Tensor& x_RD, const Tensor& w_D, const Tensor& rstd_R,
                      Tensor& dx_RD, Tensor& dw_D, cudaStream_t stream = nullptr);

// ---- RoPE (cpu/rope.h; HF rotate_half pairs (j, j + D/2)) -----------------------------------------

// In place. inv_freq, angles, cos and sin in double (as the CPU reference), rotation in double,
// result rounded to f32 and then to bf16.
//   x_NhD       [IN/OUT] (N, h, D) bf16, D even, D <= 4096
//   positions_N [IN]     (N) i32; a negative position leaves the token untouched (fault)
//   theta       > 0
void rope_forward(Tensor& x_NhD, const Tensor& positions_N, double theta, cudaStream_t stream = nullptr);
// Backward, in place: the inverse rotation (dLoss/dy on entry, dLoss/dx on return).
void rope_backward(Tensor& dx_NhD, const Tensor& positions_N, double theta, cudaStream_t stream = nullptr);

// ---- SwiGLU (cpu/experts.h) ---------------------------------------------------------------------

// a[m, c] = silu(h[m, c]) · h[m, i + c].
//   h_M2i [IN] (M, 2i) bf16 (gate | up);  returns a_Mi (M, i) bf16
Tensor swiglu_forward(const Tensor& h_M2i, cudaStream_t stream = nullptr);
// dgate = da · up · σ(g) · (1 + g · (1 − σ(g))),  dup = da · silu(g).
//   h_M2i [IN] (M, 2i) bf16;  da_Mi [IN] (M, i) bf16;  returns dh_M2i (M, 2i) bf16
Tensor swiglu_backward(const Tensor& h_M2i, const Tensor& da_Mi, cudaStream_t stream = nullptr);

// ---- router (cpu/router.h, after the logits GEMM) -----------------------------------------------

struct RouterOutput {
  Tensor probs_NE;        // (N, E) f32, softmax over E
  Tensor topk_idx_NK;     // (N, K) i32, by probability descending; ties -> lower expert id first
  Tensor topk_weight_NK;  // (N, K) f32, the top-k probabilities, renormalised to sum 1 when norm_topk_prob
};

// Softmax in f32 (max-subtracted), top-K over the f32 probabilities, renormalisation in double.
//   logits_NE [IN] (N, E) f32, 1 <= K <= E <= 1024. Logits are not checked for NaN/Inf (the CPU
//             throws): a NaN row selects experts 0..K-1 with NaN weights.
RouterOutput router_forward(const Tensor& logits_NE, int64_t K, bool norm_topk_prob, cudaStream_t stream = nullptr);

// cpu::router_logits_grad: gradient flows through the selected probabilities (and their sum when
// norm_topk_prob) and d_probs_NE; per-token reductions in double.
//   fwd               [IN] the forward's result (probs_NE, topk_idx_NK, topk_weight_NK)
//   d_topk_weight_NK  [IN] (N, K) f32, or undefined = zero
//   d_probs_NE        [IN] (N, E) f32, or undefined = zero
//   returns dlogits_NE (N, E) f32, freshly allocated. topk ids outside [0, E) are skipped (fault).
Tensor router_logits_grad(const RouterOutput& fwd, bool norm_topk_prob, const Tensor& d_topk_weight_NK,
                          const Tensor& d_probs_NE, cudaStream_t stream = nullptr);

// ---- row movement (moe/row_ops.h) ---------------------------------------------------------------

// out[i] = src[rows[i]], bit-exact.
//   src_RH [IN] (R, ...) any dtype, rows of H = row_numel elements
//   rows_M [IN] (M) i64 on the device; a bad row gives a zero row (fault)
//   returns out (M, ...) same dtype, freshly allocated
Tensor gather_rows(const Tensor& src_RH, const Tensor& rows_M, cudaStream_t stream = nullptr);

// dst[rows[i]] += src[i], deterministic: rows repeated in `rows` add in increasing i, bit-identical
// to moe::scatter_add_rows on the same f32 values. Uses workspace.
//   src_MH [IN]  (M, H) bf16 or f32
//   rows_M [IN]  (M) i64; bad rows are skipped (fault)
//   dst_RH [OUT] (R, H) f32, ACCUMULATED (+=); must not alias src_MH
void scatter_add_rows(const Tensor& src_MH, const Tensor& rows_M, Tensor& dst_RH, cudaStream_t stream = nullptr);

// dst[rows[i]] += w[rows[i], cols[i]] · y[i], deterministic and bit-identical to moe::fold_weighted
// (f32 multiply, then add, in increasing i). Uses workspace.
//   y_MH   [IN]  (M, H) bf16 or f32
//   rows_M [IN]  (M) i64; bad rows are skipped (fault)
//   cols_M [IN]  (M) i64; bad columns skip their row (fault)
//   w_RC   [IN]  (R, C) f32
//   dst_RH [OUT] (R, H) f32, ACCUMULATED (+=)
void fold_weighted(const Tensor& y_MH, const Tensor& rows_M, const Tensor& cols_M, const Tensor& w_RC,
                   Tensor& dst_RH, cudaStream_t stream = nullptr);

// ---- cross-entropy (cpu/cross_entropy.h) ---------------------------------------------------------

// Per-row loss and (optionally) its gradient, one block per row: max and Σ exp in f32 (online), then
// loss[n] = logsumexp(logits[n, :]) − logits[n, targets[n]], and
// dlogits[n, :] = grad_scale · (softmax(logits[n, :]) − one_hot(targets[n])).
//   logits_NV  [IN]  (N, V) f32 or bf16, V >= 1
//   targets_N  [IN]  (N) i32, each in [0, V) or -100 (ignored: loss 0, zero gradient row); anything
//                    else is treated as ignored (fault)
//   dlogits_NV [OUT] may be null (not computed); else (N, V) in the logits' dtype, OVERWRITTEN
//                    (allocated when undefined); may alias logits_NV
//   returns loss_N (N) f32, freshly allocated. The caller sums it (in double: loss_sum of the CPU
//   reference) and counts targets != -100.
Tensor cross_entropy_forward(const Tensor& logits_NV, const Tensor& targets_N, Tensor* dlogits_NV, float grad_scale,
                             cudaStream_t stream = nullptr);

// ---- optimiser (train/optim.h) ------------------------------------------------------------------

struct AdamWHyper {
  double lr = 0.0;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.0;  // 0: no decay (norm weights)
  int64_t step = 1;           // counts from 1
};

// One AdamW step, the formula of train::AdamW::step element by element (f32 moments, double
// update): bit-identical to it on the same inputs.
//   w [IN/OUT] f32 master weights;  g [IN] f32 gradient;  m, v [IN/OUT] f32 moments (same shape), or
//   both bf16 (read as f32, stored rounded to nearest even: cpu::adamw_step's bits)
//   w_bf16 [OUT] may be null; else a bf16 tensor of w's shape, OVERWRITTEN with bf16(new w)
void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const AdamWHyper& hyper, Tensor* w_bf16 = nullptr,
                cudaStream_t stream = nullptr);

// Σ g² in double: per-block double partials (a grid that depends only on numel, so the result is the
// same on every device and run), added in order on the host. Synchronises `stream`.
//   g [IN] f32, any shape
double sum_of_squares(const Tensor& g, cudaStream_t stream = nullptr);
// The same for several tensors at once (one synchronisation): out[i] == sum_of_squares(gs[i]).
std::vector<double> sums_of_squares(std::span<const Tensor> gs, cudaStream_t stream = nullptr);

}  // namespace moetp::cuda
