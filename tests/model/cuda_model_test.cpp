// The model on the CUDA backend (model/model.h, backend/cuda_backend.cpp) against the same model on
// the CPU backend (the spec) on tiny
// Qwen3-MoE configs: 3 layers with a dense one in the middle (mlp_only_layers), and 2 layers with
// tied embeddings; 8 experts top-2, head_dim 16, vocab 96, hidden 64, B = 2, S = 16.
//
// The CPU model's initial values are rounded to bf16 first, so both sides start from the same
// weights and the comparison measures only the GPU's bf16 activations (the CPU keeps f32).
//
// Routing: top-k is discontinuous. The GPU's router input differs from the CPU's by its bf16
// rounding (relative ~3e-3, so logit differences of ~5e-4 at these logit scales); a token whose
// K-th and (K+1)-th probabilities are closer than that may pick another expert on each side,
// which changes that token's whole path. The test therefore picks, among token seeds 1..256, the
// first batch whose GPU routing margin (p_K − p_{K+1}) / p_K is >= kMinMargin = 2e-3 on every token
// of every MoE layer (about 4x that estimate of the logit error), prints it, and then requires the
// per-layer expert counts to agree exactly.
//
// Tolerances:
//   - cross-entropy mean: relative 1e-3 (logits are bf16 on the GPU: ~2^-9 relative per logit, the
//     mean over 32 targets of logsumexp − logit averages them out; an H100 measured 1.6e-5);
//   - aux loss: relative 1e-3 (same counts; probability sums of f32 softmaxes of bf16-input logits;
//     an H100 measured 1.5e-5..3.3e-5);
//   - every gradient: norm-wise ‖g_gpu − g_cpu‖₂ / ‖g_cpu‖₂ <= 5e-2. The GPU rounds each activation
//     and each activation gradient to bf16 (relative 2^-9 each, RMS ~1.1e-3) along a chain of ~10
//     roundings per layer across 2-3 layers, forward and backward, so errors of ~1e-2 are expected;
//     5e-2 leaves room while a wrong op (transposed weight, missing residual, wrong norm) gives O(1).
//     Each tensor's error is printed (an H100 measured 3e-3..1.6e-2). The reference must be non-zero.
// AdamW: three steps on the same batch with train::AdamW on each backend; the
// losses after each step agree within 2e-2 relative, and the loss falls on both.
//
// Runs under mpirun -np 1 (the CPU model needs a one-rank mesh); skips without a GPU.
//
// 2 and 4 GPUs (CudaModelDist, mpirun -np 2 / -np 4, one GPU per rank over NCCL), every layout
// (ep, etp) with ep·etp dividing the world size (the rest is data parallel), each rank with its
// own B×S tokens. Two references from the same bf16-rounded initial values:
//   - the CPU model at the same layout over MPI (the spec of that layout, itself held to one rank
//     by tests/train/trainer_test.cpp): cross-entropy mean over the global batch, aux loss, expert
//     counts (exact), every gradient of this rank after the gradient reduction (norm-wise, as
//     above) and the global gradient norm (relative 2e-2);
//   - the one-GPU model on the whole global batch (every rank's sequences, in rank order) on this
//     rank's GPU: the same losses and counts, and every gradient (replicated ones after the
//     all-reduce, expert shards against this rank's slice of the full gradient).
// Then three AdamW steps on the GPU layout and the CPU layout track each other (losses within
// 2e-2) and fall. The routing-margin rule above applies to every rank's tokens.
#include "model/model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "dist/nccl_env.h"
#include "io/checkpoint.h"
#include "kernels/cuda/runtime.h"
#include "shard/layout.h"
#include "testing.h"
#include "testing_files.h"
#include "train/optim.h"

