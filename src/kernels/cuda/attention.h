// Causal grouped-query self-attention on the GPU: fused flash-attention-2 style forward and backward
// that never materialise the S × S score matrix. Same math as the CPU reference
// (kernels/cpu/attention.h, the executable spec): softmax(q·kᵀ · scale + causal mask) · v with
// scale = 1 / sqrt(D); query head h reads key/value head h / (Q / G). Runs after the q/k norms and
// RoPE, before o_proj. Storage is bf16, softmax statistics and accumulation f32.
//
// Shape legend: B sequences, S tokens per sequence, Q query heads (Hq), G key/value heads (Hkv),
// D head_dim. Supported: 8 <= D <= 128 with D % 8 == 0; other D are rejected with an error naming D.
// Two kernels, chosen by D (launch::attention_uses_tensor_cores):
//   D = 64, 128  tensor cores (attention_tc_fwd.cu, attention_tc_bwd.cu): mma.sync m16n8k16 with bf16
//                operands and f32 accumulation. As in flash-attention-2, the softmax probabilities P
//                (forward and backward) and dS = P ⊙ (dP − delta) (backward) are rounded to bf16 to
//                enter the P·V, Pᵀ·dout, dSᵀ·q and dS·k products; scores, the online softmax, the row
//                sums and every accumulator stay f32. Expect an error of a few 1e-3 of the largest
//                output element against an f32 computation. dq is accumulated with f32 atomics.
//   other D      the f32 kernel (attention.cu): f32 FMA on tiles padded to 64 or 128 columns,
//                products in f32 throughout; about 9x slower than the tensor cores at D = 64 or 128
//                (bench/attention_cuda_bench.cpp).
//
// Stream semantics: work is enqueued on `stream` (nullptr = legacy default stream) and the call
// returns without waiting. Outputs are allocated with cudaMalloc (through core's hooks); temporaries
// are released by cudaFree, which waits for the device, so they never die under a running kernel.
#pragma once

#include <cuda_runtime.h>

#include "core/tensor.h"

namespace moetp::cuda {

// Forward.
//   q_BSQD  [IN]  (B, S, Q, D) bf16, CUDA, contiguous
//   k_BSGD  [IN]  (B, S, G, D) bf16, CUDA, contiguous; Q % G == 0
//   v_BSGD  [IN]  (B, S, G, D) bf16, CUDA, contiguous
//   lse_BQS [OUT] may be null; else (re)assigned a fresh (B, Q, S) f32 CUDA tensor holding the
//                 natural-log Σ_{j <= i} exp(scale · q_i · k_j) per query row (cpu::AttentionSaved)
//   returns out_BSQD (B, S, Q, D) bf16, freshly allocated
//   docs    [IN]  packed documents: (documents + 1) i64 CUDA offsets over the flat B·S tokens
//                 (cu_seqlens; the semantics of kernels/cpu/attention.h; the caller checks the
//                 values), head_dim 64 or 128 only; undefined = one document per row
Tensor attention_forward(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD, Tensor* lse_BQS,
                         cudaStream_t stream = nullptr, const Tensor& docs = Tensor());

// Backward (the flash-attention-2 backward: delta = rowsum(dout ⊙ out) in f32, P recomputed from
// lse, dq accumulated in f32 and rounded once at the end, dk/dv summed over the group's query heads).
//   dout_BSQD [IN]  (B, S, Q, D) bf16, dLoss/dout
//   q_BSQD, k_BSGD, v_BSGD [IN] as in forward
//   out_BSQD  [IN]  (B, S, Q, D) bf16, the forward's output on the same inputs
//   lse_BQS   [IN]  (B, Q, S) f32, the forward's lse on the same inputs
//   dq_BSQD   [OUT] (B, S, Q, D) bf16, OVERWRITTEN (allocated when undefined)
//   dk_BSGD, dv_BSGD [OUT] (B, S, G, D) bf16, OVERWRITTEN (allocated when undefined)
//   deterministic     [IN]  the key tiles add their dq shares in key-tile order (train.deterministic)
//   docs              [IN]  the forward's packed documents
// Outputs must not alias each other or any input. dq's f32 accumulation uses atomics: without
// `deterministic` in whatever order the key tiles run, so dq is not bitwise reproducible run to run
// (dk and dv are); with it in a fixed order, each key tile waiting for the one before it.
void attention_backward(const Tensor& dout_BSQD, const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD,
                        const Tensor& out_BSQD, const Tensor& lse_BQS, Tensor& dq_BSQD, Tensor& dk_BSGD,
                        Tensor& dv_BSGD, cudaStream_t stream = nullptr, bool deterministic = false,
                        const Tensor& docs = Tensor());

}  // namespace moetp::cuda
