// Checkpoints in global coordinates, for any layout (etp_spec §9):
//   - Hugging Face: config.json, model-XXXXX-of-YYYYY.safetensors, model.safetensors.index.json,
//     tensor names as transformers' Qwen3-MoE; routed experts per expert
//     (mlp.experts.{e}.{gate,up,down}_proj.weight, the default) or stacked
//     (mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]); both load.
//   - native (resume): the same files with moetp's parameter names (experts stored per expert as
//     "<param>.{e}"), the AdamW moments under "optim.exp_avg." / "optim.exp_avg_sq.", and
//     trainer_state.json (step, configs, layout, format version).
// Loading reads, on each rank, only the byte ranges of the rows it owns (shard::compute_runs), so
// an expert tensor is never materialised on a rank that does not own part of it. Saving writes
// whole tensors in parallel: rank (d = 0, p, t = 0) gathers its EP group's TP slices and writes
// the experts of EP rank p; rank 0 also writes the replicated tensors, the index and the JSON.
// A save goes to "<dir>.tmp" and is renamed into place only when complete: an interrupted save
// never replaces a good checkpoint. All functions are collective over the store's mesh.
//
// The model is a model::ParamStore (model/param_store.h): parameters move between files and the
// store one tensor at a time through host f32 tensors (a save streams each file, header first), so
// host memory is bounded by one shard plus one EP group's rows of a tensor (a whole expert tensor
// with the stacked HF layout), whatever the model size; a GPU model needs no host copy.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "model/param_store.h"

namespace moetp::io {

enum class HfExpertLayout { kPerExpert, kStacked };

// The dtype of the weights save_hf writes (native checkpoints are always f32).
enum class HfWeightDType { kAuto, kF32, kBF16 };

struct SaveOptions {
  HfExpertLayout expert_layout = HfExpertLayout::kPerExpert;
  bool show_progress = true;  // rank 0 prints tensors/bytes done and the rate
  // save_hf: kAuto writes the dtype the model config names (ModelConfig::weights_dtype():
  // "bfloat16" -> BF16, rounded to nearest even; "float32" or none -> F32; any other is an error);
  // config.json's torch_dtype (and dtype, if present) says what was written.
  HfWeightDType weights = HfWeightDType::kAuto;
  // Files copied by name into the checkpoint folder before it is completed (tokenizer files,
  // generation_config.json); a missing one is an error. save_hf writes generation_config.json from
  // the config's bos/eos token ids when none is among them.
  std::vector<std::string> files;
};

// The tokenizer and generation files of a Hugging Face model folder (tokenizer.json,
// tokenizer_config.json, generation_config.json, special_tokens_map.json, vocab.json, merges.txt)
// that exist in `dir`, as paths.
std::vector<std::string> hf_side_files(const std::string& dir);

// HF checkpoint of the store's parameter values (slot 0; no state).
void save_hf(const model::ParamStore& store, const std::string& dir, const SaveOptions& opts = {});
// Loads an HF checkpoint (per-expert or stacked expert tensors, detected) into the store's values.
// Checks config.json against the model config and every tensor's presence and shape on every rank
// before any value is written; errors name the file and the tensor. State slots are untouched.
void load_hf(model::ParamStore& store, const std::string& dir);

// Native checkpoint: values, every state slot (under its prefix) and a JSON state object.
void save_native(const model::ParamStore& store, const nlohmann::json& state, const std::string& dir,
                 const SaveOptions& opts = {});
// Loads values and state slots (checked like load_hf first); returns the state object. The
// checkpoint may come from any layout.
nlohmann::json load_native(model::ParamStore& store, const std::string& dir);

// A model whose mesh is the host mesh (the CPU backend) with extra per-parameter tensors (e.g. AdamW
// moments), through model::ModelParamStore.
using ExtraState = model::ParamState;
void save_hf(const model::Qwen3MoeModel& model, const std::string& dir, const SaveOptions& opts = {});
void load_hf(model::Qwen3MoeModel& model, const std::string& dir);
void save_native(const model::Qwen3MoeModel& model, const std::vector<ExtraState>& extras,
                 const nlohmann::json& state, const std::string& dir, const SaveOptions& opts = {});
nlohmann::json load_native(model::Qwen3MoeModel& model, const std::vector<ExtraState>& extras,
                           const std::string& dir);

// Checkpoint directories "<root>/step-XXXXXXXX" that are complete (their trainer_state.json
// exists), oldest first.
std::vector<std::string> list_checkpoints(const std::string& root);
// Removes all but the newest `keep` complete checkpoints under root (rank 0 only calls this).
void prune_checkpoints(const std::string& root, int keep);
// Completes the saves under `root` that a kill interrupted around their renames (a save writes
// `<dir>.tmp`, trainer_state.json last, moves an existing `<dir>` to `<dir>.old`, renames the .tmp
// onto `<dir>` and removes the .old): a `.tmp` whose trainer_state.json parses and that has no
// `<dir>` becomes `<dir>`; else a `.old` without `<dir>` becomes `<dir>` again; a `.old` beside a
// complete `<dir>` is removed. Incomplete `.tmp` folders are left alone (never read). Returns one
// line per action, for the log. Not collective: call it on one rank, then synchronise.
std::vector<std::string> recover_checkpoints(const std::string& root);

}  // namespace moetp::io
