// One micro-batch as the model consumes it: B rows of S tokens (N = B·S), each token with its
// next-token target (kIgnoreIndex = no loss there), its position in its document, and the document
// boundaries in the cu_seqlens style (document d is tokens [doc_offsets[d], doc_offsets[d + 1]),
// doc_offsets.back() == N). Host tensors; the model copies what it needs to its backend.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace moetp::model {

inline constexpr int32_t kIgnoreIndex = -100;

struct Batch {
  int64_t rows = 0;       // B
  int64_t seq_len = 0;    // S
  Tensor inputs;          // (N) i32
  Tensor targets;         // (N) i32; kIgnoreIndex where the loss mask is off
  Tensor positions;       // (N) i32: the token's position in its document (RoPE)
  std::vector<int64_t> doc_offsets;  // D + 1 entries, 0 first, N last, increasing

  int64_t num_tokens() const { return rows * seq_len; }
  // Whether every document is exactly one row (what the attention kernels compute today).
  bool one_document_per_row() const;
  // Checks the invariants above; errors name the values.
  void validate() const;

  // Rows of S + 1 token ids (B, S + 1) i32: inputs [:, :S], targets [:, 1:], one document per row,
  // positions 0..S-1. `loss_mask_BS` (optional, (B, S) i32, 0 = no loss on that target) turns
  // targets into kIgnoreIndex.
  static Batch from_rows(const Tensor& tokens_BS1, const Tensor& loss_mask_BS = Tensor());
};

}  // namespace moetp::model
