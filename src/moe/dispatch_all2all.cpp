// `all2all`: EP all-to-all by owning EP rank, then (T > 1) a TP all-gather of the received rows
// inside dispatch; combine is the reverse (TP reduce-scatter of the partials, reverse EP
// all-to-all), and the routing weights are applied on the source rank (etp_spec §6.4).
//
// Two data paths are reused four times:
//   forward_move:  source slot rows (S, H) -> a2a over ep -> all-gather over etp -> expert order (M, H)
//   backward_move: expert order (M, H) -> source order of the gather -> reduce-scatter over etp
//                  -> reverse a2a over ep -> source slot rows (S, H)
// dispatch = forward_move(x per slot); combine = backward_move, then fold with the weights;
// combine_backward = forward_move(w · dout per slot); dispatch_backward = backward_move, then sum
// the K slots of each token.
#include "moe/all2all_plan.h"
#include "moe/dispatch_common.h"
#include "moe/row_ops.h"

namespace moetp::moe::detail {

namespace {

struct All2AllState : DispatchState {
  int64_t num_tokens = 0;
  std::vector<int64_t> slot_token;   // per source slot row: token n (rows sorted by expert, token)
  std::vector<int64_t> slot_k;       // per source slot row: slot k
  All2AllPlan plan;                  // counts and the expert order (all2all_plan.h)
  Tensor weight_NK;
  Tensor y_slot_SH;                  // combined (TP-summed) expert output per source slot row
  void release_rows() override { y_slot_SH = Tensor(); }
};

class All2AllDispatcher final : public Dispatcher {
 public:
  All2AllDispatcher(const comm::Mesh& mesh, const DispatcherConfig& cfg)
      : mesh_(mesh), cfg_(cfg) {}
  std::string name() const override { return "all2all"; }

  Dispatched dispatch(const Tensor& x_NH, const Tensor& idx, const Tensor& w,
                      std::unique_ptr<DispatchState>& state) override {
    validate_routing(mesh_.ep_etp(), x_NH, idx, w, cfg_);
    auto s = std::make_unique<All2AllState>();
    s->num_tokens = x_NH.size(0);
    s->weight_NK = w.contiguous();
    const HostRouting r = host_routing(idx);
    // Source slot rows sorted by global expert, then token (slot k is unique per (token, expert)).
    std::vector<int64_t> per_expert(cfg_.num_experts, 0);
    for (int32_t e : r.idx) ++per_expert[e];
    std::vector<int64_t> cursor = exclusive_prefix(per_expert);
    s->slot_token.resize(r.idx.size());
    s->slot_k.resize(r.idx.size());
    for (int64_t n = 0; n < r.num_tokens; ++n) {
      for (int64_t k = 0; k < r.top_k; ++k) {
        const int64_t pos = cursor[r.at(n, k)]++;
        s->slot_token[pos] = n;
        s->slot_k[pos] = k;
      }
    }
    plan_all2all(mesh_, per_expert, s->plan);
    Dispatched d{forward_move(gather_rows(x_NH, s->slot_token), *s), s->plan.offsets};
    state = std::move(s);
    return d;
  }

  Tensor combine(const Tensor& y_MH, DispatchState& state) override {
    auto& s = state_as<All2AllState>(state, "all2all");
    s.y_slot_SH = backward_move(y_MH, s);
    Tensor out = Tensor::zeros({s.num_tokens, y_MH.size(1)}, DType::kF32);
    fold_weighted(s.y_slot_SH, s.slot_token, s.slot_k, s.weight_NK, out);
    return out;
  }

  CombineGrads combine_backward(const Tensor& dout_NH, DispatchState& state) override {
    auto& s = state_as<All2AllState>(state, "all2all");
    CombineGrads g;
    g.dtopk_weight_NK = Tensor::zeros(s.weight_NK.shape(), DType::kF32);
    dot_rows(dout_NH, s.slot_token, s.slot_k, s.y_slot_SH, g.dtopk_weight_NK);
    g.dy_MH = forward_move(weighted_gather(dout_NH, s.slot_token, s.slot_k, s.weight_NK), s);
    return g;
  }

  Tensor dispatch_backward(const Tensor& dx_MH, DispatchState& state) override {
    auto& s = state_as<All2AllState>(state, "all2all");
    Tensor dx = Tensor::zeros({s.num_tokens, dx_MH.size(1)}, DType::kF32);
    scatter_add_rows(backward_move(dx_MH, s), s.slot_token, dx);
    return dx;
  }

  Dispatched redispatch(const Tensor& x_NH, DispatchState& state) override {
    auto& s = state_as<All2AllState>(state, "all2all");
    return {forward_move(gather_rows(x_NH, s.slot_token), s), s.plan.offsets};
  }

  void recombine(const Tensor& y_MH, DispatchState& state) override {
    auto& s = state_as<All2AllState>(state, "all2all");
    s.y_slot_SH = backward_move(y_MH, s);
  }

 private:
  Tensor forward_move(const Tensor& rows_SH, const All2AllState& s) const {
    const int64_t h = rows_SH.size(1);
    const All2AllPlan& p = s.plan;
    Tensor recv = Tensor::empty({p.num_recv, h}, DType::kF32);
    mesh_.ep().all_to_all_v(rows_SH, p.send_counts, recv, p.recv_counts);
    Tensor gathered = Tensor::empty({p.num_rows, h}, DType::kF32);
    mesh_.etp().all_gather_v(recv, gathered, p.tp_counts);
    return gather_rows(gathered, p.perm);
  }

  Tensor backward_move(const Tensor& rows_MH, const All2AllState& s) const {
    const int64_t h = rows_MH.size(1);
    const All2AllPlan& p = s.plan;
    MOETP_CHECK(rows_MH.rows() == p.num_rows, "all2all: expert rows {} but dispatch produced {} rows",
                rows_MH.describe(), p.num_rows);
    Tensor gathered = scatter_rows(rows_MH.contiguous(), p.perm);
    Tensor mine = Tensor::empty({p.num_recv, h}, DType::kF32);
    mesh_.etp().reduce_scatter_v(gathered, mine, p.tp_counts);
    Tensor back = Tensor::empty({comm::sum_counts(p.send_counts), h}, DType::kF32);
    mesh_.ep().all_to_all_v(mine, p.recv_counts, back, p.send_counts);
    return back;
  }

  const comm::Mesh& mesh_;
  DispatcherConfig cfg_;
};

}  // namespace

std::unique_ptr<Dispatcher> make_all2all(const comm::Mesh& mesh, const DispatcherConfig& cfg) {
  return std::make_unique<All2AllDispatcher>(mesh, cfg);
}

}  // namespace moetp::moe::detail