namespace moetp {
namespace {

// Save options without progress output.
io::SaveOptions quiet_save(io::HfExpertLayout layout) {
  io::SaveOptions o;
  o.expert_layout = layout;
  o.show_progress = false;
  return o;
}

constexpr double kMinMargin = 2e-3;
constexpr double kCeRel = testing::kModelCeRel;
constexpr double kAuxRel = testing::kModelAuxRel;
constexpr double kGradRel = testing::kModelGradRel;
constexpr double kAdamLossRel = testing::kModelAdamLossRel;
constexpr int64_t kB = 2, kS = 16;

config::ModelConfig tiny_config(bool tied) {
  config::ModelConfig c;
  c.vocab_size = 96;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.moe_intermediate_size = 32;
  c.num_hidden_layers = tied ? 2 : 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.num_experts = 8;
  c.num_experts_per_tok = 2;
  c.norm_topk_prob = true;
  c.mlp_only_layers = tied ? std::vector<int64_t>{0} : std::vector<int64_t>{1};
  c.tie_word_embeddings = tied;
  c.router_aux_loss_coef = 0.1;  // larger than HF's 0.001 so the aux gradient shows in the router's
  c.max_position_embeddings = 64;
  c.validate("tiny_config");
  return c;
}

backend::Backend& gpu_backend() { return backend::get(Device::kCuda); }

void round_to_bf16(model::Qwen3MoeModel& m) {
  for (model::Param& p : m.params()) p.value.copy_from(p.value.to(DType::kBF16).to(DType::kF32));
}

// A GPU model of the CPU model's layout holding the CPU model's current values (exactly; bf16
// working copies rounded from them), copied through the two models' parameter stores.
std::unique_ptr<model::Qwen3MoeModel> from_cpu(const model::Qwen3MoeModel& cpu, model::ModelOptions opts = {}) {
  auto gpu = std::make_unique<model::Qwen3MoeModel>(cpu.config(), gpu_backend(), opts, 0);
  model::ModelParamStore store(*gpu, *cpu.mesh());
  model::copy_params(model::ModelParamStore(cpu), store, false);
  return gpu;
}

Tensor random_tokens(int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(V - 1));
  std::vector<int32_t> v(static_cast<size_t>(kB * (kS + 1)));
  for (int32_t& t : v) t = pick(rng);
  return Tensor::from_vector<int32_t>(v, {kB, kS + 1});
}

// Smallest (p_K − p_{K+1}) / p_K over tokens and MoE layers of the GPU model's last forward.
double routing_margin(const model::Qwen3MoeModel& m) {
  const config::ModelConfig& c = m.config();
  const int64_t E = c.num_experts, K = c.num_experts_per_tok;
  double margin = 1.0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const moe::MoeLayer* layer = m.moe_layer(l);
    if (layer == nullptr || K == E) continue;
    const std::vector<float> probs = layer->router_probs().to_vector<float>();
    for (size_t n = 0; n * E < probs.size(); ++n) {
      std::vector<float> row(probs.begin() + n * E, probs.begin() + (n + 1) * E);
      std::sort(row.begin(), row.end(), std::greater<float>());
      margin = std::min(margin, static_cast<double>(row[K - 1] - row[K]) / row[K - 1]);
    }
  }
  return margin;
}

double rel_l2(const Tensor& actual, const Tensor& expected, double* ref_norm) {
  const std::vector<float> a = actual.to_vector<float>(), b = expected.to_vector<float>();
  double d2 = 0, r2 = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    d2 += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    r2 += static_cast<double>(b[i]) * b[i];
  }
  *ref_norm = std::sqrt(r2);
  return r2 == 0 ? (d2 == 0 ? 0.0 : INFINITY) : std::sqrt(d2 / r2);
}

