// Grouped SwiGLU over this rank's local expert shards, CPU reference (etp_spec §4). Runs between
// dispatch and combine: rows arrive grouped by local expert; with T > 1 each rank holds a 1/T slice
// of every expert's FFN width and produces an H-wide partial output that combine sums over the TP
// group. Pure functions: no communication, no config.
//
// Shape legend: M rows after dispatch, H hidden, L local experts, i = I/T this rank's slice of the
// per-expert FFN width.
//   h_M2i = x · w13ᵀ      (per expert; columns [0, i) gate, [i, 2i) up)
//   a_Mi  = silu(h[:, :i]) ⊙ h[:, i:]
//   y_MH  = a · w2ᵀ
#pragma once

#include <cstdint>
#include <span>

#include "core/tensor.h"

namespace moetp::cpu {

// Activations the backward needs.
struct ExpertsSaved {
  Tensor h_M2i;  // (M, 2i) f32, gate | up pre-activations
  Tensor a_Mi;   // (M, i)  f32, silu(gate) ⊙ up
};

// Sizes read off validated expert arguments.
struct ExpertsDims {
  int64_t M = 0;  // rows
  int64_t H = 0;  // hidden size
  int64_t L = 0;  // local experts
  int64_t i = 0;  // local FFN width
};

// Shape check shared by the experts kernels (dtype-agnostic, so another backend can call it). L comes
// from offsets, H from x_MH, i from w2_LHi; errors quote the expected and actual shapes.
//   x_MH      (M, H)
//   offsets   L+1 entries, offsets[0] == 0, offsets[L] == M, non-decreasing
//   w13_L2iH  (L, 2i, H)
//   w2_LHi    (L, H, i)
ExpertsDims check_experts_shapes(const Tensor& x_MH, std::span<const int64_t> offsets, const Tensor& w13_L2iH,
                                 const Tensor& w2_LHi);

// Forward. Rows are grouped by local expert: expert j owns rows [offsets[j], offsets[j+1]); empty
// experts are allowed.
//   x_MH      [IN]  (M, H) f32, contiguous
//   offsets   [IN]  L+1 entries, offsets[0] = 0, offsets[L] = M, non-decreasing
//   w13_L2iH  [IN]  (L, 2i, H) f32: for expert j rows [0, i) gate_proj slice, [i, 2i) up_proj slice
//   w2_LHi    [IN]  (L, H, i) f32: down_proj columns of this slice
//   saved     [OUT] may be null; else h_M2i and a_Mi are (re)allocated and filled for backward
//   returns y_MH (M, H) f32, freshly allocated (a partial sum over the TP group when T > 1)
Tensor experts_forward(const Tensor& x_MH, std::span<const int64_t> offsets, const Tensor& w13_L2iH,
                       const Tensor& w2_LHi, ExpertsSaved* saved);

// Backward.
//   dy_MH      [IN]  (M, H) f32, dLoss/dy
//   x_MH, offsets, w13_L2iH, w2_LHi [IN] as in forward; saved [IN] from the forward
//   dx_MH      [OUT] (M, H) f32, OVERWRITTEN (allocated when undefined); the gradient of this
//                    rank's partial output only (combine's backward already handed every TP rank the
//                    full dy, so the TP partials of dx are summed by dispatch's backward)
//   dw13_L2iH  [OUT] (L, 2i, H) f32, ACCUMULATED (+=); must be defined
//   dw2_LHi    [OUT] (L, H, i) f32, ACCUMULATED (+=); must be defined
void experts_backward(const Tensor& dy_MH, const Tensor& x_MH, std::span<const int64_t> offsets,
                      const Tensor& w13_L2iH, const Tensor& w2_LHi, const ExpertsSaved& saved, Tensor& dx_MH,
                      Tensor& dw13_L2iH, Tensor& dw2_LHi);

// Elementwise SwiGLU: a[m, c] = silu(h[m, c]) · h[m, i + c], silu(g) = g · sigmoid(g).
//   h_M2i [IN] (M, 2i) f32, contiguous; returns a_Mi (M, i)
Tensor swiglu_forward(const Tensor& h_M2i);

// Backward of swiglu_forward.
//   h_M2i [IN] (M, 2i); da_Mi [IN] (M, i); returns dh_M2i (M, 2i):
//   dgate = da · up · sigmoid(g) · (1 + g · (1 − sigmoid(g))),  dup = da · silu(g)
Tensor swiglu_backward(const Tensor& h_M2i, const Tensor& da_Mi);

}  // namespace moetp::cpu
