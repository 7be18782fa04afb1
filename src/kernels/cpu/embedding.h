// Token embedding lookup (nn.Embedding, HF `model.embed_tokens`), CPU reference. First op of the
// forward pass; its backward is the last of the backward pass and scatters gradients into the table.
// Pure functions: no communication, no configuration.
//
// Shape legend: N tokens on this rank, V vocabulary, H hidden.
#pragma once

#include "core/tensor.h"

namespace moetp::cpu {

// y[n, :] = table[ids[n], :].
//   ids_N    [IN] (N) i32, contiguous; every id in [0, V) (an id outside throws, naming the
//                 position, the id and V)
//   table_VH [IN] (V, H) f32, contiguous
//   returns y_NH (N, H) f32, freshly allocated (rows are bit-exact copies of the table's)
Tensor embedding_forward(const Tensor& ids_N, const Tensor& table_VH);

// dtable[ids[n], :] += dy[n, :] for every n (repeated ids sum, in token order).
//   ids_N     [IN]  (N) i32, as in forward
//   dy_NH     [IN]  (N, H) f32, dLoss/dy
//   dtable_VH [OUT] (V, H) f32, ACCUMULATED (+=); must be defined. Rows of ids not present are
//                   untouched.
void embedding_backward(const Tensor& ids_N, const Tensor& dy_NH, Tensor& dtable_VH);

}  // namespace moetp::cpu