class CudaModel : public ::testing::Test {
 protected:
  void SetUp() override {
    MOETP_REQUIRE_WORLD_SIZE(1);
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

// The seed constructor draws exactly the CPU model's initial values (bit-exact masters).
TEST_F(CudaModel, FromSeedMatchesCpuInit) {
  comm::Mesh mesh(testing::world(), 1, 1);
  for (const bool tied : {false, true}) {
    const config::ModelConfig cfg = tiny_config(tied);
    model::Qwen3MoeModel cpu(cfg, mesh, DispatcherKind::kLocal, 5);
    model::Qwen3MoeModel gpu(cfg, gpu_backend(), {}, 5);
    ASSERT_EQ(gpu.params().size(), cpu.params().size());
    for (size_t i = 0; i < cpu.params().size(); ++i) {
      EXPECT_EQ(gpu.params()[i].name, cpu.params()[i].name);
      EXPECT_TRUE(testing::bit_equal(gpu.params()[i].value.to(Device::kCpu), cpu.params()[i].value))
          << cpu.params()[i].name;
    }
  }
}

// Recomputation on the GPU (ModelOptions::recompute): the forward is deterministic, so the losses
// of a micro-batch are bit-identical to keeping every activation; the gradients are too except
// where the attention backward's dq atomics add in another order (testing::kAtomicOrderRel).
TEST_F(CudaModel, RecomputeMatchesKeepingActivations) {
  const config::ModelConfig cfg = tiny_config(false);
  const Tensor tokens = random_tokens(cfg.vocab_size, 3);
  auto run = [&](RecomputeMode mode, int64_t layers) {
    model::ModelOptions opts;
    opts.recompute = mode;
    opts.recompute_layers = layers;
    auto m = std::make_unique<model::Qwen3MoeModel>(cfg, gpu_backend(), opts, 7);
    m->zero_grads();
    const model::MicroStats st = m->forward_backward(tokens, 1.0 / (kB * kS), 0.01);
    return std::pair{st, std::move(m)};
  };
  const auto [ref_st, ref] = run(RecomputeMode::kNone, -1);
  for (const auto& [mode, layers] :
       {std::pair{RecomputeMode::kAttn, int64_t{-1}}, std::pair{RecomputeMode::kMoe, int64_t{-1}},
        std::pair{RecomputeMode::kLayer, int64_t{-1}}, std::pair{RecomputeMode::kLayer, int64_t{2}}}) {
    SCOPED_TRACE(fmt::format("recompute {} of {} layers", option_name(mode), layers));
    const auto [st, m] = run(mode, layers);
    EXPECT_EQ(st.ce_sum, ref_st.ce_sum);
    EXPECT_EQ(st.aux, ref_st.aux);
    EXPECT_EQ(st.expert_counts, ref_st.expert_counts);
    for (size_t i = 0; i < ref->params().size(); ++i) {
      double norm = 0;
      const double err = rel_l2(m->params()[i].grad.to(Device::kCpu), ref->params()[i].grad.to(Device::kCpu), &norm);
      EXPECT_LE(err, testing::kAtomicOrderRel) << ref->params()[i].name;
    }
  }
}

// train.deterministic (Backend::set_deterministic): the attention backward adds dq in a fixed order,
// so every recompute mode gives the gradients of keeping every activation bit for bit, and a repeat
// of the same micro-batch gives the same bits.
TEST_F(CudaModel, DeterministicRecomputeIsBitIdentical) {
  // Head dim 64 (the tensor-core kernels) and 200 tokens per row: several key tiles add into each
  // query tile's dq.
  config::ModelConfig cfg = tiny_config(false);
  cfg.head_dim = 64;
  cfg.max_position_embeddings = 256;
  cfg.validate("deterministic test");
  constexpr int64_t S = 200;
  std::vector<int32_t> ids(static_cast<size_t>(kB * (S + 1)));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 37 + 11) % cfg.vocab_size);
  const Tensor tokens = Tensor::from_vector<int32_t>(ids, {kB, S + 1});
  gpu_backend().set_deterministic(true);
  auto run = [&](RecomputeMode mode) {
    model::ModelOptions opts;
    opts.recompute = mode;
    auto m = std::make_unique<model::Qwen3MoeModel>(cfg, gpu_backend(), opts, 7);
    m->zero_grads();
    m->forward_backward(tokens, 1.0 / (kB * S), 0.01);
    return m;
  };
  const auto ref = run(RecomputeMode::kNone);
  for (const RecomputeMode mode : {RecomputeMode::kNone, RecomputeMode::kAttn, RecomputeMode::kMoe, RecomputeMode::kLayer}) {
    SCOPED_TRACE(fmt::format("recompute {}", option_name(mode)));
    const auto m = run(mode);
    for (size_t i = 0; i < ref->params().size(); ++i) {
      EXPECT_TRUE(testing::bit_equal(m->params()[i].grad, ref->params()[i].grad)) << ref->params()[i].name;
    }
  }
  gpu_backend().set_deterministic(false);
}

