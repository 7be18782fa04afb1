// SafetensorsWriter: F32/BF16/integer round trips are bit-exact (BF16 = core/bf16.h rounding),
// the layout is name-sorted, packed and space-padded, and a failed write never disturbs the file
// already at the path (the .tmp + rename protocol).
#include <bit>
#include <cstring>
#include <filesystem>
#include <limits>

#include "core/bf16.h"
#include "io/io_testing.h"
#include "io/safetensors.h"
#include "testing.h"

namespace moetp::io {
namespace {

namespace iot = moetp::io::testing;
using iot::contains_all;
using iot::error_of;
using iot::read_bytes;
using iot::ScratchDir;
using moetp::testing::bit_equal;
using moetp::testing::random_tensor;

// Values that a lossy or reinterpreting copy would change.
Tensor special_f32() {
  const float nan_payload = std::bit_cast<float>(0x7fa00001u);  // signalling NaN with a payload
  return Tensor::from_vector<float>(
      {0.0f, -0.0f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(), nan_payload,
       1e-40f, std::numeric_limits<float>::max(), std::numeric_limits<float>::lowest()},
      {2, 4});
}

TEST(SafetensorsWriter, RoundTripsF32BitExact) {
  ScratchDir dir;
  const std::string path = dir.path("f32.safetensors");
  const std::vector<WriteTensor> tensors = {
      {"special", special_f32()},
      {"random", random_tensor({3, 5}, 7, 0, -100.0f, 100.0f)},
      {"one", Tensor::from_vector<float>({42.5f}, {1})},
      {"empty", Tensor::empty({0, 4}, DType::kF32)},
      {"scalar", Tensor::full<float>({}, -3.25f)},
      {"cube", random_tensor({2, 3, 4}, 7, 1)},
  };
  write_safetensors(path, tensors);
  const SafetensorsFile f = SafetensorsFile::open(path);
  ASSERT_EQ(f.tensors().size(), tensors.size());
  for (const WriteTensor& w : tensors) {
    SCOPED_TRACE(w.name);
    EXPECT_EQ(f.info(w.name).dtype, "F32");
    EXPECT_TRUE(bit_equal(f.read(w.name), w.value));
  }
  EXPECT_EQ(f.read("scalar").shape(), Shape{});
  EXPECT_EQ(f.read("empty").shape(), (Shape{0, 4}));
}

TEST(SafetensorsWriter, RoundTripsBF16WithNearestEvenRounding) {
  ScratchDir dir;
  const std::string path = dir.path("bf16.safetensors");
  const Tensor values = random_tensor({17, 5}, 3, 0, -4.0f, 4.0f);
  // 1 + half a bf16 ulp ties to 1.0; 1 + 1.5 ulp ties up to 1 + 2 ulp.
  const Tensor ties =
      Tensor::from_vector<float>({std::bit_cast<float>(0x3f808000u), std::bit_cast<float>(0x3f818000u)}, {2});
  write_safetensors(path, {{"w", values, "BF16"},
                           {"ties", ties, "BF16"},
                           {"special", special_f32(), "BF16"},
                           {"from_bf16", values.to(DType::kBF16), "BF16"},
                           {"widened", values.to(DType::kBF16), "F32"}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  for (const char* name : {"w", "from_bf16"}) {
    SCOPED_TRACE(name);
    EXPECT_EQ(f.info(name).dtype, "BF16");
    const std::span<const std::byte> raw = f.raw(name);
    ASSERT_EQ(raw.size(), static_cast<size_t>(values.numel()) * 2);
    const float* v = values.data<float>();
    for (int64_t i = 0; i < values.numel(); ++i) {
      uint16_t bits;
      std::memcpy(&bits, raw.data() + 2 * i, 2);
      ASSERT_EQ(bits, f32_to_bf16(v[i]).bits) << i;
    }
    EXPECT_TRUE(bit_equal(f.read(name), values.to(DType::kBF16).to(DType::kF32)));
  }
  EXPECT_EQ(f.read("ties").to_vector<float>(), (std::vector<float>{1.0f, std::bit_cast<float>(0x3f820000u)}));
  EXPECT_TRUE(bit_equal(f.read("special"), special_f32().to(DType::kBF16).to(DType::kF32)));
  EXPECT_EQ(f.info("widened").dtype, "F32");
  EXPECT_TRUE(bit_equal(f.read("widened"), values.to(DType::kBF16).to(DType::kF32)));
}

TEST(SafetensorsWriter, RoundTripsIntegersAndStridedViews) {
  ScratchDir dir;
  const std::string path = dir.path("ints.safetensors");
  const Tensor i32 = Tensor::from_vector<int32_t>(
      {std::numeric_limits<int32_t>::min(), 0, -1, std::numeric_limits<int32_t>::max()}, {2, 2});
  const Tensor i64 = Tensor::full<int64_t>({}, std::numeric_limits<int64_t>::min() + 5);
  const Tensor base = random_tensor({4, 6}, 9, 0);
  const Tensor view = base.transpose(0, 1).slice(0, 1, 5);  // (4, 4), not contiguous
  write_safetensors(path, {{"i32", i32, "I32"}, {"i64", i64, "I64"}, {"view", view}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_TRUE(bit_equal(f.read("i32"), i32));
  EXPECT_TRUE(bit_equal(f.read("i64"), i64));
  EXPECT_TRUE(bit_equal(f.read("view"), view.contiguous()));
}

TEST(SafetensorsWriter, WritesSortedPackedSpacePaddedLayout) {
  ScratchDir dir;
  const std::string path = dir.path("layout.safetensors");
  write_safetensors(path,
                    {{"b", Tensor::from_vector<float>({1, 2, 3}, {3})},
                     {"a", Tensor::from_vector<float>({1, -2}, {2}), "BF16"},
                     {"c", Tensor::full<float>({}, 0.5f)}},
                    {{"format", "pt"}});
  const std::string bytes = read_bytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + n + 4 + 12 + 4);  // packed: no gaps between tensors
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.front(), '{');
  EXPECT_EQ(header.find_last_not_of(' '), header.find_last_of('}'));  // only spaces after the JSON
  const nlohmann::json j = nlohmann::json::parse(header);
  EXPECT_EQ(j["__metadata__"], (nlohmann::json{{"format", "pt"}}));
  EXPECT_EQ(j["a"]["data_offsets"], nlohmann::json::array({0, 4}));
  EXPECT_EQ(j["b"]["data_offsets"], nlohmann::json::array({4, 16}));
  EXPECT_EQ(j["c"]["data_offsets"], nlohmann::json::array({16, 20}));
  EXPECT_EQ(j["c"]["shape"], nlohmann::json::array());
  EXPECT_EQ(j["a"]["dtype"], "BF16");
  // Names in the serialised header appear in sorted order too.
  EXPECT_LT(header.find("\"a\""), header.find("\"b\""));
  EXPECT_LT(header.find("\"b\""), header.find("\"c\""));
  EXPECT_EQ(bytes.substr(8 + n, 4), std::string("\x80\x3f\x00\xc0", 4));  // bf16 1, -2
}

TEST(SafetensorsWriter, RoundTripsMetadata) {
  ScratchDir dir;
  const std::string path = dir.path("meta.safetensors");
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"step", "100"}, {"note", "ünïcode \"quoted\""}};
  write_safetensors(path, {{"w", Tensor::from_vector<float>({1}, {1})}}, metadata);
  EXPECT_EQ(SafetensorsFile::open(path).metadata(), metadata);
  write_safetensors(path, {});
  EXPECT_TRUE(SafetensorsFile::open(path).metadata().empty());
  EXPECT_TRUE(SafetensorsFile::open(path).tensors().empty());
}

TEST(SafetensorsWriter, RejectsBadArgumentsBeforeCreatingAnything) {
  ScratchDir dir;
  const std::string path = dir.path("bad.safetensors");
  const Tensor t = Tensor::from_vector<float>({1, 2}, {2});
  EXPECT_TRUE(contains_all(error_of([&] {
                             write_safetensors(path, {{"w", t}, {"v", t}, {"w", t}});
                           }),
                           {path, "duplicate tensor name 'w'"}));
  EXPECT_TRUE(contains_all(error_of([&] { write_safetensors(path, {{"w", t, "F16"}}); }), {path, "'w'", "'F16'"}));
  EXPECT_TRUE(contains_all(error_of([&] {
                             write_safetensors(path, {{"i", Tensor::zeros({2}, DType::kI32), "F32"}});
                           }),
                           {path, "'i'", "i32[2]", "'F32'"}));
  EXPECT_TRUE(contains_all(error_of([&] { write_safetensors(path, {{"__metadata__", t}}); }), {path, "__metadata__"}));
  EXPECT_TRUE(contains_all(error_of([&] { write_safetensors(path, {{"u", Tensor()}}); }), {path, "'u'", "undefined"}));
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(SafetensorsWriter, FailedWriteLeavesOldFileIntact) {
  ScratchDir dir;
  const std::string path = dir.path("model.safetensors");
  write_safetensors(path, {{"w", random_tensor({4, 4}, 1, 0)}});
  const std::string old_bytes = read_bytes(path);
  const Tensor t = random_tensor({8}, 2, 0);

  // The temporary cannot be created (a directory sits on its name): the write fails up front.
  std::filesystem::create_directory(path + ".tmp");
  EXPECT_TRUE(contains_all(error_of([&] { write_safetensors(path, {{"w", t}}); }), {path + ".tmp", "cannot create"}));
  EXPECT_EQ(read_bytes(path), old_bytes);
  std::filesystem::remove(path + ".tmp");

  // Rejected arguments: nothing is touched.
  EXPECT_NE(error_of([&] { write_safetensors(path, {{"w", t}, {"w", t}}); }), "<no error>");
  EXPECT_EQ(read_bytes(path), old_bytes);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(SafetensorsWriter, FailedRenameRemovesTheTemporary) {
  ScratchDir dir;
  // The rename target is a non-empty directory: the data is written and fsynced, the rename fails.
  const std::string path = dir.path("target");
  std::filesystem::create_directory(path);
  iot::write_bytes(path + "/keep", "x");
  EXPECT_TRUE(contains_all(error_of([&] {
                             write_safetensors(path, {{"w", random_tensor({3}, 1, 0)}});
                           }),
                           {"cannot rename", path + ".tmp", path}));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  EXPECT_TRUE(std::filesystem::is_directory(path));
  EXPECT_EQ(read_bytes(path + "/keep"), "x");
}

TEST(SafetensorsWriter, OverwriteKeepsOpenReadersOnTheOldFile) {
  ScratchDir dir;
  const std::string path = dir.path("model.safetensors");
  const Tensor old_value = random_tensor({5, 3}, 1, 0);
  const Tensor new_value = random_tensor({5, 3}, 2, 0);
  write_safetensors(path, {{"w", old_value}});
  const SafetensorsFile old_file = SafetensorsFile::open(path);
  write_safetensors(path, {{"w", new_value}});  // rename onto the path: the old inode lives on
  EXPECT_TRUE(bit_equal(old_file.read("w"), old_value));
  EXPECT_TRUE(bit_equal(SafetensorsFile::open(path).read("w"), new_value));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

// The streaming writer: data in the order of the entries (not sorted by name), one tensor at a
// time; the reader finds every tensor. A value of another shape, a tensor too many and a commit
// before the last tensor are errors naming the file, and an uncommitted writer leaves no file.
TEST(SafetensorsStreamWriter, WritesInEntryOrderAndChecksEachTensor) {
  ScratchDir dir;
  const std::string path = dir.path("stream.safetensors");
  const Tensor z = random_tensor({4, 3}, 1, 0), a = random_tensor({5}, 2, 0);
  {
    SafetensorsStreamWriter out(path, {{"z", {4, 3}, "F32"}, {"a", {5}, "BF16"}}, {{"format", "pt"}});
    EXPECT_EQ(out.data_bytes(), 4u * 3 * 4 + 5 * 2);
    out.write_next(z.slice(1, 0, 3));  // a strided view of all columns is fine
    out.write_next(a);
    EXPECT_TRUE(contains_all(error_of([&] { out.write_next(a); }), {path, "after the last of 2 entries"}));
    out.commit();
  }
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_TRUE(bit_equal(f.read("z"), z));
  EXPECT_TRUE(bit_equal(f.read("a"), a.to(DType::kBF16).to(DType::kF32)));
  EXPECT_LT(f.info("z").begin, f.info("a").begin);  // entry order, not name order

  const std::string bad = dir.path("bad.safetensors");
  {
    SafetensorsStreamWriter out(bad, {{"w", {2, 2}, "F32"}, {"v", {2}, "F32"}});
    EXPECT_TRUE(contains_all(error_of([&] { out.write_next(random_tensor({3}, 1, 0)); }),
                             {bad, "'w'", "f32[3]", "[2, 2]"}));
    out.write_next(random_tensor({2, 2}, 1, 0));
    EXPECT_TRUE(contains_all(error_of([&] { out.commit(); }), {bad, "commit after 1 of 2 tensors"}));
  }
  EXPECT_FALSE(std::filesystem::exists(bad));
  EXPECT_FALSE(std::filesystem::exists(bad + ".tmp"));
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsStreamWriter(bad, {{"w", {1}, "F32"}, {"w", {1}, "F32"}}); }),
                           {bad, "duplicate tensor name 'w'"}));
  EXPECT_FALSE(std::filesystem::exists(bad + ".tmp"));
}

}  // namespace
}  // namespace moetp::io
