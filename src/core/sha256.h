// SHA-256 (OpenSSL's EVP digest): content hashes for dataset manifests and tokenizer files.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace moetp {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(const void* data, size_t num_bytes);
  void update(std::string_view bytes) { update(bytes.data(), bytes.size()); }
  // Lowercase hex of the digest (64 characters). Ends the hash: call once.
  std::string hex();

 private:
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
};

std::string sha256_hex(std::string_view bytes);
// The file's digest, read in chunks; moetp::Error naming the path when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace moetp