// A native checkpoint saved from the GPU model (masters and AdamW moments, through its parameter
// store, one tensor at a time) loads into the CPU model with every value bit-identical.
TEST_F(CudaModel, NativeCheckpointLoadsIntoCpuModel) {
  comm::Mesh mesh(testing::world(), 1, 1);
  const config::ModelConfig cfg = tiny_config(false);
  model::Qwen3MoeModel gpu(cfg, gpu_backend(), {}, 11);
  train::AdamW gopt(gpu, train::AdamWConfig{});
  // Distinct moments: each parameter's values scaled by 2 and by 3.
  model::ModelParamStore store(gpu, mesh,
                               {{model::kAdamWStatePrefixes[0], &gopt.exp_avg()},
                                {model::kAdamWStatePrefixes[1], &gopt.exp_avg_sq()}});
  for (size_t i = 0; i < store.num_params(); ++i) {
    Tensor host = Tensor::empty(shard::local_shape(store.param(i).spec), DType::kF32);
    store.read(i, 0, host);
    for (int slot : {1, 2}) {
      Tensor m = host.clone();
      for (float& x : std::span<float>(m.data<float>(), static_cast<size_t>(m.numel()))) x *= static_cast<float>(slot + 1);
      store.write(i, slot, m);
    }
  }
  const testing::ScratchDir tmp;
  const std::string dir = tmp.path("ckpt");
  io::save_native(store, {{"format", "moetp-native"}, {"version", 1}, {"step", 3}}, dir, quiet_save(io::HfExpertLayout::kPerExpert));

  model::Qwen3MoeModel cpu(cfg, mesh, DispatcherKind::kLocal, 99);  // other initial values, overwritten by the load
  std::vector<Tensor> m, v;
  for (const model::Param& p : cpu.params()) {
    m.push_back(Tensor::zeros(p.value.shape(), DType::kF32));
    v.push_back(Tensor::zeros(p.value.shape(), DType::kF32));
  }
  const nlohmann::json state = io::load_native(cpu, {{model::kAdamWStatePrefixes[0], &m}, {model::kAdamWStatePrefixes[1], &v}}, dir);
  EXPECT_EQ(state.at("step").get<int64_t>(), 3);
  const model::Qwen3MoeModel fresh(cfg, mesh, DispatcherKind::kLocal, 11);
  for (size_t i = 0; i < cpu.params().size(); ++i) {
    const model::Param& p = cpu.params()[i];
    const Tensor master = gpu.params()[i].value.to(Device::kCpu);
    EXPECT_TRUE(testing::bit_equal(p.value, master)) << p.name;
    EXPECT_TRUE(testing::bit_equal(p.value, fresh.params()[i].value)) << p.name << " (CPU model of the same seed)";
    EXPECT_TRUE(testing::bit_equal(m[i], gopt.exp_avg()[i].to(Device::kCpu))) << p.name << " exp_avg";
    EXPECT_TRUE(testing::bit_equal(v[i], gopt.exp_avg_sq()[i].to(Device::kCpu))) << p.name << " exp_avg_sq";
  }
}

// Picks the token batch (see the file header) after a GPU forward on each candidate.
Tensor pick_tokens(model::Qwen3MoeModel& gpu, double* margin) {
  for (uint64_t seed = 1; seed <= 256; ++seed) {
    const Tensor tokens = random_tokens(gpu.config().vocab_size, seed);
    gpu.forward(tokens);
    *margin = routing_margin(gpu);
    if (*margin >= kMinMargin) {
      std::printf("  token seed %llu: routing margin %.2e (min %.0e)\n", static_cast<unsigned long long>(seed),
                  *margin, kMinMargin);
      return tokens;
    }
  }
  return Tensor();
}

