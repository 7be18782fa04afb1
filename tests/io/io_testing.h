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

namespace moetp::io::testing {

// A fresh directory under the system temp dir, removed (with its contents) at scope exit.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::temp_directory_path() /
           ("moetp_io_" + std::string(info->test_suite_name()) + "_" + info->name() + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string str() const { return dir_.string(); }

 private:
  std::filesystem::path dir_;
};

// The moetp::Error message of fn(), or "<no error>" when it does not throw.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const moetp::Error& e) {
    return e.what();
  }
  return "<no error>";
}

// Passes when `message` contains every one of `parts`.
inline ::testing::AssertionResult contains_all(const std::string& message, std::initializer_list<std::string> parts) {
  for (const std::string& part : parts) {
    if (message.find(part) == std::string::npos) {
      return ::testing::AssertionFailure() << "\"" << message << "\" lacks \"" << part << "\"";
    }
  }
  return ::testing::AssertionSuccess();
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

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
