// SafetensorsDir and the index file: single-file and sharded checkpoints round trip, and an index
// that names a missing shard, or a tensor its shard lacks, is rejected naming the index, the
// tensor and the file.
#include <filesystem>

#include "io/io_testing.h"
#include "io/safetensors.h"
#include "testing.h"

namespace moetp::io {
namespace {

namespace iot = moetp::io::testing;
using iot::contains_all;
using iot::error_of;
using iot::ScratchDir;
using moetp::testing::bit_equal;
using moetp::testing::random_tensor;

constexpr const char* kShard1 = "model-00001-of-00002.safetensors";
constexpr const char* kShard2 = "model-00002-of-00002.safetensors";

// Two shards: w1, w2 in the first; w3 (BF16) and an unindexed "extra" in the second.
struct Sharded {
  Tensor w1 = random_tensor({6, 4}, 1, 0);
  Tensor w2 = random_tensor({3}, 2, 0);
  Tensor w3 = random_tensor({5, 2, 3}, 3, 0);
  IndexFile index;

  explicit Sharded(const ScratchDir& dir) {
    write_safetensors(dir.path(kShard1), {{"w1", w1}, {"w2", w2}});
    write_safetensors(dir.path(kShard2), {{"w3", w3, "BF16"}, {"extra", w2}});
    index.weight_map = {{"w1", kShard1}, {"w2", kShard1}, {"w3", kShard2}};
    index.metadata["total_size"] = (24 + 3) * 4 + 30 * 2;
    write_index(dir.path(kIndexFileName), index);
  }
};

TEST(SafetensorsIndex, RoundTrips) {
  ScratchDir dir;
  IndexFile index;
  index.weight_map = {{"model.embed_tokens.weight", kShard1}, {"lm_head.weight", kShard2}};
  index.metadata["total_size"] = uint64_t{123456789012};
  index.metadata["format"] = "pt";
  const std::string path = dir.path(kIndexFileName);
  write_index(path, index);
  const IndexFile back = read_index(path);
  EXPECT_EQ(back.weight_map, index.weight_map);
  EXPECT_EQ(back.metadata, index.metadata);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  const nlohmann::json j = nlohmann::json::parse(iot::read_bytes(path));
  EXPECT_EQ(j["metadata"]["total_size"], 123456789012u);
  EXPECT_EQ(j["weight_map"]["lm_head.weight"], kShard2);
}

TEST(SafetensorsIndex, RejectsMalformedIndexes) {
  ScratchDir dir;
  const std::string path = dir.path(kIndexFileName);
  auto error_for = [&](const std::string& text) {
    iot::write_bytes(path, text);
    return error_of([&] { read_index(path); });
  };
  EXPECT_TRUE(contains_all(error_for("{\"weight_map\": "), {path, "not valid JSON"}));
  EXPECT_TRUE(contains_all(error_for("[]"), {path, "not an object"}));
  EXPECT_TRUE(contains_all(error_for(R"({"metadata": {}})"), {path, "\"weight_map\" is missing"}));
  EXPECT_TRUE(contains_all(error_for(R"({"weight_map": {}})"), {path, "weight_map is empty"}));
  EXPECT_TRUE(contains_all(error_for(R"({"weight_map": {"w": 3}})"), {path, "tensor 'w' to 3"}));
  EXPECT_TRUE(contains_all(error_for(R"({"weight_map": {"w": "../x.safetensors"}})"),
                           {path, "'w'", "'../x.safetensors'", "inside the directory"}));
  EXPECT_TRUE(contains_all(error_for(R"({"weight_map": {"w": "/abs.safetensors"}})"), {path, "'/abs.safetensors'"}));
  EXPECT_TRUE(contains_all(error_for(R"({"metadata": {"total_size": -1}, "weight_map": {"w": "a.safetensors"}})"),
                           {path, "total_size is -1"}));
  EXPECT_TRUE(contains_all(error_for(R"({"metadata": 5, "weight_map": {"w": "a.safetensors"}})"),
                           {path, "\"metadata\" is a JSON number"}));
  IndexFile empty;
  EXPECT_TRUE(contains_all(error_of([&] { write_index(dir.path("out.json"), empty); }), {"weight_map is empty"}));
}

TEST(SafetensorsDir, OpensSingleFile) {
  ScratchDir dir;
  const Tensor a = random_tensor({4, 3}, 1, 0);
  const Tensor b = random_tensor({2}, 2, 0);
  write_safetensors(dir.path(kSingleFileName), {{"b", b}, {"a", a}});
  const SafetensorsDir d = SafetensorsDir::open(dir.str());
  EXPECT_EQ(d.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(d.files().size(), 1u);
  EXPECT_EQ(d.file_of("a").path(), dir.path(kSingleFileName));
  EXPECT_TRUE(bit_equal(d.read("a"), a));
  EXPECT_TRUE(bit_equal(d.read_rows("a", 1, 2, 1, 3), a.slice(0, 1, 3).slice(1, 1, 3).contiguous()));
}

TEST(SafetensorsDir, RoundTripsShardedCheckpoint) {
  ScratchDir dir;
  const Sharded s(dir);
  const SafetensorsDir d = SafetensorsDir::open(dir.str() + "/");
  EXPECT_EQ(d.names(), (std::vector<std::string>{"w1", "w2", "w3"}));
  EXPECT_EQ(d.files().size(), 2u);
  EXPECT_TRUE(d.contains("w3"));
  EXPECT_FALSE(d.contains("extra"));  // in a shard, but not in the index
  EXPECT_EQ(d.file_of("w1").path(), dir.path(kShard1));
  EXPECT_EQ(d.file_of("w3").path(), dir.path(kShard2));
  EXPECT_TRUE(bit_equal(d.read("w1"), s.w1));
  EXPECT_TRUE(bit_equal(d.read("w2"), s.w2));
  EXPECT_TRUE(bit_equal(d.read("w3"), s.w3.to(DType::kBF16).to(DType::kF32)));
  EXPECT_TRUE(bit_equal(d.read_rows("w1", 2, 3, 1, -1), s.w1.slice(0, 2, 5).slice(1, 1, 4).contiguous()));
  EXPECT_TRUE(
      contains_all(error_of([&] { d.read("w4"); }), {dir.str(), "no tensor 'w4'", "similar: 'w1', 'w2', 'w3'"}));
}

TEST(SafetensorsDir, RejectsIndexNamingAMissingFile) {
  ScratchDir dir;
  const Sharded s(dir);
  std::filesystem::remove(dir.path(kShard2));
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsDir::open(dir.str()); }),
                           {dir.path(kIndexFileName), "tensor 'w3'", kShard2, "does not exist"}));
}

