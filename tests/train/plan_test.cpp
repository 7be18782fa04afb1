// train::plan_memory, the arithmetic behind `moetp plan`: the parameter count is the model's (every
// parameter once on one rank; the expert shards split over ep x etp), each term scales as its
// dtype says (bf16 moments are half the f32 ones), recomputation only lowers the saved
// activations, and bad layouts are refused naming the values. The plan against measured GPU peaks
// is a table in docs/performance.md.
#include "train/plan.h"

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "testing.h"

namespace moetp {
namespace {

config::ModelConfig model() {
  const std::string dir = MOETP_CONFIGS_DIR;
  return config::ModelConfig::load(dir + "/qwen3-30b-a3b-l4.json");
}

config::TrainConfig train(int ep, int etp, int batch) {
  config::TrainConfig c;
  c.parallel.ep = ep;
  c.parallel.etp = etp;
  c.train.seq_len = 4096;
  c.train.global_batch_size = batch;
  return c;
}

double item(const train::MemoryPlan& p, const std::string& prefix) {
  for (const train::PlanItem& it : p.items) {
    if (it.what.rfind(prefix, 0) == 0) return it.bytes;
  }
  ADD_FAILURE() << "no item '" << prefix << "'";
  return 0;
}

TEST(MemoryPlan, ParametersAreTheModelsAndExpertsSplitOverTheLayout) {
  const config::ModelConfig m = model();
  const train::MemoryPlan one = train::plan_memory(m, train(1, 1, 2), 1, Device::kCuda, 1.0);
  EXPECT_EQ(one.parameters, static_cast<double>(m.num_params()));
  EXPECT_EQ(one.tokens_per_rank, 2 * 4096);
  const double experts = static_cast<double>(m.num_hidden_layers) * m.num_experts * 3 * m.hidden_size *
                         m.moe_intermediate_size;
  for (const auto& [ep, etp] : {std::pair{2, 1}, std::pair{2, 2}, std::pair{4, 1}}) {
    const train::MemoryPlan p = train::plan_memory(m, train(ep, etp, 8), 8, Device::kCuda, 1.0);
    EXPECT_EQ(p.parameters, one.parameters - experts + experts / (ep * etp)) << "ep " << ep << " etp " << etp;
  }
}

TEST(MemoryPlan, TermsFollowTheirDtypes) {
  const config::ModelConfig m = model();
  config::TrainConfig c = train(1, 1, 2);
  const train::MemoryPlan f32 = train::plan_memory(m, c, 1, Device::kCuda, 1.0);
  c.optim.state_dtype = StateDType::kBF16;
  const train::MemoryPlan bf16 = train::plan_memory(m, c, 1, Device::kCuda, 1.0);
  EXPECT_EQ(item(f32, "AdamW moments"), 2 * item(bf16, "AdamW moments"));
  EXPECT_EQ(item(f32, "gradients"), 2 * item(f32, "weights"));  // f32 gradients, bf16 working copies
  EXPECT_EQ(item(f32, "master weights"), item(f32, "gradients"));
  EXPECT_NEAR(f32.peak_bytes - bf16.peak_bytes, 4 * f32.parameters, 0.01 * f32.parameters);
  const train::MemoryPlan cpu = train::plan_memory(m, c, 1, Device::kCpu, 1.0);
  EXPECT_EQ(item(cpu, "weights"), item(cpu, "gradients")) << "the CPU's f32 weights are the masters";
}

TEST(MemoryPlan, RecomputationLowersTheSavedActivationsAndThePeak) {
  const config::ModelConfig m = model();
  config::TrainConfig c = train(1, 1, 2);
  double last_saved = 1e30, last_peak = 1e30;
  for (const RecomputeMode mode : {RecomputeMode::kNone, RecomputeMode::kAttn, RecomputeMode::kMoe, RecomputeMode::kLayer}) {
    c.train.recompute = mode;
    const train::MemoryPlan p = train::plan_memory(m, c, 1, Device::kCuda, 1.0);
    EXPECT_LT(item(p, "saved activations"), last_saved) << option_name(mode);
    EXPECT_LT(p.peak_bytes, last_peak) << option_name(mode);
    last_saved = item(p, "saved activations");
    last_peak = p.peak_bytes;
  }
  c.train.recompute_layers = 2;  // half the layers: between none and all
  const double half = item(train::plan_memory(m, c, 1, Device::kCuda, 1.0), "saved activations");
  c.train.recompute = RecomputeMode::kNone;
  EXPECT_LT(half, item(train::plan_memory(m, c, 1, Device::kCuda, 1.0), "saved activations"));
  EXPECT_GT(half, last_saved);
}

// advise_fit: the largest micro-batch fits and one more sequence does not; every suggested
// setting, applied to the config, plans at the peak it states and within the budget; a budget
// nothing fits says so.
TEST(MemoryPlan, AdviceNamesWhatFits) {
  const config::ModelConfig m = model();
  const config::TrainConfig c = train(1, 1, 4);
  const double two = train::plan_memory(m, train(1, 1, 2), 1, Device::kCuda, 1.5).peak_bytes;
  const double three = train::plan_memory(m, train(1, 1, 3), 1, Device::kCuda, 1.5).peak_bytes;
  const double budget = (two + three) / 2;
  const train::FitAdvice a = train::advise_fit(m, c, 1, Device::kCuda, budget);
  ASSERT_EQ(a.largest_rows, 2);
  for (const int64_t rows : {a.largest_rows, a.largest_rows + 1}) {
    const double p = train::plan_memory(m, train(1, 1, static_cast<int>(rows)), 1, Device::kCuda, 1.5).peak_bytes;
    EXPECT_EQ(p <= budget, rows == a.largest_rows) << rows << " sequences: " << p << " bytes, budget " << budget;
  }
  ASSERT_FALSE(a.settings.empty());
  for (const train::FitAdvice::Setting& s : a.settings) {
    config::TrainConfig applied = c;
    for (const std::string& o : s.overrides) config::apply_override(applied, o);
    const double p = train::plan_memory(m, applied, 1, Device::kCuda, 1.5).peak_bytes;
    EXPECT_EQ(p, s.peak_bytes) << s.overrides.front();
    EXPECT_LE(p, budget) << s.overrides.front();
  }
  const std::string text = train::format_advice(a, c, 0);
  EXPECT_NE(text.find("largest micro-batch that fits: " + std::to_string(a.largest_rows)), std::string::npos) << text;
  EXPECT_NE(text.find("fits with: --set "), std::string::npos) << text;

  EXPECT_FALSE(a.fits);
  const train::FitAdvice roomy = train::advise_fit(m, c, 1, Device::kCuda, 1e15);
  EXPECT_TRUE(roomy.fits);
  EXPECT_TRUE(roomy.settings.empty()) << "nothing to change when it fits";
  EXPECT_EQ(train::format_advice(roomy, c, 0).find("fits with"), std::string::npos);

  const train::FitAdvice none = train::advise_fit(m, c, 1, Device::kCuda, 1e9);
  EXPECT_FALSE(none.fits);
  EXPECT_EQ(none.largest_rows, 0);
  EXPECT_TRUE(none.settings.empty());
  EXPECT_NE(train::format_advice(none, c, 0).find("no combination"), std::string::npos);
}

// When no single change fits, the changes combine in order until they do.
TEST(MemoryPlan, AdviceCombinesChangesWhenNoneFitsAlone) {
  const config::ModelConfig m = model();
  const config::TrainConfig c = train(1, 1, 4);
  config::TrainConfig lean = c;
  lean.optim.state_dtype = StateDType::kBF16;
  lean.train.recompute = RecomputeMode::kLayer;
  lean.train.micro_batches = 4;
  const double budget = 1.001 * train::plan_memory(m, lean, 1, Device::kCuda, 1.5).peak_bytes;
  const train::FitAdvice a = train::advise_fit(m, c, 1, Device::kCuda, budget);
  ASSERT_EQ(a.settings.size(), 1u);
  const std::vector<std::string> want = {"optim.state_dtype=bf16", "train.recompute=layer", "train.micro_batches=4"};
  EXPECT_EQ(a.settings[0].overrides, want);
}

// The training recipes in configs/recipes plan to fit the machines configs/README.md names them for.
TEST(MemoryPlan, RecipesFitTheirMachines) {
  const std::string dir = MOETP_CONFIGS_DIR;
  struct Recipe {
    const char* file;
    int world;
    double gpu_gib;
  };
  for (const Recipe& r : {Recipe{"qwen3-30b-a3b-8xh100-ep8.json", 8, 79.0}, Recipe{"qwen3-30b-a3b-8xh100-ep2-etp4.json", 8, 79.0},
                          Recipe{"qwen3-30b-a3b-4xh200-ep4.json", 4, 139.0}}) {
    SCOPED_TRACE(r.file);
    config::TrainConfig c;
    config::apply_json_file(c, dir + "/recipes/" + r.file);
    config::validate(c);
    EXPECT_EQ(c.model.config, "configs/qwen3-30b-a3b.json");
    const config::ModelConfig m = config::ModelConfig::load(dir + "/qwen3-30b-a3b.json");
    config::validate_with_model(c, m, r.world);
    const train::MemoryPlan p = train::plan_memory(m, c, r.world, Device::kCuda, c.moe.plan_imbalance);
    EXPECT_LE(p.peak_bytes / (1 << 30) + train::kDefaultAllowanceGiB, r.gpu_gib);
    EXPECT_EQ(p.tokens_per_rank, 2 * 4096);
  }
}

// train.logit_chunk_rows: the LM head's chunk of logits is rows x V in the compute dtype; the
// default is the backends' (backend::default_logit_chunk_rows).
TEST(MemoryPlan, LogitChunkFollowsTheConfig) {
  nlohmann::json j = model().to_hf_json();
  j["vocab_size"] = 151936;
  const config::ModelConfig m = config::ModelConfig::from_json(j, "full vocabulary");
  config::TrainConfig c = train(1, 1, 2);
  c.train.recompute = RecomputeMode::kLayer;
  c.train.logit_chunk_rows = 8192;
  const double n = 8192, H = 2048, V = 151936;
  EXPECT_EQ(item(train::plan_memory(m, c, 1, Device::kCuda, 1.0), "LM head chunk"), 8192 * V * 2 + 2 * 2 * n * H);
  c.train.logit_chunk_rows = 0;
  const train::MemoryPlan def = train::plan_memory(m, c, 1, Device::kCuda, 1.0);
  for (const train::PlanItem& it : def.items) {
    if (it.what.rfind("LM head chunk", 0) == 0) {
      EXPECT_EQ(it.bytes, static_cast<double>(backend::default_logit_chunk_rows(Device::kCuda, 151936)) * V * 2 + 2 * 2 * n * H);
    }
  }
}

// optim.zero = 1: the f32 masters and the moments of replicated parameters split over world, of
// expert shards over expert_dp; nothing else changes. On the CPU the working copies become a
// separate f32 copy beside the sliced masters.
TEST(MemoryPlan, ZeroShardsTheMastersAndMoments) {
  const config::ModelConfig m = model();
  config::TrainConfig c = train(4, 1, 8);
  const train::MemoryPlan z0 = train::plan_memory(m, c, 8, Device::kCuda, 1.0);
  c.optim.zero = 1;
  const train::MemoryPlan z1 = train::plan_memory(m, c, 8, Device::kCuda, 1.0);
  const double experts = static_cast<double>(m.num_hidden_layers) * m.num_experts * 3 * m.hidden_size *
                         m.moe_intermediate_size / 4;
  const double replicated = z0.parameters - experts;
  EXPECT_NEAR(item(z1, "AdamW moments"), 8 * (replicated / 8 + experts / 2), 1e-6 * item(z0, "AdamW moments"));
  EXPECT_NEAR(item(z1, "master weights"), 4 * (replicated / 8 + experts / 2), 1e-6 * item(z0, "master weights"));
  EXPECT_NEAR(z0.peak_bytes - z1.peak_bytes,
              item(z0, "AdamW moments") - item(z1, "AdamW moments") + item(z0, "master weights") -
                  item(z1, "master weights"),
              1.0);
  const train::MemoryPlan cpu0 = train::plan_memory(m, c, 8, Device::kCpu, 1.0);
  EXPECT_NEAR(item(cpu0, "weights (f32 working copies)"), item(z0, "weights (bf16 working copies)") * 2, 1.0);
  EXPECT_NEAR(item(cpu0, "master weights"), item(z1, "master weights"), 1.0);
}

TEST(MemoryPlan, TableEndsWithTheVerdict) {
  const train::MemoryPlan p = train::plan_memory(model(), train(1, 1, 2), 1, Device::kCuda, 1.0);
  const std::string fits = train::format_plan(p, 1000, 1.0), not_fits = train::format_plan(p, 10, 1.0);
  EXPECT_NE(fits.find("per-rank peak: "), std::string::npos);
  EXPECT_NE(fits.find("(fits in 1000 GiB)"), std::string::npos) << fits;
  EXPECT_NE(not_fits.find("(does not fit in 10 GiB)"), std::string::npos) << not_fits;
  EXPECT_NE(fits.find("CUDA context and allocator slack"), std::string::npos);
}

TEST(MemoryPlan, BadLayoutsNameTheValues) {
  const config::ModelConfig m = model();
  testing::expect_error([&] { train::plan_memory(m, train(2, 2, 8), 6, Device::kCuda, 1.0); },
                        {"world 6", "ep 2", "etp 2"});
  testing::expect_error([&] { train::plan_memory(m, train(1, 1, 3), 2, Device::kCuda, 1.0); },
                        {"global_batch_size 3", "2 ranks"});
  testing::expect_error([&] { train::plan_memory(m, train(1, 1, 2), 1, Device::kCuda, 0.5); }, {"imbalance (0.5)"});
}

}  // namespace
}  // namespace moetp
