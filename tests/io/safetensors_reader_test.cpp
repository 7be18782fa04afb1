// SafetensorsReader: files assembled byte by byte are read back value by value; F16 decoding is
// checked on known bit patterns and exhaustively; read_rows equals slicing read(); every malformed
// file is rejected with an error that names the file and the values.
#include <bit>
#include <cmath>
#include <limits>

#include "io/io_testing.h"
#include "io/safetensors.h"
#include "testing.h"

namespace moetp::io {
namespace {

namespace iot = moetp::io::testing;
using iot::bytes_of;
using iot::contains_all;
using iot::craft;
using iot::error_of;
using iot::ScratchDir;
using iot::write_bytes;

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }

// Opens a file holding `bytes`; returns the error message (or "<no error>").
std::string open_error(const ScratchDir& dir, const std::string& bytes, const std::string& name = "bad.safetensors") {
  const std::string path = dir.path(name);
  write_bytes(path, bytes);
  return error_of([&] { SafetensorsFile::open(path); });
}

TEST(SafetensorsReader, ReadsHandMadeFile) {
  ScratchDir dir;
  // Entries out of name order, pretty-printed, a 2-byte gap before "u8", trailing space padding.
  const std::string header = R"({
  "z_f32": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
  "__metadata__": {"format": "pt", "note": "hand made"},
  "a_bf16": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
  "h_f16": {"dtype": "F16", "shape": [2], "data_offsets": [22, 26]},
  "scalar_i64": {"dtype": "I64", "shape": [], "data_offsets": [26, 34]},
  "i32": {"dtype": "I32", "shape": [1], "data_offsets": [34, 38]},
  "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [38, 38]},
  "u8": {"dtype": "U8", "shape": [2], "data_offsets": [40, 42]}
}     )";
  const std::string data = bytes_of({
      0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x00, 0x00, 0x3f, 0x00, 0x00, 0x40, 0x40,  // 1 -2 .5 3
      0x80, 0x3f, 0x00, 0xc0, 0x00, 0x3f,                                                              // bf16 1 -2 .5
      0x00, 0x3c, 0xff, 0x7b,                                                                          // f16 1 65504
      0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,                                                  // i64 -1
      0x2a, 0x00, 0x00, 0x00,                                                                          // i32 42
      0xee, 0xee,                                                                                      // gap
      0xde, 0xad,                                                                                      // u8
  });
  const std::string path = dir.path("hand.safetensors");
  write_bytes(path, craft(header, data));
  const SafetensorsFile f = SafetensorsFile::open(path);

  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.file_size(), 8 + header.size() + 42);
  std::vector<std::string> names;
  for (const TensorInfo& t : f.tensors()) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"a_bf16", "empty", "h_f16", "i32", "scalar_i64", "u8", "z_f32"}));
  const TensorInfo& z = f.info("z_f32");
  EXPECT_EQ(z.dtype, "F32");
  EXPECT_EQ(z.shape, (Shape{2, 2}));
  EXPECT_EQ(z.begin, 8 + header.size());  // absolute offsets
  EXPECT_EQ(z.end, 8 + header.size() + 16);
  EXPECT_TRUE(f.contains("u8"));
  EXPECT_FALSE(f.contains("__metadata__"));
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "hand made"}}));

  const Tensor z_read = f.read("z_f32");
  EXPECT_EQ(z_read.dtype(), DType::kF32);
  EXPECT_EQ(z_read.shape(), (Shape{2, 2}));
  EXPECT_EQ(z_read.to_vector<float>(), (std::vector<float>{1.0f, -2.0f, 0.5f, 3.0f}));
  EXPECT_EQ(f.read("a_bf16").to_vector<float>(), (std::vector<float>{1.0f, -2.0f, 0.5f}));
  EXPECT_EQ(f.read("h_f16").to_vector<float>(), (std::vector<float>{1.0f, 65504.0f}));
  const Tensor scalar = f.read("scalar_i64");
  EXPECT_EQ(scalar.dtype(), DType::kI64);
  EXPECT_EQ(scalar.shape(), Shape{});
  EXPECT_EQ(scalar.to_vector<int64_t>(), std::vector<int64_t>{-1});
  EXPECT_EQ(f.read("i32").to_vector<int32_t>(), std::vector<int32_t>{42});
  EXPECT_EQ(f.read("empty").shape(), (Shape{0, 3}));
  EXPECT_EQ(f.read_rows("empty", 0, 0).shape(), (Shape{0, 3}));

  const std::span<const std::byte> raw = f.raw("u8");
  ASSERT_EQ(raw.size(), 2u);
  EXPECT_EQ(static_cast<uint8_t>(raw[0]), 0xde);
  EXPECT_EQ(static_cast<uint8_t>(raw[1]), 0xad);
  EXPECT_TRUE(contains_all(error_of([&] { f.read("u8"); }), {path, "'u8'", "U8", "raw()"}));
}

