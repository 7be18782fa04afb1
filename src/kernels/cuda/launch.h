// Kernel launchers: the boundary between host C++ (compiled by g++, uses Tensor, fmt and
// moetp::Error) and device code (compiled by nvcc, sees only raw pointers and sizes). Launchers
// return the launch's cudaError_t; the host wrapper turns it into a moetp::Error naming the op.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moetp::cuda::launch {

// dst[i] = bf16(src[i]) round-to-nearest-even; dst holds raw bf16 bits.
cudaError_t cast_f32_to_bf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);
// dst[i] = f32(src[i]).
cudaError_t cast_bf16_to_f32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream);

}  // namespace moetp::cuda::launch

// ---- attention (attention.cu, attention_tc_*.cu; contract in attention.h) -------------------------
// Causal grouped-query attention, bf16 storage with f32 math. Layouts: q/out/dout (B, S, Hq, D),
// k/v/dk/dv (B, S, Hkv, D), lse/delta (B, Hq, S) f32, dq_accum (B, S, Hq, D) f32. Requirements
// (checked by the host wrapper): 8 <= D <= 128, D % 8 == 0, Hq % Hkv == 0, 16-byte aligned rows.
namespace moetp::cuda::launch {

// Which kernels compute the attention. kAuto: the tensor-core kernels (attention_tc_*.cu: mma.sync
// bf16, P and dS rounded to bf16) for D = 64 and D = 128, the f32 kernels (attention.cu) for every
// other supported D. kF32: the f32 kernels for any supported D (the benchmark's baseline).
enum class AttentionKernel : int32_t { kAuto = 0, kF32 = 1 };
bool attention_uses_tensor_cores(int64_t D, AttentionKernel kernel = AttentionKernel::kAuto);

// Packed documents: `count` documents of the flat B·S token stream, device offsets[0..count]
// (cu_seqlens: 0 first, B·S last, increasing; kernels/cpu/attention.h). Null offsets: one document
// per row. The tensor-core kernels only (the f32 kernels return cudaErrorInvalidValue).
struct AttentionDocs {
  const int64_t* offsets = nullptr;
  int64_t count = 0;
};

// out = softmax(scale · q·kᵀ + causal mask) · v, lse = natural-log row log-sum-exp of the scaled scores.
cudaError_t attention_forward(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                              int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                              cudaStream_t stream, AttentionKernel kernel = AttentionKernel::kAuto,
                              const AttentionDocs& docs = {});
// delta[b, h, s] = Σ_d dout[b, s, h, d] · out[b, s, h, d] (f32).
cudaError_t attention_backward_delta(const uint16_t* dout, const uint16_t* out, float* delta, int64_t B, int64_t S,
                                     int64_t Hq, int64_t D, cudaStream_t stream);
// dk, dv (bf16, overwritten) and dq_accum += scale · dS · k (f32, zeroed by the caller beforehand).
// dq_turns: null (the key tiles add into dq in whatever order they run), or zeroed ints, at least
// attention_dq_turns(B, S, Hq) of them: the adds run in key-tile order (bit-reproducible dq).
cudaError_t attention_backward(const uint16_t* dout, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                               const float* lse, const float* delta, float* dq_accum, uint16_t* dk, uint16_t* dv,
                               int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                               cudaStream_t stream, AttentionKernel kernel = AttentionKernel::kAuto,
                               int* dq_turns = nullptr, const AttentionDocs& docs = {});
// Counters the ordered dq needs: one per (sequence, query head, 64-row query tile).
inline int64_t attention_dq_turns(int64_t B, int64_t S, int64_t Hq) { return B * Hq * ((S + 63) / 64); }

// The tensor-core kernels with an explicit tile configuration (D = 64 or 128, else
// cudaErrorInvalidValue): config in [0, kAttention{Forward,Backward}TcConfigs); kAuto runs the
// k...TcDefault one. For the benchmark and the tests (every configuration is tested); the list, with
// the measurements that chose the default, is in attention_tc_fwd.cu / attention_tc_bwd.cu.
inline constexpr int kAttentionForwardTcConfigs = 4, kAttentionForwardTcDefault = 2;
inline constexpr int kAttentionBackwardTcConfigs = 2, kAttentionBackwardTcDefault = 0;
cudaError_t attention_forward_tc(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                                 int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                                 cudaStream_t stream, int config, const AttentionDocs& docs = {});
cudaError_t attention_backward_tc(const uint16_t* dout, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                  const float* lse, const float* delta, float* dq_accum, uint16_t* dk, uint16_t* dv,
                                  int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                                  cudaStream_t stream, int config, int* dq_turns = nullptr,
                                  const AttentionDocs& docs = {});

}  // namespace moetp::cuda::launch
// ---- end attention ------------------------------------------------------------------------------

