// Backend: everything the model, the MoE layer and the optimizer need from a device, on tensors
// that live on it. The model (model/model.h) and the optimizer (train/optim.h) are written once
// against this interface; each backend supplies its kernels:
//
//   cpu   f32 everywhere, the executable specification (kernels/cpu, OpenBLAS, MPI collectives)
//   cuda  bf16 activations and working weights, f32 accumulation, masters, gradients and moments
//         (kernels/cuda, cuBLAS, the Hopper grouped GEMM, NCCL collectives)
//
// Precision policy of the CUDA backend (the CPU backend never rounds below f32): the kernels read
// bf16 copies of the f32 master weights (refreshed by AdamW); every activation a kernel stores is
// bf16 except the router logits and probabilities, the RMSNorm and attention statistics, the
// per-token losses and the gradients of the parameters (f32); every sum accumulates in f32 (the
// loss, the gradient norm and the aux statistics in double); a residual add is an f32 add rounded
// once to bf16. Tests hold each CUDA op to its CPU reference at the tolerances in tests/testing.h.
//
// Adding an operation: declare it here, implement it in cpu_backend.cpp (calling a kernel in
// kernels/cpu) and cuda_backend.cpp (calling one in kernels/cuda), and test the CUDA kernel against
// the CPU one (tests/kernels, tests/backend).
//
// Streams: a backend with streams queues every op on its compute stream in call order; results are
// ready for the next op on that stream. synchronize() waits for all of it. Host-visible results
// (sum_of_squares, cross_entropy's loss sum) are returned synchronously.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/options.h"
#include "core/tensor.h"
#include "moe/moe_layer.h"

namespace moetp::comm {
class Comm;
}

namespace moetp::backend {

// One AdamW step's hyper-parameters (decoupled weight decay; 0 = no decay).
struct AdamWHyper {
  double lr = 0.0;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.0;
  int64_t step = 1;  // counts from 1
};

// Rows of logits the LM head materialises at once on `device` by default (at least 1), for a
// vocabulary of `vocab`: rows · V <= kLogitChunkElems(device). On the CPU a multiple of
// cpu::kGemmBlock rows, so that the chunked head's logits and input gradient are bit-identical to
// the whole (kernels/cpu/gemm.h); on CUDA a multiple of kLogitChunkAlign rows. CUDA's budget is
// large because every chunk re-reads and re-writes the f32 LM-head gradient (V · H · 8 bytes): at
// Qwen3's vocabulary 441-row chunks run the head at 0.6x the speed of 3456-row ones
// (docs/performance.md, LM head). The memory planner counts the same chunk.
inline constexpr int64_t kLogitChunkElemsCpu = int64_t{1} << 26;   // 256 MiB of f32 logits
inline constexpr int64_t kLogitChunkElemsCuda = int64_t{1} << 29;  // 1 GiB of bf16 logits
inline constexpr int64_t kLogitChunkAlign = 128;
int64_t default_logit_chunk_rows(Device device, int64_t vocab);

class Backend {
 public:
  virtual ~Backend() = default;

  // ---- device, memory, streams ---------------------------------------------------------------
  virtual Device device() const = 0;
  // What the kernels read and write for activations and working weights (f32 CPU, bf16 CUDA).
  virtual DType compute_dtype() const = 0;
  // Devices of this kind visible to this process, and why there are none (for messages).
  virtual int visible_devices() const = 0;
  virtual std::string unavailable_reason() const = 0;
  // Prepares this process's device: the node-local rank picks it. Idempotent for one process.
  virtual void init(int local_rank, AllocatorChoice allocator) = 0;
  // A communicator for this backend's tensors over the ranks of `host` (same members and order),
  // or null when host collectives already serve this backend (CPU).
  virtual std::unique_ptr<comm::Comm> make_comm(comm::Comm& host, const std::string& name) = 0;
  virtual void synchronize() = 0;
  // train.deterministic: every kernel whose result could depend on scheduling (the attention
  // backward's dq) runs in a fixed order, so a run repeats bit for bit. The CPU backend always does.
  virtual void set_deterministic(bool on) = 0;
  // Synchronises and raises the first deferred kernel fault (e.g. a token id out of range) since
  // the last call. Once per step.
  virtual void check_faults() = 0;
  // Peak bytes of live tensors since the last reset; -1 where the backend does not count (CPU).
  virtual double peak_memory_bytes() const = 0;
  virtual void reset_peak_memory() = 0;
  // The phase (mark() or set_memory_phase()) in which that peak was reached; "" where not counted.
  virtual std::string peak_memory_phase() const = 0;
  // Labels what runs from now on for peak_memory_phase(), without a timeline mark (mark() labels too).
  virtual void set_memory_phase(const char* phase) = 0;
  // This process's device as the driver sees it: free and total bytes (the use of every process,
  // the CUDA context, library workspaces and cached blocks all count as used); -1 where the backend
  // has no device memory (CPU).
  struct DeviceMemory {
    double free_bytes = -1, total_bytes = -1;
  };
  virtual DeviceMemory device_memory() const = 0;

  // Timeline marks at the model's phase boundaries (embed, attn_fwd, moe_fwd, head_ce, ...); with
  // phase timing on, finish_phases() adds each phase's milliseconds to phase_ms(). Off by default.
  // `phase` must outlive its use (a string literal).
  virtual void set_phase_timing(bool on) = 0;
  virtual void mark(const char* phase) = 0;
  virtual void finish_phases() = 0;
  virtual const std::map<std::string, double>& phase_ms() const = 0;
  virtual void reset_phase_ms() = 0;

