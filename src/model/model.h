// The Qwen3-MoE decoder, written once for every backend (backend/backend.h): its parameters (the
// table of model/param_table.h in flat buffers) and one micro-batch's forward + backward composed
// from the backend's ops and MoE layers (no autograd: each layer saves what its backward needs,
// and the model runs the layers in order and in reverse). On the CPU backend it is the executable
// specification (f32); on the CUDA backend every op rounds as the backend's precision policy says.
//
// Storage (per backend): three flat buffers hold every parameter's f32 master value, its working
// copy in the backend's compute dtype (the masters themselves on the CPU, unless the masters are
// sharded) and its f32 gradient;
// Param::value / work / grad are views of them at fixed offsets (parameters in table order, each
// starting at a multiple of kFlatAlign elements, except a dense layer's up_proj, which follows its
// gate_proj directly so that the two are one stacked (2F, H) weight). grad_span() is a view over a
// run of consecutive parameters' gradients (a bucket for reductions). The MoE layers compute with
// views of their parameters (moe::MoeLayer::bind).
//
// Layouts: every non-expert parameter replicated on every rank (data parallel over world), the
// routed experts sharded over (ep, etp) (etp_spec §2-§3); the same names, shard specs and initial
// values on every backend and layout.
//
// Legend: B sequences, S sequence length, N = B·S tokens on this rank, H hidden, V vocab,
// Hq/Hkv query/kv heads, D head_dim, E experts, I expert FFN width, F dense FFN width.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/mesh.h"
#include "config/model_config.h"
#include "model/batch.h"
#include "model/param_table.h"
#include "moe/moe_layer.h"

namespace moetp::model {

// A parameter of the table with its tensors (views of the model's flat buffers, on its backend).
struct Param : ParamDesc {
  // f32 master, the local shape of `spec` (2-D for matrices, 1-D for norms); with sharded masters
  // (ModelOptions::shard_masters) only this rank's slice, 1-D (Qwen3MoeModel::master_slice).
  Tensor value;
  Tensor work;   // what the kernels read, always whole: `value` itself on the CPU (unless the
                 // masters are sharded: then an f32 copy), its bf16 copy on CUDA
  Tensor grad;   // f32, same shape; ACCUMULATED by forward_backward
};

inline constexpr int64_t kSliceAlign = 64;  // elements (256 bytes of f32): vector loads stay aligned

// One rank's slice of a parameter's flattened elements (the sharded optimizer, train/optim.h): the
// elements split over the members of `group` into contiguous slices, member r's slice counts[r]
// elements long, starting at the sum of counts[0..r). group == null: not split.
struct ParamSlice {
  comm::Comm* group = nullptr;  // the model backend's communicator over the parameter's replicas
  std::vector<int64_t> counts;
  int64_t offset = 0, count = 0;  // this rank's slice
};

// Each parameter's slice on this rank over its replica group of `mesh` (world for replicated
// parameters, expert_dp for expert shards; etp_spec §8.1): slices of kSliceAlign-multiple lengths,
// the last ones shorter or empty. The group is null where it has one member, or without a mesh.
std::vector<ParamSlice> replica_slices(const ParamTable& table, const comm::Mesh* mesh);

// Statistics of one micro-batch on this rank (the trainer reduces them).
struct MicroStats {
  double ce_sum = 0;                              // Σ of per-target cross-entropy on this rank
  int64_t num_targets = 0;                        // targets on this rank
  double aux = 0;                                 // aux loss of the micro-batch (global, no coefficient)
  std::vector<std::vector<float>> expert_counts;  // per MoE layer: global tokens per expert
};

struct ModelOptions {
  // The mesh whose communicators carry the backend's tensors (MPI on the CPU, NCCL on CUDA); the
  // CPU backend needs one, on CUDA null means one GPU holding every expert. Must outlive the model.
  const comm::Mesh* mesh = nullptr;
  DispatcherKind dispatcher = DispatcherKind::kAll2all;  // concrete (not kAuto)
  bool force_balance = false;                            // moe::MoeLayerOptions
  int expert_streams = 1;
  ExpertGemmChoice expert_gemm = ExpertGemmChoice::kAuto;
  // Rows of logits the LM head materialises at once; 0 = the backend's choice
  // (Backend::logit_chunk_rows). On the CPU a multiple of cpu::kGemmBlock keeps the loss and the
  // input gradient bit-identical to the unchunked head.
  int64_t logit_chunk_rows = 0;
  // Activation recomputation (train.recompute): what the backward of a decoder layer recomputes
  // from the layer's input, for the first `recompute_layers` layers (-1: all). Results are the
  // same bits as without (the forward is deterministic). A MoE layer keeps its routing and dispatch
  // plan and re-runs only dispatch and experts (moe::MoeLayer::recompute).
  RecomputeMode recompute = RecomputeMode::kNone;
  int64_t recompute_layers = -1;
  // The sharded optimizer's masters (optim.zero = 1): each rank keeps the f32 masters of its
  // replica slices only (replica_slices); the working copies stay whole and are all-gathered after
  // each update (refresh_work). Without a mesh of several ranks nothing is split.
  bool shard_masters = false;
};

class Qwen3MoeModel {
 public:

  // Initial values are model::fill_initial_value's, generated on the host one tensor at a time and
  // copied to the backend. Not collective; the backend must be initialised (Backend::init).
  Qwen3MoeModel(const config::ModelConfig& cfg, backend::Backend& backend, const ModelOptions& opts, uint64_t seed);
  // The CPU reference over an MPI mesh.
  Qwen3MoeModel(const config::ModelConfig& cfg, const comm::Mesh& mesh, DispatcherKind dispatcher, uint64_t seed);
  ~Qwen3MoeModel();
  Qwen3MoeModel(const Qwen3MoeModel&) = delete;
  Qwen3MoeModel& operator=(const Qwen3MoeModel&) = delete;

  const config::ModelConfig& config() const { return cfg_; }
  backend::Backend& backend() const { return backend_; }
  // The options' mesh (null: one process, every expert local).
  const comm::Mesh* mesh() const { return opts_.mesh; }
  ExpertLayout layout() const;
  // The parameters with their gradients (gradient zeroing a MoE layer deferred is completed first,
  // so a read between zero_grads and the next backward sees zeros).
  std::vector<Param>& params();
  const std::vector<Param>& params() const;
  Param& param(const std::string& name);
  // The table entries alone (no gradient zeroing, unlike params()).
  size_t num_params() const { return params_.size(); }
  const ParamDesc& param_desc(size_t i) const { return params_.at(i); }
  // Parameter i's master value (no gradient zeroing): whole, or this rank's slice with sharded
  // masters. Write through it, then refresh_work(i); or set_value.
  const Tensor& value(size_t i) const { return params_.at(i).value; }
  Tensor& value(size_t i) { return params_.at(i).value; }
  // The slice of parameter i that value(i) holds, or null where it holds the whole parameter.
  const ParamSlice* master_slice(size_t i) const;
  bool masters_sharded() const { return !master_slices_.empty(); }
  // Every parameter's slice when masters_sharded() (entries with a null group hold it whole).
  const std::vector<ParamSlice>& master_slices() const { return master_slices_; }
  // Writes parameter i's whole value (host f32, its local shape): its master (slice) and working
  // copy. Not collective.
  void set_value(size_t i, const Tensor& host_f32);
  // The gradients of parameters [first, last) as one flat f32 view (alignment gaps included: they
  // stay zero).
  Tensor grad_span(size_t first, size_t last) const;
  void zero_grads();

  // After parameter i's value was written: recomputes its working copy (no-op on the CPU). With a
  // sliced master, this rank's part of the working copy, then every member's part all-gathered
  // over the slice's group: collective over it, in the same order on every member.
  void refresh_work(size_t i);

  // One micro-batch: forward, loss, backward; gradients accumulate into Param::grad.
  //   ce_scale   gradient scale of the summed cross-entropy (1 / global targets of the step)
  //   aux_scale  gradient scale of the aux loss (router_aux_loss_coef / micro-batches)
  // Collective over the mesh (aux statistics over world; dispatchers over ep_etp). Returns with
  // the work done (the loss sums are on the host).
  MicroStats forward_backward(const Batch& batch, double ce_scale, double aux_scale);
  // tokens_BS1 (B, S + 1) i32 on the host: inputs [:, :S], targets [:, 1:] (Batch::from_rows).
  MicroStats forward_backward(const Tensor& tokens_BS1, double ce_scale, double aux_scale);
  // Forward only; writes the logits (N, V, the backend's compute dtype) when `logits` is non-null.
  MicroStats forward(const Batch& batch, Tensor* logits = nullptr);
  MicroStats forward(const Tensor& tokens_BS1, Tensor* logits = nullptr);

  // The MoE layer of decoder layer `layer_idx` (null for a dense layer).
  const moe::MoeLayer* moe_layer(int64_t layer_idx) const;

 private:
  struct Layer;
  void build(const ParamTable& table, uint64_t seed);
  MicroStats run(const Batch& batch, bool backward, double ce_scale, double aux_scale, Tensor* logits);

  config::ModelConfig cfg_;
  backend::Backend& backend_;
  ModelOptions opts_;
  std::vector<Param> params_;
  std::vector<int64_t> offsets_;  // flat offset of each parameter (elements)
  std::vector<ParamSlice> master_slices_;  // shard_masters over a mesh: every parameter's slice
  Tensor flat_value_, flat_work_, flat_grad_;
  std::vector<Layer> layers_;
  size_t embed_ = 0, final_norm_ = 0, lm_head_ = 0;
};

// Copies every gradient of `from` into `to` (OVERWRITTEN): the same table (names and shapes
// checked), any backends. Synchronous.
void copy_grads(const Qwen3MoeModel& from, Qwen3MoeModel& to);

}  // namespace moetp::model
