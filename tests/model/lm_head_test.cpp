// The LM head and loss in chunks of rows on the CPU (ModelOptions::logit_chunk_rows) against the
// whole (N, V) logits at once, on a tiny Qwen3-MoE model with 400 tokens: chunks that are multiples
// of cpu::kGemmBlock give the same logits, cross-entropy sum, aux loss and every gradient bit for
// bit except the LM head's weight gradient (its sum over rows is split by chunk: within kF32Sum);
// a chunk size that is no multiple still agrees within tolerance. A negative chunk size is refused.
// Runs under mpirun -np 1 (the CPU model needs a one-rank mesh).
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "kernels/cpu/gemm.h"
#include "model/model.h"
#include "testing.h"

namespace moetp {
namespace {

config::ModelConfig config_with_vocab(int64_t vocab) {
  config::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 48;
  c.intermediate_size = 64;
  c.moe_intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 12;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.mlp_only_layers = {1};
  c.router_aux_loss_coef = 0.01;
  c.max_position_embeddings = 256;
  c.validate("lm_head_test");
  return c;
}

Tensor tokens(int64_t B, int64_t S, int64_t V) {
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(V - 1));
  std::vector<int32_t> v(static_cast<size_t>(B * (S + 1)));
  for (int32_t& t : v) t = pick(rng);
  return Tensor::from_vector<int32_t>(v, {B, S + 1});
}

struct Result {
  model::MicroStats stats;
  Tensor logits;
  std::vector<Tensor> grads;  // in parameter order
};

Result run(const config::ModelConfig& cfg, const comm::Mesh& mesh, int64_t chunk_rows, const Tensor& tok) {
  model::ModelOptions opts;
  opts.mesh = &mesh;
  opts.logit_chunk_rows = chunk_rows;
  model::Qwen3MoeModel m(cfg, backend::get(Device::kCpu), opts, 11);
  Result r;
  m.forward(tok, &r.logits);
  m.zero_grads();
  r.stats = m.forward_backward(tok, 1.0 / 400.0, 0.01);
  for (const model::Param& p : m.params()) r.grads.push_back(p.grad.clone());
  return r;
}

TEST(CpuLmHead, AlignedChunksAreBitIdenticalToTheWholeLogits) {
  MOETP_REQUIRE_WORLD_SIZE(1);
  comm::Mesh mesh(testing::world(), 1, 1);
  const config::ModelConfig cfg = config_with_vocab(300);
  const Tensor tok = tokens(2, 200, cfg.vocab_size);
  const Result whole = run(cfg, mesh, 400, tok);
  const model::Qwen3MoeModel names(cfg, mesh, DispatcherKind::kAll2all, 11);
  for (const int64_t chunk : {cpu::kGemmBlock, 2 * cpu::kGemmBlock, int64_t{100}}) {
    SCOPED_TRACE(::testing::Message() << "chunks of " << chunk << " rows");
    const bool aligned = chunk % cpu::kGemmBlock == 0;
    const Result c = run(cfg, mesh, chunk, tok);
    if (aligned) {
      EXPECT_TRUE(testing::bit_equal(c.logits, whole.logits)) << "logits";
      EXPECT_EQ(c.stats.ce_sum, whole.stats.ce_sum) << "cross-entropy sum";
      EXPECT_EQ(c.stats.aux, whole.stats.aux) << "aux loss";
    } else {
      EXPECT_TRUE(testing::close(c.logits, whole.logits, testing::kF32Sum)) << "logits";
      EXPECT_NEAR(c.stats.ce_sum, whole.stats.ce_sum, 1e-9 * whole.stats.ce_sum) << "cross-entropy sum";
    }
    EXPECT_EQ(c.stats.num_targets, 400);
    ASSERT_EQ(c.grads.size(), whole.grads.size());
    for (size_t i = 0; i < c.grads.size(); ++i) {
      const std::string& name = names.param_desc(i).name;
      if (aligned && name != "lm_head.weight") {
        EXPECT_TRUE(testing::bit_equal(c.grads[i], whole.grads[i])) << name;
      } else {
        EXPECT_TRUE(testing::close(c.grads[i], whole.grads[i], testing::kF32Sum)) << name;
      }
    }
  }
}

TEST(CpuLmHead, NegativeChunkSizeIsRefused) {
  MOETP_REQUIRE_WORLD_SIZE(1);
  comm::Mesh mesh(testing::world(), 1, 1);
  const config::ModelConfig cfg = config_with_vocab(64);
  model::ModelOptions opts;
  opts.mesh = &mesh;
  opts.logit_chunk_rows = -5;
  model::Qwen3MoeModel m(cfg, backend::get(Device::kCpu), opts, 11);
  testing::expect_error([&] { m.forward(tokens(1, 8, cfg.vocab_size)); }, {"logit_chunk_rows (-5)"});
}

}  // namespace
}  // namespace moetp