TEST(SafetensorsReader, AcceptsEmptyHeaderObject) {
  ScratchDir dir;
  const std::string path = dir.path("none.safetensors");
  write_bytes(path, craft("{}      "));
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST(SafetensorsReader, DecodesF16BitPatterns) {
  static_assert(f16_to_f32(0x3c00) == 1.0f);
  struct Case {
    uint16_t f16;
    uint32_t f32;
  };
  const Case cases[] = {
      {0x3c00, 0x3f800000},  // 1.0
      {0xc000, 0xc0000000},  // -2.0
      {0x7bff, 0x477fe000},  // 65504, the largest half
      {0x0001, 0x33800000},  // 2^-24, the smallest subnormal
      {0x03ff, 0x387fc000},  // 1023 · 2^-24, the largest subnormal
      {0x0400, 0x38800000},  // 2^-14, the smallest normal
      {0x8001, 0xb3800000},  // -2^-24
      {0x0000, 0x00000000},  // +0
      {0x8000, 0x80000000},  // -0
      {0x7c00, 0x7f800000},  // +inf
      {0xfc00, 0xff800000},  // -inf
      {0x7e00, 0x7fc00000},  // quiet NaN
      {0xfd01, 0xffa02000},  // signalling NaN: sign and payload kept
  };
  for (const Case& c : cases) EXPECT_EQ(bits_of(f16_to_f32(c.f16)), c.f32) << std::hex << c.f16;
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
}

TEST(SafetensorsReader, DecodesEveryF16ValueExactly) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    const float got = f16_to_f32(static_cast<uint16_t>(h));
    if (exponent == 0x1f) {
      EXPECT_EQ(mantissa != 0, std::isnan(got)) << h;
      EXPECT_EQ(mantissa == 0, std::isinf(got)) << h;
    } else {
      // value = mantissa · 2^-24 (subnormal) or (1024 + mantissa) · 2^(exponent - 25); exact in double.
      double want = exponent == 0 ? std::ldexp(static_cast<double>(mantissa), -24)
                                  : std::ldexp(static_cast<double>(1024 + mantissa), static_cast<int>(exponent) - 25);
      if (h & 0x8000) want = -want;
      ASSERT_EQ(static_cast<double>(got), want) << h;
    }
    ASSERT_EQ(std::signbit(got), (h & 0x8000) != 0) << h;
  }
}

TEST(SafetensorsReader, ReadsF16SpecialValuesFromFile) {
  ScratchDir dir;
  const std::string path = dir.path("f16.safetensors");
  // 2^-24, -inf, NaN, -0, 65504, 1 — little-endian u16s.
  write_bytes(path, craft(R"({"h":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}})",
                          bytes_of({0x01, 0x00, 0x00, 0xfc, 0x00, 0x7e, 0x00, 0x80, 0xff, 0x7b, 0x00, 0x3c})));
  const std::vector<float> got = SafetensorsFile::open(path).read("h").to_vector<float>();
  ASSERT_EQ(got.size(), 6u);
  const uint32_t want[] = {0x33800000, 0xff800000, 0x7fc00000, 0x80000000, 0x477fe000, 0x3f800000};
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(bits_of(got[i]), want[i]) << i;
}

// read_rows must equal slicing the whole tensor: rows of dim 0, columns of dim 1.
struct RowsCase {
  const char* name;
  int64_t row_begin, num_rows, col_begin, col_end;
};

