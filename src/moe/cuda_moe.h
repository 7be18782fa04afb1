// The MoE block of one Qwen3-MoE layer on one GPU: expert parallel 1, every expert local (the
// `local` dispatcher), forward and backward, bf16 parameters and activations with f32 accumulation.
// It is the CUDA counterpart of moe::MoeBlock at P = T = 1 (ETP_SPEC §3-§5) and is held to it by
// tests/moe/cuda_moe_test.cpp. Not collective: no communication.
//
// Legend: N tokens, H hidden, E experts, K top-k, I expert FFN width (moe_intermediate_size),
// M = N·K dispatched rows.
//
// Forward (one layer):
//   logits_NE = x · wgᵀ                 cuBLAS, bf16 operands, f32 output (the router needs f32)
//   probs, topk_idx, topk_weight        cuda router kernel (softmax, top-K, renormalisation)
//   routing plan                        rows sorted by expert, then token, then slot: the row order
//                                       of moe/dispatcher.h; per-expert counts copied to the host
//                                       (moe/cuda_moe_kernels.h, as the combines below)
//   x_MH = x[token]                     cuda gather
//   h_M2I = grouped(x_MH, w13)          cuBLAS, one GEMM per non-empty expert (gemm.h)
//   a_MI = silu(h[:, :I]) ⊙ h[:, I:]
//   y_MH = grouped(a_MI, w2)
//   out[n] = Σ_k w[n, k] · y[pos(n, k)]  f32 sum, one bf16 rounding
// Backward: the combine backward (dy = w · dout[token], dw_topk = <dout, y>), the two grouped GEMM
// backwards and the SwiGLU backward, the router's logits gradient and GEMMs, and
// dx[n] = Σ_k dx_MH[pos(n, k)] + dx_router[n].
//
// Streams and synchronisation: everything is enqueued on the layer's stream; the caller makes sure
// x and dout are ready on it (a non-blocking stream does not wait for the legacy one). forward()
// synchronises that stream once (the per-expert counts: the grouped GEMMs take host offsets);
// backward() does not synchronise. The layer owns its activation buffers, sized for the last N
// (reallocated when N changes), so steady-state calls allocate nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "moe/moe_block.h"

namespace moetp::moe {

struct CudaMoeOptions {
  // Benchmark routing: token n slot k goes to expert (n·K + k) % E with weight 1/K (every expert
  // gets exactly N·K/E rows when E divides N·K). The router still runs forward (its cost counts,
  // its probabilities are kept); the fixed weights carry no gradient, so backward skips the router
  // unless an aux-loss gradient d_probs_NE is given.
  bool force_balance = false;
  cudaStream_t stream = nullptr;  // nullptr = the legacy default stream
  // The experts split into this many chunks of about M / expert_streams rows; each chunk's GEMMs
  // and SwiGLU run on a stream of their own (forked from and joined back to `stream` with events).
  // gemm.h's grouped GEMMs are one cuBLAS GEMM per expert, each of M/E rows, too small to fill the
  // GPU; chunks on separate streams run side by side. 1: everything on `stream`. Results are the
  // same function either way (each expert's GEMMs are the same calls).
  int expert_streams = 1;
};

// What backward needs from forward (all on the GPU unless noted). Shapes for the last forward.
struct CudaMoeSaved {
  Tensor x_NH;            // (N, H) bf16, the caller's input (shared, not copied: keep it unchanged until backward)
  Tensor logits_NE;       // (N, E) f32
  Tensor probs_NE;        // (N, E) f32
  Tensor topk_idx_NK;     // (N, K) i32
  Tensor topk_weight_NK;  // (N, K) f32
  Tensor flat_M;          // (M) i32: dispatched row i carries pair n·K + k
  Tensor token_M;         // (M) i64: its token n
  Tensor pos_NK;          // (N, K) i32: the dispatched row of pair (n, k)
  Tensor x_MH;            // (M, H) bf16
  Tensor h_M2I;           // (M, 2I) bf16, gate | up
  Tensor a_MI;            // (M, I) bf16
  Tensor y_MH;            // (M, H) bf16
  std::vector<int64_t> counts_E;  // host: rows per expert
  std::vector<int64_t> offsets;   // host, E + 1: expert e owns rows [offsets[e], offsets[e + 1])
};

class CudaMoeLayer {
 public:
  // Validates the config (sizes >= 1, 1 <= K <= E <= 1024); errors name the values. cfg.dispatcher
  // is not read (always `local`). Parameters and gradients start at zero (set_params loads the
  // parameters). Needs cuda::init() to have run.
  explicit CudaMoeLayer(const MoeConfig& cfg, CudaMoeOptions opts = {});
  ~CudaMoeLayer();
  CudaMoeLayer(const CudaMoeLayer&) = delete;
  CudaMoeLayer& operator=(const CudaMoeLayer&) = delete;

