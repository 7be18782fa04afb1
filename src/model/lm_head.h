// The LM head and its cross-entropy, over rows in chunks: logits = f · Wᵀ for a chunk of rows, the
// per-row losses (and, with a backward, dlogits in place of the logits), then df for the chunk's rows
// and dW += dlogitsᵀ · f. At most `chunk_rows` rows of logits exist at once. One phase of
// Qwen3MoeModel::forward_backward, and what bench/lm_head_cuda_bench.cpp times on its own.
//
// Legend: N rows (tokens), H hidden, V vocabulary.
#pragma once

#include <cstdint>

#include "backend/backend.h"

namespace moetp::model {

struct LmHeadGrads {
  Tensor* df_NH = nullptr;  // [OUT] (N, H) compute dtype, allocated when undefined or of another shape
  Tensor* dw_VH = nullptr;  // [IN/OUT] (V, H) f32, ACCUMULATED
  double ce_scale = 1.0;    // gradient scale of the summed cross-entropy
};

//   f_NH       [IN] (N, H) the final norm's output, the backend's compute dtype
//   w_VH       [IN] (V, H) the LM head's working weight
//   targets_N  [IN] (N) i32 on the backend; kIgnoreIndex rows carry no loss
//   chunk_rows rows of logits at once (>= 1)
//   grads      null: forward only
//   logits_NV  [OUT] optional: every row's logits (N, V), compute dtype (forward only)
// Returns the summed cross-entropy of the rows (chunks in row order, each chunk's rows in order).
double lm_head_loss(backend::Backend& be, const Tensor& f_NH, const Tensor& w_VH, const Tensor& targets_N,
                    int64_t chunk_rows, const LmHeadGrads* grads, Tensor* logits_NV = nullptr);

}  // namespace moetp::model