TEST(SafetensorsReader, ReadRowsEqualsSlicingTheFullTensor) {
  ScratchDir dir;
  const std::string path = dir.path("rows.safetensors");
  Tensor ints = Tensor::empty({4, 3}, DType::kI32);
  for (int32_t i = 0; i < 12; ++i) ints.data<int32_t>()[i] = 100 * i + 7;
  write_safetensors(path, {{"w3", moetp::testing::random_tensor({7, 5, 3}, 1, 0), "F32"},
                           {"w2", moetp::testing::random_tensor({9, 6}, 2, 0), "BF16"},
                           {"v", moetp::testing::random_tensor({11}, 3, 0), "F32"},
                           {"ids", ints, "I32"}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  const RowsCase cases[] = {
      {"w3", 0, 7, 0, -1}, {"w3", 2, 3, 1, 4},  {"w3", 6, 1, 0, 1},  {"w3", 0, 0, 0, -1}, {"w3", 1, 4, 2, 2},
      {"w2", 3, 2, 4, -1}, {"w2", 0, 9, 0, 6},  {"w2", 8, 1, 5, 6},  {"w2", 1, 7, 0, 3},  {"v", 3, 5, 0, -1},
      {"v", 0, 11, 0, -1}, {"v", 10, 1, 0, -1}, {"v", 11, 0, 0, -1}, {"ids", 1, 2, 1, 3},
  };
  for (const RowsCase& c : cases) {
    SCOPED_TRACE(
        fmt::format("{} rows [{}, +{}) cols [{}, {})", c.name, c.row_begin, c.num_rows, c.col_begin, c.col_end));
    const Tensor full = f.read(c.name);
    Tensor want = full.slice(0, c.row_begin, c.row_begin + c.num_rows);
    if (full.ndim() >= 2) want = want.slice(1, c.col_begin, c.col_end == -1 ? full.size(1) : c.col_end);
    const Tensor got = f.read_rows(c.name, c.row_begin, c.num_rows, c.col_begin, c.col_end);
    EXPECT_TRUE(moetp::testing::bit_equal(got, want.contiguous()));
  }
  EXPECT_EQ(f.read_rows("ids", 1, 2, 1, 3).to_vector<int32_t>(), (std::vector<int32_t>{407, 507, 707, 807}));
}

TEST(SafetensorsReader, ReadRowsRejectsOutOfRangeBlocks) {
  ScratchDir dir;
  const std::string path = dir.path("rows.safetensors");
  write_safetensors(path, {{"w", moetp::testing::random_tensor({9, 6}, 1, 0), "F32"},
                           {"v", moetp::testing::random_tensor({4}, 2, 0), "F32"},
                           {"s", Tensor::full<float>({}, 2.0f), "F32"}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_TRUE(contains_all(error_of([&] { f.read_rows("w", 5, 5); }), {path, "'w'", "[9, 6]", "rows [5, 5 + 5)"}));
  EXPECT_TRUE(contains_all(error_of([&] { f.read_rows("w", -1, 2); }), {path, "rows [-1"}));
  EXPECT_TRUE(contains_all(error_of([&] { f.read_rows("w", 0, 2, 3, 7); }), {path, "columns [3, 7)", "[0, 6)"}));
  EXPECT_TRUE(contains_all(error_of([&] { f.read_rows("w", 0, 2, 4, 3); }), {path, "columns [4, 3)"}));
  EXPECT_TRUE(contains_all(error_of([&] { f.read_rows("v", 0, 2, 1, 2); }), {path, "'v'", "1-D"}));
  EXPECT_TRUE(contains_all(error_of([&] { f.read_rows("s", 0, 1); }), {path, "'s'", "0-d"}));
}

TEST(SafetensorsReader, MissingTensorListsSimilarNames) {
  ScratchDir dir;
  const std::string path = dir.path("model.safetensors");
  const Tensor t = moetp::testing::random_tensor({2}, 1, 0);
  write_safetensors(path, {{"model.layers.0.mlp.gate.weight", t},
                           {"model.layers.1.mlp.gate.weight", t},
                           {"model.embed_tokens.weight", t},
                           {"lm_head.weight", t},
                           {"model.norm.weight", t}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_TRUE(contains_all(error_of([&] { f.info("model.layers.0.mlp.gate.weights"); }),
                           {path, "no tensor 'model.layers.0.mlp.gate.weights'", "5 tensors",
                            "similar: 'model.layers.0.mlp.gate.weight', 'model.layers.1.mlp.gate.weight'"}));
  EXPECT_TRUE(contains_all(error_of([&] { f.read("lm_head"); }), {"'lm_head.weight'"}));
}

// ---- malformed files ----

TEST(SafetensorsReader, RejectsMissingAndTruncatedFiles) {
  ScratchDir dir;
  const std::string missing = dir.path("absent.safetensors");
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsFile::open(missing); }), {"cannot open", missing}));
  EXPECT_TRUE(contains_all(open_error(dir, ""), {dir.path("bad.safetensors"), "file is 0 bytes"}));
  EXPECT_TRUE(contains_all(open_error(dir, std::string("\x02\0\0\0\0", 5), "five.safetensors"),
                           {dir.path("five.safetensors"), "file is 5 bytes", "8-byte"}));
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsFile::open(dir.str()); }), {dir.str(), "not a regular file"}));
}

TEST(SafetensorsReader, RejectsHeaderLengthBeyondFileOrLimit) {
  ScratchDir dir;
  // Claims 120 header bytes; the file holds 8 + 2 + 4.
  EXPECT_TRUE(contains_all(open_error(dir, craft("{}", "abcd", 120)),
                           {dir.path("bad.safetensors"), "header length 120", "past the end of the file (14 bytes)"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft("{}", "", 200'000'000)),
                           {dir.path("bad.safetensors"), "header length 200000000", "limit of 100000000"}));
}

