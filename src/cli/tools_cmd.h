// `moetp inspect`, `moetp convert`, `moetp eval`: checkpoint tools for checking a converted or
// trained model against another framework.
#pragma once

#include <string>
#include <vector>

#include "comm/comm.h"
#include "train/plan.h"

namespace moetp::cli {

// Lists tensors (name, dtype, shape, bytes, FNV-1a checksum of the raw bytes) of a .safetensors
// file or a checkpoint directory. Rank 0 only.
int run_inspect(const std::string& path);

struct ConvertArgs {
  std::string from = "hf";  // hf | native
  std::string to = "native";
  std::string input, output;
  int ep = 1, etp = 1;  // the layout to load at (any layout gives the same files)
  bool stacked = false;  // --to hf: write stacked expert tensors instead of per-expert ones
  std::string dtype = "auto";  // --to hf: auto (the config's torch_dtype) | bf16 | f32
  bool allow_nonfinite = false;  // convert weights that hold NaN or Inf (refused otherwise)
};
int run_convert(const ConvertArgs& args, comm::Comm& world);

struct EvalArgs {
  std::string model_dir;    // HF or native checkpoint directory
  std::string data;         // token file
  int64_t seq_len = 128;
  int64_t num_sequences = 8;  // the first sequences of the file (packed as in training)
  std::string dump_logits;  // optional .safetensors path (rank 0 writes all logits, f32)
  int ep = 1, etp = 1;
  std::string dispatcher = "auto";
  bool allow_nonfinite = false;  // evaluate weights that hold NaN or Inf (refused otherwise)
};
int run_eval(const EvalArgs& args, comm::Comm& world);

struct PlanArgs {
  std::vector<std::string> config_files;  // training config JSON files, applied in order
  std::vector<std::string> overrides;     // --set key=value
  int world = 1;
  double gpu_mem_gb = 0;       // GiB per GPU; 0 = no verdict
  double allowance_gb = train::kDefaultAllowanceGiB;  // CUDA context and allocator slack, GiB
  std::string device = "cuda";
};
// Prints train::plan_memory's table for the configuration (no job, no allocation). Rank 0 only.
int run_plan(const PlanArgs& args);

}  // namespace moetp::cli