TEST_F(CudaModel, MatchesCpuModel) {
  comm::Mesh mesh(testing::world(), 1, 1);
  for (const bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied_L2" : "untied_L3");
    std::printf(" %s\n", tied ? "tied, 2 layers (0 dense)" : "untied, 3 layers (1 dense)");
    const config::ModelConfig cfg = tiny_config(tied);
    model::Qwen3MoeModel cpu(cfg, mesh, DispatcherKind::kLocal, 7);
    round_to_bf16(cpu);
    const std::unique_ptr<model::Qwen3MoeModel> gpu = from_cpu(cpu);
    double margin = 0;
    const Tensor tokens = pick_tokens(*gpu, &margin);
    ASSERT_TRUE(tokens.defined()) << "no token seed in 1..256 with a routing margin >= " << kMinMargin;
    const int64_t targets = kB * kS;
    const double ce_scale = 1.0 / static_cast<double>(targets), aux_scale = cfg.router_aux_loss_coef;

    cpu.zero_grads();
    const model::MicroStats ref = cpu.forward_backward(tokens, ce_scale, aux_scale);
    gpu->zero_grads();
    const model::MicroStats got = gpu->forward_backward(tokens, ce_scale, aux_scale);

    EXPECT_EQ(got.num_targets, ref.num_targets);
    const double ce_ref = ref.ce_sum / static_cast<double>(ref.num_targets);
    const double ce_got = got.ce_sum / static_cast<double>(got.num_targets);
    std::printf("  ce %.6f vs cpu %.6f (rel %.2e, limit %.0e); aux %.6f vs cpu %.6f (rel %.2e, limit %.0e)\n", ce_got,
                ce_ref, std::fabs(ce_got - ce_ref) / ce_ref, kCeRel, got.aux, ref.aux,
                std::fabs(got.aux - ref.aux) / ref.aux, kAuxRel);
    EXPECT_NEAR(ce_got, ce_ref, kCeRel * ce_ref) << "cross-entropy mean";
    EXPECT_GT(ref.aux, 0.0);
    EXPECT_NEAR(got.aux, ref.aux, kAuxRel * ref.aux) << "aux loss";
    EXPECT_EQ(got.expert_counts, ref.expert_counts) << "per-layer expert counts";

    std::vector<Tensor> ref_grads;
    for (const model::Param& p : cpu.params()) ref_grads.push_back(p.grad.clone());
    model::copy_grads(*gpu, cpu);  // overwrites the CPU model's gradients with the GPU's
    for (size_t i = 0; i < ref_grads.size(); ++i) {
      const model::Param& p = cpu.params()[i];
      double norm = 0;
      const double err = rel_l2(p.grad, ref_grads[i], &norm);
      std::printf("    %-45s rel L2 %.2e (|ref| %.3e)\n", p.name.c_str(), err, norm);
      EXPECT_GT(norm, 0.0) << p.name << ": reference gradient is all zeros";
      EXPECT_LE(err, kGradRel) << "gradient of " << p.name;
    }
  }
}

