// What a run leaves in its run directory (written by rank 0): metrics.jsonl (one JSON object per
// step), config.json, and two pictures viewable in any browser: loss.svg (loss and aux loss per
// step) and expert_load.svg (tokens per expert per MoE layer over the steps, as heat maps).
#pragma once

#include <fstream>
#include <string>
#include <vector>

#include "train/trainer.h"

namespace moetp::train {

class MetricsWriter {
 public:
  explicit MetricsWriter(const std::string& path);
  // Appends one line: step, loss, ce_loss, aux_loss, grad_norm, lr, tokens_per_s, seconds,
  // model_tflops_per_rank, loss_tokens, padding, epoch, expert_counts, and on GPUs peak_mem_gb and peak_mem_phase. Flushed every line so a crashed run keeps its history.
  void write(const StepResult& r);
  // Appends one line of a validation pass: step, eval_loss, eval_loss_tokens, eval_batches, eval_seconds.
  void write(const EvalResult& r);

 private:
  std::ofstream out_;
  std::string path_;
};

void write_loss_svg(const std::string& path, const std::vector<StepResult>& history);
void write_expert_load_svg(const std::string& path, const std::vector<StepResult>& history);

// "step   12/200 | loss 3.1234 | aux 1.0021 | grad 0.812 | lr 1.80e-03 | 12.3k tok/s | ETA 1m05s"
// With packed datasets also "| pad 12.5%" (padding positions of the global batch).
std::string progress_line(const StepResult& r, int64_t total_steps, double elapsed_s);
// "eval    100 | valid loss 2.3456 (ppl 10.44) over 12345 targets in 3 batches | 1.2s"
std::string eval_line(const EvalResult& r);

}  // namespace moetp::train
