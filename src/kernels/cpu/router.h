// Qwen3-MoE router and its load-balancing loss, CPU reference (etp_spec §5). The router runs
// replicated on every rank on that rank's own tokens, before dispatch; the aux loss is a function of
// GLOBAL per-expert statistics (summed over MoE layers and all-reduced over ranks by the caller), so
// every parallel layout gives the single-rank value. Pure functions: no communication, no config.
//
// Shape legend: N tokens on this rank, H hidden, E routed experts, K experts per token (top-k).
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace moetp::cpu {

// Everything the router produces; backward reads all four.
struct RouterForward {
  Tensor logits_NE;       // (N, E) f32, x · Wgᵀ
  Tensor probs_NE;        // (N, E) f32, softmax over E
  Tensor topk_idx_NK;     // (N, K) i32 global expert ids, by probability descending; ties -> lower id first
  Tensor topk_weight_NK;  // (N, K) f32, the top-k probabilities, renormalised to sum 1 when norm_topk_prob
};

// Forward.
//   x_NH  [IN] (N, H) f32, contiguous
//   wg_EH [IN] (E, H) f32, contiguous (HF `mlp.gate.weight`)
//   K     1 ≤ K ≤ E
// Throws moetp::Error on shape/dtype mismatch, K out of range, or a NaN/Inf logit (naming the token,
// expert and value). Top-k compares the f32 probabilities (as HF's torch.topk on softmax output).
RouterForward router_forward(const Tensor& x_NH, const Tensor& wg_EH, int64_t K, bool norm_topk_prob);

// Gradient w.r.t. the logits, the part of router_backward before the GEMMs. The top-k selection is
// piecewise constant and carries no gradient; gradients flow through the selected probabilities
// (and, with norm_topk_prob, through their sum) and through d_probs_NE.
//   fwd               [IN] the forward's result
//   d_topk_weight_NK  [IN] (N, K) f32, dLoss/d topk_weight; undefined = zero
//   d_probs_NE        [IN] (N, E) f32, extra dLoss/d probs (the aux loss); undefined = zero
//   returns dlogits_NE (N, E) f32, freshly allocated
Tensor router_logits_grad(const RouterForward& fwd, bool norm_topk_prob, const Tensor& d_topk_weight_NK,
                          const Tensor& d_probs_NE);

// Backward: router_logits_grad followed by the linear backward.
//   dx_NH  [OUT] (N, H) f32, OVERWRITTEN (allocated when undefined)
//   dwg_EH [OUT] (E, H) f32, ACCUMULATED (+=); must be defined
void router_backward(const Tensor& x_NH, const Tensor& wg_EH, const RouterForward& fwd, bool norm_topk_prob,
                     const Tensor& d_topk_weight_NK, const Tensor& d_probs_NE, Tensor& dx_NH, Tensor& dwg_EH);

// Per-expert statistics of one layer on this rank's tokens, for the load-balancing loss.
//   counts_E   [OUT] (E) f32, OVERWRITTEN (allocated when undefined): number of (token, slot) pairs
//                    routed to e; Σ_e counts_E[e] = N·K
//   prob_sum_E [OUT] (E) f32, OVERWRITTEN (allocated when undefined): Σ_n probs[n, e]
// The caller sums them over MoE layers and all-reduces them over the data-parallel ranks.
void router_stats(const RouterForward& fwd, Tensor& counts_E, Tensor& prob_sum_E);

// Load-balancing loss of Hugging Face transformers' Qwen3-MoE (`load_balancing_loss_func`, called
// without an attention mask; the model adds router_aux_loss_coef times it to the LM loss). HF
// concatenates the router logits of all L MoE layers into [L·N, E], softmaxes, takes top-K and returns
//   E · Σ_k Σ_e mean_rows(one_hot(topk)[:, k, e]) · mean_rows(probs[:, e])
// which equals
//   aux = E / (L·N)² · Σ_e C_e · P_e
// with C_e = total count of e over all layers, tokens and slots, P_e = total probability mass of e
// over all layers and tokens, N = GLOBAL tokens per layer (all ranks, the whole step's batch).
//   counts_E   [IN] (E) f32, C_e summed over layers and ranks (router_stats, summed)
//   prob_sum_E [IN] (E) f32, P_e summed over layers and ranks
// Accumulates in double; returns the loss without the coefficient.
double aux_loss_from_stats(const Tensor& counts_E, const Tensor& prob_sum_E, int64_t num_layers,
                           int64_t num_tokens);

// d(coef · aux)/d probs for one layer's local tokens. The counts come from a non-differentiable top-k,
// so only P_e carries gradient: every row is coef · E / (L·N)² · C_e. Feed it to router_backward
// as d_probs_NE.
//   counts_E [IN] (E) f32 GLOBAL counts (as for aux_loss_from_stats); E == num_experts
//   returns d_probs_NE (N_local, E) f32
Tensor aux_loss_grad_probs(const Tensor& counts_E, int64_t num_experts, int64_t num_layers, int64_t num_tokens,
                           float coef, int64_t N_local);

}  // namespace moetp::cpu
