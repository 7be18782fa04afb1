#include "train/optim.h"

#include <algorithm>
#include <bit>
#include <cmath>

namespace moetp::train {

namespace {

comm::Comm* replica_group(const model::Qwen3MoeModel& model, const model::ParamDesc& p) {
  const comm::Mesh* mesh = model.mesh();
  if (mesh == nullptr) return nullptr;
  comm::Comm& g = p.kind == model::ParamKind::kExpert ? mesh->expert_dp() : mesh->world();
  return g.size() > 1 ? &g : nullptr;
}

// The parameter's elements as one flat view.
Tensor flat(const Tensor& t) { return t.view({t.numel()}); }
Tensor slice_of(const Tensor& t, const model::ParamSlice& s) { return flat(t).slice(0, s.offset, s.offset + s.count); }

}  // namespace

// Each parameter's slice over its replica group of the model's mesh.
std::vector<model::ParamSlice> slices_of(const model::Qwen3MoeModel& model) {
  return model.masters_sharded() ? model.master_slices()
                                 : model::replica_slices(model::qwen3_moe_params(model.config(), model.layout()), model.mesh());
}

void reduce_grads(model::Qwen3MoeModel& model, bool zero) {
  const std::vector<model::ParamSlice> slices = zero ? slices_of(model) : std::vector<model::ParamSlice>{};
  std::vector<model::Param>& params = model.params();
  for (size_t i = 0; i < params.size(); ++i) {
    model::Param& p = params[i];
    comm::Comm* group = replica_group(model, p);
    if (group == nullptr) continue;
    if (!zero) {
      // A dense layer's gate and up gradients are row views of one buffer: each is reduced on its own.
      group->all_reduce(p.grad, comm::ReduceOp::kSum);
      continue;
    }
    const model::ParamSlice& s = slices[i];
    Tensor mine = model.backend().empty({s.count}, DType::kF32);
    group->reduce_scatter_v(flat(p.grad), mine, s.counts);
    Tensor dst = slice_of(p.grad, s);
    dst.copy_from(mine);
  }
}

// Fixed order: parameters in the model's order, each parameter's slices in group-rank order, every
// slice's sum of squares in double (the backend's fixed order for its numel). Replicated gradients
// are identical on every rank after reduce_grads (zero: their reduced slices are spread over world,
// and every rank gathers the slice sums), so every rank has the same `replicated`; `expert` is this
// rank's shards, summed over ep_etp in rank order (Comm::all_reduce_scalar(double) on the host).
double global_grad_norm(model::Qwen3MoeModel& model, bool zero) {
  backend::Backend& be = model.backend();
  const std::vector<model::ParamSlice> slices = slices_of(model);
  const std::vector<model::Param>& params = model.params();
  // Slice views: every slice (zero = 0: all reduced here) or this rank's (zero = 1).
  std::vector<Tensor> views;
  for (size_t i = 0; i < params.size(); ++i) {
    const model::ParamSlice& s = slices[i];
    if (zero) {
      views.push_back(slice_of(params[i].grad, s));
      continue;
    }
    for (int64_t r = 0, off = 0; r < static_cast<int64_t>(s.counts.size()); off += s.counts[static_cast<size_t>(r)], ++r) {
      views.push_back(flat(params[i].grad).slice(0, off, off + s.counts[static_cast<size_t>(r)]));
    }
  }
  const std::vector<double> local = be.sums_of_squares(views);
  // per_param[i][r]: slice r's sum of squares of parameter i.
  std::vector<std::vector<double>> per_param(params.size());
  size_t k = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const size_t d = slices[i].counts.size();
    per_param[i].assign(d, 0.0);
    if (!zero) {
      for (size_t r = 0; r < d; ++r) per_param[i][r] = local[k++];
    }
  }
  if (zero) {
    // Every member's slice sums, gathered over each replica group as bit patterns (i64 tensors).
    const comm::Mesh* mesh = model.mesh();
    for (const bool expert : {false, true}) {
      std::vector<size_t> idx;
      for (size_t i = 0; i < params.size(); ++i) {
        if ((params[i].kind == model::ParamKind::kExpert) == expert) idx.push_back(i);
      }
      comm::Comm* group = mesh == nullptr ? nullptr : expert ? &mesh->expert_dp() : &mesh->world();
      const int64_t d = group == nullptr ? 1 : group->size();
      std::vector<int64_t> mine;
      for (const size_t i : idx) mine.push_back(std::bit_cast<int64_t>(local[i]));
      std::vector<int64_t> all = mine;
      if (d > 1) {
        Tensor out = Tensor::empty({d * static_cast<int64_t>(idx.size())}, DType::kI64);
        group->host().all_gather(Tensor::from_vector<int64_t>(mine, {static_cast<int64_t>(idx.size())}), out);
        all = out.to_vector<int64_t>();
      }
      for (int64_t r = 0; r < d; ++r) {
        for (size_t j = 0; j < idx.size(); ++j) {
          const double v = std::bit_cast<double>(all[static_cast<size_t>(r) * idx.size() + j]);
          if (static_cast<size_t>(r) < per_param[idx[j]].size()) per_param[idx[j]][static_cast<size_t>(r)] = v;
        }
      }
    }
  }
  double replicated = 0, expert = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    double& acc = params[i].kind == model::ParamKind::kExpert ? expert : replicated;
    for (const double v : per_param[i]) acc += v;
  }
  // Expert shards partition the expert tensors over ep_etp.
  const comm::Mesh* mesh = model.mesh();
  if (mesh != nullptr && mesh->ep_etp().size() > 1) {
    expert = mesh->ep_etp().host().all_reduce_scalar(expert, comm::ReduceOp::kSum);
  }
  return std::sqrt(replicated + expert);
}