TEST_F(CudaModel, AdamWStepsTrackCpu) {
  comm::Mesh mesh(testing::world(), 1, 1);
  const config::ModelConfig cfg = tiny_config(false);
  model::Qwen3MoeModel cpu(cfg, mesh, DispatcherKind::kLocal, 9);
  round_to_bf16(cpu);
  const std::unique_ptr<model::Qwen3MoeModel> gpu = from_cpu(cpu);
  double margin = 0;
  const Tensor tokens = pick_tokens(*gpu, &margin);
  ASSERT_TRUE(tokens.defined());
  const double ce_scale = 1.0 / static_cast<double>(kB * kS), aux_scale = cfg.router_aux_loss_coef, lr = 3e-3;
  train::AdamWConfig acfg;
  train::AdamW opt(cpu, acfg), gopt(*gpu, acfg);
  std::vector<double> cpu_loss, gpu_loss;
  for (int64_t step = 1; step <= 4; ++step) {
    cpu.zero_grads();
    gpu->zero_grads();
    const model::MicroStats r = cpu.forward_backward(tokens, ce_scale, aux_scale);
    const model::MicroStats g = gpu->forward_backward(tokens, ce_scale, aux_scale);
    cpu_loss.push_back(r.ce_sum * ce_scale + aux_scale * r.aux);
    gpu_loss.push_back(g.ce_sum * ce_scale + aux_scale * g.aux);
    std::printf("  step %lld: loss %.6f vs cpu %.6f\n", static_cast<long long>(step), gpu_loss.back(),
                cpu_loss.back());
    EXPECT_NEAR(gpu_loss.back(), cpu_loss.back(), kAdamLossRel * cpu_loss.back()) << "step " << step;
    if (step == 4) break;  // the 4th forward measures the 3rd update
    opt.step(cpu, lr, step);
    gopt.step(*gpu, lr, step);
  }
  EXPECT_LT(cpu_loss.back(), cpu_loss.front()) << "CPU loss should fall on a repeated batch";
  EXPECT_LT(gpu_loss.back(), gpu_loss.front()) << "GPU loss should fall on a repeated batch";
}


// ---- expert parallel on 2 and 4 GPUs ----

struct Layout {
  int P, T;
  const char* dispatcher = "all2all";
};

class CudaModelDist : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    auto& w = testing::world();
    if (w.size() < 2) GTEST_SKIP() << "needs 2 or more ranks";
    const Layout l = GetParam();
    if (w.size() % (l.P * l.T) != 0) GTEST_SKIP() << "world size " << w.size() << " is no multiple of ep·etp";
    MOETP_REQUIRE_NCCL();
  }
};

// Tokens of rank q for a candidate seed (every rank can draw every rank's).
Tensor rank_tokens(int64_t V, uint64_t seed, int q) { return random_tokens(V, seed * 131 + static_cast<uint64_t>(q)); }

Tensor concat_batches(const std::vector<Tensor>& parts) {
  std::vector<int32_t> all;
  int64_t B = 0, cols = 0;
  for (const Tensor& t : parts) {
    const std::vector<int32_t> v = t.to_vector<int32_t>();
    all.insert(all.end(), v.begin(), v.end());
    B += t.size(0);
    cols = t.size(1);
  }
  return Tensor::from_vector<int32_t>(all, {B, cols});
}

void expect_grads_close(const std::vector<Tensor>& actual, const std::vector<Tensor>& expected,
                        const std::vector<model::Param>& params, const char* against) {
  for (size_t i = 0; i < params.size(); ++i) {
    double norm = 0;
    const double err = rel_l2(actual[i], expected[i], &norm);
    if (testing::world().rank() == 0) {
      std::printf("    vs %-8s %-45s rel L2 %.2e (|ref| %.3e)\n", against, params[i].name.c_str(), err, norm);
    }
    EXPECT_GT(norm, 0.0) << params[i].name << ": reference gradient is all zeros (" << against << ")";
    EXPECT_LE(err, kGradRel) << "gradient of " << params[i].name << " against " << against;
  }
}

