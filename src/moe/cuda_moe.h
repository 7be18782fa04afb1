// The MoE block of one Qwen3-MoE layer on the GPU, forward and backward, bf16 parameters and
// activations with f32 accumulation. The CUDA counterpart of moe::MoeBlock (etp_spec §3-§6), held
// to it by tests/moe/cuda_moe_test.cpp (one GPU at np 1; the 2- and 4-GPU layouts at np 2 and 4).
//
// Layouts: without a mesh, one GPU holds every expert (the `local` dispatcher, no communication).
// With a mesh of NCCL communicators (comm::NcclComm, one GPU per rank), rank (p, t) holds the
// L = E/P experts [p·L, (p+1)·L) and the t-th slice of width i = I/T of each (etp_spec §3.2), and the
// rows move as the `all2all` dispatcher does (etp_spec §6.4, moe/dispatch_all2all.cpp): EP
// all-to-all by owning rank, then a TP all-gather inside the etp group; back by a TP reduce-scatter
// of the partial outputs and the reverse all-to-all. The row order on the expert side is the
// dispatcher contract of moe/dispatcher.h (local expert, source rank, token, slot), so the CPU
// dispatcher over MPI and this layer over NCCL produce bit-identical dispatched rows.
// With cfg.dispatcher == "vexpert" the rows move as the `vexpert` dispatcher does instead (etp_spec
// §6.5, moe/dispatch_vexpert.cpp, planned on the host by moe/vexpert_plan.h): one row per (token,
// destination ep_etp rank) by NCCL all_to_all_v over ep_etp, folded with the routing weights on the
// expert side (f32), the folded sums sent back (f32) and added into the tokens (tested at every 2-
// and 4-GPU layout: docs/gpu.md).
//
// Legend: N tokens on this rank, H hidden, E experts, K top-k, I expert FFN width
// (moe_intermediate_size), M = N·K "slot rows" (this rank's (token, slot) pairs), L local experts,
// i = I/T, R rows the local experts process (R = M with one GPU).
//
// Forward (one layer):
//   logits_NE = x · wgᵀ                 cuBLAS, bf16 operands, f32 output (the router needs f32)
//   probs, topk_idx, topk_weight        cuda router kernel (softmax, top-K, renormalisation)
//   routing plan                        slot rows sorted by global expert, then token, then slot;
//                                       per-expert counts copied to the host (the one host sync of
//                                       the layer: row counts decide the collective sizes and the
//                                       grouped GEMMs take host offsets)
//   x_MH = x[token]                     cuda gather
//   [mesh] counts exchanged over the host communicators (MPI, a few hundred bytes), the expert-side
//          order computed on the host and uploaded; x_RH = all2all(x_MH) then all-gather over etp,
//          permuted into expert order
//   h_R2i = grouped(x_RH, w13)          cuBLAS, one GEMM per non-empty local expert (gemm.h)
//   a_Ri = silu(h[:, :i]) ⊙ h[:, i:]
//   y_RH = grouped(a_Ri, w2)            TP partial
//   [mesh] y_MH = reverse all2all(reduce-scatter over etp (bf16 sum) of y_RH in gathered order)
//   out[n] = Σ_k w[n, k] · y_MH[pos(n, k)]  f32 sum, one bf16 rounding
// Backward: the combine backward (dy_MH = w · dout[token], dw_topk = <dout, y_MH>), dy moved to the
// expert side like x, the two grouped GEMM backwards and the SwiGLU backward, dx_RH moved back like
// y, the router's logits gradient and GEMMs, and dx[n] = Σ_k dx_MH[pos(n, k)] + dx_router[n].
//
// Streams and synchronisation: everything is enqueued on the layer's stream (the NCCL collectives
// on the communicator's stream, ordered against the layer's stream with events by NcclComm: the
// communicators' compute stream must be the layer's stream, checked); the caller makes sure x and
// dout are ready on it (a non-blocking stream does not wait for the legacy one). forward()
// synchronises that stream once (the per-expert counts); backward() does not synchronise. The
// layer owns its buffers: the slot-side ones sized for the last N, the expert-side ones (whose row
// count R changes with the routing every step) allocated exactly for the first R and regrown to
// 1.125× R when a larger R comes (the vexpert buffers likewise), used through views. The buffers
// only the backward uses are allocated when it starts and released when it returns, so the layers
// of a model share one set through the caching allocator (with the direct allocator each of those
// cudaFree calls synchronises the device).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "core/tensor.h"
#include "moe/moe_block.h"
#include "moe/all2all_plan.h"
#include "moe/vexpert_plan.h"

