// `vexpert`: virtual experts on the flat ep_etp group (etp_spec §6.5). Expert e becomes T virtual
// experts v(e, t) owned by ep_etp rank p(e)·T + t. One row goes to each (token, destination rank)
// pair, carrying the K virtual entries that destination (p, t) can own (entry k = virtual entry
// k·T + t, moe/vexpert_plan.h): the local expert id where it owns the entry, -1 elsewhere, and the
// weights repeated with no 1/T.
// The receiver folds its partials with those weights; combine sums what comes back.
#include "moe/dispatch_common.h"
#include "moe/row_ops.h"
#include "moe/vexpert_plan.h"

namespace moetp::moe::detail {

namespace {

struct VExpertState : DispatchState {
  int64_t num_tokens = 0;
  int64_t num_entries = 0;           // K (entries per row, vexpert_plan.h)
  std::vector<int64_t> send_token;   // token of each sent row (rows sorted by destination, token)
  std::vector<int64_t> send_counts;  // rows to each ep_etp rank
  std::vector<int64_t> recv_counts;  // rows from each ep_etp rank
  std::vector<int64_t> row_recv;     // expert-order row i = received row row_recv[i] ...
  std::vector<int64_t> row_entry;    // ... entry (slot) row_entry[i] of its K entries
  std::vector<int64_t> offsets;      // L + 1: local expert j owns expert-order rows [offsets[j], offsets[j+1])
  Tensor recv_weight_RC;             // (M_recv, K) weights of the received rows (0 where not ours)
  Tensor y_MH;
  void release_rows() override { y_MH = Tensor(); }
};

class VExpertDispatcher final : public Dispatcher {
 public:
  VExpertDispatcher(const comm::Mesh& mesh, const DispatcherConfig& cfg)
      : mesh_(mesh), cfg_(cfg), num_local_(cfg.num_experts / mesh.ep_size()) {}
  std::string name() const override { return "vexpert"; }

  Dispatched dispatch(const Tensor& x_NH, const Tensor& idx, const Tensor& w,
                      std::unique_ptr<DispatchState>& state) override {
    comm::Comm& g = mesh_.ep_etp();
    validate_routing(g, x_NH, idx, w, cfg_);
    auto s = std::make_unique<VExpertState>();
    const int64_t n_tok = x_NH.size(0), K = cfg_.top_k, L = num_local_;
    VExpertSendPlan plan = plan_vexpert_send(idx.to_vector<int32_t>(), w.to_vector<float>(), n_tok, K,
                                             cfg_.num_experts, mesh_.ep_size(), mesh_.etp_size());
    const int64_t C = plan.num_entries;
    s->num_tokens = n_tok;
    s->num_entries = C;
    s->send_token = std::move(plan.send_token);
    s->send_counts = std::move(plan.send_counts);
    const std::vector<int32_t>& meta = plan.meta;
    const std::vector<float>& meta_w = plan.meta_w;
    const int64_t num_sent = static_cast<int64_t>(s->send_token.size());
    s->recv_counts = g.exchange_counts(s->send_counts);
    const int64_t num_recv = comm::sum_counts(s->recv_counts);

    Tensor recv_x = Tensor::empty({num_recv, x_NH.size(1)}, DType::kF32);
    g.all_to_all_v(gather_rows(x_NH, s->send_token), s->send_counts, recv_x, s->recv_counts);
    Tensor recv_meta = Tensor::empty({num_recv, C}, DType::kI32);
    g.all_to_all_v(Tensor::from_vector<int32_t>(meta, {num_sent, C}), s->send_counts, recv_meta, s->recv_counts);
    s->recv_weight_RC = Tensor::empty({num_recv, C}, DType::kF32);
    g.all_to_all_v(Tensor::from_vector<float>(meta_w, {num_sent, C}), s->send_counts, s->recv_weight_RC,
                   s->recv_counts);

    // Expert order: local expert, then received row (= source rank, token), then entry (= slot).
    VExpertRecvPlan rp = plan_vexpert_recv(recv_meta.to_vector<int32_t>(), num_recv, C, L);
    s->row_recv = std::move(rp.row_recv);
    s->row_entry = std::move(rp.row_entry);
    s->offsets = std::move(rp.offsets);
    Dispatched d{gather_rows(recv_x, s->row_recv), s->offsets};
    state = std::move(s);
    return d;
  }