// An index beside a single model.safetensors (one of them stale) is ambiguous: refused, even when
// the single file alone would load.
TEST(SafetensorsDir, RejectsASingleFileBesideAnIndex) {
  ScratchDir dir;
  const Sharded s(dir);
  std::filesystem::remove(dir.path(kShard2));
  write_safetensors(dir.path(kSingleFileName), {{"w1", s.w1}});
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsDir::open(dir.str()); }),
                           {dir.str(), kSingleFileName, kIndexFileName, "ambiguous"}));
}

TEST(SafetensorsDir, RejectsTensorMissingFromItsFile) {
  ScratchDir dir;
  Sharded s(dir);
  s.index.weight_map["w2x"] = kShard2;
  write_index(dir.path(kIndexFileName), s.index);
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsDir::open(dir.str()); }),
                           {dir.path(kIndexFileName), "tensor 'w2x'", dir.path(kShard2), "has no such tensor"}));
}

TEST(SafetensorsDir, RejectsDirectoryWithoutCheckpoint) {
  ScratchDir dir;
  EXPECT_TRUE(
      contains_all(error_of([&] { SafetensorsDir::open(dir.str()); }), {dir.str(), kSingleFileName, kIndexFileName}));
}

TEST(SafetensorsDir, RejectsCorruptShard) {
  ScratchDir dir;
  const Sharded s(dir);
  iot::write_bytes(dir.path(kShard1), iot::craft("{\"w1\": 1}"));
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsDir::open(dir.str()); }), {dir.path(kShard1), "'w1'"}));
}

}  // namespace
}  // namespace moetp::io