namespace moetp::moe {

// How the expert GEMMs run: kGrouped, the Hopper grouped GEMM (kernels/cuda/grouped_gemm.h: one
// launch per product over all local experts, group boundaries read from device memory); kCublas,
// one cuBLAS GEMM per expert (kernels/cuda/gemm.h grouped_linear), kept as the reference path.
enum class ExpertGemm { kGrouped, kCublas };
// "grouped" | "cublas" (parse_option<ExpertGemm> names the value and the choices when it throws).
ExpertGemm parse_expert_gemm(const std::string& name);
const char* expert_gemm_name(ExpertGemm g);
// Whether kGrouped can run experts of hidden size H and local width i (its TMA row strides need
// H % 8 == 0 and i % 8 == 0); the layer rejects kGrouped otherwise, naming the sizes.
bool grouped_gemm_fits(int64_t hidden, int64_t local_intermediate);

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
  // Only with kCublas: the grouped GEMM is one persistent launch that fills the GPU by itself
  // (expert_streams > 1 with kGrouped is rejected).
  int expert_streams = 1;
  ExpertGemm expert_gemm = ExpertGemm::kGrouped;
  // Expert parallel layout, or null: one GPU with every expert. Every communicator of the mesh must
  // be a comm::NcclComm (checked) whose compute stream is `stream`; the mesh must outlive the layer.
  // MoeConfig::dispatcher must then be "all2all" or "vexpert" (others are rejected); with
  // "vexpert" the mesh's ep_etp group must be NCCL too.
  const comm::Mesh* mesh = nullptr;
  // Parameters and gradients live in the caller's storage (bind(), before the first forward)
  // instead of tensors the layer allocates.
  bool external_params = false;
};

// What backward needs from forward (all on the GPU unless noted). Shapes for the last forward.
struct CudaMoeSaved {
  Tensor x_NH;            // (N, H) bf16, the caller's input (shared, not copied: keep it unchanged until backward)
  Tensor logits_NE;       // (N, E) f32
  Tensor probs_NE;        // (N, E) f32
  Tensor topk_idx_NK;     // (N, K) i32
  Tensor topk_weight_NK;  // (N, K) f32
  Tensor flat_M;          // (M) i32: slot row j carries pair n·K + k
  Tensor token_M;         // (M) i64: its token n
  Tensor pos_NK;          // (N, K) i32: the slot row of pair (n, k)
  Tensor x_MH;            // (M, H) bf16 slot rows: x[token_M], sorted by global expert, token, slot;
                          // on a mesh valid until the backward starts (its storage is the backward's dy);
                          // undefined with `vexpert`
  Tensor y_MH;            // (M, H) bf16 slot rows: the experts' outputs (summed over the etp group);
                          // not used (left unset) by `vexpert`, which folds on the expert side
  // Expert side: the R rows this rank's L local experts process, in dispatcher order (moe/dispatcher.h).
  // With one GPU these are the slot rows themselves (x_RH is x_MH, y_RH is y_MH).
  Tensor x_RH;            // (R, H) bf16
  Tensor h_M2I;           // (R, 2i) bf16, gate | up
  Tensor a_MI;            // (R, i) bf16
  Tensor y_RH;            // (R, H) bf16, this rank's TP partial; on a mesh with `all2all` valid until
                          // the backward starts (its storage is the backward's dy_RH)
  std::vector<int64_t> counts_E;  // host: slot rows per global expert (this rank's tokens)
  std::vector<int64_t> offsets;   // host, L + 1: local expert j owns expert-side rows [offsets[j], offsets[j + 1])
};

