// Helpers shared by the safetensors tests: a per-test scratch directory, raw file bytes, files
// assembled byte by byte (so the reader is checked against the format, not against our writer),
// and error-message checks.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <string>
#include <vector>

#include "core/check.h"
#include "testing_files.h"

namespace moetp::io::testing {

// The shared file helpers (tests/testing_files.h), under this namespace's names.
class ScratchDir : public ::moetp::testing::ScratchDir {
 public:
  ScratchDir() : ::moetp::testing::ScratchDir("moetp_io") {}
};
using ::moetp::testing::contains_all;
using ::moetp::testing::error_of;
using ::moetp::testing::read_bytes;
using ::moetp::testing::write_bytes;

// 8-byte little-endian u64.
inline std::string u64_le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

inline std::string bytes_of(std::initializer_list<uint8_t> bytes) { return std::string(bytes.begin(), bytes.end()); }

// A safetensors file: length prefix (header.size() unless given), header text as is, data bytes.
inline std::string craft(const std::string& header, const std::string& data = "", int64_t header_len = -1) {
  return u64_le(header_len < 0 ? header.size() : static_cast<uint64_t>(header_len)) + header + data;
}

}  // namespace moetp::io::testing