// ---- ops (ops_*.cu; contract in ops.h) ----------------------------------------------------------
// Embedding, RMSNorm, RoPE, SwiGLU, router, row movement, cross-entropy, AdamW. bf16 tensors are
// passed as raw uint16_t bits. Kernels that read an index never touch memory out of bounds: a bad
// index is skipped (documented per op) and recorded in an IndexFault the host reads later.
namespace moetp::cuda::launch {

enum class IndexOp : int32_t {
  kNone = 0,
  kEmbeddingForward,   // token id not in [0, V)
  kEmbeddingBackward,  // token id not in [0, V)
  kRopePosition,       // negative position
  kGatherRows,         // rows[i] not in [0, R)
  kScatterAddRows,     // rows[i] not in [0, R)
  kFoldWeightedRows,   // rows[i] not in [0, R)
  kFoldWeightedCols,   // cols[i] not in [0, C)
  kRouterTopkIdx,      // topk_idx not in [0, E)
  kCrossEntropyTarget  // target neither in [0, V) nor -100
};

// First bad index seen since the last reset (count == 0: none). Lives in device memory.
struct IndexFault {
  unsigned long long count;  // bad indices seen (all ops)
  int32_t op;                // IndexOp of the first one
  int32_t reserved;
  int64_t position;          // its position in the index tensor
  int64_t value;             // the bad value
  int64_t limit;             // the exclusive bound it broke
};

// y[n] = table[ids[n]] (rows of H bf16); a bad id gives a zero row.
cudaError_t embedding_forward(const int32_t* ids, const uint16_t* table, uint16_t* y, int64_t N, int64_t V, int64_t H,
                              IndexFault* fault, cudaStream_t stream);

// Deterministic scatter-add: sort (key, position) pairs by key (stable), then one block per distinct
// key adds its rows into dst in position order. workspace_bytes for M rows with i32 or i64 keys.
size_t sorted_accumulate_workspace_bytes(int64_t M, bool key64);
// dtable[ids[n]] += f32(dy[n]); bad ids are skipped.
cudaError_t embedding_backward(const int32_t* ids, const uint16_t* dy, float* dtable, int64_t N, int64_t V, int64_t H,
                               void* workspace, size_t workspace_bytes, IndexFault* fault, cudaStream_t stream);
// dst[rows[i]] += src[i]; src is bf16 (src_bf16) or f32. Bad rows are skipped.
cudaError_t scatter_add_rows(const void* src, bool src_bf16, const int64_t* rows, float* dst, int64_t M, int64_t R,
                             int64_t H, void* workspace, size_t workspace_bytes, IndexFault* fault,
                             cudaStream_t stream);
// dst[rows[i]] += w[rows[i], cols[i]] · y[i]; y is bf16 (y_bf16) or f32. Bad rows/cols are skipped.
cudaError_t fold_weighted(const void* y, bool y_bf16, const int64_t* rows, const int64_t* cols, const float* w,
                          int64_t C, float* dst, int64_t M, int64_t R, int64_t H, void* workspace,
                          size_t workspace_bytes, IndexFault* fault, cudaStream_t stream);
// out[i] = src[rows[i]] (rows of row_bytes bytes, any dtype); a bad row gives a zero row.
cudaError_t gather_rows(const void* src, void* out, const int64_t* rows, int64_t M, int64_t R, int64_t row_bytes,
                        IndexFault* fault, cudaStream_t stream);

// One warp per row. rstd may be null.
cudaError_t rmsnorm_forward(const uint16_t* x, const uint16_t* w, float eps, uint16_t* y, float* rstd, int64_t R,
                            int64_t D, cudaStream_t stream);
// Rows of partial dw sums the backward needs as workspace: (rmsnorm_dw_chunks(R), D) f32.
int64_t rmsnorm_dw_chunks(int64_t R);
cudaError_t rmsnorm_backward(const uint16_t* dy, const uint16_t* x, const uint16_t* w, const float* rstd,
                             uint16_t* dx, float* dw, float* dw_partial, int64_t R, int64_t D, cudaStream_t stream);

// In-place rotation of (N, h, D) by angle sign · positions[n] · theta^(−2j/D); negative positions
// leave the token untouched.
cudaError_t rope(uint16_t* x, const int32_t* positions, int64_t N, int64_t h, int64_t D, double theta, double sign,
                 IndexFault* fault, cudaStream_t stream);

cudaError_t swiglu_forward(const uint16_t* h, uint16_t* a, int64_t M, int64_t i, cudaStream_t stream);
cudaError_t swiglu_backward(const uint16_t* h, const uint16_t* da, uint16_t* dh, int64_t M, int64_t i,
                            cudaStream_t stream);

// One warp per token; 1 <= K <= E <= kRouterMaxExperts.
inline constexpr int64_t kRouterMaxExperts = 1024;
cudaError_t router_forward(const float* logits, float* probs, int32_t* topk_idx, float* topk_weight, int64_t N,
                           int64_t E, int64_t K, bool norm_topk_prob, cudaStream_t stream);
// d_topk_weight and d_probs may be null (zero).
cudaError_t router_logits_grad(const float* probs, const int32_t* topk_idx, const float* topk_weight,
                               const float* d_topk_weight, const float* d_probs, float* dlogits, int64_t N, int64_t E,
                               int64_t K, bool norm_topk_prob, IndexFault* fault, cudaStream_t stream);

// One block per row; logits and dlogits are bf16 (logits_bf16) or f32; dlogits may be null.
cudaError_t cross_entropy_forward(const void* logits, bool logits_bf16, const int32_t* targets, float* loss,
                                  void* dlogits, float grad_scale, int64_t N, int64_t V, IndexFault* fault,
                                  cudaStream_t stream);

// AdamW scalars, prepared on the host in double exactly as train::AdamW::step does.
// Every scalar computed in double on the host and rounded once to f32 (train::AdamW::step does the same).
struct AdamWArgs {
  float beta1, beta2;
  float bias_correction1;  // 1 − beta1^step
  float bias_correction2;  // 1 − beta2^step
  float eps, lr;
  float decay;  // lr · weight_decay (0: no decay)
};
// w_bf16 may be null.
cudaError_t adamw_step(float* w, const float* g, float* m, float* v, uint16_t* w_bf16, int64_t n,
                       const AdamWArgs& args, cudaStream_t stream);
// The same with bf16 moments (read as f32, stored rounded to nearest even); w_bf16 may be null.
cudaError_t adamw_step_bf16_moments(float* w, const float* g, uint16_t* m, uint16_t* v, uint16_t* w_bf16, int64_t n,
                                    const AdamWArgs& args, cudaStream_t stream);

// Per-block partial sums of g² in double; the host adds the partials in order.
int sum_of_squares_num_partials(int64_t n);
cudaError_t sum_of_squares_partials(const float* g, int64_t n, double* partials, cudaStream_t stream);

}  // namespace moetp::cuda::launch
// ---- end ops ------------------------------------------------------------------------------------
