#include "model/param_store.h"

namespace moetp::model {

void check_host_shard(const ParamDesc& p, const Tensor& host_f32, const char* what) {
  check_dtype(host_f32, DType::kF32, p.name.c_str());
  check_device(host_f32, Device::kCpu, p.name.c_str());
  check_contiguous(host_f32, p.name.c_str());
  MOETP_CHECK(host_f32.shape() == shard::local_shape(p.spec), "{} '{}': host tensor is {}, the shard is {}", what,
              p.name, host_f32.describe(), shape_str(shard::local_shape(p.spec)));
}

namespace {

void check_states(const Qwen3MoeModel& model, const std::vector<ParamState>& states) {
  for (const ParamState& s : states) {
    MOETP_CHECK(s.tensors != nullptr && s.tensors->size() == model.num_params(),
                "state '{}' has {} tensors for {} parameters", s.prefix, s.tensors ? s.tensors->size() : 0,
                model.num_params());
  }
}

const comm::Mesh& host_mesh_of(const Qwen3MoeModel& model) {
  MOETP_CHECK(model.mesh() != nullptr && model.mesh()->world().device() == Device::kCpu,
              "ModelParamStore: the model's mesh is not a host (MPI) mesh; pass the host mesh of its layout");
  return *model.mesh();
}

void check_layout(const Qwen3MoeModel& model, const comm::Mesh& host_mesh) {
  const ExpertLayout a = model.layout(), b = expert_layout(host_mesh);
  MOETP_CHECK(a.ep_size == b.ep_size && a.ep_rank == b.ep_rank && a.etp_size == b.etp_size && a.etp_rank == b.etp_rank,
              "ModelParamStore: the model is ep rank {} of {}, etp rank {} of {}; the host mesh ep rank {} of {}, "
              "etp rank {} of {}",
              a.ep_rank, a.ep_size, a.etp_rank, a.etp_size, b.ep_rank, b.ep_size, b.etp_rank, b.etp_size);
}

}  // namespace

ModelParamStore::ModelParamStore(Qwen3MoeModel& model, const comm::Mesh& host_mesh, std::vector<ParamState> states)
    : model_(&model), mutable_model_(&model), mesh_(host_mesh), states_(std::move(states)) {
  check_layout(model, mesh_);
  check_states(model, states_);
}

ModelParamStore::ModelParamStore(const Qwen3MoeModel& model, const comm::Mesh& host_mesh,
                                 std::vector<ParamState> states)
    : model_(&model), mesh_(host_mesh), states_(std::move(states)) {
  check_layout(model, mesh_);
  check_states(model, states_);
}

ModelParamStore::ModelParamStore(Qwen3MoeModel& model, std::vector<ParamState> states)
    : ModelParamStore(model, host_mesh_of(model), std::move(states)) {}

ModelParamStore::ModelParamStore(const Qwen3MoeModel& model, std::vector<ParamState> states)
    : ModelParamStore(model, host_mesh_of(model), std::move(states)) {}

std::vector<std::string> ModelParamStore::state_prefixes() const {
  std::vector<std::string> out;
  for (const ParamState& s : states_) out.push_back(s.prefix);
  return out;
}

const Tensor& ModelParamStore::slot_tensor(size_t i, int slot) const {
  MOETP_CHECK(i < model_->num_params(), "parameter {} of {}", i, model_->num_params());
  MOETP_CHECK(slot >= 0 && static_cast<size_t>(slot) <= states_.size(), "parameter '{}': slot {} of {} state slots",
              model_->param_desc(i).name, slot, states_.size());
  return slot == 0 ? model_->value(i) : (*states_[static_cast<size_t>(slot - 1)].tensors)[i];
}

const ParamSlice* ModelParamStore::sliced(size_t i, int slot) const {
  if (slot == 0) return model_->master_slice(i);
  const ParamState& s = states_.at(static_cast<size_t>(slot - 1));
  if (s.slices == nullptr) return nullptr;
  const ParamSlice& p = s.slices->at(i);
  return p.group != nullptr ? &p : nullptr;
}

void ModelParamStore::read(size_t i, int slot, Tensor& host_f32) const {
  const Tensor& src = slot_tensor(i, slot);
  check_host_shard(model_->param_desc(i), host_f32, "ModelParamStore::read");
  model_->backend().synchronize();
  if (const ParamSlice* p = sliced(i, slot)) {
    // Every member's slice, in member order: the whole parameter.
    Tensor full = model_->backend().empty({host_f32.numel()}, src.dtype());
    p->group->all_gather_v(src, full, p->counts);
    model_->backend().synchronize();
    host_f32.view({host_f32.numel()}).copy_from(full.dtype() == DType::kF32 ? full
                                                                            : full.to(Device::kCpu).to(DType::kF32));
    return;
  }
  host_f32.copy_from(src.dtype() == DType::kF32 ? src : src.to(Device::kCpu).to(DType::kF32));
}

void ModelParamStore::write(size_t i, int slot, const Tensor& host_f32) {
  MOETP_CHECK(mutable_model_ != nullptr, "ModelParamStore::write: parameter {} of a read-only store", i);
  slot_tensor(i, slot);  // checks i and slot
  check_host_shard(model_->param_desc(i), host_f32, "ModelParamStore::write");
  if (slot == 0) {
    mutable_model_->set_value(i, host_f32);
    mutable_model_->backend().synchronize();
    return;
  }
  Tensor& dst = (*states_[static_cast<size_t>(slot - 1)].tensors)[i];
  if (const ParamSlice* p = sliced(i, slot)) {
    const Tensor mine = host_f32.view({host_f32.numel()}).slice(0, p->offset, p->offset + p->count).contiguous();
    dst.copy_from(dst.dtype() == DType::kF32 ? mine : mine.to(dst.dtype()));
  } else {
    dst.copy_from(dst.dtype() == DType::kF32 ? host_f32 : host_f32.to(dst.dtype()));
  }
  mutable_model_->backend().synchronize();
}

void copy_params(const ParamStore& from, ParamStore& to, bool with_state) {
  MOETP_CHECK(from.num_params() == to.num_params(), "copy_params: {} parameters into {}", from.num_params(),
              to.num_params());
  const std::vector<std::string> prefixes = from.state_prefixes();
  const int slots = with_state ? static_cast<int>(prefixes.size()) : 0;
  MOETP_CHECK(!with_state || prefixes == to.state_prefixes(), "copy_params: the stores keep different state ({} vs {} slots)",
              prefixes.size(), to.state_prefixes().size());
  for (size_t i = 0; i < from.num_params(); ++i) {
    const ParamDesc& a = from.param(i);
    const ParamDesc& b = to.param(i);
    MOETP_CHECK(a.name == b.name && a.spec.global_shape == b.spec.global_shape &&
                    shard::local_shape(a.spec) == shard::local_shape(b.spec) &&
                    shard::compute_runs(a.spec) == shard::compute_runs(b.spec) &&
                    shard::column_range(a.spec).begin == shard::column_range(b.spec).begin &&
                    shard::column_range(a.spec).end == shard::column_range(b.spec).end,
                "copy_params: parameter {} is '{}' (global {}, local {}) in the source, '{}' (global {}, local {}) in the "
                "destination",
                i, a.name, shape_str(a.spec.global_shape), shape_str(shard::local_shape(a.spec)), b.name,
                shape_str(b.spec.global_shape), shape_str(shard::local_shape(b.spec)));
    Tensor host = Tensor::empty(shard::local_shape(a.spec), DType::kF32);
    for (int slot = 0; slot <= slots; ++slot) {
      from.read(i, slot, host);
      to.write(i, slot, host);
    }
  }
}

}  // namespace moetp::model
