// The memory planner (`moetp plan`): the bytes one rank holds at the step's peak, item by item,
// from the model config, the training config and the world size, without allocating anything.
//
// What it counts (one rank; every rank holds the same sizes except for routing imbalance):
//   - parameters as the model allocates them (model/param_table.h local shapes, 256-element
//     alignment of the flat buffers): working copy (compute dtype), f32 master (CUDA; on the CPU the
//     working copy is the master), f32 gradient, AdamW moments (optim.state_dtype);
//   - per decoder layer, what the forward keeps for the backward (model/model.cpp: the attention
//     block's activations, the MLP's or the MoE layer's, the MoE layer's slot and expert-side rows,
//     the router's outputs), less what train.recompute drops;
//   - the largest transient: the top layer's backward (the MoE backward's buffers, the recomputed
//     layer's activations) or the LM head's chunk of logits.
// The peak is reached in the top layer's MoE backward (metrics.jsonl's peak_mem_phase says where a
// run reached it). Expert-side rows are planned for `imbalance` times their mean: the rows a rank
// receives follow the routing (1 = perfectly balanced). Bytes are the allocator's requested bytes;
// the CUDA context and the allocator's rounding and reuse slack come on top (a stated allowance).
#pragma once

#include <string>
#include <vector>

#include "config/model_config.h"
#include "config/train_config.h"
#include "core/dtype.h"

namespace moetp::train {

struct PlanItem {
  std::string what;
  double bytes = 0;
};

struct MemoryPlan {
  std::vector<PlanItem> items;  // the terms of the peak, in the order printed
  double peak_bytes = 0;        // Σ items
  int64_t tokens_per_rank = 0;  // tokens of one micro-batch on one rank
  double parameters = 0;        // this rank's parameter count
};

// `device` is where the model runs (kCpu: f32 everywhere, no separate masters). The layout comes
// from cfg.parallel (ep, etp), the micro-batch from cfg.train; `world` must be a multiple of ep·etp
// and divide the global batch (errors name the values).
MemoryPlan plan_memory(const config::ModelConfig& model, const config::TrainConfig& cfg, int world, Device device,
                       double imbalance);

// What `moetp plan` and the trainer's memory check add for the CUDA context, library workspaces
// and allocator slack, GiB.
inline constexpr double kDefaultAllowanceGiB = 1.0;

// What would make the plan fit in `budget_bytes` per rank (the GPU's memory less the allowance),
// at the same world size: the largest micro-batch (sequences per rank and micro-batch) that fits
// with the other settings as they are, and the settings that fit: each candidate change alone
// (optim.state_dtype, optim.zero, train.recompute, train.micro_batches, parallel.ep), and when none does,
// the candidates combined in that order until they do.
struct FitAdvice {
  bool fits = false;              // the configuration as given fits (no settings are then listed)
  int64_t largest_rows = 0;       // 0: not even one sequence per micro-batch fits
  double largest_rows_bytes = 0;  // its peak
  struct Setting {
    std::vector<std::string> overrides;  // key=value, for --set
    double peak_bytes = 0;
  };
  std::vector<Setting> settings;  // when it does not fit: fitting settings, fewest changes first
};
FitAdvice advise_fit(const config::ModelConfig& model, const config::TrainConfig& cfg, int world, Device device,
                     double budget_bytes);
// The advice as lines for a person: "largest micro-batch that fits: ..." and "fits with: --set ...",
// each with its per-rank peak plus `allowance_gib` (as format_plan's last line).
std::string format_advice(const FitAdvice& advice, const config::TrainConfig& cfg, double allowance_gib);

// The table in GiB (2^30 bytes), one item per line, and the last line
// "per-rank peak: X GiB (fits in G GiB | does not fit in G GiB)" (without the parenthesis when
// gpu_mem_gib <= 0). `allowance_gib` is added for the CUDA context and allocator slack.
std::string format_plan(const MemoryPlan& plan, double gpu_mem_gib, double allowance_gib);

}  // namespace moetp::train