class CudaMoeLayer {
 public:
  // Validates the config (sizes >= 1, 1 <= K <= E <= 1024, E % P == 0, I % T == 0, the dispatcher)
  // and the mesh; errors name the values. Without a mesh cfg.dispatcher is not read (always
  // `local`). Parameters and gradients start at zero (set_params loads the parameters). Needs
  // cuda::init() to have run. Not collective.
  explicit CudaMoeLayer(const MoeConfig& cfg, CudaMoeOptions opts = {});
  ~CudaMoeLayer();
  CudaMoeLayer(const CudaMoeLayer&) = delete;
  CudaMoeLayer& operator=(const CudaMoeLayer&) = delete;

  const MoeConfig& config() const { return cfg_; }
  const CudaMoeOptions& options() const { return opts_; }

  // Parameters, bf16 on the GPU, this rank's shards in the shapes of MoeParams: wg_EH (E, H),
  // w13_L2iH (L, 2i, H) with gate rows [0, i) and up rows [i, 2i) of each local expert,
  // w2_LHi (L, H, i). With one GPU L = E and i = I.
  const MoeParams& params() const { return params_; }
  // The same tensors, writable: for an optimizer that writes its bf16-rounded update straight into
  // them (the model's AdamW writes its bound copies), instead of a set_params copy per step. Writes must be ordered
  // before the next forward on the layer's stream.
  MoeParams& mutable_params() { return params_; }
  // Copies `src` (CPU f32 or bf16, or CUDA bf16 or f32, the shapes above) into the parameters,
  // rounding f32 to bf16 (round to nearest even). Synchronous.
  void set_params(const MoeParams& src);
  // From now on computes with `work` (bf16) and accumulates into `grads` (f32): the caller's
  // tensors in the shapes above (checked), e.g. views of a model's flat buffers. Replaces the
  // layer's own (external_params: there are none before).
  void bind(const MoeParams& work, const MoeParams& grads);
  // Gradients, f32 on the GPU, the parameters' shapes; backward accumulates (+=) into them.
  // The expert weight gradients' zeroing is deferred to the next backward (the grouped weight
  // gradient then overwrites instead of adding: no memset, no read of dW); grads() zeroes first
  // if it is still pending, so every reader sees zeros or the accumulated values.
  MoeParams& grads() {
    materialize_zero_grads();
    return grads_;
  }
  const MoeParams& grads() const {
    materialize_zero_grads();
    return grads_;
  }
  void zero_grads();

  //   x_NH   [IN]  (N, H) bf16, CUDA, contiguous; kept (not copied) for backward
  //   out_NH [OUT] (N, H) bf16, OVERWRITTEN (allocated when undefined or of another shape)
  // Collective over the mesh's ep and etp groups (every member calls it; N may differ by rank).
  void forward_into(const Tensor& x_NH, Tensor& out_NH);
  Tensor forward(const Tensor& x_NH);

  // Consumes the last forward (a second backward without a forward throws).
  //   dout_NH    [IN]  (N, H) bf16, CUDA: gradient of the layer output
  //   d_probs_NE [IN]  (N, E) f32, CUDA: extra gradient w.r.t. the router probabilities (the aux
  //                    loss, moe::aux_loss); undefined = zero
  //   dx_NH      [OUT] (N, H) bf16, OVERWRITTEN (allocated when undefined or of another shape)
  // Accumulates into grads(). Collective like forward.
  void backward_into(const Tensor& dout_NH, const Tensor& d_probs_NE, Tensor& dx_NH);
  Tensor backward(const Tensor& dout_NH, const Tensor& d_probs_NE = Tensor());

  // Frees the rows of the last forward (slot rows, expert-side rows, the vexpert buffers), keeping
  // the router's outputs (probabilities, top-k, counts); the next forward allocates them again and
  // a backward needs that forward first. For recomputation (moe::MoeLayer::release_activations).
  void release_rows();
  // Recomputation (moe::MoeLayer::recompute): after release_rows, runs the last forward's dispatch
  // and experts again from the same input with its routing and exchange plan (no router GEMM, no
  // routing plan, no counts exchange, no host synchronisation; the row exchanges run again), so
  // that a backward can follow. Produces no output. Collective like forward.
  void recompute_forward(const Tensor& x_NH);

  int64_t num_local_experts() const;   // L
  int64_t local_intermediate() const;  // i
  // The last forward's activations and routing (counts_E: telemetry and the aux-loss counts).
  const CudaMoeSaved& saved() const { return saved_; }
  const std::vector<int64_t>& counts_E() const { return saved_.counts_E; }

