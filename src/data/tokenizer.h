// Byte-level tokenizer: token id = byte value, vocabulary 256. No merges, no special tokens; every
// byte string round-trips. Used to turn the shipped text corpus into a token file (token_file.h).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moetp::data {

inline constexpr uint32_t kByteVocabSize = 256;

// ids[i] = (unsigned char)text[i].
std::vector<uint32_t> encode_bytes(std::string_view text);
// Inverse of encode_bytes; every id must be < 256 (moetp::Error naming the position and id).
std::string decode_bytes(std::span<const uint32_t> ids);

// Reads text_path as raw bytes, encodes it with encode_bytes, and writes out_path with
// write_token_file (vocab_size 256, atomic). moetp::Error when text_path cannot be read.
void convert_text_file(const std::string& text_path, const std::string& out_path);

}  // namespace moetp::data
