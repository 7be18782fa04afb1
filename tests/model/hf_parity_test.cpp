// Parity with Hugging Face transformers (5.17) on a fixture made by tools/make_hf_fixture.py on a
// GPU host (see docs/hf_parity.md): a random 3-layer Qwen3-MoE (layer 1 dense, 8 experts, top-2)
// saved with save_pretrained, plus transformers' logits, loss, aux loss and gradients for a fixed
// input. moetp loads the checkpoint and must reproduce them on one rank and at (D, P, T) =
// (1, 2, 2). At 4 ranks every rank feeds the same two sequences and the cross-entropy is scaled by
// 1 / (W · targets), which leaves the mean loss, the aux loss and the reduced gradients unchanged.
#include <gtest/gtest.h>

#include "comm/mesh.h"
#include "dist/mpi_env.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "testing.h"
#include "train/optim.h"

namespace moetp {
namespace {

using testing::world;

const std::string kDir = MOETP_HF_FIXTURE_DIR;

// max |a - b| / max |b| over the tensor.
double normwise_error(const Tensor& a, const Tensor& b) {
  const std::vector<float> x = a.contiguous().to_vector<float>(), y = b.contiguous().to_vector<float>();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(x[i]) - y[i]));
    den = std::max(den, std::fabs(static_cast<double>(y[i])));
  }
  return num / den;
}

void check_parity(int ep, int etp) {
  auto& w = world();
  const io::SafetensorsFile fx = io::SafetensorsFile::open(kDir + "/fixture.safetensors");
  const config::ModelConfig cfg = config::ModelConfig::load(kDir + "/model/config.json");
  comm::Mesh mesh(w, ep, etp);
  model::Qwen3MoeModel m(cfg, mesh, ep * etp == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 1);
  io::load_hf(m, kDir + "/model");
  const Tensor ids = fx.read("input_ids");  // (2, 17) i32
  const int64_t targets = ids.size(0) * (ids.size(1) - 1);

  Tensor logits;
  const model::MicroStats fwd = m.forward(ids, &logits);
  const Tensor ref_logits = fx.read("logits").view({-1, cfg.vocab_size});
  const double logit_err = normwise_error(logits, ref_logits);
  EXPECT_LE(logit_err, 1e-4) << "logits";
  if (w.rank() == 0) std::printf("  logits: normwise error %.3g\n", logit_err);
  EXPECT_TRUE(testing::close(logits, ref_logits, {1e-4, 1e-6, 0.1})) << "logits";
  const double ce = fwd.ce_sum / static_cast<double>(targets);
  const double ref_ce = fx.read("ce_loss").to_vector<float>()[0];
  const double ref_aux = fx.read("aux_loss").to_vector<float>()[0];
  const double ref_loss = fx.read("loss").to_vector<float>()[0];
  EXPECT_NEAR(ce, ref_ce, 1e-5 * ref_ce) << "cross-entropy";
  EXPECT_NEAR(fwd.aux, ref_aux, 1e-5 * ref_aux) << "aux loss";
  EXPECT_NEAR(ce + cfg.router_aux_loss_coef * fwd.aux, ref_loss, 1e-5 * ref_loss) << "loss";
  if (w.rank() == 0) {
    std::printf("  ce %.8f vs %.8f, aux %.8f vs %.8f\n", ce, ref_ce, fwd.aux, ref_aux);
  }

  m.zero_grads();
  m.forward_backward(ids, 1.0 / static_cast<double>(targets * w.size()), cfg.router_aux_loss_coef);
  train::reduce_grads(m);
  int checked = 0;
  for (const io::TensorInfo& info : fx.tensors()) {
    if (!info.name.starts_with("grad.")) continue;
    std::string name = info.name.substr(5);
    // transformers keeps the routed experts stacked in memory: gate_up_proj [E, 2I, H] is our w13
    // [E·2I, H]; down_proj [E, H, I] is our w2 [E·H, I].
    if (name.ends_with("experts.gate_up_proj")) name = name.substr(0, name.size() - 12) + "w13";
    if (name.ends_with("experts.down_proj")) name = name.substr(0, name.size() - 9) + "w2";
    model::Param& p = m.param(name);
    Tensor g = p.grad;
    if (p.kind == model::ParamKind::kExpert) g = shard::gather_full(p.grad, p.spec, mesh.ep_etp());
    const Tensor ref = fx.read(info.name).view(g.shape());
    const double err = normwise_error(g, ref);
    EXPECT_LE(err, 1e-4) << "gradient of " << info.name;
    if (w.rank() == 0) std::printf("  %s: normwise error %.3g\n", info.name.c_str(), err);
    EXPECT_TRUE(testing::close(g, ref, {1e-4, 1e-6, 0.1})) << "gradient of " << info.name;
    ++checked;
  }
  EXPECT_EQ(checked, 8);
}

TEST(HfParity, SingleRankReproducesTransformers) {
  if (world().size() != 1) GTEST_SKIP() << "single-rank case";
  check_parity(1, 1);
}

TEST(HfParity, Ep2Etp2ReproducesTransformers) {
  if (world().size() != 4) GTEST_SKIP() << "needs 4 ranks for (1, 2, 2)";
  check_parity(2, 2);
}

}  // namespace
}  // namespace moetp