  Tensor combine(const Tensor& y_MH, DispatchState& state) override {
    auto& s = state_as<VExpertState>(state, "vexpert");
    s.y_MH = y_MH;
    Tensor z = Tensor::zeros({s.recv_weight_RC.size(0), y_MH.size(1)}, DType::kF32);
    fold_weighted(y_MH, s.row_recv, s.row_entry, s.recv_weight_RC, z);
    return sum_back(z, s);
  }

  CombineGrads combine_backward(const Tensor& dout_NH, DispatchState& state) override {
    auto& s = state_as<VExpertState>(state, "vexpert");
    comm::Comm& g = mesh_.ep_etp();
    Tensor dz = Tensor::empty({s.recv_weight_RC.size(0), dout_NH.size(1)}, DType::kF32);
    g.all_to_all_v(gather_rows(dout_NH.contiguous(), s.send_token), s.send_counts, dz, s.recv_counts);
    CombineGrads out;
    out.dy_MH = weighted_gather(dz, s.row_recv, s.row_entry, s.recv_weight_RC);
    Tensor dw_recv = Tensor::zeros(s.recv_weight_RC.shape(), DType::kF32);
    dot_rows(dz, s.row_recv, s.row_entry, s.y_MH, dw_recv);
    Tensor dw_sent = Tensor::empty({static_cast<int64_t>(s.send_token.size()), s.num_entries}, DType::kF32);
    g.all_to_all_v(dw_recv, s.recv_counts, dw_sent, s.send_counts);
    // The T copies of slot k sum into dw[n, k] (the backward of repeating the weights).
    out.dtopk_weight_NK = Tensor::from_vector<float>(
        vexpert_fold_weight_grad(dw_sent.to_vector<float>(), s.send_token, s.num_tokens, cfg_.top_k),
        {s.num_tokens, cfg_.top_k});
    return out;
  }

  Tensor dispatch_backward(const Tensor& dx_MH, DispatchState& state) override {
    auto& s = state_as<VExpertState>(state, "vexpert");
    Tensor dq = Tensor::zeros({s.recv_weight_RC.size(0), dx_MH.size(1)}, DType::kF32);
    scatter_add_rows(dx_MH, s.row_recv, dq);
    return sum_back(dq, s);
  }

  Dispatched redispatch(const Tensor& x_NH, DispatchState& state) override {
    auto& s = state_as<VExpertState>(state, "vexpert");
    Tensor recv_x = Tensor::empty({s.recv_weight_RC.size(0), x_NH.size(1)}, DType::kF32);
    mesh_.ep_etp().all_to_all_v(gather_rows(x_NH, s.send_token), s.send_counts, recv_x, s.recv_counts);
    return {gather_rows(recv_x, s.row_recv), s.offsets};
  }

  void recombine(const Tensor& y_MH, DispatchState& state) override { state_as<VExpertState>(state, "vexpert").y_MH = y_MH; }

 private:
  // Reverse all-to-all of per-received-row values, summed into the source tokens.
  Tensor sum_back(const Tensor& per_recv_RH, const VExpertState& s) const {
    const int64_t h = per_recv_RH.size(1);
    Tensor back = Tensor::empty({static_cast<int64_t>(s.send_token.size()), h}, DType::kF32);
    mesh_.ep_etp().all_to_all_v(per_recv_RH, s.recv_counts, back, s.send_counts);
    Tensor out = Tensor::zeros({s.num_tokens, h}, DType::kF32);
    scatter_add_rows(back, s.send_token, out);
    return out;
  }

  const comm::Mesh& mesh_;
  DispatcherConfig cfg_;
  int64_t num_local_;
};

}  // namespace

std::unique_ptr<Dispatcher> make_vexpert(const comm::Mesh& mesh, const DispatcherConfig& cfg) {
  return std::make_unique<VExpertDispatcher>(mesh, cfg);
}

}  // namespace moetp::moe::detail
