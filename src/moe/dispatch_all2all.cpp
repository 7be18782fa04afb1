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
#include "moe/dispatch_common.h"
#include "moe/row_ops.h"

namespace moetp::moe::detail {

namespace {

struct All2AllState : DispatchState {
  int64_t num_tokens = 0;
  std::vector<int64_t> slot_token;   // per source slot row: token n (rows sorted by expert, token)
  std::vector<int64_t> slot_k;       // per source slot row: slot k
  std::vector<int64_t> send_counts;  // rows to each EP rank
  std::vector<int64_t> recv_counts;  // rows from each EP rank
  std::vector<int64_t> tp_counts;    // received rows of each TP rank (all-gather counts)
  std::vector<int64_t> perm;         // expert-order row i = gathered row perm[i]
  Tensor weight_NK;
  Tensor y_slot_SH;                  // combined (TP-summed) expert output per source slot row
};

class All2AllDispatcher final : public Dispatcher {
 public:
  All2AllDispatcher(const comm::Mesh& mesh, const DispatcherConfig& cfg)
      : mesh_(mesh), cfg_(cfg), num_local_(cfg.num_experts / mesh.ep_size()) {}
  std::string name() const override { return "all2all"; }

  Dispatched dispatch(const Tensor& x_NH, const Tensor& idx, const Tensor& w,
                      std::unique_ptr<DispatchState>& state) override {
    validate_routing(mesh_.ep_etp(), x_NH, idx, w, cfg_);
    auto s = std::make_unique<All2AllState>();
    s->num_tokens = x_NH.size(0);
    s->weight_NK = w.contiguous();
    const HostRouting r = host_routing(idx);
    const int P = mesh_.ep_size(), T = mesh_.etp_size();
    const int64_t L = num_local_;

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
    s->send_counts.assign(P, 0);
    for (int64_t e = 0; e < cfg_.num_experts; ++e) s->send_counts[e / L] += per_expert[e];

    // Counts, exchanged once: per (source EP rank, local expert), then gathered over TP.
    Tensor cnt_send = Tensor::from_vector<int64_t>(per_expert, {cfg_.num_experts, 1});
    Tensor cnt_recv = Tensor::empty({P * L, 1}, DType::kI64);
    const std::vector<int64_t> l_each(P, L);
    mesh_.ep().all_to_all_v(cnt_send, l_each, cnt_recv, l_each);
    Tensor cnt_all = Tensor::empty({T * P * L, 1}, DType::kI64);
    mesh_.etp().all_gather(cnt_recv, cnt_all);
    const std::vector<int64_t> cnt = cnt_all.to_vector<int64_t>();  // [t'][q'][j]
    s->recv_counts.assign(P, 0);
    const int t_me = mesh_.coords().t;
    for (int q = 0; q < P; ++q) {
      for (int64_t j = 0; j < L; ++j) s->recv_counts[q] += cnt[(t_me * P + q) * L + j];
    }
    s->tp_counts = mesh_.etp().all_gather_scalar(comm::sum_counts(s->recv_counts));

    // Gathered rows are blocks (t', q', j) in that nesting; expert order is (j, q', t').
    const std::vector<int64_t> block_off = exclusive_prefix(cnt);
    std::vector<int64_t> offsets(L + 1, 0);
    for (int64_t j = 0; j < L; ++j) {
      for (int q = 0; q < P; ++q) {
        for (int t = 0; t < T; ++t) {
          const int64_t b = (static_cast<int64_t>(t) * P + q) * L + j;
          for (int64_t i = block_off[b]; i < block_off[b + 1]; ++i) s->perm.push_back(i);
        }
      }
      offsets[j + 1] = static_cast<int64_t>(s->perm.size());
    }

    Dispatched d{forward_move(gather_rows(x_NH, s->slot_token), *s), offsets};
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

 private:
  Tensor forward_move(const Tensor& rows_SH, const All2AllState& s) const {
    const int64_t h = rows_SH.size(1);
    Tensor recv = Tensor::empty({comm::sum_counts(s.recv_counts), h}, DType::kF32);
    mesh_.ep().all_to_all_v(rows_SH, s.send_counts, recv, s.recv_counts);
    Tensor gathered = Tensor::empty({comm::sum_counts(s.tp_counts), h}, DType::kF32);
    mesh_.etp().all_gather_v(recv, gathered, s.tp_counts);
    return gather_rows(gathered, s.perm);
  }

  Tensor backward_move(const Tensor& rows_MH, const All2AllState& s) const {
    const int64_t h = rows_MH.size(1);
    MOETP_CHECK(rows_MH.rows() == static_cast<int64_t>(s.perm.size()),
                "all2all: expert rows {} but dispatch produced {} rows", rows_MH.describe(), s.perm.size());
    Tensor gathered = scatter_rows(rows_MH.contiguous(), s.perm);
    Tensor mine = Tensor::empty({s.tp_counts[mesh_.etp().rank()], h}, DType::kF32);
    mesh_.etp().reduce_scatter_v(gathered, mine, s.tp_counts);
    Tensor back = Tensor::empty({comm::sum_counts(s.send_counts), h}, DType::kF32);
    mesh_.ep().all_to_all_v(mine, s.recv_counts, back, s.send_counts);
    return back;
  }

  const comm::Mesh& mesh_;
  DispatcherConfig cfg_;
  int64_t num_local_;
};

}  // namespace

std::unique_ptr<Dispatcher> make_all2all(const comm::Mesh& mesh, const DispatcherConfig& cfg) {
  return std::make_unique<All2AllDispatcher>(mesh, cfg);
}

}  // namespace moetp::moe::detail
