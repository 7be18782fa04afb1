// RMSNorm (Qwen3RMSNorm), CPU reference: the input and post-attention layer norms over the hidden
// size, the final norm, and the per-head q/k norms over head_dim (rows = tokens · heads).
// Pure functions: no communication, no configuration.
//
// Shape legend: R rows (N tokens for the layer norms, N · heads for q/k norms), D normalised size.
//   rstd[r] = 1 / sqrt(mean_d x[r, d]² + eps)
//   y[r, d] = w[d] · (x[r, d] · rstd[r])          (HF's order: normalise, then scale)
#pragma once

#include "core/tensor.h"

namespace moetp::cpu {

// Forward. The mean of squares accumulates in double; rstd is rounded to f32 before it scales x (as
// HF, which computes it in f32), and backward uses that same f32 rstd.
//   x_RD   [IN]  (R, D) f32, contiguous (view a (N, heads, head_dim) tensor as (N · heads, head_dim))
//   w_D    [IN]  (D) f32 (HF `*.weight`)
//   eps    rms_norm_eps from the model config, > 0
//   rstd_R [OUT] may be null; else (re)allocated as (R) f32 and filled for backward
//   returns y_RD (R, D) f32, freshly allocated
Tensor rmsnorm_forward(const Tensor& x_RD, const Tensor& w_D, float eps, Tensor* rstd_R);

// Backward, with g = dy ⊙ w and r = rstd:
//   dx[r, :] = r · (g[r, :] − x[r, :] · r² · (Σ_d g[r, d] x[r, d]) / D)
//   dw[d]   += Σ_r dy[r, d] · x[r, d] · r
//   dy_RD  [IN]  (R, D) f32, dLoss/dy
//   x_RD, w_D [IN] as in forward; rstd_R [IN] (R) f32 from the forward
//   dx_RD  [OUT] (R, D) f32, OVERWRITTEN (allocated when undefined); must not alias dy_RD or x_RD
//   dw_D   [OUT] (D) f32, ACCUMULATED (+=); must be defined. Row sums accumulate in double.
void rmsnorm_backward(const Tensor& dy_RD, const Tensor& x_RD, const Tensor& w_D, const Tensor& rstd_R,
                      Tensor& dx_RD, Tensor& dw_D);

}  // namespace moetp::cpu