 private:
  bool distributed() const { return opts_.mesh != nullptr; }
  bool vexpert() const { return distributed() && cfg_.dispatcher == DispatcherKind::kVexpert; }
  // `vexpert` (etp_spec §6.5, the CPU spec moe/dispatch_vexpert.cpp, planning shared through
  // moe/vexpert_plan.h): after the router and the host copy of the routing, everything from the
  // send plan to out_NH. Collective over ep_etp.
  // vexpert_plan: the host plans and the exchange of counts, entries and weights (into vx_);
  // vexpert_buffers: the device tables and row buffers for them; vexpert_dispatch: the rows to
  // the expert side and the experts; vexpert_combine: the folded outputs back into out_NH.
  void vexpert_plan(int64_t N);
  void vexpert_buffers(int64_t N);
  void vexpert_dispatch(const Tensor& x_NH);
  void vexpert_combine(Tensor& out_NH);
  // Combine backward (dy_RH_, and the routing-weight gradient into dtopk_NK unless null), the
  // experts' backward, and the dispatch backward: vx_.acc_NH holds the experts' dx in f32.
  void vexpert_backward(const Tensor& dout_NH, float* dtopk_NK);
  void reserve(int64_t N);
  // The buffers only a backward uses (dy, da, dh, the router's gradients), allocated at its start
  // and released when it returns: the layers of a model take turns with the same memory (the
  // caching allocator hands a freed block to the next layer's backward, on the same stream).
  void begin_backward_buffers();
  void end_backward_buffers();
  // Expert-side buffers for R rows (grown with slack on a mesh, see the header comment).
  void reserve_expert_side(int64_t R);
  // Mesh only: exchanges the per-expert counts over the host communicators and computes the
  // expert-side order (ex_, saved_.offsets). Collective. upload_exchange: the expert-side buffers
  // for that plan and its permutations on the device.
  void plan_exchange();
  void upload_exchange();
  // Mesh only: slot rows (M, H) -> expert side (R, H), and back (summing the etp partials).
  void move_to_experts(const Tensor& slot_MH, Tensor& exp_RH);
  void move_to_slots(const Tensor& exp_RH, Tensor& slot_MH);
  // The all-to-all's rows (num_recv) and the gathered rows (R) of the last plan; one view with T = 1,
  // the first inside the second with T > 1 (the etp collectives then run in place).
  void exchange_views(Tensor& recv, Tensor& gathered);
  // Calls fn(first_expert, end_expert, stream) once per non-empty chunk of local experts (see
  // CudaMoeOptions::expert_streams), ordered after the work already on the layer stream and before
  // the work queued on it afterwards.
  void for_expert_chunks(const std::function<void(int64_t, int64_t, cudaStream_t)>& fn);
  void experts_forward(int64_t e0, int64_t e1, cudaStream_t stream);
  void experts_backward(int64_t e0, int64_t e1, cudaStream_t stream);

  MoeConfig cfg_;
  CudaMoeOptions opts_;
  int64_t L_ = 0, i_ = 0;  // local experts, local expert FFN width
  MoeParams params_;  // bf16
  MoeParams grads_;   // f32
  // zero_grads() left w13/w2 gradients unzeroed for the next backward to overwrite (see grads()).
  mutable bool expert_grads_zero_pending_ = false;
  void zero_expert_grads_async() const;  // memset w13/w2 gradients on the layer stream, clear the flag
  void materialize_zero_grads() const;   // the same if pending, then synchronise the layer stream
  void begin_expert_grads();             // before a backward's expert chunks (see experts_backward)
  CudaMoeSaved saved_;
  bool has_forward_ = false;
  int64_t num_tokens_ = -1;     // N the buffers are sized for
  int64_t routed_tokens_ = -1;  // N of the last forward's routing (kept by release_rows)

  // Scratch, sized with the activations.
  Tensor plan_workspace_;   // routing_plan's sort scratch
  Tensor counts_dev_E_;     // (E) i32
  // Backward only (begin_backward_buffers .. end_backward_buffers):
  Tensor dtopk_weight_NK_;  // (N, K) f32
  Tensor dy_MH_;            // (M, H) bf16 slot rows; reused for dx_MH once dy is consumed
  Tensor dlogits_NE_;       // (N, E) f32
  Tensor dlogits_bf16_NE_;  // (N, E) bf16, the operand of the router GEMMs
  Tensor dx_router_NH_;     // (N, H) f32

