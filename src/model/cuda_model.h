// Qwen3-MoE decoder on the GPU: one micro-batch's forward + backward composed from the CUDA kernels
// (kernels/cuda/{ops,attention,gemm}.h) and the CUDA MoE layer (moe/cuda_moe.h), in exactly the
// layer order of the CPU model (model/model.h, the executable spec), which
// tests/model/cuda_model_test.cpp holds it to on one GPU (np 1), and holds the 2- and 4-GPU layouts
// to the one-GPU model (np 2 and 4).
//
// Layouts: one GPU (no mesh), or one process per GPU over a mesh of NCCL communicators
// (CudaModelOptions::mesh; etp_spec §2): every non-expert parameter replicated on every rank (data
// parallel over world), the routed experts sharded over (ep, etp) exactly as the CPU model shards
// them (the same names, ShardSpecs and initial values), each rank running its own tokens.
// Gradients: reduce_grads() sums replicated gradients over world and expert shards over expert_dp
// (NCCL all-reduce, f32), grad_norm() counts every unique element once (etp_spec §8).
//
// Storage: per parameter an f32 master, a bf16 working copy (what the kernels read) and an f32
// gradient (accumulated, +=). Activations are bf16, every accumulation f32. The residual stream is
// bf16 (each residual add is an f32 add rounded once to bf16). The routed experts and router of a
// MoE layer keep their bf16 copy and f32 gradient inside their moe::CudaMoeLayer; the model's
// gradient tensors for them are views of the layer's.
//
// Parameters are the table's (model/param_table.h), as the CPU model's: the same order, names,
// shard specs and initial values (params()[i] corresponds to Qwen3MoeModel::params()[i]). Initial
// values are generated on the host one tensor at a time and uploaded. The dense MLP's gate and up
// weights are rows [0, F) and [F, 2F) of one (2F, H) buffer (master, working copy and gradient
// alike), so one GEMM gives the SwiGLU input gate | up.
//
// Checkpoints: CudaParamStore is the model as a model::ParamStore (values and AdamW moments moved
// one tensor at a time between the GPU and host f32 tensors), which io/checkpoint.h saves and loads.
//
// Loss: cross-entropy on the LM head's bf16 logits, computed in chunks of rows (tokens) so that at
// most kLogitChunkElems logits (bf16) exist at a time, whatever N·V; the aux loss from the MoE
// layers' statistics as moe::aux_loss (summed over world on a mesh). The per-layer probability
// sums are column sums in double on the GPU; E values per layer come back to the host.
//
// Streams: everything runs on the legacy default stream (the NCCL collectives on their
// communicators' streams, ordered against it with events); forward_backward synchronises (the MoE
// layers' per-expert counts, the loss sums, the aux statistics).
//
// Legend: B sequences, S sequence length, N = B·S tokens, H hidden, V vocab, Hq/Hkv query/kv heads,
// D head_dim, E experts, I expert FFN width, F dense FFN width.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "core/tensor.h"
#include "model/model.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "moe/cuda_moe.h"

namespace moetp::moe {
class CudaMoeLayer;
}

namespace moetp::model {

// A parameter of the table with its GPU tensors.
struct CudaParam : ParamDesc {
  Tensor master;      // f32, CUDA, the local shard shape of `spec`
  Tensor work;        // bf16, CUDA, same shape; for MoE parameters a view of their layer's own copy
  Tensor grad;        // f32, CUDA, same shape; ACCUMULATED by forward_backward
  Tensor exp_avg, exp_avg_sq;  // f32 AdamW moments, allocated by the first adamw_step
};

// AdamW hyper-parameters (train::AdamWConfig's fields; this library does not depend on train).
struct CudaAdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

struct CudaModelOptions {
  // One process per GPU over this mesh (every group a comm::NcclComm whose compute stream is the
  // legacy default stream; must outlive the model), or null: one GPU, every expert local.
  const comm::Mesh* mesh = nullptr;
  DispatcherKind dispatcher = DispatcherKind::kAll2all;  // with a mesh: kAll2all or kVexpert (moe/cuda_moe.h)
  bool force_balance = false;          // round-robin routing (moe.force_balance; benchmarks)
  int expert_streams = 1;              // moe::CudaMoeOptions::expert_streams
  moe::ExpertGemm expert_gemm = moe::ExpertGemm::kGrouped;  // moe::CudaMoeOptions::expert_gemm
};

class CudaQwen3MoeModel {
 public:
  // Rows per cross-entropy chunk: as many as keep chunk_rows · V <= kLogitChunkElems (at least 1).
  static constexpr int64_t kLogitChunkElems = int64_t{1} << 26;  // 128 MiB of bf16 logits

  // Initial values exactly as the CPU model built with the same (cfg, seed) and layout
  // (model::fill_initial_value per tensor on the host, uploaded; host memory: one tensor). Needs
  // cuda::init() to have run. Without a mesh it needs no MPI; with one, construction is local (no
  // collective).
  CudaQwen3MoeModel(const config::ModelConfig& cfg, uint64_t seed, CudaModelOptions opts = {});
  ~CudaQwen3MoeModel();
  CudaQwen3MoeModel(const CudaQwen3MoeModel&) = delete;
  CudaQwen3MoeModel& operator=(const CudaQwen3MoeModel&) = delete;

