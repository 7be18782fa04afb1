// Token files: the on-disk form of a tokenised corpus, read once at start-up by the data loader
// (data/loader.h), which cuts the token stream into training sequences.
//
// Format (all integers little-endian, no padding):
//   offset  size          field
//   0       8             magic "MOETPTOK" (ASCII, no terminator)
//   8       4             uint32 version = 1
//   12      4             uint32 vocab_size (> 0)
//   16      8             uint64 num_tokens
//   24      4·num_tokens  uint32 token ids, each < vocab_size
// The file size is exactly 24 + 4·num_tokens bytes; anything else is an error.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace moetp::data {

inline constexpr char kTokenFileMagic[8] = {'M', 'O', 'E', 'T', 'P', 'T', 'O', 'K'};
inline constexpr uint32_t kTokenFileVersion = 1;
inline constexpr uint64_t kTokenFileHeaderBytes = 24;

// Writes `ids` as a token file at `path`. Every id must be < vocab_size (checked before anything
// is written; the error names the position and id). The bytes go to path + ".tmp", are fsync'ed,
// and the .tmp is renamed over `path`, so `path` is either the old file or the complete new one,
// never a half-written one. On error the .tmp is removed and moetp::Error is thrown.
void write_token_file(const std::string& path, std::span<const uint32_t> ids, uint32_t vocab_size);

// A token file read fully into memory and validated: magic, version, vocab_size > 0, exact file
// size, and every id < vocab_size. Errors are moetp::Error naming the file and the values.
// Copies are cheap and share the (immutable) ids.
class TokenFile {
 public:
  static TokenFile open(const std::string& path);
  // An in-memory token stream with the same validation (ids < vocab_size); `name` stands in for
  // the path in error messages. For tests and for callers that tokenise on the fly.
  static TokenFile from_ids(std::vector<uint32_t> ids, uint32_t vocab_size, std::string name = "<memory>");

  const std::string& path() const { return path_; }
  uint32_t vocab_size() const { return vocab_size_; }
  uint64_t num_tokens() const { return ids_ ? ids_->size() : 0; }
  std::span<const uint32_t> ids() const {
    return ids_ ? std::span<const uint32_t>(*ids_) : std::span<const uint32_t>();
  }

 private:
  std::string path_;
  uint32_t vocab_size_ = 0;
  std::shared_ptr<const std::vector<uint32_t>> ids_;
};

}  // namespace moetp::data
