// A model's per-parameter tensors as the checkpoint code (io/checkpoint.h) sees them: the parameter
// table plus one-tensor-at-a-time copies between host f32 tensors and wherever the model keeps its
// values and optimiser state (host memory on the CPU backend, GPU memory on CUDA). Moving one
// tensor at a time bounds the host memory of save, load and import by the largest tensor.
#pragma once

#include <string>
#include <vector>

#include "model/model.h"
#include "model/param_table.h"

namespace moetp::model {

class ParamStore {
 public:
  virtual ~ParamStore() = default;
  virtual const config::ModelConfig& config() const = 0;
  // The host (MPI) mesh whose collectives the checkpoint code runs, with the model's expert layout.
  virtual const comm::Mesh& mesh() const = 0;
  virtual size_t num_params() const = 0;
  virtual const ParamDesc& param(size_t i) const = 0;
  // Checkpoint prefixes of the per-parameter state kept besides the values (slots 1, 2, ...), e.g.
  // kAdamWStatePrefixes; empty when only values are stored.
  virtual std::vector<std::string> state_prefixes() const = 0;
  // Slot 0: parameter i's values; slot k >= 1: its state state_prefixes()[k - 1].
  // host_f32: f32, host, contiguous, the local shape of param(i).spec.
  virtual void read(size_t i, int slot, Tensor& host_f32) const = 0;
  virtual void write(size_t i, int slot, const Tensor& host_f32) = 0;
  // Whether read(i, slot) is collective (state sharded over the parameter's replicas, ParamSlice):
  // then every rank holding the parameter calls it, in the same order.
  virtual bool collective_read(size_t /*i*/, int /*slot*/) const { return false; }
};

// The AdamW moments in a native checkpoint: exp_avg (slot 1), exp_avg_sq (slot 2).
inline const std::vector<std::string> kAdamWStatePrefixes = {"optim.exp_avg.", "optim.exp_avg_sq."};

// Per-parameter state tensors kept besides the values (e.g. the AdamW moments), saved under
// `prefix`: one tensor per parameter in the parameter's local shape, on the model's backend, f32 or
// bf16 (read as f32; an f32 value written into bf16 is rounded to nearest even). With `slices`,
// parameter i's tensor holds only this rank's slice (1-D, slices[i].count elements) where
// slices[i].group is set; reading it gathers the slices over the group (collective).
struct ParamState {
  std::string prefix;
  std::vector<Tensor>* tensors;  // model.params() order
  const std::vector<ParamSlice>* slices = nullptr;
};

// The model (on any backend) and optional state tensors. Moving a value into the model refreshes
// its working copy.
class ModelParamStore final : public ParamStore {
 public:
  // `host_mesh`: the MPI mesh of the model's layout (the checkpoint code's collectives run on host
  // tensors); checked against the model's layout. Both must outlive the store.
  ModelParamStore(Qwen3MoeModel& model, const comm::Mesh& host_mesh, std::vector<ParamState> states = {});
  // Read-only: write() fails.
  ModelParamStore(const Qwen3MoeModel& model, const comm::Mesh& host_mesh, std::vector<ParamState> states = {});
  // A model whose own mesh is the host mesh (the CPU backend).
  explicit ModelParamStore(Qwen3MoeModel& model, std::vector<ParamState> states = {});
  explicit ModelParamStore(const Qwen3MoeModel& model, std::vector<ParamState> states = {});

  const config::ModelConfig& config() const override { return model_->config(); }
  const comm::Mesh& mesh() const override { return mesh_; }
  size_t num_params() const override { return model_->num_params(); }
  const ParamDesc& param(size_t i) const override { return model_->param_desc(i); }
  std::vector<std::string> state_prefixes() const override;
  void read(size_t i, int slot, Tensor& host_f32) const override;
  void write(size_t i, int slot, const Tensor& host_f32) override;
  bool collective_read(size_t i, int slot) const override { return sliced(i, slot) != nullptr; }

 private:
  const Tensor& slot_tensor(size_t i, int slot) const;
  // The slice of parameter i in state slot `slot`, or null when the slot holds the whole parameter.
  const ParamSlice* sliced(size_t i, int slot) const;
  const Qwen3MoeModel* model_;
  Qwen3MoeModel* mutable_model_ = nullptr;
  const comm::Mesh& mesh_;
  std::vector<ParamState> states_;
};

// Copies every parameter's values (and, with_state, every state slot; both stores must have the
// same prefixes) from one store to another of the same table (names and shard specs checked), one
// tensor at a time through a host buffer. Local: no collective.
void copy_params(const ParamStore& from, ParamStore& to, bool with_state);

// Checks a host tensor handed to ParamStore::read/write: f32, host, contiguous, the parameter's
// local shape. `what` names the caller in the error.
void check_host_shard(const ParamDesc& p, const Tensor& host_f32, const char* what);

}  // namespace moetp::model
