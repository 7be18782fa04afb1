// Dispatcher factory, validation helpers, the virtual-expert expansion, and the two dispatchers
// that need no all-to-all: `local` (P = T = 1) and `allgather` (all-gather over ep_etp, fold on
// the expert side, reduce-scatter back).
#include "moe/dispatcher.h"

#include "moe/dispatch_common.h"
#include "moe/row_ops.h"

namespace moetp::moe {

namespace detail {

std::string routing_error(const Tensor& x_NH, const Tensor& topk_idx_NK, const Tensor& topk_weight_NK,
                          const DispatcherConfig& cfg) {
  if (!x_NH.defined() || x_NH.ndim() != 2 || x_NH.dtype() != DType::kF32 || !x_NH.is_contiguous()) {
    return fmt::format("x_NH must be a contiguous f32 (N, H) tensor, got {}", x_NH.describe());
  }
  const int64_t n = x_NH.size(0);
  const Shape nk = {n, cfg.top_k};
  if (!topk_idx_NK.defined() || topk_idx_NK.shape() != nk || topk_idx_NK.dtype() != DType::kI32) {
    return fmt::format("topk_idx_NK must be i32 {}, got {}", shape_str(nk), topk_idx_NK.describe());
  }
  if (!topk_weight_NK.defined() || topk_weight_NK.shape() != nk || topk_weight_NK.dtype() != DType::kF32) {
    return fmt::format("topk_weight_NK must be f32 {}, got {}", shape_str(nk), topk_weight_NK.describe());
  }
  const Tensor idx = topk_idx_NK.contiguous();
  const int32_t* p = idx.data<int32_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    if (p[i] < 0 || p[i] >= cfg.num_experts) {
      return fmt::format("topk_idx[{}, {}] = {} is not an expert id in [0, {})", i / cfg.top_k, i % cfg.top_k, p[i],
                         cfg.num_experts);
    }
  }
  return "";
}

void validate_routing(comm::Comm& group, const Tensor& x_NH, const Tensor& topk_idx_NK,
                      const Tensor& topk_weight_NK, const DispatcherConfig& cfg) {
  group.raise_if_any(routing_error(x_NH, topk_idx_NK, topk_weight_NK, cfg), "dispatch");
}

HostRouting host_routing(const Tensor& topk_idx_NK) {
  HostRouting r;
  r.num_tokens = topk_idx_NK.size(0);
  r.top_k = topk_idx_NK.size(1);
  r.idx = topk_idx_NK.to_vector<int32_t>();
  return r;
}

std::vector<int64_t> exclusive_prefix(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) off[i + 1] = off[i] + counts[i];
  return off;
}

namespace {

// Rows routed to the experts [first_expert, first_expert + L) among `num_tokens_total` tokens
// whose routing is given by `idx` (tokens in source-rank order already): sorted by local expert,
// then token, then slot. Returns (token row, slot) per dispatched row and the offsets.
struct LocalPlan {
  std::vector<int64_t> token;
  std::vector<int64_t> slot;
  std::vector<int64_t> offsets;
};

LocalPlan plan_local(const HostRouting& r, int64_t first_expert, int64_t num_local) {
  std::vector<int64_t> counts(num_local, 0);
  for (int32_t e : r.idx) {
    if (e >= first_expert && e < first_expert + num_local) ++counts[e - first_expert];
  }
  LocalPlan plan;
  plan.offsets = exclusive_prefix(counts);
  plan.token.resize(plan.offsets.back());
  plan.slot.resize(plan.offsets.back());
  std::vector<int64_t> cursor(plan.offsets.begin(), plan.offsets.end() - 1);
  for (int64_t n = 0; n < r.num_tokens; ++n) {
    for (int64_t k = 0; k < r.top_k; ++k) {
      const int64_t e = r.at(n, k);
      if (e < first_expert || e >= first_expert + num_local) continue;
      const int64_t pos = cursor[e - first_expert]++;
      plan.token[pos] = n;
      plan.slot[pos] = k;
    }
  }
  return plan;
}

// ---- local: P = T = 1, no communication ----

struct LocalState : DispatchState {
  LocalPlan plan;
  int64_t num_tokens = 0;
  Tensor weight_NK;
  Tensor y_MH;
  void release_rows() override { y_MH = Tensor(); }
};

class LocalDispatcher final : public Dispatcher {
 public:
  LocalDispatcher(const comm::Mesh& mesh, const DispatcherConfig& cfg) : mesh_(mesh), cfg_(cfg) {}
  std::string name() const override { return "local"; }

  Dispatched dispatch(const Tensor& x_NH, const Tensor& idx, const Tensor& w,
                      std::unique_ptr<DispatchState>& state) override {
    validate_routing(mesh_.ep_etp(), x_NH, idx, w, cfg_);
    auto s = std::make_unique<LocalState>();
    s->plan = plan_local(host_routing(idx), 0, cfg_.num_experts);
    s->num_tokens = x_NH.size(0);
    s->weight_NK = w.contiguous();
    Dispatched d{gather_rows(x_NH, s->plan.token), s->plan.offsets};
    state = std::move(s);
    return d;
  }

