// Causal grouped-query self-attention (Qwen3's eager attention: softmax(q·kᵀ · scale + causal mask)
// · v), CPU reference. Runs after the q/k norms and RoPE, before o_proj. Pure functions: no
// communication, no configuration.
//
// Shape legend: B sequences, S tokens per sequence, Q query heads, G key/value heads, D head_dim.
// Query head q reads key/value head q / (Q / G) (HF `repeat_kv`); scale = 1 / sqrt(D).
//
// Documents (packed batches): `doc_offsets` in the cu_seqlens style over the flat stream of the
// N = B·S tokens (document d is tokens [doc_offsets[d], doc_offsets[d + 1]); 0 first, N last,
// increasing; a document may continue from one row into the next). Token i attends to the tokens
// j <= i of its own document only. Empty: one document per row (token i of a row attends to tokens
// j <= i of that row).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.h"

namespace moetp::cpu {

// What the backward needs besides the inputs: the softmax is recomputed from q, k and this.
struct AttentionSaved {
  Tensor lse_BQS;  // (B, Q, S) f32, natural-log Σ_{j <= i} exp(scale · q_i · k_j) per query row
};

// Sizes read off validated attention arguments.
struct AttentionDims {
  int64_t B = 0;  // sequences
  int64_t S = 0;  // tokens per sequence
  int64_t Q = 0;  // query heads
  int64_t G = 0;  // key/value heads, Q % G == 0
  int64_t D = 0;  // head_dim
};

// Shape check shared by the attention kernels (dtype-agnostic, so another backend can call it):
// q (B, S, Q, D), k and v (B, S, G, D), D >= 1, G >= 1, Q % G == 0; errors quote the shapes.
AttentionDims check_attention_shapes(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD);

// Checks document offsets over N tokens (0 first, N last, strictly increasing); errors start with
// `what` and name the offsets.
void check_document_offsets(std::span<const int64_t> doc_offsets, int64_t N, const char* what);
// Whether the offsets are exactly one document per row of B rows of S tokens.
bool documents_are_rows(std::span<const int64_t> doc_offsets, int64_t B, int64_t S);
// The documents `doc_offsets` describes for inputs of dims `d` (one per row when empty), checked.
std::vector<int64_t> attention_documents(const AttentionDims& d, std::span<const int64_t> doc_offsets);

// Forward.
//   q_BSQD [IN]  (B, S, Q, D) f32, contiguous (the q_proj output viewed per head, after RoPE)
//   k_BSGD [IN]  (B, S, G, D) f32, contiguous (after RoPE)
//   v_BSGD [IN]  (B, S, G, D) f32, contiguous
//   saved  [OUT] may be null; else lse_BQS is (re)allocated and filled for backward
//   doc_offsets [IN] the documents (above); empty = one per row
//   returns out_BSQD (B, S, Q, D) f32, freshly allocated (view it as (B·S, Q·D) for o_proj)
// Scores accumulate in f32 (OpenBLAS); softmax subtracts the row max and sums in double.
Tensor attention_forward(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD, AttentionSaved* saved,
                         std::span<const int64_t> doc_offsets = {});

// Backward. With P the causal softmax and dP = dout · vᵀ per head:
//   dS = P ⊙ (dP − rowsum(P ⊙ dP)),  dq = scale · dS · k,  dk = Σ_group scale · dSᵀ · q,
//   dv = Σ_group Pᵀ · dout   (Σ_group: over the Q / G query heads sharing a key/value head)
//   dout_BSQD          [IN]  (B, S, Q, D) f32, dLoss/dout
//   q_BSQD, k_BSGD, v_BSGD [IN] as in forward; saved [IN] from the forward on the same inputs
//   dq_BSQD            [OUT] (B, S, Q, D) f32, OVERWRITTEN (allocated when undefined)
//   dk_BSGD, dv_BSGD   [OUT] (B, S, G, D) f32, OVERWRITTEN (allocated when undefined)
//   doc_offsets        [IN]  the forward's documents
// Outputs must not alias each other or any input.
void attention_backward(const Tensor& dout_BSQD, const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD,
                        const AttentionSaved& saved, Tensor& dq_BSQD, Tensor& dk_BSGD, Tensor& dv_BSGD,
                        std::span<const int64_t> doc_offsets = {});

}  // namespace moetp::cpu
