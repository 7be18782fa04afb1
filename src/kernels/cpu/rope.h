// Rotary position embedding (Hugging Face Qwen3 `apply_rotary_pos_emb`), CPU reference: applied to
// q and k after their per-head RMSNorm and before attention. Pure functions: no communication, no
// configuration.
//
// Shape legend: N tokens on this rank, h heads (a layer's query heads, or its key heads), D head_dim.
// HF's rotate_half convention pairs element j with element j + D/2 (not adjacent elements):
//   inv_freq[j] = theta^(−2j/D),  angle[n, j] = positions[n] · inv_freq[j],   j in [0, D/2)
//   y[j]       = x[j] · cos − x[j + D/2] · sin
//   y[j + D/2] = x[j + D/2] · cos + x[j] · sin
// Angles, cos and sin are computed in double (HF computes inv_freq and the angles in f32, which loses
// ~position · 2⁻²⁴ radians at large positions; this reference is the exact rotation).
#pragma once

#include "core/tensor.h"

namespace moetp::cpu {

// Forward, in place.
//   x_NhD       [IN/OUT] (N, h, D) f32, contiguous, D even; rotated in place
//   positions_N [IN]     (N) i32, contiguous, each >= 0: the token's position in its sequence
//   theta       rope_theta from the model config, > 0
void rope_forward(Tensor& x_NhD, const Tensor& positions_N, double theta);

// Backward, in place: the rotation is orthogonal, so dx = Rᵀ · dy is the inverse rotation (the
// forward with the angle negated).
//   dx_NhD      [IN/OUT] (N, h, D) f32: dLoss/dy on entry, dLoss/dx on return
//   positions_N, theta   as in forward
void rope_backward(Tensor& dx_NhD, const Tensor& positions_N, double theta);

}  // namespace moetp::cpu