  Tensor combine(const Tensor& y_MH, DispatchState& state) override {
    auto& s = state_as<LocalState>(state, "local");
    s.y_MH = y_MH;
    Tensor out = Tensor::zeros({s.num_tokens, y_MH.size(1)}, DType::kF32);
    fold_weighted(y_MH, s.plan.token, s.plan.slot, s.weight_NK, out);
    return out;
  }

  CombineGrads combine_backward(const Tensor& dout_NH, DispatchState& state) override {
    auto& s = state_as<LocalState>(state, "local");
    CombineGrads g;
    g.dy_MH = weighted_gather(dout_NH, s.plan.token, s.plan.slot, s.weight_NK);
    g.dtopk_weight_NK = Tensor::zeros(s.weight_NK.shape(), DType::kF32);
    dot_rows(dout_NH, s.plan.token, s.plan.slot, s.y_MH, g.dtopk_weight_NK);
    return g;
  }

  Tensor dispatch_backward(const Tensor& dx_MH, DispatchState& state) override {
    auto& s = state_as<LocalState>(state, "local");
    Tensor dx = Tensor::zeros({s.num_tokens, dx_MH.size(1)}, DType::kF32);
    scatter_add_rows(dx_MH, s.plan.token, dx);
    return dx;
  }

  Dispatched redispatch(const Tensor& x_NH, DispatchState& state) override {
    auto& s = state_as<LocalState>(state, "local");
    return {gather_rows(x_NH, s.plan.token), s.plan.offsets};
  }

  void recombine(const Tensor& y_MH, DispatchState& state) override { state_as<LocalState>(state, "local").y_MH = y_MH; }

 private:
  const comm::Mesh& mesh_;
  DispatcherConfig cfg_;
};

// ---- allgather: gather every token of the ep_etp group, fold on the expert side ----

struct AllGatherState : DispatchState {
  std::vector<int64_t> counts;  // tokens per ep_etp rank
  LocalPlan plan;               // token = row of the gathered table
  Tensor weight_TK;             // gathered routing weights (N_tot, K)
  Tensor y_MH;
  void release_rows() override { y_MH = Tensor(); }
};

class AllGatherDispatcher final : public Dispatcher {
 public:
  AllGatherDispatcher(const comm::Mesh& mesh, const DispatcherConfig& cfg) : mesh_(mesh), cfg_(cfg) {}
  std::string name() const override { return "allgather"; }

  Dispatched dispatch(const Tensor& x_NH, const Tensor& idx, const Tensor& w,
                      std::unique_ptr<DispatchState>& state) override {
    comm::Comm& g = mesh_.ep_etp();
    validate_routing(g, x_NH, idx, w, cfg_);
    auto s = std::make_unique<AllGatherState>();
    s->counts = g.all_gather_scalar(x_NH.size(0));
    const int64_t total = comm::sum_counts(s->counts);
    Tensor x_all = Tensor::empty({total, x_NH.size(1)}, DType::kF32);
    g.all_gather_v(x_NH, x_all, s->counts);
    Tensor idx_all = Tensor::empty({total, cfg_.top_k}, DType::kI32);
    g.all_gather_v(idx.contiguous(), idx_all, s->counts);
    s->weight_TK = Tensor::empty({total, cfg_.top_k}, DType::kF32);
    g.all_gather_v(w.contiguous(), s->weight_TK, s->counts);
    const int64_t num_local = cfg_.num_experts / mesh_.ep_size();
    s->plan = plan_local(host_routing(idx_all), mesh_.coords().p * num_local, num_local);
    Dispatched d{gather_rows(x_all, s->plan.token), s->plan.offsets};
    state = std::move(s);
    return d;
  }

  Tensor combine(const Tensor& y_MH, DispatchState& state) override {
    auto& s = state_as<AllGatherState>(state, "allgather");
    s.y_MH = y_MH;
    const int64_t h = y_MH.size(1);
    Tensor partial = Tensor::zeros({s.weight_TK.size(0), h}, DType::kF32);
    fold_weighted(y_MH, s.plan.token, s.plan.slot, s.weight_TK, partial);
    Tensor out = Tensor::empty({s.counts[mesh_.ep_etp().rank()], h}, DType::kF32);
    mesh_.ep_etp().reduce_scatter_v(partial, out, s.counts);
    return out;
  }

  CombineGrads combine_backward(const Tensor& dout_NH, DispatchState& state) override {
    auto& s = state_as<AllGatherState>(state, "allgather");
    comm::Comm& g = mesh_.ep_etp();
    Tensor dout_all = Tensor::empty({s.weight_TK.size(0), dout_NH.size(1)}, DType::kF32);
    g.all_gather_v(dout_NH.contiguous(), dout_all, s.counts);
    CombineGrads out;
    out.dy_MH = weighted_gather(dout_all, s.plan.token, s.plan.slot, s.weight_TK);
    Tensor dw_all = Tensor::zeros(s.weight_TK.shape(), DType::kF32);
    dot_rows(dout_all, s.plan.token, s.plan.slot, s.y_MH, dw_all);
    out.dtopk_weight_NK = Tensor::empty({s.counts[g.rank()], cfg_.top_k}, DType::kF32);
    g.reduce_scatter_v(dw_all, out.dtopk_weight_NK, s.counts);
    return out;
  }

