// The MoE layer as the model sees it: forward and backward of one decoder layer's routed experts
// (router, dispatch, experts, combine) on tensors of one backend. A backend builds it
// (backend::Backend::make_moe_layer): the CPU backend from moe::MoeBlock and its dispatchers, the
// CUDA backend from moe::CudaMoeLayer. The model owns the parameter storage (flat buffers, see
// model/model.h) and binds views of it to the layer; the layer owns its activations.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/mesh.h"
#include "core/options.h"
#include "moe/moe_block.h"

namespace moetp::moe {

struct MoeLayerOptions {
  // The mesh whose ep / etp / ep_etp groups carry this backend's tensors, or null: one process
  // holding every expert (CUDA only; the CPU layer always runs over a mesh). Must outlive the layer.
  const comm::Mesh* mesh = nullptr;
  bool force_balance = false;  // round-robin routing (moe.force_balance; CUDA only)
  int expert_streams = 1;      // CUDA, cuBLAS expert GEMMs: side streams for chunks of experts
  ExpertGemmChoice expert_gemm = ExpertGemmChoice::kAuto;  // CUDA only
};

// This rank's routing statistics of the last forward, on the host (the aux loss and telemetry).
struct RoutingStats {
  std::vector<float> counts_E;     // (token, slot) pairs per expert, exact integers
  std::vector<float> prob_sums_E;  // Σ_n probs[n, e], summed in double, rounded once to f32
};

class MoeLayer {
 public:
  virtual ~MoeLayer() = default;
  virtual const MoeConfig& config() const = 0;
  virtual int64_t num_local_experts() const = 0;   // L
  virtual int64_t local_intermediate() const = 0;  // i
  // The tensors the layer computes with (the backend's compute dtype, MoeParams shapes) and
  // accumulates its gradients into (f32, same shapes). Views of the model's buffers; they must stay
  // valid while the layer is used.
  virtual void bind(const MoeParams& work, const MoeParams& grads) = 0;
  // Zeroes the bound gradients. A backend may defer part of it to the next backward;
  // materialize_grads() completes it, so that a reader then sees zeros or accumulated values.
  virtual void zero_grads() = 0;
  virtual void materialize_grads() = 0;
  //   x_NH [IN] (N, H), the backend's compute dtype; kept (not copied) until backward
  //   returns out_NH (N, H). Collective over the mesh.
  virtual Tensor forward(const Tensor& x_NH) = 0;
  //   dout_NH    [IN] (N, H) gradient of the output
  //   d_probs_NE [IN] (N, E) f32 on this backend: extra gradient w.r.t. the router probabilities
  //                   (the aux loss); undefined = zero
  //   returns dx_NH. Accumulates into the bound gradients. Collective over the mesh.
  virtual Tensor backward(const Tensor& dout_NH, const Tensor& d_probs_NE) = 0;
  // Recomputation. release_activations drops what only the backward of the last forward reads
  // (its input, the dispatched rows, the expert activations), keeping the routing (probabilities,
  // top-k, statistics) and the dispatch plan (counts, row order); recompute(x_NH) then runs
  // dispatch and experts again from the same input with that routing and plan: no router GEMM, no
  // routing plan, no counts exchange (the row exchanges run again, as the dispatcher's redispatch
  // says). The backward needs a forward, or a recompute after release_activations; the results
  // are the same bits either way. recompute produces no output and is collective like forward.
  virtual void release_activations() = 0;
  virtual void recompute(const Tensor& x_NH) = 0;
  virtual RoutingStats routing_stats() const = 0;
  // (N, E) f32 router probabilities of the last forward (tests: routing margins).
  virtual Tensor router_probs() const = 0;
};

}  // namespace moetp::moe