  // Expert side: capacity buffers (rows = exp_capacity_) and the views of the last forward.
  int64_t exp_capacity_ = -1;
  // Mesh: x and y own buffers; the backward's dy is y's buffer with `all2all`, its own with `vexpert`.
  Tensor cap_x_, cap_h_, cap_a_, cap_y_;
  // all2all: the all-to-all output (T = 1); the etp all-gather output (T > 1), whose block
  // [recv_offset, recv_offset + num_recv) is then the all-to-all output (exchange_views).
  Tensor cap_recv_, cap_gath_;
  Tensor cap_perm_, cap_inv_perm_;  // all2all: (R) i64 expert order <- gathered order, and its inverse
  Tensor dy_RH_, da_MI_, dh_M2I_;   // backward only: (R, H), (R, i), (R, 2i)

  // Mesh, `all2all`: the plan of the last forward (counts and expert order, moe/all2all_plan.h).
  All2AllPlan ex_;

  // `vexpert`: the last forward's plan (host) and capacity buffers (device, used through views).
  // S rows sent, Q rows received, C = K entries per row (vexpert_plan.h), R expert-side rows.
  struct VExpert {
    std::vector<int32_t> idx_host;     // (N, K) the routing, copied once per forward
    std::vector<float> weight_host;    // (N, K)
    VExpertSendPlan send_plan;         // host plans of the last forward (vectors reused every forward)
    VExpertRecvPlan recv_plan;
    Tensor recv_w_host;                // (Q, C) f32 the received weights (host; kept for recomputation)
    std::vector<int64_t> send_counts;  // rows to each ep_etp rank
    std::vector<int64_t> recv_counts;  // rows from each ep_etp rank
    int64_t S = 0, Q = 0, C = 0;
    Tensor send_token, tok_begin, tok_rows, row_recv, row_entry;  // views: (S), (N+1), (S), (R), (R) i64
    Tensor recv_w;                     // view (Q, C) f32, the received weights (C = K, vexpert_plan.h)
    Tensor send_SH, recv_QH;           // views (S, H), (Q, H) bf16: sent / received rows (x, then dout),
                                       // in the storage of back_SH / z_QH (their lifetimes do not overlap)
    Tensor z_QH, back_SH, acc_NH;      // views f32: per received row, per sent row, per token
    Tensor dw_QC, dw_SC;               // views f32: routing-weight gradient, received / sent side
    Tensor workspace;                  // deterministic scatter-add / fold scratch
    // Releases every view above (a view keeps its capacity buffer's storage alive; grow_rows can
    // free a buffer only after this). A new view member belongs in this list.
    void drop_views() {
      for (Tensor* t : {&send_token, &tok_begin, &tok_rows, &row_recv, &row_entry, &recv_w, &send_SH, &recv_QH, &z_QH,
                        &back_SH, &acc_NH, &dw_QC, &dw_SC, &workspace}) {
        *t = Tensor();
      }
    }
    // Capacity buffers behind the views (first allocation exact, regrown 1.125x, never shrunk).
    Tensor cap_send_token, cap_tok_begin, cap_tok_rows, cap_row_recv, cap_row_entry, cap_recv_w, cap_z, cap_back,
        cap_acc, cap_dw_q, cap_dw_s, cap_ws;
  } vx_;

  struct PinnedDeleter {
    void operator()(void* p) const;
  };
  std::unique_ptr<int32_t, PinnedDeleter> counts_host_;  // (E) pinned host memory
  // kGrouped: saved_.offsets on the device (L + 1) i64, uploaded once per forward from a pinned copy
  // (the next forward rewrites the pinned copy only after its counts sync, which follows the
  // previous upload on the layer stream).
  Tensor offsets_dev_L1_;
  std::unique_ptr<int64_t, PinnedDeleter> offsets_host_;

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

template <>
struct moetp::OptionNames<moetp::moe::ExpertGemm> {
  static constexpr std::array<std::string_view, 2> names = {"grouped", "cublas"};
};
