// The memory plan (train/plan.h) against the peaks the trainer measures on one GPU: a model of the
// Qwen3-30B-A3B preset's layer shapes (2 layers, 32 experts top-8, vocabulary 8192), two batch
// shapes, f32 and bf16 moments, every recompute mode; planned live bytes within 10% of the step's
// measured peak of live tensor bytes. And the trainer's memory check: a configuration whose plan
// exceeds the GPU stops before allocating, with the plan and what would fit.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "core/rng.h"
#include "dist/mpi_env.h"
#include "kernels/cuda/runtime.h"
#include "testing.h"
#include "train/trainer.h"

namespace moetp {
namespace {

// The repository's configs/: $MOETP_CONFIGS_DIR where set (a GPU host running a bundle built
// elsewhere, scripts/gpu-check.sh), else the source tree this test was built from.
std::string configs_dir() {
  const char* env = std::getenv("MOETP_CONFIGS_DIR");
  return env != nullptr && *env != '\0' ? env : MOETP_CONFIGS_DIR;
}

config::ModelConfig model() {
  config::ModelConfig m = config::ModelConfig::load(configs_dir() + "/qwen3-30b-a3b-l4.json");
  nlohmann::json j = m.to_hf_json();
  j["num_hidden_layers"] = 2;
  j["num_experts"] = 32;
  j["vocab_size"] = 8192;
  return config::ModelConfig::from_json(j, "planner test model");
}

data::TokenFile random_tokens(int64_t n, uint32_t vocab) {
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  const CounterRng rng(9, 1);
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<uint32_t>(rng.uniform(static_cast<uint64_t>(i)) * vocab);
  return data::TokenFile::from_ids(std::move(ids), vocab, "random");
}

config::TrainConfig train_config(int seq, int batch) {
  config::TrainConfig c;
  c.train.device = DeviceChoice::kCuda;
  c.train.seq_len = seq;
  c.train.global_batch_size = batch;
  c.train.steps = 2;
  return c;
}

class PlanCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    MOETP_REQUIRE_WORLD_SIZE(1);
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
  }
};

TEST_F(PlanCuda, PlannedPeakWithinTenPercentOfMeasured) {
  const config::ModelConfig m = model();
  std::printf("  %-10s %-6s %-7s %10s %10s %7s  %s\n", "batch", "moments", "recomp", "plan GiB", "meas GiB", "ratio",
              "peak in");
  for (const auto& [seq, batch] : {std::pair{2048, 2}, std::pair{1024, 8}}) {
    for (const StateDType sd : {StateDType::kF32, StateDType::kBF16}) {
      for (const RecomputeMode mode : {RecomputeMode::kNone, RecomputeMode::kAttn, RecomputeMode::kMoe, RecomputeMode::kLayer}) {
        if (sd == StateDType::kF32 && mode != RecomputeMode::kNone) continue;
        config::TrainConfig c = train_config(seq, batch);
        c.optim.state_dtype = sd;
        c.train.recompute = mode;
        train::Trainer t(c, m, testing::world(), random_tokens(int64_t{batch} * (seq + 1) * 4, 8192));
        const train::StepResult r = t.step();
        const double plan = t.memory_plan().peak_bytes, measured = r.peak_mem_gb * 1e9;
        std::printf("  %4dx%-5d %-6s %-7s %10.3f %10.3f %7.3f  %s\n", batch, seq, option_name(sd).data(),
                    option_name(mode).data(), plan / (1 << 30), measured / (1 << 30), plan / measured,
                    r.peak_mem_phase.c_str());
        EXPECT_NEAR(plan / measured, 1.0, 0.10) << batch << "x" << seq << " " << option_name(sd) << " "
                                                << option_name(mode) << ": " << t.memory_line(r);
        EXPECT_GT(r.device_mem_gb, r.peak_mem_gb) << "device use includes the context and the cache";
      }
    }
  }
}

TEST_F(PlanCuda, ConfigurationThatCannotFitStopsBeforeAllocating) {
  const config::ModelConfig m = model();
  // 1024 sequences of 2048 tokens on one GPU: terabytes of activations.
  config::TrainConfig c = train_config(2048, 1024);
  testing::expect_error([&] { train::Trainer t(c, m, testing::world(), random_tokens(1 << 22, 8192)); },
                        {"the memory plan does not fit", "per-rank peak", "largest micro-batch that fits",
                         "train.memory_check=false"});
  EXPECT_LT(cuda::memory_stats().live_bytes, size_t{1} << 30) << "nothing of the model was allocated";
}

}  // namespace
}  // namespace moetp
