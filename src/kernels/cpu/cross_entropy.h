// Softmax cross-entropy of the LM head's logits against the next-token targets, CPU reference: the
// loss at the end of the forward pass and the first gradient of the backward pass, fused. Pure
// functions: no communication, no configuration.
//
// Shape legend: N tokens on this rank, V vocabulary.
// The loss is a SUM over this rank's non-ignored targets; the caller all-reduces loss_sum and
// num_targets and divides, and passes grad_scale = 1 / (global target count) so that dlogits is the
// gradient of the global mean (HF's `loss_type = "ForCausalLM"` with reduction "mean").
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace moetp::cpu {

inline constexpr int32_t kIgnoreIndex = -100;  // PyTorch's ignore_index: target contributes nothing

struct CrossEntropyResult {
  double loss_sum = 0.0;    // Σ over non-ignored n of logsumexp(logits[n, :]) − logits[n, targets[n]]
  int64_t num_targets = 0;  // number of n with targets[n] != kIgnoreIndex
};

// Forward (and, when dlogits_NV is non-null, backward).
//   logits_NV  [IN]  (N, V) f32, contiguous
//   targets_N  [IN]  (N) i32, contiguous; each in [0, V) or kIgnoreIndex (anything else throws,
//                    naming the position and the value, before anything is written)
//   dlogits_NV [OUT] may be null (not computed); else (N, V) f32, OVERWRITTEN (allocated when
//                    undefined) with grad_scale · d loss_sum / d logits =
//                    grad_scale · (softmax(logits[n, :]) − one_hot(targets[n])), zero rows for
//                    ignored targets; may alias logits_NV (each row is read before it is written)
//   grad_scale multiplies dlogits only
//   loss_start the value loss_sum starts from
// Each row's log-softmax subtracts the row max and accumulates in double; loss_sum adds the rows in
// order to loss_start, so it does not depend on the thread count, and chunks of rows, each started
// from the running sum of the chunks before, give exactly the sum of the whole.
CrossEntropyResult cross_entropy_forward(const Tensor& logits_NV, const Tensor& targets_N, Tensor* dlogits_NV,
                                         float grad_scale, double loss_start = 0.0);

}  // namespace moetp::cpu