  Tensor dispatch_backward(const Tensor& dx_MH, DispatchState& state) override {
    auto& s = state_as<AllGatherState>(state, "allgather");
    comm::Comm& g = mesh_.ep_etp();
    Tensor dx_all = Tensor::zeros({s.weight_TK.size(0), dx_MH.size(1)}, DType::kF32);
    scatter_add_rows(dx_MH, s.plan.token, dx_all);
    Tensor dx = Tensor::empty({s.counts[g.rank()], dx_MH.size(1)}, DType::kF32);
    g.reduce_scatter_v(dx_all, dx, s.counts);
    return dx;
  }

  // Only the tokens travel again (their counts, routing and weights are kept from the dispatch).
  Dispatched redispatch(const Tensor& x_NH, DispatchState& state) override {
    auto& s = state_as<AllGatherState>(state, "allgather");
    Tensor x_all = Tensor::empty({s.weight_TK.size(0), x_NH.size(1)}, DType::kF32);
    mesh_.ep_etp().all_gather_v(x_NH, x_all, s.counts);
    return {gather_rows(x_all, s.plan.token), s.plan.offsets};
  }

  void recombine(const Tensor& y_MH, DispatchState& state) override {
    state_as<AllGatherState>(state, "allgather").y_MH = y_MH;
  }

 private:
  const comm::Mesh& mesh_;
  DispatcherConfig cfg_;
};

}  // namespace

std::unique_ptr<Dispatcher> make_local(const comm::Mesh& mesh, const DispatcherConfig& cfg) {
  MOETP_CHECK(mesh.ep_size() == 1 && mesh.etp_size() == 1,
              "dispatcher 'local' needs ep = etp = 1, got ep = {}, etp = {} (use allgather, all2all or vexpert)",
              mesh.ep_size(), mesh.etp_size());
  return std::make_unique<LocalDispatcher>(mesh, cfg);
}

std::unique_ptr<Dispatcher> make_allgather(const comm::Mesh& mesh, const DispatcherConfig& cfg) {
  return std::make_unique<AllGatherDispatcher>(mesh, cfg);
}

}  // namespace detail

std::unique_ptr<Dispatcher> make_dispatcher(DispatcherKind kind, const comm::Mesh& mesh, const DispatcherConfig& cfg) {
  MOETP_CHECK(cfg.num_experts >= 1 && cfg.top_k >= 1, "num_experts ({}) and top_k ({}) must be >= 1",
              cfg.num_experts, cfg.top_k);
  MOETP_CHECK(cfg.top_k <= cfg.num_experts, "top_k ({}) > num_experts ({})", cfg.top_k, cfg.num_experts);
  MOETP_CHECK(cfg.num_experts % mesh.ep_size() == 0, "num_experts ({}) % ep ({}) = {} != 0", cfg.num_experts,
              mesh.ep_size(), cfg.num_experts % mesh.ep_size());
  switch (kind) {
    case DispatcherKind::kLocal: return detail::make_local(mesh, cfg);
    case DispatcherKind::kAllgather: return detail::make_allgather(mesh, cfg);
    case DispatcherKind::kAll2all: return detail::make_all2all(mesh, cfg);
    case DispatcherKind::kVexpert: return detail::make_vexpert(mesh, cfg);
    case DispatcherKind::kAuto: break;
  }
  MOETP_FAIL("make_dispatcher: dispatcher 'auto' must be resolved to a concrete one first (config::resolved_dispatcher)");
}

Tensor expand_topk_for_tp(const Tensor& topk_idx_NK, int64_t num_experts, int ep, int etp) {
  check_dtype(topk_idx_NK, DType::kI32, "expand_topk_for_tp topk_idx_NK");
  MOETP_CHECK(num_experts % ep == 0, "num_experts ({}) % ep ({}) != 0", num_experts, ep);
  const int64_t local = num_experts / ep;
  const int64_t n = topk_idx_NK.size(0), k = topk_idx_NK.size(1);
  const std::vector<int32_t> idx = topk_idx_NK.to_vector<int32_t>();
  Tensor out = Tensor::empty({n, k * etp}, DType::kI32);
  int32_t* o = out.data<int32_t>();
  for (int64_t i = 0; i < n * k; ++i) {
    const int64_t e = idx[i];
    MOETP_CHECK(e >= 0 && e < num_experts, "expert id {} out of range [0, {})", e, num_experts);
    for (int64_t t = 0; t < etp; ++t) {
      o[i * etp + t] = static_cast<int32_t>(((e / local) * etp + t) * local + e % local);
    }
  }
  return out;
}

}  // namespace moetp::moe
