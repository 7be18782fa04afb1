// Packed documents through the whole CPU model (model::Batch with document offsets): the logits and
// losses of every document equal those of the document run alone (positions restart per document,
// attention stays inside it), and the packing matters (the same tokens as one document give other
// logits for the later documents). Runs under mpirun -np 1 (the CPU model needs a one-rank mesh).
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "model/model.h"
#include "testing.h"

namespace moetp {
namespace {

config::ModelConfig tiny() {
  config::ModelConfig c;
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.moe_intermediate_size = 16;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.mlp_only_layers = {1};
  c.max_position_embeddings = 64;
  c.validate("packed_test");
  return c;
}

// `tokens` (N + 1 ids) as rows of S with the given documents (positions restart at each).
model::Batch packed(const std::vector<int32_t>& tokens, int64_t B, int64_t S, std::vector<int64_t> docs) {
  const int64_t N = B * S;
  model::Batch b;
  b.rows = B;
  b.seq_len = S;
  b.inputs = Tensor::from_vector<int32_t>(std::vector<int32_t>(tokens.begin(), tokens.begin() + N), {N});
  b.targets = Tensor::from_vector<int32_t>(std::vector<int32_t>(tokens.begin() + 1, tokens.begin() + N + 1), {N});
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (size_t d = 0; d + 1 < docs.size(); ++d) {
    for (int64_t t = docs[d]; t < docs[d + 1]; ++t) pos[static_cast<size_t>(t)] = static_cast<int32_t>(t - docs[d]);
  }
  b.positions = Tensor::from_vector<int32_t>(pos, {N});
  b.doc_offsets = std::move(docs);
  return b;
}

TEST(PackedDocuments, EachDocumentAsIfAlone) {
  comm::Mesh mesh(testing::world(), 1, 1);
  const config::ModelConfig cfg = tiny();
  model::Qwen3MoeModel m(cfg, mesh, DispatcherKind::kAll2all, 5);
  const int64_t B = 2, S = 12, N = B * S;
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(cfg.vocab_size - 1));
  std::vector<int32_t> tokens(static_cast<size_t>(N + 1));
  for (int32_t& t : tokens) t = pick(rng);
  // The third document continues from row 0 into row 1.
  const std::vector<int64_t> docs = {0, 5, 9, 17, N};
  Tensor logits;
  const model::MicroStats all = m.forward(packed(tokens, B, S, docs), &logits);
  double ce_alone = 0;
  for (size_t d = 0; d + 1 < docs.size(); ++d) {
    const int64_t t0 = docs[d], L = docs[d + 1] - t0;
    SCOPED_TRACE(::testing::Message() << "document " << d << " [" << t0 << ", " << docs[d + 1] << ")");
    const std::vector<int32_t> mine(tokens.begin() + t0, tokens.begin() + t0 + L + 1);
    Tensor alone;
    ce_alone += m.forward(packed(mine, 1, L, {0, L}), &alone).ce_sum;
    // The same math over other row counts: GEMM blocking rounds differently.
    EXPECT_TRUE(testing::close(logits.slice(0, t0, t0 + L).contiguous(), alone, testing::kF32Parallel));
  }
  EXPECT_NEAR(all.ce_sum, ce_alone, 1e-5 * ce_alone);
  // Unpacked (one document per row), the later documents see the earlier tokens of their row.
  Tensor rows;
  m.forward(packed(tokens, B, S, {0, S, N}), &rows);
  EXPECT_TRUE(testing::close(rows.slice(0, 0, 5).contiguous(), logits.slice(0, 0, 5).contiguous(), testing::kF32Parallel));
  EXPECT_FALSE(testing::close(rows.slice(0, 5, 9).contiguous(), logits.slice(0, 5, 9).contiguous(),
                              testing::Tolerance{1e-3, 1e-3}));
}

// The backward of a packed batch equals the sum of each document's backward alone (the aux loss,
// a statistic of the whole batch's routing, is left out: aux_scale 0), and padding positions
// (kIgnoreIndex targets, a document of their own) add nothing.
TEST(PackedDocuments, GradientsEqualEachDocumentAlone) {
  comm::Mesh mesh(testing::world(), 1, 1);
  const config::ModelConfig cfg = tiny();
  model::Qwen3MoeModel m(cfg, mesh, DispatcherKind::kAll2all, 7);
  const int64_t B = 2, S = 12, N = B * S;
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(cfg.vocab_size - 1));
  std::vector<int32_t> tokens(static_cast<size_t>(N + 1));
  for (int32_t& t : tokens) t = pick(rng);
  // Documents [0, 5), [5, 9), [9, 17) across the rows, then 7 padding positions.
  const std::vector<int64_t> docs = {0, 5, 9, 17, N};
  model::Batch batch = packed(tokens, B, S, docs);
  for (int64_t t = 17; t < N; ++t) batch.targets.data<int32_t>()[t] = model::kIgnoreIndex;
  const size_t P = m.num_params();
  m.zero_grads();
  const model::MicroStats all = m.forward_backward(batch, 1.0, 0.0);
  const Tensor packed_grads = m.grad_span(0, P).clone();
  m.zero_grads();
  double ce_alone = 0;
  for (size_t d = 0; d + 2 < docs.size(); ++d) {  // the last "document" is the padding
    const int64_t t0 = docs[d], L = docs[d + 1] - t0;
    const std::vector<int32_t> mine(tokens.begin() + t0, tokens.begin() + t0 + L + 1);
    ce_alone += m.forward_backward(packed(mine, 1, L, {0, L}), 1.0, 0.0).ce_sum;  // gradients accumulate
  }
  EXPECT_NEAR(all.ce_sum, ce_alone, 1e-5 * ce_alone);
  EXPECT_EQ(all.num_targets, 17);
  EXPECT_TRUE(testing::close(packed_grads, m.grad_span(0, P), testing::kF32Parallel));
}

}  // namespace
}  // namespace moetp