TEST(SafetensorsReader, RejectsInvalidJson) {
  ScratchDir dir;
  const std::string file = dir.path("bad.safetensors");
  const std::string cut = R"({"a": {"dtype": "F32",)";
  EXPECT_TRUE(
      contains_all(open_error(dir, craft(cut)), {file, fmt::format("({} bytes)", cut.size()), "not valid JSON"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft("  {}")), {file, "does not start with '{'", "0x20"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft("{} x")), {file, "not valid JSON"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(std::string("{}\0\0", 4))), {file, "NUL byte at offset 2"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"a": 1})")), {file, "'a'", "entry is 1, not an object"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft("{\"\xff\": 1}")), {file, "not valid JSON"}));  // not UTF-8
}

TEST(SafetensorsReader, RejectsDuplicateKeys) {
  ScratchDir dir;
  const std::string e = R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"a":)" + e + R"(,"a":)" + e + "}", "abcd")),
                           {dir.path("bad.safetensors"), "key 'a' twice"}));
  EXPECT_TRUE(contains_all(
      open_error(dir, craft(R"({"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})", "abcd")),
      {"key 'dtype' twice"}));
}

TEST(SafetensorsReader, RejectsBadEntries) {
  ScratchDir dir;
  const std::string file = dir.path("bad.safetensors");
  const std::string data(16, '\0');
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"w":{"dtype":"F31","shape":[4],"data_offsets":[0,16]}})", data)),
                           {file, "tensor 'w'", "unknown dtype 'F31'"}));
  EXPECT_TRUE(
      contains_all(open_error(dir, craft(R"({"w":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,16]}})", data)),
                   {file, "tensor 'w'", "shape [-1,4] holds -1"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,16]}})", data)),
                           {file, "holds 2.5"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"w":{"dtype":"F32","shape":[4]}})", data)),
                           {file, "tensor 'w' has no \"data_offsets\""}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0]}})", data)),
                           {file, "data_offsets [0] are not two non-negative integers"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"w":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}})", data)),
                           {file, "12 bits, not a whole number of bytes"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(R"({"__metadata__":{"step":5}})")),
                           {file, "__metadata__ 'step' is 5", "not a string"}));
}

TEST(SafetensorsReader, RejectsSizeMismatch) {
  ScratchDir dir;
  const std::string path = dir.path("model.safetensors");
  write_bytes(path, craft(R"({"lm_head.weight":{"dtype":"F32","shape":[5,6],"data_offsets":[0,100]}})",
                          std::string(120, '\0')));
  EXPECT_TRUE(contains_all(error_of([&] { SafetensorsFile::open(path); }),
                           {path + ": tensor 'lm_head.weight' data_offsets [0, 100] hold 100 bytes but dtype F32 "
                                   "shape [5, 6] needs 120"}));
}

TEST(SafetensorsReader, RejectsOffsetsBeyondTheFile) {
  ScratchDir dir;
  // The header promises 16 bytes of data; the file ends after 8.
  EXPECT_TRUE(contains_all(
      open_error(dir, craft(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(8, '\0'))),
      {dir.path("bad.safetensors"), "tensor 'w' data_offsets [0, 16]", "data area (8 bytes)"}));
  EXPECT_TRUE(contains_all(
      open_error(dir, craft(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", std::string(16, '\0'))),
      {dir.path("bad.safetensors"), "data_offsets [16, 0] end before they begin"}));
}

TEST(SafetensorsReader, RejectsOverlappingTensors) {
  ScratchDir dir;
  const std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]},)"
                             R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})";  // empty: holds nothing
  EXPECT_TRUE(
      contains_all(open_error(dir, craft(header, std::string(24, '\0'))),
                   {dir.path("bad.safetensors"), "'a' data_offsets [0, 16]", "'b' data_offsets [8, 24]", "overlap"}));
}

TEST(SafetensorsReader, RejectsHeaderLengthThatLies) {
  ScratchDir dir;
  const std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string data = bytes_of({0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0});
  // Too short: the JSON is cut off. Too long: the data bytes are taken for header text, and the
  // tensor's 8 bytes no longer fit in what remains.
  EXPECT_TRUE(contains_all(open_error(dir, craft(header, data, static_cast<int64_t>(header.size()) - 3)),
                           {dir.path("bad.safetensors"), "not valid JSON"}));
  EXPECT_TRUE(contains_all(open_error(dir, craft(header, data, static_cast<int64_t>(header.size()) + 4)),
                           {dir.path("bad.safetensors"), "not valid JSON"}));
  const std::string padded = header + "    ";
  EXPECT_TRUE(
      contains_all(open_error(dir, craft(padded, data, static_cast<int64_t>(padded.size()) + 4)), {"not valid JSON"}));
  // Honest length, padded with spaces: fine.
  const std::string ok = dir.path("ok.safetensors");
  write_bytes(ok, craft(padded, data));
  EXPECT_EQ(SafetensorsFile::open(ok).read("w").to_vector<float>(), (std::vector<float>{1.0f, -2.0f}));
}

}  // namespace
}  // namespace moetp::io