  const MoeConfig& config() const { return cfg_; }
  const CudaMoeOptions& options() const { return opts_; }

  // Parameters, bf16 on the GPU, shapes of MoeParams with L = E, i = I: wg_EH (E, H),
  // w13_L2iH (E, 2I, H) with gate rows [0, I) and up rows [I, 2I) of each expert, w2_LHi (E, H, I).
  const MoeParams& params() const { return params_; }
  // Copies `src` (CPU f32 or bf16, or CUDA bf16 or f32, the shapes above) into the parameters,
  // rounding f32 to bf16 (round to nearest even). Synchronous.
  void set_params(const MoeParams& src);
  // Gradients, f32 on the GPU, the parameters' shapes; backward accumulates (+=) into them.
  MoeParams& grads() { return grads_; }
  const MoeParams& grads() const { return grads_; }
  void zero_grads();

  //   x_NH   [IN]  (N, H) bf16, CUDA, contiguous; kept (not copied) for backward
  //   out_NH [OUT] (N, H) bf16, OVERWRITTEN (allocated when undefined or of another shape)
  void forward_into(const Tensor& x_NH, Tensor& out_NH);
  Tensor forward(const Tensor& x_NH);

  // Consumes the last forward (a second backward without a forward throws).
  //   dout_NH    [IN]  (N, H) bf16, CUDA: gradient of the layer output
  //   d_probs_NE [IN]  (N, E) f32, CUDA: extra gradient w.r.t. the router probabilities (the aux
  //                    loss, moe::aux_loss); undefined = zero
  //   dx_NH      [OUT] (N, H) bf16, OVERWRITTEN (allocated when undefined or of another shape)
  // Accumulates into grads().
  void backward_into(const Tensor& dout_NH, const Tensor& d_probs_NE, Tensor& dx_NH);
  Tensor backward(const Tensor& dout_NH, const Tensor& d_probs_NE = Tensor());

  // The last forward's activations and routing (counts_E: telemetry and the aux-loss counts).
  const CudaMoeSaved& saved() const { return saved_; }
  const std::vector<int64_t>& counts_E() const { return saved_.counts_E; }

 private:
  void reserve(int64_t N);
  // Calls fn(first_expert, end_expert, stream) once per non-empty chunk of experts (see
  // CudaMoeOptions::expert_streams), ordered after the work already on the layer stream and before
  // the work queued on it afterwards.
  void for_expert_chunks(const std::function<void(int64_t, int64_t, cudaStream_t)>& fn);
  void experts_forward(int64_t e0, int64_t e1, cudaStream_t stream);
  void experts_backward(int64_t e0, int64_t e1, cudaStream_t stream);

  MoeConfig cfg_;
  CudaMoeOptions opts_;
  MoeParams params_;  // bf16
  MoeParams grads_;   // f32
  CudaMoeSaved saved_;
  bool has_forward_ = false;
  int64_t num_tokens_ = -1;  // N the buffers are sized for

  // Scratch, sized with the activations.
  Tensor plan_workspace_;   // routing_plan's sort scratch
  Tensor counts_dev_E_;     // (E) i32
  Tensor dtopk_weight_NK_;  // (N, K) f32
  Tensor dy_MH_;            // (M, H) bf16; reused for dx_MH once dy is consumed
  Tensor da_MI_;            // (M, I) bf16
  Tensor dh_M2I_;           // (M, 2I) bf16
  Tensor dlogits_NE_;       // (N, E) f32
  Tensor dlogits_bf16_NE_;  // (N, E) bf16, the operand of the router GEMMs
  Tensor dx_router_NH_;     // (N, H) f32

  struct PinnedDeleter {
    void operator()(int32_t* p) const;
  };
  std::unique_ptr<int32_t, PinnedDeleter> counts_host_;  // (E) pinned host memory

  // Side streams and their fork/join events (expert_streams > 1); destroyed with the layer.
  struct Streams {
    std::vector<cudaStream_t> side;
    cudaEvent_t fork = nullptr;
    std::vector<cudaEvent_t> join;
    ~Streams();
  };
  Streams streams_;
};

}  // namespace moetp::moe