  const config::ModelConfig& config() const { return cfg_; }
  // The parameters with their gradients; expert gradients zero_grads deferred are zeroed first
  // (materialize_moe_grads), so a read between zero_grads and the next backward sees zeros.
  std::vector<CudaParam>& params() {
    materialize_moe_grads();
    return params_;
  }
  const std::vector<CudaParam>& params() const {
    materialize_moe_grads();
    return params_;
  }
  // The table entries of the parameters (no gradient zeroing, unlike params()).
  size_t num_params() const { return params_.size(); }
  const ParamDesc& param_desc(size_t i) const { return params_.at(i); }
  // One rank: 1 x 1; with a mesh, the mesh's.
  ExpertLayout layout() const;
  void zero_grads();
  // Zeroes the MoE expert gradients zero_grads deferred, if no backward has run since.
  void materialize_moe_grads() const;

  // One micro-batch, the CPU model's semantics (Qwen3MoeModel::forward_backward):
  //   tokens_BS1 [IN] i32 (B, S + 1), host: inputs [:, :S], targets [:, 1:]
  //   ce_scale   gradient scale of the summed cross-entropy (1 / targets of the step)
  //   aux_scale  gradient scale of the aux loss (router_aux_loss_coef / micro-batches)
  // Gradients accumulate (+=) into params()[i].grad. Synchronous (returns with the work done).
  MicroStats forward_backward(const Tensor& tokens_BS1, double ce_scale, double aux_scale);
  // Forward only (loss and statistics), no gradients.
  MicroStats forward(const Tensor& tokens_BS1);

  // Profiling: with phase timing on, every run() records CUDA events on the legacy stream at phase
  // boundaries (embed, attn_fwd, moe_fwd / dense_fwd, head_ce, aux, moe_bwd / dense_bwd, attn_bwd,
  // embed_bwd) and adds each phase's GPU-timeline milliseconds to phase_ms() (summed over layers
  // and runs). Time the GPU spends idle waiting for the host is counted in the phase it waits in,
  // which is the point: the phase that is slow for host reasons shows up. Off by default (the
  // events cost a few microseconds each).
  void set_phase_timing(bool on);
  const std::map<std::string, double>& phase_ms() const;
  void reset_phase_ms();

  // The MoE layer of decoder layer `layer_idx` (null for a dense layer): routing, probabilities
  // and counts of the last forward (tests use them to check routing margins).
  const moe::CudaMoeLayer* moe_layer(int64_t layer_idx) const;

  // Mesh: sums replicated gradients over world and expert shards over expert_dp (NCCL, f32, in
  // place); no-op on one GPU. Collective.
  void reduce_grads();
  // sqrt(Σ replicated g² + Σ over ep_etp of expert-shard g²), identical on every rank after
  // reduce_grads(). Collective (one host all-reduce over ep_etp); synchronises.
  double grad_norm();
  void scale_grads(float scale);

  // Downloads the f32 gradients into cpu.params()[i].grad (OVERWRITTEN), so the CPU optimiser and
  // tests can be reused. Names and shapes must match (checked).
  void copy_grads_to(Qwen3MoeModel& cpu) const;
  // One parameter's f32 tensor to or from the host (checkpoint save and load), synchronously.
  //   what  kMaster, or an AdamW moment (zero before the first adamw_step)
  //   host  f32, host, contiguous, the parameter's local shape
  // Uploading a master refreshes its bf16 working copy.
  enum class Slot { kMaster, kExpAvg, kExpAvgSq };
  void download(size_t i, Slot what, Tensor& host) const;
  void upload(size_t i, Slot what, const Tensor& host);

  // One AdamW step on the f32 masters (cuda::adamw_step: train::AdamW::step's formula, element by
  // element; decay only where CudaParam::decay), then refreshes every bf16 working copy.
  //   step counts from 1. Synchronous.
  void adamw_step(const CudaAdamWConfig& cfg, double lr, int64_t step);

 private:
  struct Layer;
  void ensure_moments();
  void build(const ParamTable& table, uint64_t seed);
  void refresh_moe_params();
  MicroStats run(const Tensor& tokens_BS1, bool backward, double ce_scale, double aux_scale);

  struct PhaseTimer;
  std::unique_ptr<PhaseTimer> phases_;
  void mark(const char* phase);  // no-op unless phase timing is on

  config::ModelConfig cfg_;
  CudaModelOptions opts_;
  std::vector<CudaParam> params_;
  std::vector<Layer> layers_;
  size_t embed_ = 0, final_norm_ = 0, lm_head_ = 0;
  Tensor prob_sums_dev_;  // (MoE layers, E) doubles as i64 bits: the aux loss's per-layer probability sums
};

// The CUDA model as a checkpoint store: slot 0 the f32 masters, slots 1 and 2 the AdamW moments
// (kAdamWStatePrefixes). `host_mesh` is the MPI mesh of the same layout (the checkpoint code's
// collectives run on host tensors); both must outlive the store.
class CudaParamStore final : public ParamStore {
 public:
  CudaParamStore(CudaQwen3MoeModel& model, const comm::Mesh& host_mesh);

  const config::ModelConfig& config() const override { return model_.config(); }
  const comm::Mesh& mesh() const override { return mesh_; }
  size_t num_params() const override { return model_.num_params(); }
  const ParamDesc& param(size_t i) const override { return model_.param_desc(i); }
  std::vector<std::string> state_prefixes() const override { return kAdamWStatePrefixes; }
  void read(size_t i, int slot, Tensor& host_f32) const override;
  void write(size_t i, int slot, const Tensor& host_f32) override;

 private:
  CudaQwen3MoeModel& model_;
  const comm::Mesh& mesh_;
};

}  // namespace moetp::model
