// Dispatchers: move each token row to the ranks that hold its experts and bring the expert
// outputs back (etp_spec §6). All four compute the same function; the MoE block does not know
// which one runs.
//
// Legend: N tokens on this rank, H hidden, K experts per token, E experts, L = E/P local experts,
// M rows after dispatch on this rank.
//
// Row order after dispatch (identical for every dispatcher, and on every TP rank of an EP group):
// rows sorted by local expert j, then by source rank (group rank r = p·T + t in ep_etp), then by
// source token index n, then by slot k. Row i of x_MH is a bit-exact copy of x_NH[n] of its
// source rank. The expert output y_MH has the same rows; on rank (p, t) it is the TP-partial
// y_t of etp_spec §4, and combine sums the partials over t and folds them with the routing
// weights: out[n] = Σ_k w[n, k] · Σ_t y_t(n, k).
//
// One layer's step calls dispatch → combine → combine_backward → dispatch_backward with the same
// DispatchState, which keeps the row counts exchanged in dispatch (never exchanged again) and
// what the backward needs. All calls are collective over the dispatcher's group.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "comm/mesh.h"
#include "core/options.h"
#include "core/tensor.h"

namespace moetp::moe {

struct Dispatched {
  Tensor x_MH;                   // rows grouped by local expert, order above
  std::vector<int64_t> offsets;  // L + 1 entries: local expert j owns rows [offsets[j], offsets[j+1])
};

struct CombineGrads {
  Tensor dy_MH;           // gradient w.r.t. y_MH (this rank's partial), rows as dispatched
  Tensor dtopk_weight_NK; // gradient w.r.t. topk_weight_NK of this rank's tokens
};

// What one layer's dispatch keeps for combine and the backward passes (opaque to callers): the
// plan (who sends which rows where, the exchanged counts) and the rows the backward reads.
struct DispatchState {
  virtual ~DispatchState() = default;
  // Drops the rows, keeping the plan (recomputation: see Dispatcher::redispatch).
  virtual void release_rows() = 0;
};

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  virtual std::string name() const = 0;

  //   x_NH           [IN] f32 (N, H)
  //   topk_idx_NK    [IN] i32 (N, K) global expert ids in [0, E)
  //   topk_weight_NK [IN] f32 (N, K)
  virtual Dispatched dispatch(const Tensor& x_NH, const Tensor& topk_idx_NK, const Tensor& topk_weight_NK,
                              std::unique_ptr<DispatchState>& state) = 0;
  //   y_MH [IN] f32 (M, H) expert outputs (TP partials); returns out_NH. Keeps y_MH for the
  //   routing-weight gradient.
  virtual Tensor combine(const Tensor& y_MH, DispatchState& state) = 0;
  //   dout_NH [IN] gradient of combine's output.
  virtual CombineGrads combine_backward(const Tensor& dout_NH, DispatchState& state) = 0;
  //   dx_MH [IN] gradient w.r.t. the dispatched rows (this rank's TP partial); returns dx_NH.
  virtual Tensor dispatch_backward(const Tensor& dx_MH, DispatchState& state) = 0;

  // Recomputation, after state.release_rows(): the same rows as the dispatch that made `state`,
  // moved with its plan (no routing check, no counts exchange; the row exchanges run again).
  //   x_NH [IN] the input of that dispatch (the same values)
  virtual Dispatched redispatch(const Tensor& x_NH, DispatchState& state) = 0;
  // What combine keeps of y_MH for the backward, without the combined output (all2all moves the
  // rows back as combine does; the others keep y_MH as it is).
  virtual void recombine(const Tensor& y_MH, DispatchState& state) = 0;
};

struct DispatcherConfig {
  int64_t num_experts = 0;  // E
  int64_t top_k = 0;        // K
};

// kLocal (P = T = 1), kAllgather, kAll2all, kVexpert; kAuto must be resolved first
// (config::resolved_dispatcher). Validates E % P == 0 and K <= E.
std::unique_ptr<Dispatcher> make_dispatcher(DispatcherKind kind, const comm::Mesh& mesh, const DispatcherConfig& cfg);
// Every concrete dispatcher, in OptionNames order.
inline constexpr std::array<DispatcherKind, 4> kDispatchers = {DispatcherKind::kLocal, DispatcherKind::kAllgather,
                                                               DispatcherKind::kAll2all, DispatcherKind::kVexpert};

// Virtual-expert expansion for `vexpert` (etp_spec §6.5): entry k·T + t of the result is
// v(e, t) = (p(e)·T + t)·L + j(e) for e = topk_idx[n, k]; p(e) = e / L, j(e) = e % L.
//   topk_idx_NK [IN] i32 (N, K); returns i32 (N, K·T)
Tensor expand_topk_for_tp(const Tensor& topk_idx_NK, int64_t num_experts, int ep, int etp);

}  // namespace moetp::moe
