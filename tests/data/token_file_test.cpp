// Token files (format in src/data/token_file.h) and the byte tokenizer: bit-exact round trips, the
// byte layout checked by hand, every corruption rejected with the file and numbers in the message,
// atomic writes, and the shipped corpus data/kjv.tokens == byte-encoding of data/kjv.txt.
#include "data/token_file.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "data_testing.h"

namespace moetp::data {
namespace {

using testing::contains_all;
using testing::error_of;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

// Ids that encode their position (id = pos · 7919 mod vocab), so a shifted or reordered read shows.
std::vector<uint32_t> position_ids(size_t num_tokens, uint32_t vocab_size) {
  std::vector<uint32_t> ids(num_tokens);
  for (size_t i = 0; i < num_tokens; ++i) ids[i] = static_cast<uint32_t>((i * 7919u) % vocab_size);
  return ids;
}

void expect_round_trip(const ScratchDir& scratch, const std::vector<uint32_t>& ids, uint32_t vocab_size) {
  const std::string path = scratch.path("rt.tokens");
  write_token_file(path, ids, vocab_size);
  EXPECT_EQ(std::filesystem::file_size(path), kTokenFileHeaderBytes + 4 * ids.size());
  const TokenFile file = TokenFile::open(path);
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.vocab_size(), vocab_size);
  ASSERT_EQ(file.num_tokens(), ids.size());
  EXPECT_EQ(std::vector<uint32_t>(file.ids().begin(), file.ids().end()), ids);
}

TEST(TokenFile, RoundTripsBitExact) {
  ScratchDir scratch;
  expect_round_trip(scratch, {}, 256);                                   // empty file
  expect_round_trip(scratch, {0}, 1);                                    // smallest vocab
  expect_round_trip(scratch, {255, 0, 255}, 256);                        // id == vocab_size - 1
  expect_round_trip(scratch, position_ids(100003, 50257), 50257);        // real vocab, odd length
  expect_round_trip(scratch, {0xfffffffeu, 0x80000000u, 1}, 0xffffffffu);  // largest vocab
}

TEST(TokenFile, WritesTheDocumentedByteLayout) {
  ScratchDir scratch;
  const std::string path = scratch.path("layout.tokens");
  write_token_file(path, std::vector<uint32_t>{1, 0x01020304u}, 0x05060708u);
  const std::string expected = std::string("MOETPTOK") +
                               std::string("\x01\x00\x00\x00", 4) +                  // version 1
                               std::string("\x08\x07\x06\x05", 4) +                  // vocab_size
                               std::string("\x02\x00\x00\x00\x00\x00\x00\x00", 8) +  // num_tokens 2
                               std::string("\x01\x00\x00\x00", 4) + std::string("\x04\x03\x02\x01", 4);
  EXPECT_EQ(read_bytes(path), expected);
}

TEST(TokenFile, RejectsTruncatedFile) {
  ScratchDir scratch;
  const std::string path = scratch.path("trunc.tokens");
  write_token_file(path, position_ids(10, 256), 256);  // 24 + 40 = 64 bytes
  std::filesystem::resize_file(path, 62);
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(path); }),
                           {path, "truncated", "62 bytes", "expected 64", "10 tokens"}));
}

TEST(TokenFile, RejectsFileShorterThanHeader) {
  ScratchDir scratch;
  const std::string path = scratch.path("short.tokens");
  write_bytes(path, "MOETPTOK\x01");
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(path); }), {path, "truncated", "9 bytes", "24-byte header"}));
  write_bytes(path, "");
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(path); }), {path, "truncated", "0 bytes"}));
}

TEST(TokenFile, RejectsTrailingBytes) {
  ScratchDir scratch;
  const std::string path = scratch.path("long.tokens");
  write_token_file(path, position_ids(3, 256), 256);  // 36 bytes
  write_bytes(path, read_bytes(path) + "xy");
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(path); }),
                           {path, "wrong size", "38 bytes", "expected 36", "3 tokens"}));
}

TEST(TokenFile, RejectsWrongMagic) {
  ScratchDir scratch;
  const std::string path = scratch.path("magic.tokens");
  write_token_file(path, position_ids(3, 256), 256);
  std::string bytes = read_bytes(path);
  bytes[0] = 'X';
  bytes[7] = '\x01';
  write_bytes(path, bytes);
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(path); }), {path, "bad magic", "XOETPTO\\x01", "MOETPTOK"}));
}

TEST(TokenFile, RejectsUnknownVersion) {
  ScratchDir scratch;
  const std::string path = scratch.path("version.tokens");
  write_token_file(path, position_ids(3, 256), 256);
  std::string bytes = read_bytes(path);
  bytes[8] = '\x02';
  write_bytes(path, bytes);
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(path); }), {path, "version 2", "supports version 1"}));
}

TEST(TokenFile, RejectsZeroVocab) {
  ScratchDir scratch;
  const std::string path = scratch.path("vocab0.tokens");
  write_token_file(path, std::vector<uint32_t>{}, 256);
  std::string bytes = read_bytes(path);
  bytes[13] = '\0';  // vocab_size 256 -> 0
  write_bytes(path, bytes);
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(path); }), {path, "vocab_size is 0"}));
  EXPECT_TRUE(contains_all(error_of([&] { write_token_file(path, std::vector<uint32_t>{}, 0); }), {"vocab_size is 0"}));
}

