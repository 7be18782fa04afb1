// TrainConfig: the field table gives the documented defaults; JSON (nested and dotted) and --set
// of every type apply; unknown keys fail with a did-you-mean and the section's valid keys; bad
// values fail naming the expected type; help_text, rows and to_json cover every field; validate
// and validate_with_model name the offending values.
#include "config/train_config.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>

#include "config/model_config.h"
#include "core/check.h"
#include "testing.h"

namespace moetp::config {
namespace {

using nlohmann::json;

using testing::expect_error;

TEST(TrainConfig, Defaults) {
  const TrainConfig c = TrainConfig::defaults();
  EXPECT_EQ(c, TrainConfig{});
  EXPECT_EQ(c.model.config, "configs/tiny-moe.json");
  EXPECT_EQ(c.parallel.ep, 1);
  EXPECT_EQ(c.parallel.etp, 1);
  EXPECT_EQ(c.moe.dispatcher, DispatcherKind::kAuto);
  EXPECT_FALSE(c.moe.force_balance);
  EXPECT_EQ(c.train.steps, 200);
  EXPECT_EQ(c.train.global_batch_size, 16);
  EXPECT_EQ(c.train.seq_len, 128);
  EXPECT_EQ(c.train.micro_batches, 1);
  EXPECT_EQ(c.train.seed, 1234);
  EXPECT_EQ(c.train.log_every, 1);
  EXPECT_EQ(c.train.device, DeviceChoice::kAuto);
  EXPECT_EQ(c.optim.lr, 3e-3);
  EXPECT_EQ(c.optim.min_lr, 3e-4);
  EXPECT_EQ(c.optim.warmup_steps, 20);
  EXPECT_EQ(c.optim.weight_decay, 0.1);
  EXPECT_EQ(c.optim.beta1, 0.9);
  EXPECT_EQ(c.optim.beta2, 0.95);
  EXPECT_EQ(c.optim.eps, 1e-8);
  EXPECT_EQ(c.optim.grad_clip, 1.0);
  EXPECT_EQ(c.data.path, "data/kjv.tokens");
  EXPECT_EQ(c.run.dir, "");
  EXPECT_EQ(c.checkpoint.dir, "");
  EXPECT_EQ(c.checkpoint.every, 0);
  EXPECT_EQ(c.checkpoint.keep, 3);
  EXPECT_NO_THROW(validate(c));
  EXPECT_EQ(c.moe.expert_gemm, ExpertGemmChoice::kAuto);
  EXPECT_EQ(c.train.cuda_allocator, AllocatorChoice::kAuto);
  EXPECT_EQ(c.optim.state_dtype, StateDType::kF32);
  EXPECT_EQ(c.train.recompute, RecomputeMode::kNone);
  EXPECT_EQ(c.train.recompute_layers, -1);
  EXPECT_EQ(c.moe.plan_imbalance, 1.5);
  EXPECT_TRUE(c.train.memory_check);
  EXPECT_EQ(c.train.logit_chunk_rows, 0);
  EXPECT_EQ(c.optim.zero, 0);
  EXPECT_FALSE(c.train.deterministic);
  EXPECT_EQ(c.data.valid, "");
  EXPECT_EQ(c.data.overlong, OverlongChoice::kAuto);
  EXPECT_EQ(c.train.eval_every, 0);
  EXPECT_EQ(c.train.eval_batches, 0);
  EXPECT_EQ(field_names().size(), 39u);
}

TEST(TrainConfig, AppliesNestedAndDottedJson) {
  TrainConfig c;
  apply_json(c,
             json{{"train", {{"steps", 3}, {"seq_len", 128}}},
                  {"optim.lr", 1},  // an int is a valid double
                  {"optim", {{"beta2", 0.99}}},
                  {"moe.force_balance", true},
                  {"parallel", {{"ep", 2}}},
                  {"run.dir", "runs/x"}},
             "run.json");
  EXPECT_EQ(c.train.steps, 3);
  EXPECT_EQ(c.train.seq_len, 128);
  EXPECT_EQ(c.optim.lr, 1.0);
  EXPECT_EQ(c.optim.beta2, 0.99);
  EXPECT_TRUE(c.moe.force_balance);
  EXPECT_EQ(c.parallel.ep, 2);
  EXPECT_EQ(c.run.dir, "runs/x");
  EXPECT_EQ(c.train.global_batch_size, 16);  // untouched
}

TEST(TrainConfig, JsonFileErrorsNameThePath) {
  const std::string path = ::testing::TempDir() + "moetp_train_config.json";
  std::ofstream(path) << R"({"train": {"steps": 7}, "checkpoint.every": 5})";
  TrainConfig c;
  apply_json_file(c, path);
  EXPECT_EQ(c.train.steps, 7);
  EXPECT_EQ(c.checkpoint.every, 5);
  std::ofstream(path) << R"({"train": {"steps": 7},)";
  expect_error([&] { apply_json_file(c, path); }, {path, "invalid JSON"});
  std::remove(path.c_str());
  expect_error([&] { apply_json_file(c, "/nonexistent/run.json"); }, {"/nonexistent/run.json"});
}

TEST(TrainConfig, JsonUnknownKeysListTheSection) {
  TrainConfig c;
  expect_error([&] { apply_json(c, json{{"train", {{"stepz", 3}}}}, "run.json"); },
               {"run.json", "unknown config key 'train.stepz'", "did you mean 'train.steps'?",
                "valid keys in section 'train': steps, global_batch_size, seq_len, micro_batches, seed, log_every, device"});
  expect_error([&] { apply_json(c, json{{"optim.learning_rate", 0.1}}, "run.json"); },
               {"unknown config key 'optim.learning_rate'", "valid keys in section 'optim': lr, min_lr"});
  expect_error([&] { apply_json(c, json{{"trian", {{"steps", 3}}}}, "run.json"); },
               {"unknown config key 'trian' (did you mean 'train'?)",
                "valid sections: model, parallel, moe, train, optim, data, run, checkpoint"});
  expect_error([&] { apply_json(c, json{{"train", {{"steps", {{"x", 1}}}}}}, "run.json"); },
               {"'train.steps' expects int", "{\"x\":1}", "object"});
  expect_error([&] { apply_json(c, json::array(), "run.json"); }, {"run.json", "JSON object"});
}

TEST(TrainConfig, JsonWrongTypesNameTheType) {
  TrainConfig c;
  expect_error([&] { apply_json(c, json{{"train.steps", "3"}}, "r.json"); },
               {"r.json", "config key 'train.steps' expects int, got \"3\" (string)"});
  expect_error([&] { apply_json(c, json{{"train.steps", 2.5}}, "r.json"); }, {"expects int, got 2.5"});
  expect_error([&] { apply_json(c, json{{"moe.force_balance", 1}}, "r.json"); }, {"expects bool, got 1"});
  expect_error([&] { apply_json(c, json{{"optim.lr", "fast"}}, "r.json"); }, {"expects double", "\"fast\""});
  expect_error([&] { apply_json(c, json{{"data.path", 3}}, "r.json"); }, {"expects string, got 3"});
  expect_error([&] { apply_json(c, json{{"train.steps", int64_t{1} << 40}}, "r.json"); },
               {"train.steps", "1099511627776", "out of range"});
}

TEST(TrainConfig, SetOverridesEachType) {
  TrainConfig c;
  apply_override(c, "train.steps=3");
  apply_override(c, "train.seed=-1");  // parsed; validate() rejects it later
  apply_override(c, "optim.lr=1e-2");
  apply_override(c, "optim.grad_clip=0");
  apply_override(c, "moe.force_balance=true");
  apply_override(c, "moe.dispatcher=vexpert");
  apply_override(c, "run.dir=");
  apply_override(c, "data.path=a=b.tokens");  // only the first '=' splits
  EXPECT_EQ(c.train.steps, 3);
  EXPECT_EQ(c.train.seed, -1);
  EXPECT_EQ(c.optim.lr, 1e-2);
  EXPECT_EQ(c.optim.grad_clip, 0.0);
  EXPECT_TRUE(c.moe.force_balance);
  EXPECT_EQ(c.moe.dispatcher, DispatcherKind::kVexpert);
  EXPECT_EQ(c.run.dir, "");
  EXPECT_EQ(c.data.path, "a=b.tokens");
  apply_override(c, "moe.force_balance=0");
  EXPECT_FALSE(c.moe.force_balance);
}

TEST(TrainConfig, SetUnknownKeySuggests) {
  TrainConfig c;
  expect_error([&] { apply_override(c, "train.stepz=3"); },
               {"unknown config key 'train.stepz' (did you mean 'train.steps'?)"});
  expect_error([&] { apply_override(c, "lr=0.1"); }, {"unknown config key 'lr' (did you mean 'optim.lr'?)"});
  expect_error([&] { apply_override(c, "optim.warmup=5"); }, {"did you mean 'optim.warmup_steps'?"});
  expect_error([&] { apply_override(c, "zzzzzz.qqqqqq=1"); }, {"unknown config key 'zzzzzz.qqqqqq'", "valid sections"});
  expect_error([&] { apply_override(c, "train.steps"); }, {"--set expects key=value, got 'train.steps'"});
  expect_error([&] { apply_override(c, "=3"); }, {"--set expects key=value"});
}

TEST(TrainConfig, SetBadValuesNameTheType) {
  TrainConfig c;
  expect_error([&] { apply_override(c, "train.steps=abc"); }, {"train.steps=abc", "expected int, got 'abc'"});
  expect_error([&] { apply_override(c, "train.steps=3.5"); }, {"expected int, got '3.5'"});
  expect_error([&] { apply_override(c, "train.steps="); }, {"expected int, got ''"});
  expect_error([&] { apply_override(c, "train.steps=99999999999"); }, {"99999999999 is out of range"});
  expect_error([&] { apply_override(c, "optim.lr=fast"); }, {"expected double, got 'fast'"});
  expect_error([&] { apply_override(c, "optim.lr=inf"); }, {"expected double, got 'inf'"});
  expect_error([&] { apply_override(c, "moe.force_balance=yes"); }, {"expected bool, got 'yes'", "true|false|1|0"});
  EXPECT_EQ(c, TrainConfig{});  // failed overrides leave the config untouched
}

TEST(TrainConfig, HelpTextMentionsEveryField) {
  const std::string help = help_text();
  for (const std::string& name : field_names()) EXPECT_NE(help.find(name), std::string::npos) << name;
  EXPECT_NE(help.find("\"configs/tiny-moe.json\""), std::string::npos);
  EXPECT_NE(help.find("0.003"), std::string::npos);
  EXPECT_NE(help.find("gradient accumulation"), std::string::npos);
  EXPECT_EQ(std::count(help.begin(), help.end(), '\n'), static_cast<long>(field_names().size()));
}

TEST(TrainConfig, RowsTableAndJsonCoverEveryField) {
  TrainConfig c;
  apply_override(c, "train.steps=5");
  const auto table_rows = rows(c);
  ASSERT_EQ(table_rows.size(), field_names().size());
  EXPECT_EQ(table_rows[0].first, "model.config");
  bool found = false;
  for (const auto& [key, value] : table_rows) {
    if (key == "train.steps") found = (value == "5");
    if (key == "run.dir") {
      EXPECT_EQ(value, "\"\"");
    }
  }
  EXPECT_TRUE(found);
  const std::string table = format_table(table_rows);
  EXPECT_NE(table.find("train.steps"), std::string::npos);
  EXPECT_NE(table.find("optim.lr                 0.003"), std::string::npos) << table;

  const json j = to_json(c);
  EXPECT_EQ(j["train"]["steps"], 5);
  EXPECT_EQ(j["optim"]["lr"], 3e-3);
  EXPECT_EQ(j["moe"]["force_balance"], false);
  TrainConfig back;
  apply_json(back, j, "saved config.json");
  EXPECT_EQ(back, c);
  apply_json(back, json::parse(j.dump()), "saved config.json");
  EXPECT_EQ(back, c);
}

TEST(TrainConfig, ValidateNamesValues) {
  auto with = [](const std::string& set) {
    TrainConfig c;
    apply_override(c, set);
    return c;
  };
  expect_error([&] { validate(with("train.micro_batches=0")); }, {"train.micro_batches (0) must be >= 1"});
  expect_error([&] { validate(with("moe.plan_imbalance=0.9")); }, {"moe.plan_imbalance (0.9) must be >= 1"});
  expect_error([&] { validate(with("optim.zero=2")); }, {"optim.zero (2) must be 0 or 1"});
  expect_error([&] { validate(with("train.global_batch_size=0")); }, {"train.global_batch_size (0)"});
  TrainConfig c;
  c.train.global_batch_size = 6;
  c.train.micro_batches = 4;
  expect_error([&] { validate(c); }, {"train.global_batch_size (6) % train.micro_batches (4) != 0"});
  expect_error([&] { validate(with("train.steps=0")); }, {"train.steps (0)"});
  // Option names are checked when they are read, before validate().
  expect_error([&] { with("moe.expert_gemm=cutlass"); },
               {"config key 'moe.expert_gemm': 'cutlass' is not one of auto | grouped | cublas"});
  expect_error([&] { with("train.cuda_allocator=pool"); },
               {"config key 'train.cuda_allocator': 'pool' is not one of auto | caching | direct"});
  expect_error([&] { validate(with("train.seq_len=-3")); }, {"train.seq_len (-3)"});
  expect_error([&] { validate(with("optim.min_lr=0.01")); }, {"optim.lr (0.003) >= optim.min_lr (0.01)"});
  expect_error([&] { validate(with("optim.min_lr=-1")); }, {"optim.min_lr (-1)"});
  expect_error([&] { validate(with("optim.beta1=1")); }, {"optim.beta1 (1) must be in [0, 1)"});
  expect_error([&] { validate(with("optim.beta2=-0.1")); }, {"optim.beta2 (-0.1)"});
  expect_error([&] { validate(with("optim.eps=0")); }, {"optim.eps (0)"});
  expect_error([&] { validate(with("optim.grad_clip=-1")); }, {"optim.grad_clip (-1)"});
  expect_error([&] { with("moe.dispatcher=nccl"); },
               {"config key 'moe.dispatcher': 'nccl' is not one of auto | local | allgather | all2all | vexpert"});
  c = with("moe.dispatcher=local");
  c.parallel.ep = 2;
  expect_error([&] { validate(c); }, {"'local' needs", "ep = 2, etp = 1"});
  expect_error([&] { validate(with("parallel.etp=0")); }, {"parallel.etp (0)"});
  expect_error([&] { validate(with("train.seed=-1")); }, {"train.seed (-1)"});
  expect_error([&] { validate(with("checkpoint.every=-1")); }, {"checkpoint.every (-1)"});
  expect_error([&] { validate(with("checkpoint.keep=0")); }, {"checkpoint.keep (0)"});
  expect_error([&] { validate(with("data.path=")); }, {"data.path"});
  expect_error([&] { with("train.device=gpu"); }, {"config key 'train.device': 'gpu' is not one of auto | cpu | cuda"});
}

TEST(TrainConfig, ValidateWithModelChecksTheMesh) {
  ModelConfig m;
  m.num_experts = 8;
  m.moe_intermediate_size = 32;
  m.max_position_embeddings = 512;
  TrainConfig c;
  c.parallel.ep = 2;
  c.parallel.etp = 2;
  EXPECT_NO_THROW(validate_with_model(c, m, 4));
  EXPECT_NO_THROW(validate_with_model(c, m, 8));
  expect_error([&] { validate_with_model(c, m, 6); }, {"world size (6) % (parallel.ep (2) * parallel.etp (2)) != 0"});
  c.parallel.ep = 3;
  c.parallel.etp = 1;
  expect_error([&] { validate_with_model(c, m, 3); }, {"num_experts (8) % parallel.ep (3) != 0"});
  c.parallel.ep = 1;
  c.parallel.etp = 3;
  expect_error([&] { validate_with_model(c, m, 3); }, {"moe_intermediate_size (32) % parallel.etp (3) != 0"});
  c = TrainConfig{};
  c.train.global_batch_size = 8;
  c.train.micro_batches = 2;
  expect_error([&] { validate_with_model(c, m, 8); },
               {"train.global_batch_size (8) % (world size (8) * train.micro_batches (2)) != 0"});
  c = TrainConfig{};
  c.train.seq_len = 1024;
  expect_error([&] { validate_with_model(c, m, 1); }, {"train.seq_len (1024) > max_position_embeddings (512)"});
}

TEST(TrainConfig, ChoicesAreParsedOnceFromJsonAndText) {
  TrainConfig c;
  apply_json(c, nlohmann::json::parse(R"({"moe": {"dispatcher": "allgather", "expert_gemm": "cublas"},
                                          "train.device": "cpu", "train.cuda_allocator": "direct"})"),
             "test.json");
  EXPECT_EQ(c.moe.dispatcher, DispatcherKind::kAllgather);
  EXPECT_EQ(c.moe.expert_gemm, ExpertGemmChoice::kCublas);
  EXPECT_EQ(c.train.device, DeviceChoice::kCpu);
  EXPECT_EQ(c.train.cuda_allocator, AllocatorChoice::kDirect);
  // The saved JSON holds the names, and reading it back gives the same enums.
  const nlohmann::json saved = to_json(c);
  EXPECT_EQ(saved["moe"]["dispatcher"], "allgather");
  TrainConfig back;
  apply_json(back, saved, "saved.json");
  EXPECT_EQ(back, c);
  expect_error([&] { apply_json(back, nlohmann::json::parse(R"({"moe.dispatcher": 3})"), "bad.json"); },
               {"bad.json: config key 'moe.dispatcher' expects choice, got 3"});
  expect_error([&] { apply_json(back, nlohmann::json::parse(R"({"train.device": "gpu"})"), "bad.json"); },
               {"'train.device': 'gpu' is not one of auto | cpu | cuda"});
  EXPECT_NE(help_text().find("moe.dispatcher"), std::string::npos);
  EXPECT_NE(help_text().find("choice"), std::string::npos);
}

TEST(TrainConfig, ResolvedDispatcher) {
  TrainConfig c;
  EXPECT_EQ(resolved_dispatcher(c), DispatcherKind::kLocal);
  c.parallel.ep = 2;
  EXPECT_EQ(resolved_dispatcher(c), DispatcherKind::kAll2all);
  c.parallel.ep = 1;
  c.parallel.etp = 2;
  EXPECT_EQ(resolved_dispatcher(c), DispatcherKind::kAll2all);
  c.moe.dispatcher = DispatcherKind::kVexpert;
  EXPECT_EQ(resolved_dispatcher(c), DispatcherKind::kVexpert);
  EXPECT_EQ(option_choices<DispatcherKind>(), "auto | local | allgather | all2all | vexpert");
}

}  // namespace
}  // namespace moetp::config