  Tensor empty(Shape shape, DType dtype) const { return Tensor::empty(std::move(shape), dtype, device()); }
  Tensor zeros(Shape shape, DType dtype) const { return Tensor::zeros(std::move(shape), dtype, device()); }
  // A copy of `t` on this backend (t itself when it is already here).
  Tensor to_device(const Tensor& t) const { return t.device() == device() ? t : t.to(device()); }
  // dst = src converted to dst's dtype (f32 -> bf16 rounds to nearest even); same shape, both here.
  virtual void cast_into(const Tensor& src, Tensor& dst) = 0;

  // ---- layer ops (shapes and semantics: the CPU kernels' headers) ---------------------------------
  //   ids_N (N) i32 on this backend; table (V, H)
  virtual Tensor embedding_forward(const Tensor& ids_N, const Tensor& table_VH) = 0;
  virtual void embedding_backward(const Tensor& ids_N, const Tensor& dy_NH, Tensor& dtable_VH) = 0;  // +=
  virtual Tensor rmsnorm_forward(const Tensor& x_RD, const Tensor& w_D, float eps, Tensor* rstd_R) = 0;
  //   dx OVERWRITTEN, dw ACCUMULATED (f32)
  virtual void rmsnorm_backward(const Tensor& dy_RD, const Tensor& x_RD, const Tensor& w_D, const Tensor& rstd_R,
                                Tensor& dx_RD, Tensor& dw_D) = 0;
  // y = x · wᵀ
  virtual Tensor linear(const Tensor& x_MK, const Tensor& w_NK) = 0;
  //   dx OVERWRITTEN (skipped when null), dw ACCUMULATED (f32; skipped when null)
  virtual void linear_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, Tensor* dx_MK,
                               Tensor* dw_NK) = 0;
  // Two projections of one input stacked in one weight, w = [w0 (rows [0, n0)); w1 (rows [n0, N))]:
  // y = x · wᵀ = [x · w0ᵀ | x · w1ᵀ] (M, N), and its backward: dx = dy · w OVERWRITTEN, dw
  // ACCUMULATED. A backend may run one GEMM or one per projection (the CPU reference does the
  // latter, adding dx0 + dx1 in f32).
  virtual Tensor linear_stacked(const Tensor& x_MK, const Tensor& w_NK, int64_t n0) = 0;
  virtual void linear_stacked_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, int64_t n0,
                                       Tensor& dx_MK, Tensor& dw_NK) = 0;
  // In place on (N, h, D); positions (N) i32 on this backend.
  virtual void rope_forward(Tensor& x_NhD, const Tensor& positions_N, double theta) = 0;
  virtual void rope_backward(Tensor& dx_NhD, const Tensor& positions_N, double theta) = 0;
  // Causal GQA attention on (B, S, Q|G, D); fills `lse_BQS` (f32) for the backward, which also
  // reads the forward's output. `docs`: the documents of the flat B·S token stream, cu_seqlens style
  // (host offsets; kernels/cpu/attention.h); empty = one per row. A backend whose kernels lack
  // packed documents rejects them with an error.
  virtual Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& lse_BQS,
                                   std::span<const int64_t> docs) = 0;
  virtual void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse_BQS, Tensor& dq, Tensor& dk, Tensor& dv,
                                  std::span<const int64_t> docs) = 0;
  virtual Tensor swiglu_forward(const Tensor& h_M2i) = 0;
  virtual Tensor swiglu_backward(const Tensor& h_M2i, const Tensor& da_Mi) = 0;
  // dst += a (+ b), element-wise, added left to right in f32 and stored once in dst's dtype.
  virtual void add_into(Tensor& dst, const Tensor& a, const Tensor& b = Tensor()) = 0;
  // Cross-entropy of (N, V) logits against (N) i32 targets on this backend (-100 = ignored): adds
  // every row's loss to `loss_sum` in row order (double) and, when dlogits is non-null, writes
  // grad_scale · d loss / d logits (may alias logits). Synchronous (the sum is on the host).
  virtual void cross_entropy(const Tensor& logits_NV, const Tensor& targets_N, Tensor* dlogits_NV, float grad_scale,
                             double& loss_sum) = 0;
  // Rows of logits the LM head materialises at once by default: default_logit_chunk_rows(device()).
  int64_t logit_chunk_rows(int64_t vocab) const { return default_logit_chunk_rows(device(), vocab); }

  // ---- optimizer (f32 tensors on this backend) ---------------------------------------------------
  // Σ g² in double, in an order that depends only on numel (same result every run). Synchronous.
  virtual double sum_of_squares(const Tensor& g) = 0;
  // sum_of_squares of each tensor, with one synchronisation: out[i] has the bits of sum_of_squares(gs[i]).
  virtual std::vector<double> sums_of_squares(std::span<const Tensor> gs) = 0;
  virtual void scale(Tensor& g, float s) = 0;
  // train::AdamW's element update (bit-identical across backends): w, g f32; m, v both f32 or both
  // bf16 (read as f32, stored rounded to nearest even); `work` (null, or the compute dtype copy of
  // w) is refreshed from the new w.
  virtual void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const AdamWHyper& hyper,
                          Tensor* work) = 0;

  // ---- MoE ------------------------------------------------------------------------------------------
  virtual std::unique_ptr<moe::MoeLayer> make_moe_layer(const moe::MoeConfig& cfg, const moe::MoeLayerOptions& opts) = 0;
  // How this backend runs the experts of a layer with hidden size H and local width i under
  // `choice` (for the run's banner); empty where there is no choice (CPU).
  virtual std::string describe_expert_gemm(int64_t hidden, int64_t local_intermediate,
                                           ExpertGemmChoice choice) const = 0;
};

// The backend of `device`; throws naming the device when this build has none.
Backend& get(Device device);
// The backend of `device`, or null when this build has none.
Backend* find(Device device);

}  // namespace moetp::backend
