// The MoE block of a Qwen3-MoE layer: router → dispatcher → grouped SwiGLU on the local expert
// shards → combine, forward and backward (etp_spec §3-§6). The dispatcher is picked by name; the
// block does not know which one runs. Collective over the mesh (ep_etp group; the router's error
// check agrees over world so that a NaN on one rank stops every rank).
//
// Legend: N tokens on this rank, H hidden, E experts, K top-k, L = E/P local experts,
// i = I/T this rank's slice of the expert FFN width, M rows after dispatch.
#pragma once

#include <memory>
#include <string>

#include "comm/mesh.h"
#include "kernels/cpu/experts.h"
#include "kernels/cpu/router.h"
#include "moe/dispatcher.h"
#include "shard/layout.h"

namespace moetp::moe {

struct MoeConfig {
  int64_t hidden = 0;            // H
  int64_t num_experts = 0;       // E
  int64_t top_k = 0;             // K
  int64_t intermediate = 0;      // I (moe_intermediate_size)
  bool norm_topk_prob = true;
  DispatcherKind dispatcher = DispatcherKind::kAll2all;  // concrete (not kAuto)
};

// This rank's parameters (or their gradients: same shapes).
struct MoeParams {
  Tensor wg_EH;     // (E, H) router, replicated on every rank
  Tensor w13_L2iH;  // (L, 2i, H) gate rows [0, i), up rows [i, 2i) of each local expert
  Tensor w2_LHi;    // (L, H, i)
};

// What backward needs from forward, plus the layer's routing statistics on this rank.
struct MoeSaved {
  Tensor x_NH;
  cpu::RouterForward router;
  std::unique_ptr<DispatchState> dispatch;
  Dispatched dispatched;
  cpu::ExpertsSaved experts;
  bool has_rows = false;  // dispatched rows and expert activations present (forward or recompute)
  Tensor counts_E;    // (E) f32 (token, slot) pairs per expert on this rank (telemetry, aux loss)
  Tensor prob_sum_E;  // (E) f32 Σ_n probs[n, e] on this rank
};

class MoeBlock {
 public:
  // Validates E % P, I % T and 1 <= K <= E (errors name the values).
  MoeBlock(const MoeConfig& cfg, const comm::Mesh& mesh);

  const MoeConfig& config() const { return cfg_; }
  const comm::Mesh& mesh() const { return mesh_; }
  const Dispatcher& dispatcher() const { return *dispatcher_; }
  int64_t num_local_experts() const { return cfg_.num_experts / mesh_.ep_size(); }
  int64_t local_intermediate() const { return cfg_.intermediate / mesh_.etp_size(); }

  // Shard specs of the expert weights in global (HF-equivalent) coordinates: w13 as
  // [E·2I, H] (InterleavedShard), w2 as [E·H, I] (columns [t·i, (t+1)·i)).
  shard::ShardSpec w13_spec() const;
  shard::ShardSpec w2_spec() const;
  // Zero tensors of this rank's parameter shapes.
  MoeParams zeros_like_params() const;

  //   x_NH [IN] (N, H) f32; returns out_NH (N, H). Fills `saved`.
  Tensor forward(const Tensor& x_NH, const MoeParams& params, MoeSaved& saved) const;
  //   dout_NH    [IN] (N, H) gradient of the block output
  //   d_probs_NE [IN] (N, E) gradient w.r.t. the router probabilities from the aux loss; may be undefined
  //   grads      [IN/OUT] accumulated (+=), this rank's local contribution (not yet reduced)
  //   returns dx_NH
  Tensor backward(const Tensor& dout_NH, const Tensor& d_probs_NE, const MoeParams& params, MoeSaved& saved,
                  MoeParams& grads) const;
  // Recomputation (MoeLayer::release_activations / recompute): drops the input, the dispatched
  // rows and the expert activations, keeping the routing and the dispatch plan; recompute re-runs
  // dispatch and experts from the same input with them (no router, no counts exchange), and the
  // backward then runs as after the forward, with the same bits.
  void release(MoeSaved& saved) const;
  void recompute(const Tensor& x_NH, const MoeParams& params, MoeSaved& saved) const;

 private:
  MoeConfig cfg_;
  const comm::Mesh& mesh_;
  std::unique_ptr<Dispatcher> dispatcher_;
};

// The load-balancing loss over MoE layers on the global batch (HF Qwen3-MoE definition; see
// cpu::aux_loss_from_stats). Sums each layer's statistics, all-reduces them over `world` so every
// layout gives the single-rank value, and returns the loss (without coefficient) and, per layer,
// d(coef · aux)/d probs for this rank's tokens.
struct AuxLoss {
  double value = 0;
  std::vector<Tensor> d_probs_NE;  // one per layer, in the order given
  Tensor global_counts_E;          // (E) tokens per expert over the global batch, all layers
};
AuxLoss aux_loss(const std::vector<const MoeSaved*>& layers, comm::Comm& world, int64_t num_experts, float coef);

// Fills a shard with N(0, std) values that are a pure function of (seed, name, global element
// index), so every layout starts from the identical global tensor.
Tensor init_normal(const shard::ShardSpec& spec, uint64_t seed, std::string_view name, float std);
// The same values written into `local` (f32, host, contiguous, the shard's local shape).
void init_normal_into(const shard::ShardSpec& spec, uint64_t seed, std::string_view name, float std, Tensor& local);

}  // namespace moetp::moe
