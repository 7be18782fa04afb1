// The trainer at every layout and dispatcher reproduces the single-rank run: same loss and
// gradient norm over 3 steps on the same global batch (tolerance below). Also: 2 accumulated
// micro-batches equal one batch of twice the size, the loss falls on a learnable task, and the
// results are bit-identical for any OpenMP thread count.
//
// Model: 2 layers (layer 0 MoE with 8 experts top-2, layer 1 dense via mlp_only_layers), vocab
// 64, hidden 32. Data: random ids from the counter RNG, in memory.
#include <gtest/gtest.h>
#include <omp.h>

#include <bit>
#include <functional>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "config/train_config.h"
#include "core/rng.h"
#include "dist/mpi_env.h"
#include "testing.h"
#include "train/report.h"
#include "train/trainer.h"

namespace moetp {
namespace {

using testing::world;

config::ModelConfig tiny_model(double aux_coef) {
  nlohmann::json j = {{"vocab_size", 64},         {"hidden_size", 32},          {"intermediate_size", 48},
                      {"moe_intermediate_size", 16}, {"num_hidden_layers", 2},   {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},  {"head_dim", 8},              {"num_experts", 8},
                      {"num_experts_per_tok", 2},  {"norm_topk_prob", true},     {"mlp_only_layers", {1}},
                      {"router_aux_loss_coef", aux_coef}, {"max_position_embeddings", 64}};
  return config::ModelConfig::from_json(j, "tiny test model");
}

data::TokenFile random_tokens(int64_t n, uint32_t vocab, uint64_t seed) {
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  const CounterRng rng(seed, 77);
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<uint32_t>(rng.uniform(static_cast<uint64_t>(i)) * vocab);
  return data::TokenFile::from_ids(std::move(ids), vocab, "random");
}

config::TrainConfig train_config(int ep, int etp, const std::string& dispatcher, int micro, int batch) {
  config::TrainConfig c;
  c.parallel.ep = ep;
  c.parallel.etp = etp;
  c.moe.dispatcher = parse_option<DispatcherKind>(dispatcher, "moe.dispatcher");
  c.train.steps = 10;
  c.train.global_batch_size = batch;
  c.train.seq_len = 8;
  c.train.micro_batches = micro;
  c.optim.warmup_steps = 2;
  c.train.device = DeviceChoice::kCpu;  // the CPU reference path, also on a GPU host
  return c;
}

std::vector<train::StepResult> run(const config::TrainConfig& c, const config::ModelConfig& m, comm::Comm& w,
                                   int steps, data::TokenFile data) {
  train::Trainer t(c, m, w, std::move(data));
  std::vector<train::StepResult> out;
  for (int i = 0; i < steps; ++i) out.push_back(t.step());
  return out;
}

struct Layout {
  int D, P, T;
};
const Layout kLayouts[] = {{1, 1, 1}, {2, 1, 1}, {1, 2, 1}, {1, 1, 2}, {1, 2, 2}, {2, 2, 2}};

class TrainerLayouts : public ::testing::TestWithParam<std::string> {};

// Tolerance: the layouts differ from the single rank only in f32 summation order; over 3 AdamW
// steps the loss agrees to 1e-5 relative and the gradient norm to 1e-4 relative.
TEST_P(TrainerLayouts, ReproduceSingleRankLossAndGradNorm) {
  auto& w = world();
  const config::ModelConfig m = tiny_model(0.01);
  auto self = w.split(w.rank(), 0, "self");
  const auto ref = run(train_config(1, 1, "local", 1, 8), m, *self, 3, random_tokens(4000, 64, 3));
  int ran = 0;
  for (const Layout& l : kLayouts) {
    if (l.D * l.P * l.T != w.size()) continue;
    if (GetParam() == "local" && (l.P != 1 || l.T != 1)) continue;
    SCOPED_TRACE(fmt::format("{}_D{}P{}T{}", GetParam(), l.D, l.P, l.T));
    const auto got = run(train_config(l.P, l.T, GetParam(), 1, 8), m, w, 3, random_tokens(4000, 64, 3));
    for (size_t s = 0; s < got.size(); ++s) {
      EXPECT_NEAR(got[s].loss, ref[s].loss, 1e-5 * ref[s].loss) << "step " << s + 1;
      EXPECT_NEAR(got[s].aux_loss, ref[s].aux_loss, 1e-5 * ref[s].aux_loss) << "step " << s + 1;
      EXPECT_NEAR(got[s].grad_norm, ref[s].grad_norm, 1e-4 * ref[s].grad_norm) << "step " << s + 1;
      EXPECT_EQ(got[s].expert_counts, ref[s].expert_counts) << "step " << s + 1;
    }
    ++ran;
  }
  if (ran == 0) GTEST_SKIP() << GetParam() << " has no listed layout at world size " << w.size();
}

INSTANTIATE_TEST_SUITE_P(Dispatchers, TrainerLayouts, ::testing::Values("local", "allgather", "all2all", "vexpert"),
                         [](const auto& info) { return info.param; });

// With the aux coefficient at 0 (the aux loss is a nonlinear statistic of each micro-batch, as in
// transformers and Megatron, so it is per micro-batch by definition), 2 micro-batches of 4
// sequences give the same loss and gradient norm as one batch of 8.
TEST(TrainerAccumulation, TwoMicroBatchesEqualOneBatchOfTwiceTheSize) {
  auto& w = world();
  if (8 % (2 * w.size()) != 0) GTEST_SKIP() << "needs world size dividing 4";
  const config::ModelConfig m = tiny_model(0.0);
  const int ep = w.size() % 2 == 0 ? 2 : 1;
  const std::string disp = ep == 1 ? "local" : "all2all";
  const auto one = run(train_config(ep, 1, disp, 1, 8), m, w, 2, random_tokens(4000, 64, 5));
  const auto two = run(train_config(ep, 1, disp, 2, 8), m, w, 2, random_tokens(4000, 64, 5));
  for (size_t s = 0; s < one.size(); ++s) {
    EXPECT_NEAR(two[s].loss, one[s].loss, 1e-6 * one[s].loss) << "step " << s + 1;
    EXPECT_NEAR(two[s].grad_norm, one[s].grad_norm, 1e-5 * one[s].grad_norm) << "step " << s + 1;
  }
}

TEST(TrainerLearning, LossFallsOnARepeatingPattern) {
  auto& w = world();
  if (w.size() > 2) GTEST_SKIP() << "one small layout is enough";
  std::vector<uint32_t> ids;
  for (int i = 0; i < 4000; ++i) ids.push_back(static_cast<uint32_t>((i * 7) % 23));
  config::TrainConfig c = train_config(w.size(), 1, w.size() == 1 ? "local" : "vexpert", 1, 8);
  c.optim.lr = 1e-2;
  c.train.steps = 40;
  const auto r = run(c, tiny_model(0.01), w, 40, data::TokenFile::from_ids(ids, 64, "pattern"));
  EXPECT_LT(r.back().ce_loss, 0.3 * r.front().ce_loss) << "first " << r.front().ce_loss << " last " << r.back().ce_loss;
}

// Steps, then every parameter (its whole working copy: the f32 weights on the CPU, whether or not
// the masters are sharded), its last gradient, and the master elements this rank holds.
struct Trained {
  std::vector<train::StepResult> steps;
  std::vector<Tensor> values, grads;
  int64_t master_elems = 0, param_elems = 0, slice_elems = 0;  // slice_elems: Σ this rank's replica slices
};

Trained train_steps(const config::TrainConfig& c, comm::Comm& w, int steps) {
  train::Trainer t(c, tiny_model(0.01), w, random_tokens(4000, 64, 9));
  Trained out;
  for (int i = 0; i < steps; ++i) out.steps.push_back(t.step());
  for (const model::Param& p : t.model().params()) {
    out.values.push_back(p.work.clone());
    out.grads.push_back(p.grad.clone());
    out.master_elems += p.value.numel();
    out.param_elems += p.work.numel();
  }
  const model::Qwen3MoeModel& m = t.model();
  for (const model::ParamSlice& s : model::replica_slices(model::qwen3_moe_params(m.config(), m.layout()), m.mesh())) {
    out.slice_elems += s.count;
  }
  return out;
}

void expect_bit_identical(const Trained& got, const Trained& ref) {
  ASSERT_EQ(got.steps.size(), ref.steps.size());
  for (size_t s = 0; s < got.steps.size(); ++s) {
    EXPECT_EQ(std::bit_cast<uint64_t>(got.steps[s].loss), std::bit_cast<uint64_t>(ref.steps[s].loss)) << "step " << s + 1;
    EXPECT_EQ(std::bit_cast<uint64_t>(got.steps[s].aux_loss), std::bit_cast<uint64_t>(ref.steps[s].aux_loss))
        << "step " << s + 1;
    EXPECT_EQ(std::bit_cast<uint64_t>(got.steps[s].grad_norm), std::bit_cast<uint64_t>(ref.steps[s].grad_norm))
        << "step " << s + 1;
  }
  ASSERT_EQ(got.values.size(), ref.values.size());
  for (size_t i = 0; i < got.values.size(); ++i) {
    EXPECT_TRUE(testing::bit_equal(got.values[i], ref.values[i])) << "parameter " << i;
    EXPECT_TRUE(testing::bit_equal(got.grads[i], ref.grads[i])) << "gradient " << i;
  }
}

bool bits_differ(const Trained& a, const Trained& b) {
  for (size_t i = 0; i < a.values.size(); ++i) {
    if (!testing::bit_equal(a.values[i], b.values[i])) return true;
  }
  return false;
}

// Every reduction of the CPU path adds in an order that does not depend on the thread count
// (per-row OpenMP loops, serial sums in a fixed order, GEMMs split into fixed blocks), so 3 steps
// give the same bits with 1, 2 or 3 OpenMP threads. 1024 tokens a step, so that the LM-head GEMMs
// are split into blocks. Control: 2 micro-batches instead of 1 (the same math in another summation
// order) do change the bits.
TEST(TrainerDeterminism, BitIdenticalForAnyThreadCount) {
  auto& w = world();
  if (w.size() != 1 && w.size() != 2 && w.size() != 4) GTEST_SKIP() << "layouts for 1, 2 and 4 ranks";
  const int ep = w.size() == 1 ? 1 : 2, etp = w.size() == 4 ? 2 : 1;
  const std::string disp = w.size() == 1 ? "local" : w.size() == 2 ? "vexpert" : "all2all";
  config::TrainConfig c = train_config(ep, etp, disp, 1, 16);
  c.train.seq_len = 64;
  const int saved = omp_get_max_threads();
  auto with_threads = [&](int n, const config::TrainConfig& cfg) {
    omp_set_num_threads(n);
    return train_steps(cfg, w, 3);
  };
  const Trained one = with_threads(1, c);
  for (int n : {2, 3}) {
    SCOPED_TRACE(fmt::format("{} threads", n));
    expect_bit_identical(with_threads(n, c), one);
  }
  config::TrainConfig two_micro = c;
  two_micro.train.micro_batches = 2;
  EXPECT_TRUE(bits_differ(with_threads(1, two_micro), one)) << "the comparison would not see a changed order";
  omp_set_num_threads(saved);
}

// Recomputation changes no bits (train.recompute): every mode, all layers or only the first, with 2
// micro-batches, at the layouts of 1, 2 and 4 ranks and every dispatcher they allow: losses, aux
// losses, gradient norms, weights and gradients after 3 steps equal the run that keeps everything.
TEST(TrainerRecompute, EveryModeIsBitIdenticalToNone) {
  auto& w = world();
  if (w.size() != 1 && w.size() != 2 && w.size() != 4) GTEST_SKIP() << "layouts for 1, 2 and 4 ranks";
  const int ep = w.size() == 1 ? 1 : 2, etp = w.size() == 4 ? 2 : 1;
  const std::vector<std::string> dispatchers =
      w.size() == 1 ? std::vector<std::string>{"local"} : std::vector<std::string>{"allgather", "all2all", "vexpert"};
  for (const std::string& disp : dispatchers) {
    config::TrainConfig c = train_config(ep, etp, disp, 2, 8);
    const Trained ref = train_steps(c, w, 3);
    for (const auto& [mode, layers] : {std::pair{RecomputeMode::kAttn, -1}, std::pair{RecomputeMode::kMoe, -1},
                                        std::pair{RecomputeMode::kLayer, -1}, std::pair{RecomputeMode::kLayer, 1}}) {
      SCOPED_TRACE(fmt::format("{}: recompute {} of {} layers", disp, option_name(mode), layers));
      config::TrainConfig r = c;
      r.train.recompute = mode;
      r.train.recompute_layers = layers;
      expect_bit_identical(train_steps(r, w, 3), ref);
    }
  }
}

// The sharded optimizer (optim.zero = 1: masters and moments in slices) changes no bits: with 2
// micro-batches and clipping active, at the layouts of 1, 2 and 4 ranks and every dispatcher they
// allow (and 2 data-parallel replicas at 4 ranks, where the expert shards split over expert_dp too):
// losses, aux losses, gradient norms and every weight after 3 steps equal optim.zero = 0, and each
// rank holds only its slices of the masters. (The gradients outside a rank's slices are
// left unreduced by design, so they are not compared.)
TEST(TrainerZero, StageOneIsBitIdenticalToStageZero) {
  auto& w = world();
  if (w.size() != 1 && w.size() != 2 && w.size() != 4) GTEST_SKIP() << "layouts for 1, 2 and 4 ranks";
  struct L {
    int ep, etp;
    std::string dispatcher;
  };
  std::vector<L> layouts;
  if (w.size() == 1) layouts = {{1, 1, "local"}};
  if (w.size() == 2) layouts = {{2, 1, "allgather"}, {2, 1, "all2all"}, {2, 1, "vexpert"}, {1, 1, "local"}};
  if (w.size() == 4) layouts = {{2, 2, "all2all"}, {2, 2, "vexpert"}, {2, 2, "allgather"}, {2, 1, "all2all"}};
  for (const L& l : layouts) {
    SCOPED_TRACE(fmt::format("ep {} etp {} {}", l.ep, l.etp, l.dispatcher));
    config::TrainConfig c = train_config(l.ep, l.etp, l.dispatcher, 2, 8);
    c.optim.grad_clip = 0.05;  // clips every step: the norm's bits reach the weights
    const Trained ref = train_steps(c, w, 3);
    ASSERT_GT(ref.steps[0].grad_norm, c.optim.grad_clip);
    c.optim.zero = 1;
    const Trained z = train_steps(c, w, 3);
    EXPECT_EQ(ref.master_elems, ref.param_elems);
    EXPECT_EQ(z.master_elems, z.slice_elems);
    if (w.size() > 1) {
      EXPECT_LT(z.slice_elems, z.param_elems) << "the replicated masters split over world";
    }
    for (size_t s = 0; s < ref.steps.size(); ++s) {
      EXPECT_EQ(std::bit_cast<uint64_t>(z.steps[s].loss), std::bit_cast<uint64_t>(ref.steps[s].loss)) << "step " << s + 1;
      EXPECT_EQ(std::bit_cast<uint64_t>(z.steps[s].aux_loss), std::bit_cast<uint64_t>(ref.steps[s].aux_loss));
      EXPECT_EQ(std::bit_cast<uint64_t>(z.steps[s].grad_norm), std::bit_cast<uint64_t>(ref.steps[s].grad_norm))
          << "step " << s + 1;
    }
    for (size_t i = 0; i < ref.values.size(); ++i) {
      EXPECT_TRUE(testing::bit_equal(z.values[i], ref.values[i])) << "parameter " << i;
    }
  }
}

TEST(TrainerReport, ModelTflopsFollowTheFormulaAndTheCpuHasNoGpuMemory) {
  auto& w = world();
  const config::ModelConfig m = tiny_model(0.01);
  const config::TrainConfig c = train_config(1, 1, "auto", 1, 8 * w.size());
  const auto r = run(c, m, w, 2, random_tokens(4000, 64, 1));
  const double flops = config::training_flops(m, c.train.global_batch_size, c.train.seq_len).total();
  for (const auto& s : r) {
    ASSERT_GT(s.seconds, 0);
    EXPECT_GT(s.model_tflops_per_rank, 0);
    EXPECT_NEAR(s.model_tflops_per_rank, flops / s.seconds / w.size() / 1e12, 1e-12 + 1e-9 * s.model_tflops_per_rank);
    EXPECT_EQ(s.peak_mem_gb, -1) << "the CPU device reports no GPU memory";
    EXPECT_EQ(s.peak_mem_phase, "") << "nor where its peak was";
  }
}

TEST(TrainerReport, ProgressLineCarriesThroughputTflopsAndGpuMemory) {
  train::StepResult r;
  r.step = 10;
  r.loss = 2.5;
  r.aux_loss = 1.25;
  r.grad_norm = 0.5;
  r.lr = 1e-3;
  r.seconds = 0.5;
  r.tokens = 4096;
  r.model_tflops_per_rank = 123.4;
  // 10 of 100 steps in 20 s: 2 s per step, 90 steps left = 3 min.
  EXPECT_EQ(train::progress_line(r, 100, 20.0),
            "step    10/100 | loss 2.5000 | aux 1.2500 | grad 0.500 | lr 1.00e-03 | 8.2k tok/s | 123.4 TFLOP/s/rank | "
            "ETA 3m00s");
  r.peak_mem_gb = 33.76;
  EXPECT_EQ(train::progress_line(r, 100, 20.0),
            "step    10/100 | loss 2.5000 | aux 1.2500 | grad 0.500 | lr 1.00e-03 | 8.2k tok/s | 123.4 TFLOP/s/rank | "
            "33.8 GB/GPU | ETA 3m00s");
  r.peak_mem_gb = -1;
  r.model_tflops_per_rank = 0.00086;
  EXPECT_EQ(train::progress_line(r, 100, 20.0),
            "step    10/100 | loss 2.5000 | aux 1.2500 | grad 0.500 | lr 1.00e-03 | 8.2k tok/s | 0.86 GFLOP/s/rank | "
            "ETA 3m00s")
      << "below 1 TFLOP/s the line says GFLOP/s";
}

TEST(TrainerBadInput, ErrorsNameTheValues) {
  auto& w = world();
  // Data with a larger vocabulary than the model.
  EXPECT_NE(testing::error_of([&] { run(train_config(1, 1, "auto", 1, 8 * w.size()), tiny_model(0.01), w, 1,
                              random_tokens(4000, 100, 1)); })
                .find("vocabulary size 100 but the model's vocab_size is 64"),
            std::string::npos);
  // Forced balance is a CUDA-device option: the CPU device says so instead of ignoring it.
  config::TrainConfig fb = train_config(1, 1, "auto", 1, 8 * w.size());
  fb.moe.force_balance = true;
  EXPECT_NE(testing::error_of([&] { run(fb, tiny_model(0.01), w, 1, random_tokens(4000, 64, 1)); })
                .find("moe.force_balance is implemented on the CUDA device only"),
            std::string::npos);
  // train.device = auto keeps a CPU-only dispatcher on the CPU and says why.
  {
    config::TrainConfig c = train_config(w.size(), 1, "allgather", 1, 8 * w.size());
    c.train.device = DeviceChoice::kAuto;
    train::Trainer t(c, tiny_model(0.01), w, random_tokens(4000, 64, 1));
    EXPECT_EQ(t.device(), Device::kCpu);
    EXPECT_NE(t.device_reason().find("moe.dispatcher 'allgather' runs on the CPU device only"), std::string::npos)
        << t.device_reason();
  }
  // The expert GEMM and the allocator are CUDA-device options: the CPU device rejects them.
  const std::vector<std::pair<std::function<void(config::TrainConfig&)>, std::string>> cuda_only = {
      {[](config::TrainConfig& c) { c.moe.expert_gemm = ExpertGemmChoice::kCublas; }, "moe.expert_gemm = cublas"},
      {[](config::TrainConfig& c) { c.train.cuda_allocator = AllocatorChoice::kDirect; }, "train.cuda_allocator = direct"}};
  for (const auto& [set, what] : cuda_only) {
    config::TrainConfig c = train_config(1, 1, "auto", 1, 8 * w.size());
    set(c);
    c.train.device = DeviceChoice::kCpu;
    EXPECT_NE(testing::error_of([&] { run(c, tiny_model(0.01), w, 1, random_tokens(4000, 64, 1)); })
                  .find(what + " applies to the CUDA device only"),
              std::string::npos)
        << what;
  }
  // NaN in the weights: the loss check names the step and rank on every rank.
  train::Trainer t(train_config(1, 1, "auto", 1, 8 * w.size()), tiny_model(0.01), w, random_tokens(4000, 64, 1));
  t.model().param("model.norm.weight").value.data<float>()[0] = std::nanf("");
  const std::string err = testing::error_of([&] { t.step(); });
  EXPECT_NE(err.find("step 1: loss is nan"), std::string::npos) << err;
}

}  // namespace
}  // namespace moetp
