// The training configuration tree: everything a run needs besides the model's own config.json.
// Every field is declared once, in the field table of train_config.cpp (dotted name, type,
// default, help text, member), and that one table drives parsing of JSON files and `--set
// key=value`, `--help`, the start-up table and the `config.json` saved in the run directory.
// Unknown keys are errors that suggest the nearest valid key. Order of application in the CLI:
// defaults, then JSON files, then --set overrides, then validate().
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/options.h"

namespace moetp::config {

struct ModelConfig;

// Default values live in the field table, not here: a default-constructed TrainConfig holds them
// (its constructor applies the table), so TrainConfig{} == TrainConfig::defaults().
struct TrainConfig {
  struct Model {
    std::string config;  // path to a Hugging Face config.json
    bool operator==(const Model&) const = default;
  };
  struct Parallel {
    int ep = 0;   // P, expert-parallel degree
    int etp = 0;  // T, expert tensor-parallel degree
    bool operator==(const Parallel&) const = default;
  };
  struct Moe {
    DispatcherKind dispatcher = DispatcherKind::kAuto;
    bool force_balance = false;
    ExpertGemmChoice expert_gemm = ExpertGemmChoice::kAuto;  // CUDA device
    double plan_imbalance = 0;  // expert-side rows the memory plan assumes, x balanced (train/plan.h)
    bool operator==(const Moe&) const = default;
  };
  struct Train {
    int steps = 0;
    int global_batch_size = 0;  // sequences per step over all ranks
    int seq_len = 0;
    int micro_batches = 0;  // gradient accumulation steps per step
    int64_t seed = 0;
    int log_every = 0;
    DeviceChoice device = DeviceChoice::kAuto;
    AllocatorChoice cuda_allocator = AllocatorChoice::kAuto;  // CUDA device
    RecomputeMode recompute = RecomputeMode::kNone;
    int recompute_layers = -1;  // the first k decoder layers recompute; -1 = all
    int logit_chunk_rows = 0;   // rows of LM-head logits at once; 0 = the backend's default
    bool memory_check = true;   // CUDA: the memory plan against the GPU's free memory before allocating
    bool deterministic = false;  // CUDA: scheduling-dependent kernels in a fixed order (bit-reproducible runs)
    int eval_every = 0;          // validation loss every N steps and at the last step (0 = off; needs data.valid)
    int eval_batches = 0;        // global batches of the validation rows per evaluation (0 = all)
    bool operator==(const Train&) const = default;
  };
  struct Optim {
    double lr = 0, min_lr = 0;
    int warmup_steps = 0;
    double weight_decay = 0, beta1 = 0, beta2 = 0, eps = 0;
    double grad_clip = 0;  // 0 = off
    StateDType state_dtype = StateDType::kF32;  // AdamW moments
    int zero = 0;  // 1: AdamW moments sharded over each parameter's replicas (train/optim.h)
    bool operator==(const Optim&) const = default;
  };
  struct Data {
    std::string path;       // token file or dataset folder (data/source.h)
    std::string valid;      // dataset folder for the validation loss ("" = none)
    OverlongChoice overlong = OverlongChoice::kAuto;  // dataset documents longer than seq_len
    bool operator==(const Data&) const = default;
  };
  struct Run {
    std::string dir;  // "" = runs/<timestamp>
    bool operator==(const Run&) const = default;
  };
  struct Checkpoint {
    std::string dir;
    int every = 0;  // 0 = off
    int keep = 0;
    bool operator==(const Checkpoint&) const = default;
  };

  Model model;
  Parallel parallel;
  Moe moe;
  Train train;
  Optim optim;
  Data data;
  Run run;
  Checkpoint checkpoint;

  TrainConfig();  // every field at its default from the field table
  static TrainConfig defaults() { return TrainConfig(); }
  bool operator==(const TrainConfig&) const = default;
};

// Applies a JSON object: nested ({"train": {"steps": 3}}) and/or dotted ({"train.steps": 3}) keys,
// mixed freely. JSON types must match the field type (an int is accepted for a double field).
// Throws naming `source`, the key, and the valid keys of its section (with a did-you-mean).
void apply_json(TrainConfig& cfg, const nlohmann::json& json, const std::string& source);
// Reads a JSON file and applies it (errors name the path).
void apply_json_file(TrainConfig& cfg, const std::string& path);
// One `--set key=value`: the value is parsed by the field's type (int, double, bool as
// true|false|1|0, string taken verbatim, may be empty).
void apply_override(TrainConfig& cfg, const std::string& key_eq_value);

// All dotted keys, in declaration order.
std::vector<std::string> field_names();
// One line per field: name, type, default, help.
std::string help_text();
// (dotted key, value) for every field, in declaration order, for the start-up table.
std::vector<std::pair<std::string, std::string>> rows(const TrainConfig& cfg);
// Two aligned columns, one row per line.
std::string format_table(const std::vector<std::pair<std::string, std::string>>& rows);
// Nested JSON ({"train": {"steps": 200}, ...}); apply_json(to_json(c)) reproduces c exactly.
nlohmann::json to_json(const TrainConfig& cfg);

// Checks that need only this config (sizes positive, micro_batches >= 1, lr >= min_lr >= 0,
// betas in [0, 1), "local" only with ep = etp = 1, ...). Messages name values. Option names are
// checked earlier, when they are parsed (apply_json, apply_override).
void validate(const TrainConfig& cfg);
// Checks that need the model and the world size (etp_spec §2): W % (ep·etp) == 0,
// num_experts % ep == 0, moe_intermediate_size % etp == 0, global_batch_size % (W·micro_batches)
// == 0 (every rank gets the same number of whole micro-batches), seq_len <= max_position_embeddings.
void validate_with_model(const TrainConfig& cfg, const ModelConfig& model, int world_size);

// kAuto resolves to kLocal when ep = etp = 1, else kAll2all; other choices are returned as is.
DispatcherKind resolve_dispatcher(DispatcherKind kind, int ep, int etp);
// resolve_dispatcher of the config's moe.dispatcher and parallel layout.
DispatcherKind resolved_dispatcher(const TrainConfig& cfg);

}  // namespace moetp::config