void scale_grads(model::Qwen3MoeModel& model, float scale) {
  backend::Backend& be = model.backend();
  for (model::Param& p : model.params()) be.scale(p.grad, scale);
}

AdamW::AdamW(const model::Qwen3MoeModel& model, const AdamWConfig& cfg) : cfg_(cfg) {
  if (model.masters_sharded()) slices_ = model.master_slices();
  for (size_t i = 0; i < model.num_params(); ++i) {
    const model::ParamSlice* s = model.master_slice(i);
    const Shape shape = s != nullptr ? Shape{s->count} : shard::local_shape(model.param_desc(i).spec);
    const DType dtype = cfg.state_dtype == StateDType::kBF16 ? DType::kBF16 : DType::kF32;
    m_.push_back(model.backend().zeros(shape, dtype));
    v_.push_back(model.backend().zeros(shape, dtype));
  }
}

std::vector<model::ParamState> AdamW::states() {
  const std::vector<std::string>& prefixes = model::kAdamWStatePrefixes;
  const std::vector<model::ParamSlice>* slices = slices_.empty() ? nullptr : &slices_;
  return {{prefixes[0], &m_, slices}, {prefixes[1], &v_, slices}};
}

void AdamW::step(model::Qwen3MoeModel& model, double lr, int64_t step) {
  MOETP_CHECK(step >= 1, "AdamW step counts from 1, got {}", step);
  std::vector<model::Param>& params = model.params();
  MOETP_CHECK(params.size() == m_.size(), "AdamW built for {} parameters, stepped with {}", m_.size(), params.size());
  backend::Backend& be = model.backend();
  for (size_t i = 0; i < params.size(); ++i) {
    model::Param& p = params[i];
    backend::AdamWHyper h;
    h.lr = lr;
    h.beta1 = cfg_.beta1;
    h.beta2 = cfg_.beta2;
    h.eps = cfg_.eps;
    h.weight_decay = p.decay ? cfg_.weight_decay : 0.0;
    h.step = step;
    const model::ParamSlice* s = model.master_slice(i);
    if (s == nullptr) {
      const bool separate = p.work.raw_data() != p.value.raw_data();
      be.adamw_step(p.value, p.grad, m_[i], v_[i], h, separate ? &p.work : nullptr);
      continue;
    }
    // This rank's master slice, then every member's updated part of the working copy.
    be.adamw_step(p.value, slice_of(p.grad, *s), m_[i], v_[i], h, nullptr);
    model.refresh_work(i);
  }
  be.synchronize();
}

double lr_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double lr, double min_lr) {
  if (warmup_steps > 0 && step <= warmup_steps) return lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  if (total_steps <= warmup_steps) return lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace moetp::train
