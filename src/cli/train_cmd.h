// `moetp train`: resolve the config (defaults < --config files < --set overrides), build the
// mesh, model and data on every rank, run the steps, and on rank 0 print progress and write the
// run directory (config.json, metrics.jsonl, loss.svg, expert_load.svg).
#pragma once

#include <string>
#include <vector>

#include "comm/comm.h"

namespace moetp::cli {

struct TrainArgs {
  std::vector<std::string> config_files;
  std::vector<std::string> overrides;  // key=value
  std::string run_dir;                 // overrides run.dir
  std::string resume;                  // native checkpoint dir, or "auto" (latest under the checkpoint root)
  std::string init_from_hf;            // HF checkpoint dir to start from
};

int run_train(const TrainArgs& args, comm::Comm& world);

}  // namespace moetp::cli
