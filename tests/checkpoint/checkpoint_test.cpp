// Checkpoints in global coordinates: HF and native save -> load is bit-exact between every pair
// of layouts (saved by a sub-group of the job at one layout, loaded by a sub-group at another), resume
// continues the exact loss curve, and bad checkpoints give errors naming the file and tensor.
//
// Model: 2 layers (layer 0 MoE: 8 experts top-2; layer 1 dense), vocab 64, hidden 32, I = 16.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "core/bf16.h"
#include "core/rng.h"
#include "dist/mpi_env.h"
#include "testing.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "train/trainer.h"

namespace moetp {
namespace {

// Save options without progress output.
io::SaveOptions quiet_save(io::HfExpertLayout layout) {
  io::SaveOptions o;
  o.expert_layout = layout;
  o.show_progress = false;
  return o;
}

namespace fs = std::filesystem;
using testing::world;

config::ModelConfig tiny_model() {
  nlohmann::json j = {{"vocab_size", 64},         {"hidden_size", 32},          {"intermediate_size", 48},
                      {"moe_intermediate_size", 16}, {"num_hidden_layers", 2},   {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},  {"head_dim", 8},              {"num_experts", 8},
                      {"num_experts_per_tok", 2},  {"norm_topk_prob", true},     {"mlp_only_layers", {1}},
                      {"router_aux_loss_coef", 0.01}, {"max_position_embeddings", 64}};
  return config::ModelConfig::from_json(j, "tiny test model");
}

struct Layout {
  int D, P, T;
  int W() const { return D * P * T; }
  std::string str() const { return fmt::format("D{}P{}T{}", D, P, T); }
};
const Layout kLayouts[] = {{1, 1, 1}, {1, 2, 1}, {1, 1, 2}, {1, 2, 2}, {2, 2, 2}};

// A directory every rank agrees on (rank 0 picks it).
std::string shared_dir(const std::string& tag) {
  auto& w = world();
  Tensor stamp = Tensor::from_vector<int64_t>({static_cast<int64_t>(::getpid())}, {1});
  w.broadcast(stamp, 0);
  const std::string dir = fmt::format("{}/moetp_ckpt_{}_{}", fs::temp_directory_path().string(), tag,
                                      stamp.data<int64_t>()[0]);
  w.barrier();
  return dir;
}

bool all_params_equal(const model::Qwen3MoeModel& a, const model::Qwen3MoeModel& b) {
  for (size_t i = 0; i < a.params().size(); ++i) {
    if (!testing::bit_equal(a.params()[i].value, b.params()[i].value)) {
      ADD_FAILURE() << "parameter " << a.params()[i].name << " differs";
      return false;
    }
  }
  return true;
}

void save_load_roundtrip(bool native) {
  auto& w = world();
  const config::ModelConfig cfg = tiny_model();
  int pairs = 0;
  for (const Layout& src : kLayouts) {
    if (src.W() > w.size()) continue;
    const std::string dir = shared_dir(native ? "native" : "hf") + "_" + src.str();
    // Ranks [0, W_src) save at the source layout with seed 7.
    auto group = w.split(w.rank() < src.W() ? 1 : 0, w.rank(), "saver");
    if (w.rank() < src.W()) {
      comm::Mesh mesh(*group, src.P, src.T);
      model::Qwen3MoeModel m(cfg, mesh, src.P * src.T == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 7);
      if (native) {
        io::save_native(m, {}, {{"format", "moetp-native"}, {"version", 1}, {"step", 0}}, dir, quiet_save(io::HfExpertLayout::kPerExpert));
      } else {
        io::save_hf(m, dir, quiet_save(io::HfExpertLayout::kPerExpert));
      }
    }
    w.barrier();
    for (const Layout& dst : kLayouts) {
      if (dst.W() > w.size()) continue;
      SCOPED_TRACE(fmt::format("{} {} -> {}", native ? "native" : "hf", src.str(), dst.str()));
      // Ranks [0, W_dst) load at the destination layout.
      auto loaders = w.split(w.rank() < dst.W() ? 1 : 0, w.rank(), "loader");
      if (w.rank() < dst.W()) {
        comm::Mesh mesh(*loaders, dst.P, dst.T);
        const DispatcherKind disp = dst.P * dst.T == 1 ? DispatcherKind::kLocal : DispatcherKind::kVexpert;
        model::Qwen3MoeModel loaded(cfg, mesh, disp, 99);  // different initial values...
        if (native) {
          io::load_native(loaded, {}, dir);
        } else {
          io::load_hf(loaded, dir);
        }
        model::Qwen3MoeModel expected(cfg, mesh, disp, 7);  // ...must become the source's, bit for bit
        EXPECT_TRUE(all_params_equal(loaded, expected));
      }
      ++pairs;
      w.barrier();
    }
    w.barrier();
    if (w.rank() == 0) fs::remove_all(dir);
  }
  EXPECT_GT(pairs, 0);
}

TEST(CheckpointHf, SaveLoadBitExactBetweenLayouts) { save_load_roundtrip(false); }
TEST(CheckpointNative, SaveLoadBitExactBetweenLayouts) { save_load_roundtrip(true); }

TEST(CheckpointHf, StackedExpertTensorsRoundTripAcrossLayouts) {
  auto& w = world();
  const std::string dir = shared_dir("stacked");
  const int ep = w.size() % 2 == 0 ? 2 : 1;
  const int etp = w.size() % 4 == 0 ? 2 : 1;
  {
    comm::Mesh mesh(w, ep, etp);
    model::Qwen3MoeModel m(tiny_model(), mesh, ep * etp == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 5);
    io::save_hf(m, dir, quiet_save(io::HfExpertLayout::kStacked));
  }
  if (w.rank() == 0) {
    const io::SafetensorsDir d = io::SafetensorsDir::open(dir);
    EXPECT_TRUE(d.contains("model.layers.0.mlp.experts.gate_up_proj"));
    EXPECT_TRUE(d.contains("model.layers.0.mlp.experts.down_proj"));
    EXPECT_FALSE(d.contains("model.layers.0.mlp.experts.0.gate_proj.weight"));
    EXPECT_EQ(d.file_of("model.layers.0.mlp.experts.down_proj").info("model.layers.0.mlp.experts.down_proj").shape,
              (Shape{8, 32, 16}));
  }
  // Load at the transposed layout (etp and ep swapped where possible).
  comm::Mesh mesh(w, etp, ep);
  model::Qwen3MoeModel loaded(tiny_model(), mesh, ep * etp == 1 ? DispatcherKind::kLocal : DispatcherKind::kVexpert, 77);
  io::load_hf(loaded, dir);
  model::Qwen3MoeModel expected(tiny_model(), mesh, ep * etp == 1 ? DispatcherKind::kLocal : DispatcherKind::kVexpert, 5);
  EXPECT_TRUE(all_params_equal(loaded, expected));
  w.barrier();
  if (w.rank() == 0) fs::remove_all(dir);
}

// A faithful Hugging Face export: the weights in the config's torch_dtype (bf16, rounded to nearest
// even, for Qwen3 releases), every config field kept, the tokenizer files copied and a
// generation_config.json from the config's token ids; --dtype f32 overrides and says so.
TEST(CheckpointHf, ExportKeepsDtypeConfigFieldsAndTokenizerFiles) {
  auto& w = world();
  const std::string dir = shared_dir("export");
  nlohmann::json j = tiny_model().to_hf_json();
  j["torch_dtype"] = "bfloat16";
  j["bos_token_id"] = 11;
  j["eos_token_id"] = 12;
  j["transformers_version"] = "4.51.0";
  const config::ModelConfig cfg = config::ModelConfig::from_json(j, "bf16 model");
  comm::Mesh mesh(w, w.size() % 2 == 0 ? 2 : 1, 1);
  model::Qwen3MoeModel m(cfg, mesh, mesh.ep_size() == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 3);
  const std::string side = dir + "-side";
  if (w.rank() == 0) {
    fs::create_directories(side);
    std::ofstream(side + "/tokenizer.json") << "{\"model\": {}}";
    std::ofstream(side + "/tokenizer_config.json") << "{\"chat_template\": \"x\"}";
  }
  w.barrier();
  io::SaveOptions opts = quiet_save(io::HfExpertLayout::kPerExpert);
  opts.files = {side + "/tokenizer.json", side + "/tokenizer_config.json"};
  io::save_hf(m, dir, opts);
  auto self = w.split(w.rank(), 0, "self");
  comm::Mesh single_mesh(*self, 1, 1);
  model::Qwen3MoeModel single(cfg, single_mesh, DispatcherKind::kLocal, 3);
  if (w.rank() == 0) {
    const io::SafetensorsDir d = io::SafetensorsDir::open(dir);
    const std::string name = "model.layers.0.mlp.experts.3.gate_proj.weight";
    EXPECT_EQ(d.file_of(name).info(name).dtype, "BF16");
    EXPECT_EQ(d.file_of("model.norm.weight").info("model.norm.weight").dtype, "BF16");
    const Tensor gate3 = d.read(name);
    Tensor expect = single.param("model.layers.0.mlp.experts.w13").value.narrow_rows(3 * 32, 16).contiguous();
    for (int64_t i = 0; i < expect.numel(); ++i) expect.data<float>()[i] = round_bf16(expect.data<float>()[i]);
    EXPECT_TRUE(testing::bit_equal(gate3, expect));
    const nlohmann::json written = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
    EXPECT_EQ(written.at("bos_token_id"), 11);
    EXPECT_EQ(written.at("transformers_version"), "4.51.0");
    EXPECT_EQ(written.at("torch_dtype"), "bfloat16");
    const nlohmann::json gen = nlohmann::json::parse(std::ifstream(dir + "/generation_config.json"));
    EXPECT_EQ(gen.at("bos_token_id"), 11);
    EXPECT_EQ(gen.at("eos_token_id"), 12);
    EXPECT_TRUE(fs::is_regular_file(dir + "/tokenizer.json"));
    EXPECT_TRUE(fs::is_regular_file(dir + "/tokenizer_config.json"));
  }
  w.barrier();
  // It loads back (bf16 values widened to f32).
  model::Qwen3MoeModel back(cfg, mesh, mesh.ep_size() == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 99);
  io::load_hf(back, dir);
  // Forced f32: the file says so.
  opts.weights = io::HfWeightDType::kF32;
  io::save_hf(m, dir, opts);
  if (w.rank() == 0) {
    const io::SafetensorsDir d = io::SafetensorsDir::open(dir);
    EXPECT_EQ(d.file_of("model.norm.weight").info("model.norm.weight").dtype, "F32");
    EXPECT_EQ(nlohmann::json::parse(std::ifstream(dir + "/config.json")).at("torch_dtype"), "float32");
  }
  w.barrier();
  // A file that is not there is named before anything is written.
  opts.files = {side + "/missing.json"};
  testing::expect_error([&] { io::save_hf(m, dir + "-x", opts); }, {"missing.json", "does not exist"});
  // A dtype moetp cannot write is refused, naming it.
  j["torch_dtype"] = "float16";
  model::Qwen3MoeModel f16(config::ModelConfig::from_json(j, "f16 model"), mesh,
                           mesh.ep_size() == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 3);
  opts.files.clear();
  opts.weights = io::HfWeightDType::kAuto;
  testing::expect_error([&] { io::save_hf(f16, dir + "-x", opts); }, {"float16", "--dtype"});
  w.barrier();
  if (w.rank() == 0) {
    fs::remove_all(dir);
    fs::remove_all(side);
  }
  w.barrier();
}

TEST(CheckpointHf, FilesUseTransformersNamesPerExpert) {
  auto& w = world();
  const std::string dir = shared_dir("names");
  comm::Mesh mesh(w, w.size() % 2 == 0 ? 2 : 1, 1);
  model::Qwen3MoeModel m(tiny_model(), mesh, mesh.ep_size() == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all, 3);
  io::save_hf(m, dir, quiet_save(io::HfExpertLayout::kPerExpert));
  auto self = w.split(w.rank(), 0, "self");  // collective: every rank gets a group of one
  comm::Mesh single_mesh(*self, 1, 1);
  model::Qwen3MoeModel single(tiny_model(), single_mesh, DispatcherKind::kLocal, 3);
  if (w.rank() == 0) {
    const io::SafetensorsDir d = io::SafetensorsDir::open(dir);
    for (int e = 0; e < 8; ++e) {
      EXPECT_TRUE(d.contains(fmt::format("model.layers.0.mlp.experts.{}.gate_proj.weight", e)));
      EXPECT_TRUE(d.contains(fmt::format("model.layers.0.mlp.experts.{}.up_proj.weight", e)));
      EXPECT_TRUE(d.contains(fmt::format("model.layers.0.mlp.experts.{}.down_proj.weight", e)));
    }
    EXPECT_EQ(d.file_of("model.layers.0.mlp.experts.7.down_proj.weight").info("model.layers.0.mlp.experts.7.down_proj.weight").shape,
              (Shape{32, 16}));
    for (const char* n : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight",
                          "model.layers.1.mlp.gate_proj.weight", "model.layers.0.self_attn.q_norm.weight"}) {
      EXPECT_TRUE(d.contains(n)) << n;
    }
    // Expert e's gate_proj is rows [2eI, 2eI + I) of w13, as HF's gate_proj[e].
    const Tensor gate3 = d.read("model.layers.0.mlp.experts.3.gate_proj.weight");
    EXPECT_TRUE(testing::bit_equal(gate3, single.param("model.layers.0.mlp.experts.w13").value.narrow_rows(3 * 32, 16).contiguous()));
    fs::remove_all(dir);
  }
  w.barrier();
}

data::TokenFile random_tokens() {
  std::vector<uint32_t> ids(3000);
  const CounterRng rng(9, 1);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint32_t>(rng.uniform(i) * 64);
  return data::TokenFile::from_ids(ids, 64, "random");
}

config::TrainConfig train_cfg(int ep, int etp) {
  config::TrainConfig c;
  c.parallel.ep = ep;
  c.parallel.etp = etp;
  c.moe.dispatcher = ep * etp == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all;
  c.train.steps = 6;
  c.train.global_batch_size = 8;
  c.train.seq_len = 8;
  c.optim.warmup_steps = 2;
  return c;
}

TEST(CheckpointResume, ContinuesTheExactLossCurve) {
  auto& w = world();
  const int ep = w.size() % 2 == 0 ? 2 : 1;
  const std::string dir = shared_dir("resume");
  std::vector<double> straight;
  {
    train::Trainer t(train_cfg(ep, 1), tiny_model(), w, random_tokens());
    for (int i = 0; i < 5; ++i) straight.push_back(t.step().loss);
  }
  {
    train::Trainer t(train_cfg(ep, 1), tiny_model(), w, random_tokens());
    t.step();
    t.step();
    t.save_checkpoint(dir);
  }
  train::Trainer resumed(train_cfg(ep, 1), tiny_model(), w, random_tokens());
  resumed.load_checkpoint(dir);
  EXPECT_EQ(resumed.current_step(), 2);
  for (int i = 2; i < 5; ++i) EXPECT_EQ(resumed.step().loss, straight[i]) << "step " << i + 1 << " (bit-identical)";
  w.barrier();
  if (w.rank() == 0) fs::remove_all(dir);
}

// optim.state_dtype = bf16: the checkpoint holds the moments in f32 (exactly the bf16 values), so a
// bf16 run resumes bit for bit; a run saved with one state dtype resumes with the other, the
// moments converted (f32 -> bf16 rounds to nearest even), and tracks the uninterrupted run.
TEST(CheckpointResume, AcrossOptimizerStateDtypes) {
  auto& w = world();
  const int ep = w.size() % 2 == 0 ? 2 : 1;
  auto cfg = [&](StateDType d) {
    config::TrainConfig c = train_cfg(ep, 1);
    c.optim.state_dtype = d;
    return c;
  };
  for (const auto& [saved_as, resumed_as] : {std::pair{StateDType::kBF16, StateDType::kBF16},
                                            std::pair{StateDType::kF32, StateDType::kBF16},
                                            std::pair{StateDType::kBF16, StateDType::kF32}}) {
    SCOPED_TRACE(fmt::format("saved with {} moments, resumed with {}", option_name(saved_as), option_name(resumed_as)));
    const std::string dir = shared_dir("state_dtype");
    std::vector<double> straight;
    {
      train::Trainer t(cfg(saved_as), tiny_model(), w, random_tokens());
      for (int i = 0; i < 5; ++i) straight.push_back(t.step().loss);
    }
    {
      train::Trainer t(cfg(saved_as), tiny_model(), w, random_tokens());
      t.step();
      t.step();
      t.save_checkpoint(dir);
    }
    train::Trainer resumed(cfg(resumed_as), tiny_model(), w, random_tokens());
    resumed.load_checkpoint(dir);
    for (int i = 2; i < 5; ++i) {
      const double loss = resumed.step().loss;
      if (saved_as == resumed_as) {
        EXPECT_EQ(loss, straight[i]) << "step " << i + 1 << " (bit-identical)";
      } else {
        EXPECT_NEAR(loss, straight[i], 1e-3 * straight[i]) << "step " << i + 1;
      }
    }
    w.barrier();
    if (w.rank() == 0) fs::remove_all(dir);
    w.barrier();
  }
}

// A run saved with the sharded optimizer (optim.zero = 1: each rank holds slices of the moments)
// resumes without it and the other way round: the checkpoint holds whole moments in global
// coordinates, and the continued losses are the straight run's bits.
TEST(CheckpointResume, AcrossZeroStages) {
  auto& w = world();
  const int ep = w.size() % 2 == 0 ? 2 : 1;
  auto cfg = [&](int zero) {
    config::TrainConfig c = train_cfg(ep, 1);
    c.optim.zero = zero;
    return c;
  };
  for (const auto& [saved_as, resumed_as] : {std::pair{1, 0}, std::pair{0, 1}, std::pair{1, 1}}) {
    SCOPED_TRACE(fmt::format("saved with optim.zero {}, resumed with {}", saved_as, resumed_as));
    const std::string dir = shared_dir("zero");
    std::vector<double> straight;
    {
      train::Trainer t(cfg(0), tiny_model(), w, random_tokens());
      for (int i = 0; i < 5; ++i) straight.push_back(t.step().loss);
    }
    {
      train::Trainer t(cfg(saved_as), tiny_model(), w, random_tokens());
      t.step();
      t.step();
      t.save_checkpoint(dir);
    }
    train::Trainer resumed(cfg(resumed_as), tiny_model(), w, random_tokens());
    resumed.load_checkpoint(dir);
    for (int i = 2; i < 5; ++i) EXPECT_EQ(resumed.step().loss, straight[i]) << "step " << i + 1 << " (bit-identical)";
    w.barrier();
    if (w.rank() == 0) fs::remove_all(dir);
    w.barrier();
  }
}

TEST(CheckpointResume, AfterALayoutChangeWithinTolerance) {
  auto& w = world();
  if (w.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const std::string dir = shared_dir("reshard");
  std::vector<double> straight;
  {
    train::Trainer t(train_cfg(2, 1), tiny_model(), w, random_tokens());
    for (int i = 0; i < 4; ++i) straight.push_back(t.step().loss);
  }
  {
    train::Trainer t(train_cfg(2, 1), tiny_model(), w, random_tokens());
    t.step();
    t.step();
    t.save_checkpoint(dir);
  }
  // Resume with expert tensor parallelism instead of expert parallelism.
  train::Trainer resumed(train_cfg(1, 2), tiny_model(), w, random_tokens());
  resumed.load_checkpoint(dir);
  for (int i = 2; i < 4; ++i) EXPECT_NEAR(resumed.step().loss, straight[i], 1e-5 * straight[i]) << "step " << i + 1;
  w.barrier();
  if (w.rank() == 0) fs::remove_all(dir);
}

TEST(CheckpointBadInput, MissingTensorWrongShapeAndOtherModelNameTheFileAndTensor) {
  auto& w = world();
  const std::string dir = shared_dir("bad");
  comm::Mesh mesh(w, 1, 1);
  model::Qwen3MoeModel m(tiny_model(), mesh, DispatcherKind::kLocal, 1);
  io::save_hf(m, dir, quiet_save(io::HfExpertLayout::kPerExpert));
  // A model with a different hidden size is refused by config.json.
  config::ModelConfig other = tiny_model();
  other.hidden_size = 64;
  model::Qwen3MoeModel bigger(other, mesh, DispatcherKind::kLocal, 1);
  EXPECT_NE(testing::error_of([&] { io::load_hf(bigger, dir); }).find("describes a different model"), std::string::npos);
  // Not a directory.
  EXPECT_NE(testing::error_of([&] { io::load_hf(m, dir + "_nope"); }).find("does not exist"), std::string::npos);
  // A native load of an HF checkpoint names the missing state file.
  EXPECT_NE(testing::error_of([&] { io::load_native(m, {}, dir); }).find("trainer_state.json is missing"), std::string::npos);
  w.barrier();
  if (w.rank() == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace moetp
