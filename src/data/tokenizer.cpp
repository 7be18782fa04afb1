// Byte-level tokenizer and the text -> token file converter (tokenizer.h).
#include "data/tokenizer.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/check.h"
#include "data/token_file.h"

namespace moetp::data {

std::vector<uint32_t> encode_bytes(std::string_view text) {
  std::vector<uint32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string decode_bytes(std::span<const uint32_t> ids) {
  std::string text(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    MOETP_CHECK(ids[i] < kByteVocabSize, "decode_bytes: id {} at position {} is not a byte (vocab_size {})", ids[i],
                i, kByteVocabSize);
    text[i] = static_cast<char>(static_cast<unsigned char>(ids[i]));
  }
  return text;
}

void convert_text_file(const std::string& text_path, const std::string& out_path) {
  std::ifstream in(text_path, std::ios::binary);
  MOETP_CHECK(in.is_open(), "cannot open text file '{}': {}", text_path, std::strerror(errno));
  std::ostringstream contents;
  contents << in.rdbuf();
  MOETP_CHECK(!in.bad(), "reading text file '{}' failed", text_path);
  write_token_file(out_path, encode_bytes(contents.str()), kByteVocabSize);
}

}  // namespace moetp::data
