// The trainer on dataset folders (data/source.h): packed rows with loss masks at every rank count
// reproduce the single rank; the loss is the mean over the loss-carrying targets of the global
// batch, so micro-batching does not change it; the validation loss is the same at every layout;
// a resumed run continues the exact data order bit for bit; and a checkpoint refuses a dataset
// whose manifest changed.
//
// Data: documents of random length (2 .. 40 tokens) and random ids in vocab 64, with random 0/1
// loss masks, written by each rank to a folder all ranks agree on (rank 0 writes, the others wait).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "config/train_config.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "dist/mpi_env.h"
#include "testing.h"
#include "train/trainer.h"

namespace moetp {
namespace {

namespace fs = std::filesystem;
using testing::world;

config::ModelConfig tiny_model(double aux_coef) {
  nlohmann::json j = {{"vocab_size", 64},         {"hidden_size", 32},          {"intermediate_size", 48},
                      {"moe_intermediate_size", 16}, {"num_hidden_layers", 2},   {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},  {"head_dim", 8},              {"num_experts", 8},
                      {"num_experts_per_tok", 2},  {"norm_topk_prob", true},     {"mlp_only_layers", {1}},
                      {"router_aux_loss_coef", aux_coef}, {"max_position_embeddings", 64}};
  return config::ModelConfig::from_json(j, "tiny test model");
}

// A folder every rank agrees on (rank 0's pid), removed at the end of the test.
class SharedDir {
 public:
  explicit SharedDir(const std::string& tag) {
    auto& w = world();
    Tensor stamp = Tensor::from_vector<int64_t>({static_cast<int64_t>(::getpid())}, {1});
    w.broadcast(stamp, 0);
    dir_ = fmt::format("{}/moetp_data_{}_{}", fs::temp_directory_path().string(), tag, stamp.data<int64_t>()[0]);
    if (w.rank() == 0) {
      fs::remove_all(dir_);
      fs::create_directories(dir_);
    }
    w.barrier();
  }
  ~SharedDir() {
    world().barrier();
    if (world().rank() == 0) fs::remove_all(dir_);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
};

// Rank 0 writes a dataset of `docs` documents (seeded), with a validation split of every 5th.
std::string write_dataset(const SharedDir& dir, const std::string& name, int docs, uint64_t seed) {
  const std::string path = dir.path(name);
  if (world().rank() == 0) {
    const CounterRng rng(seed, 91);
    data::DatasetWriter w(path, {.vocab_size = 64, .loss_mask = true});
    uint64_t k = 0;
    for (int d = 0; d < docs; ++d) {
      const auto len = static_cast<size_t>(2 + rng.uniform(k++) * 39);
      std::vector<uint32_t> ids(len);
      std::vector<uint8_t> mask(len);
      for (size_t i = 0; i < len; ++i) {
        ids[i] = static_cast<uint32_t>(rng.uniform(k++) * 64);
        mask[i] = rng.uniform(k++) < 0.7f ? 1 : 0;
      }
      w.add(d % 5 == 4 ? data::kValidSplit : data::kTrainSplit, ids, mask);
    }
    w.finish({});
  }
  world().barrier();
  return path;
}

config::TrainConfig train_config(int ep, int micro, const std::string& data, const std::string& valid = "") {
  config::TrainConfig c;
  c.parallel.ep = ep;
  c.parallel.etp = 1;
  c.moe.dispatcher = ep == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all;
  c.train.steps = 10;
  c.train.global_batch_size = 8;
  c.train.seq_len = 16;
  c.train.micro_batches = micro;
  c.optim.warmup_steps = 2;
  c.train.device = DeviceChoice::kCpu;
  c.data.path = data;
  c.data.valid = valid;
  return c;
}

std::unique_ptr<train::Trainer> make(const config::TrainConfig& c, const config::ModelConfig& m, comm::Comm& w) {
  data::DataOptions o;
  o.path = c.data.path;
  o.seq_len = c.train.seq_len;
  o.global_batch_size = c.train.global_batch_size;
  o.seed = static_cast<uint64_t>(c.train.seed);
  o.overlong = c.data.overlong;
  return std::make_unique<train::Trainer>(c, m, w, data::open_train_data(o));
}

std::vector<train::StepResult> run(train::Trainer& t, int steps) {
  std::vector<train::StepResult> out;
  for (int i = 0; i < steps; ++i) out.push_back(t.step());
  return out;
}

int expert_parallel(int world_size) { return world_size == 1 || world_size == 2 || world_size == 4 ? world_size : 0; }

TEST(TrainerDataset, PackedRowsAtEveryRankCountReproduceTheSingleRank) {
  auto& w = world();
  const int ep = expert_parallel(w.size());
  if (ep == 0) GTEST_SKIP() << "ep = world size for 1, 2 or 4 ranks";
  SharedDir dir("layouts");
  const std::string ds = write_dataset(dir, "ds", 200, 3);
  const config::ModelConfig m = tiny_model(0.01);
  auto self = w.split(w.rank(), 0, "self");
  const auto ref = run(*make(train_config(1, 1, ds), m, *self), 3);
  const auto got = run(*make(train_config(ep, 1, ds), m, w), 3);
  for (size_t s = 0; s < got.size(); ++s) {
    EXPECT_NEAR(got[s].loss, ref[s].loss, 1e-5 * ref[s].loss) << "step " << s + 1;
    EXPECT_NEAR(got[s].grad_norm, ref[s].grad_norm, 1e-4 * ref[s].grad_norm) << "step " << s + 1;
    EXPECT_EQ(got[s].loss_tokens, ref[s].loss_tokens);
    EXPECT_EQ(got[s].padding, ref[s].padding);
    EXPECT_GT(got[s].loss_tokens, 0);
    EXPECT_LT(got[s].loss_tokens, 8 * 16);  // masks and padding leave some targets without loss
  }
}

// The loss divides by the loss-carrying targets of the whole global batch, not per micro-batch
// (whose counts differ with the masks): with the aux loss off, 2 micro-batches give the loss and
// gradients of one batch.
TEST(TrainerDataset, MicroBatchesDoNotChangeTheLossMean) {
  auto& w = world();
  const int ep = expert_parallel(w.size());
  if (ep == 0 || w.size() > 4) GTEST_SKIP() << "ep = world size for 1, 2 or 4 ranks";
  SharedDir dir("micro");
  const std::string ds = write_dataset(dir, "ds", 200, 4);
  const config::ModelConfig m = tiny_model(0.0);
  const auto one = run(*make(train_config(ep, 1, ds), m, w), 2);
  const auto two = run(*make(train_config(ep, 2, ds), m, w), 2);
  for (size_t s = 0; s < one.size(); ++s) {
    EXPECT_NEAR(two[s].loss, one[s].loss, 1e-6 * one[s].loss) << "step " << s + 1;
    EXPECT_NEAR(two[s].grad_norm, one[s].grad_norm, 1e-5 * one[s].grad_norm) << "step " << s + 1;
  }
}

TEST(TrainerDataset, ValidationLossIsTheSameAtEveryLayout) {
  auto& w = world();
  const int ep = expert_parallel(w.size());
  if (ep == 0) GTEST_SKIP() << "ep = world size for 1, 2 or 4 ranks";
  SharedDir dir("eval");
  const std::string ds = write_dataset(dir, "ds", 200, 5);
  const config::ModelConfig m = tiny_model(0.01);
  auto self = w.split(w.rank(), 0, "self");
  config::TrainConfig rc = train_config(1, 1, ds, ds), gc = train_config(ep, 2, ds, ds);
  rc.data.overlong = gc.data.overlong = OverlongChoice::kSplit;  // every target of the split is evaluated
  auto ref_t = make(rc, m, *self);
  auto got_t = make(gc, m, w);
  ASSERT_TRUE(got_t->has_validation());
  EXPECT_EQ(got_t->validation_data()->split(), data::kValidSplit);
  const train::EvalResult ref = ref_t->evaluate(), got = got_t->evaluate();
  EXPECT_NEAR(got.ce_loss, ref.ce_loss, 1e-5 * ref.ce_loss);
  EXPECT_EQ(got.loss_tokens, ref.loss_tokens);
  // Every token but each document's first is a target once; the mask decides which carry loss.
  const data::Dataset d = data::Dataset::open(ds);
  int64_t expect = 0;
  for (int64_t i = 0; i < d.split(data::kValidSplit).num_documents(); ++i) {
    const data::DocumentView doc = d.split(data::kValidSplit).document(i);
    for (size_t t = 1; t < doc.mask.size(); ++t) expect += doc.mask[t];
  }
  EXPECT_EQ(got.loss_tokens, expect);
  EXPECT_GT(got.ce_loss, 3.0);  // about ln 64 = 4.16 before training
  EXPECT_LT(got.ce_loss, 5.5);
}

TEST(TrainerDataset, ResumeContinuesTheDataOrderAndRefusesOtherData) {
  auto& w = world();
  const int ep = expert_parallel(w.size());
  if (ep == 0) GTEST_SKIP() << "ep = world size for 1, 2 or 4 ranks";
  SharedDir dir("resume");
  const std::string ds = write_dataset(dir, "ds", 30, 6);
  const std::string other = write_dataset(dir, "other", 30, 7);
  const config::ModelConfig m = tiny_model(0.01);
  const config::TrainConfig c = train_config(ep, 1, ds);
  // 24 training documents of 2 to 40 tokens: a few steps per epoch, so 12 steps cross epochs.
  const auto straight = run(*make(c, m, w), 12);
  {
    auto t = make(c, m, w);
    run(*t, 7);
    t->save_checkpoint(dir.path("ckpt"));
  }
  auto resumed = make(c, m, w);
  resumed->load_checkpoint(dir.path("ckpt"));
  ASSERT_EQ(resumed->current_step(), 7);
  const auto rest = run(*resumed, 5);
  EXPECT_GT(straight.back().epoch, 0) << "the run should cross an epoch boundary";
  for (size_t s = 0; s < rest.size(); ++s) {
    EXPECT_EQ(rest[s].loss, straight[7 + s].loss) << "step " << 8 + s;
    EXPECT_EQ(rest[s].epoch, straight[7 + s].epoch);
  }
  auto wrong = make(train_config(ep, 1, other), m, w);
  testing::expect_error([&] { wrong->load_checkpoint(dir.path("ckpt")); }, {"trained on other data", "manifest"});
  config::TrainConfig longer = c;
  longer.train.seq_len = 32;
  auto changed = make(longer, m, w);
  testing::expect_error([&] { changed->load_checkpoint(dir.path("ckpt")); }, {"train.seq_len = 16", "has 32"});
}

TEST(TrainerDataset, ErrorsNameTheValues) {
  auto& w = world();
  if (w.size() != 1) GTEST_SKIP() << "one rank is enough";
  SharedDir dir("errors");
  const std::string ds = write_dataset(dir, "ds", 40, 8);
  config::ModelConfig small = tiny_model(0.01);
  small.vocab_size = 32;
  testing::expect_error([&] { make(train_config(1, 1, ds), small, w); }, {"vocabulary size 64", "vocab_size is 32"});
  testing::expect_error([&] { make(train_config(1, 1, dir.path("none")), tiny_model(0.01), w); }, {"none"});
  config::TrainConfig no_valid = train_config(1, 1, ds);
  no_valid.train.eval_every = 5;
  testing::expect_error([&] { make(no_valid, tiny_model(0.01), w); }, {"train.eval_every = 5", "data.valid"});
  // A bad field of a checkpoint's trainer_state.json is named with its file.
  const std::string ckpt = dir.path("ckpt");
  make(train_config(1, 1, ds), tiny_model(0.01), w)->save_checkpoint(ckpt);
  const std::string state_path = ckpt + "/trainer_state.json";
  nlohmann::json state = nlohmann::json::parse(std::ifstream(state_path));
  state["step"] = "abc";
  std::ofstream(state_path) << state.dump();
  testing::expect_error([&] { make(train_config(1, 1, ds), tiny_model(0.01), w)->load_checkpoint(ckpt); },
                        {state_path, "field 'step' must be an integer", "\"abc\""});
  state.erase("step");
  std::ofstream(state_path) << state.dump();
  testing::expect_error([&] { make(train_config(1, 1, ds), tiny_model(0.01), w)->load_checkpoint(ckpt); },
                        {state_path, "field 'step' is missing"});
}

}  // namespace
}  // namespace moetp