TEST_P(CudaModelDist, MatchesCpuLayoutAndOneGpu) {
  const Layout l = GetParam();
  auto& w = testing::world();
  const int W = w.size(), r = w.rank();
  comm::NcclComm& nccl = *testing::nccl_env().comm();
  comm::Mesh cpu_mesh(w, l.P, l.T), gpu_mesh(nccl, l.P, l.T);
  std::unique_ptr<comm::Comm> self = w.split(r, 0, "self");
  comm::Mesh self_mesh(*self, 1, 1);
  const config::ModelConfig cfg = tiny_config(false);
  const DispatcherKind dispatcher = parse_option<DispatcherKind>(l.dispatcher, "dispatcher");
  model::Qwen3MoeModel cpu(cfg, cpu_mesh, dispatcher, 7);
  model::ModelOptions opts;
  opts.mesh = &gpu_mesh;
  opts.dispatcher = dispatcher;
  {
    // The seed constructor gives this rank's shards of the CPU layout's initial values, bit for bit.
    const model::Qwen3MoeModel seeded(cfg, gpu_backend(), opts, 7);
    ASSERT_EQ(seeded.params().size(), cpu.params().size());
    for (size_t i = 0; i < cpu.params().size(); ++i) {
      EXPECT_TRUE(testing::bit_equal(seeded.params()[i].value.to(Device::kCpu), cpu.params()[i].value))
          << cpu.params()[i].name << " on rank " << r;
    }
  }
  round_to_bf16(cpu);
  model::Qwen3MoeModel cpu_one(cfg, self_mesh, DispatcherKind::kLocal, 7);
  round_to_bf16(cpu_one);
  const std::unique_ptr<model::Qwen3MoeModel> gpu = from_cpu(cpu, opts);
  const std::unique_ptr<model::Qwen3MoeModel> one = from_cpu(cpu_one);

  // Each rank searches its own token seed: its routing margin depends on its own sequences only
  // (attention is per sequence, routing per token), so a rank keeps a seed once it passes while
  // the others go on; the forward is collective, so all ranks step together until all pass.
  uint64_t mine = 1;
  for (int round = 0; round < 256; ++round) {
    gpu->forward(rank_tokens(cfg.vocab_size, mine, r));
    const bool ok = routing_margin(*gpu) >= kMinMargin;
    const int64_t failing = w.all_reduce_scalar(int64_t{ok ? 0 : 1}, comm::ReduceOp::kSum);
    if (failing == 0) break;
    if (!ok) ++mine;
  }
  const double worst = -w.all_reduce_scalar(-routing_margin(*gpu), comm::ReduceOp::kMax);
  ASSERT_GE(worst, kMinMargin) << "no token seeds (256 tries per rank) with a routing margin >= " << kMinMargin;
  const std::vector<int64_t> all_seeds = w.all_gather_scalar(static_cast<int64_t>(mine));
  const Tensor tokens = rank_tokens(cfg.vocab_size, mine, r);
  std::vector<Tensor> parts;
  for (int q = 0; q < W; ++q) parts.push_back(rank_tokens(cfg.vocab_size, static_cast<uint64_t>(all_seeds[q]), q));
  const Tensor all_tokens = concat_batches(parts);
  const uint64_t seed = mine;
  const int64_t global_targets = kB * kS * W;
  const double ce_scale = 1.0 / static_cast<double>(global_targets), aux_scale = cfg.router_aux_loss_coef;

  cpu.zero_grads();
  const model::MicroStats ref = cpu.forward_backward(tokens, ce_scale, aux_scale);
  train::reduce_grads(cpu);
  const double ref_norm = train::global_grad_norm(cpu);
  gpu->zero_grads();
  const model::MicroStats got = gpu->forward_backward(tokens, ce_scale, aux_scale);
  train::reduce_grads(*gpu);
  const double got_norm = train::global_grad_norm(*gpu);
  one->zero_grads();
  const model::MicroStats ref1 = one->forward_backward(all_tokens, ce_scale, aux_scale);

  const double ce_ref = w.all_reduce_scalar(ref.ce_sum, comm::ReduceOp::kSum) * ce_scale;
  const double ce_got = w.all_reduce_scalar(got.ce_sum, comm::ReduceOp::kSum) * ce_scale;
  const double ce_one = ref1.ce_sum * ce_scale;
  if (r == 0) {
    std::printf("  %s ep %d x etp %d (W %d), token seed %llu: ce %.6f vs cpu layout %.6f vs one GPU %.6f; aux %.6f vs %.6f "
                "vs %.6f; grad norm %.6f vs cpu layout %.6f\n",
                l.dispatcher, l.P, l.T, W, static_cast<unsigned long long>(seed), ce_got, ce_ref, ce_one, got.aux, ref.aux, ref1.aux,
                got_norm, ref_norm);
  }
  EXPECT_NEAR(ce_got, ce_ref, kCeRel * ce_ref) << "cross-entropy mean vs the CPU layout";
  EXPECT_NEAR(ce_got, ce_one, kCeRel * ce_one) << "cross-entropy mean vs one GPU";
  EXPECT_NEAR(got.aux, ref.aux, kAuxRel * ref.aux) << "aux loss vs the CPU layout";
  EXPECT_NEAR(got.aux, ref1.aux, kAuxRel * ref1.aux) << "aux loss vs one GPU";
  EXPECT_EQ(got.expert_counts, ref.expert_counts) << "per-layer expert counts vs the CPU layout";
  EXPECT_EQ(got.expert_counts, ref1.expert_counts) << "per-layer expert counts vs one GPU";
  EXPECT_NEAR(got_norm, ref_norm, 2e-2 * ref_norm) << "global gradient norm";

  // Against the CPU layout: this rank's reduced gradients.
  std::vector<Tensor> cpu_grads, gpu_grads, one_grads;
  for (const model::Param& p : cpu.params()) cpu_grads.push_back(p.grad.clone());
  model::copy_grads(*gpu, cpu);
  for (const model::Param& p : cpu.params()) gpu_grads.push_back(p.grad.clone());
  expect_grads_close(gpu_grads, cpu_grads, cpu.params(), "cpu");
  // Against one GPU: replicated gradients whole, expert gradients this rank's slice.
  model::copy_grads(*one, cpu_one);
  for (size_t i = 0; i < cpu.params().size(); ++i) {
    const model::Param& p = cpu.params()[i];
    one_grads.push_back(p.kind == model::ParamKind::kExpert ? shard::extract_local(cpu_one.params()[i].grad, p.spec)
                                                            : cpu_one.params()[i].grad.clone());
  }
  expect_grads_close(gpu_grads, one_grads, cpu.params(), "one GPU");

  // Three AdamW steps on the same batch: GPU layout vs CPU layout.
  train::AdamWConfig acfg;
  train::AdamW opt(cpu, acfg), gopt(*gpu, acfg);
  const double lr = 3e-3;
  std::vector<double> cpu_loss, gpu_loss;
  for (int64_t step = 1; step <= 4; ++step) {
    cpu.zero_grads();
    gpu->zero_grads();
    const model::MicroStats a = cpu.forward_backward(tokens, ce_scale, aux_scale);
    const model::MicroStats b = gpu->forward_backward(tokens, ce_scale, aux_scale);
    cpu_loss.push_back(w.all_reduce_scalar(a.ce_sum, comm::ReduceOp::kSum) * ce_scale + aux_scale * a.aux);
    gpu_loss.push_back(w.all_reduce_scalar(b.ce_sum, comm::ReduceOp::kSum) * ce_scale + aux_scale * b.aux);
    if (r == 0) {
      std::printf("    step %lld: loss %.6f vs cpu layout %.6f\n", static_cast<long long>(step), gpu_loss.back(),
                  cpu_loss.back());
    }
    EXPECT_NEAR(gpu_loss.back(), cpu_loss.back(), kAdamLossRel * cpu_loss.back()) << "step " << step;
    if (step == 4) break;
    train::reduce_grads(cpu);
    train::reduce_grads(*gpu);
    opt.step(cpu, lr, step);
    gopt.step(*gpu, lr, step);
  }
  EXPECT_LT(gpu_loss.back(), gpu_loss.front()) << "GPU loss should fall on a repeated batch";
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaModelDist,
                         ::testing::Values(Layout{1, 1}, Layout{2, 1}, Layout{1, 2}, Layout{4, 1}, Layout{2, 2},
                                           Layout{1, 4}, Layout{1, 2, "vexpert"}, Layout{2, 2, "vexpert"}),
                         [](const auto& info) {
                           return fmt::format("ep{}_etp{}_{}", info.param.P, info.param.T, info.param.dispatcher);
                         });

}  // namespace
}  // namespace moetp