TEST(TokenFile, RejectsIdOutsideVocabWithPosition) {
  ScratchDir scratch;
  const std::string path = scratch.path("id.tokens");
  write_token_file(path, std::vector<uint32_t>{5, 6, 7, 8}, 256);
  std::string bytes = read_bytes(path);
  bytes[24 + 4 * 2] = '\x2c';  // ids[2] = 300 (0x12c)
  bytes[24 + 4 * 2 + 1] = '\x01';
  write_bytes(path, bytes);
  EXPECT_TRUE(
      contains_all(error_of([&] { TokenFile::open(path); }), {path, "token id 300", "position 2", "vocab_size 256"}));
}

TEST(TokenFile, WriterRejectsIdOutsideVocabAndKeepsTheOldFile) {
  ScratchDir scratch;
  const std::string path = scratch.path("keep.tokens");
  write_token_file(path, std::vector<uint32_t>{1, 2, 3}, 16);
  const std::string before = read_bytes(path);
  EXPECT_TRUE(contains_all(error_of([&] { write_token_file(path, std::vector<uint32_t>{1, 16, 3}, 16); }),
                           {path, "token id 16", "position 1", "vocab_size 16"}));
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(TokenFile, AtomicWriteReplacesAndLeavesNoTmp) {
  ScratchDir scratch;
  const std::string path = scratch.path("atomic.tokens");
  write_token_file(path, position_ids(1000, 256), 256);
  write_token_file(path, position_ids(10, 97), 97);  // overwrite with a shorter file
  const TokenFile file = TokenFile::open(path);
  EXPECT_EQ(file.vocab_size(), 97u);
  EXPECT_EQ(std::vector<uint32_t>(file.ids().begin(), file.ids().end()), position_ids(10, 97));
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(scratch.dir())) {
    names.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"atomic.tokens"});
}

TEST(TokenFile, ReportsUnwritableAndMissingPaths) {
  ScratchDir scratch;
  const std::string bad = scratch.path("no_such_dir/x.tokens");
  EXPECT_TRUE(contains_all(error_of([&] { write_token_file(bad, std::vector<uint32_t>{1}, 2); }),
                           {"cannot create", bad + ".tmp"}));
  EXPECT_TRUE(contains_all(error_of([&] { TokenFile::open(bad); }), {"cannot open token file", bad}));
}

TEST(TokenFile, FromIdsValidatesLikeOpen) {
  const TokenFile file = TokenFile::from_ids({3, 1, 2}, 4, "mem");
  EXPECT_EQ(file.num_tokens(), 3u);
  EXPECT_EQ(file.ids()[0], 3u);
  EXPECT_TRUE(contains_all(error_of([] { TokenFile::from_ids({3, 4}, 4, "mem"); }),
                           {"'mem'", "token id 4", "position 1", "vocab_size 4"}));
}

// ---- byte tokenizer ----

TEST(TokenFile, ByteTokenizerRoundTripsAll256Bytes) {
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  all += all;  // every byte twice, including NUL and 0xff
  const std::vector<uint32_t> ids = encode_bytes(all);
  ASSERT_EQ(ids.size(), 512u);
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids[i], i % 256) << "position " << i;
  EXPECT_EQ(decode_bytes(ids), all);
  EXPECT_TRUE(encode_bytes("").empty());
  EXPECT_EQ(decode_bytes(std::vector<uint32_t>{}), "");
  EXPECT_TRUE(contains_all(error_of([] { decode_bytes(std::vector<uint32_t>{65, 256}); }),
                           {"id 256", "position 1"}));
}

TEST(TokenFile, ConvertTextFileWritesByteTokens) {
  ScratchDir scratch;
  const std::string text = std::string("In the beginning\n\0\xff", 19);
  write_bytes(scratch.path("in.txt"), text);
  convert_text_file(scratch.path("in.txt"), scratch.path("out.tokens"));
  const TokenFile file = TokenFile::open(scratch.path("out.tokens"));
  EXPECT_EQ(file.vocab_size(), kByteVocabSize);
  EXPECT_EQ(decode_bytes(file.ids()), text);
  EXPECT_FALSE(std::filesystem::exists(scratch.path("out.tokens.tmp")));
  EXPECT_TRUE(contains_all(error_of([&] { convert_text_file(scratch.path("missing.txt"), scratch.path("o")); }),
                           {"cannot open text file", "missing.txt"}));
}

// data/kjv.tokens is committed so the demo needs no conversion; it must stay in sync with kjv.txt.
TEST(TokenFile, ShippedCorpusMatchesItsText) {
  const std::string text_path = std::string(MOETP_REPO_DIR) + "/data/kjv.txt";
  const std::string tokens_path = std::string(MOETP_REPO_DIR) + "/data/kjv.tokens";
  const std::string text = read_bytes(text_path);
  ASSERT_GT(text.size(), 300000u) << text_path;
  const TokenFile file = TokenFile::open(tokens_path);
  EXPECT_EQ(file.vocab_size(), 256u);
  ASSERT_EQ(file.num_tokens(), text.size());
  EXPECT_TRUE(decode_bytes(file.ids()) == text) << tokens_path << " differs from " << text_path
                                                << "; regenerate with moetp_tokenize (data/README.md)";
  EXPECT_EQ(text.find("In the beginning God created the heaven and the earth."), 11u);  // after "Genesis 1\n\n"
  // Byte-identical to what the converter writes today.
  ScratchDir scratch;
  convert_text_file(text_path, scratch.path("kjv.tokens"));
  EXPECT_TRUE(read_bytes(scratch.path("kjv.tokens")) == read_bytes(tokens_path));
}

}  // namespace
}  // namespace moetp::data
