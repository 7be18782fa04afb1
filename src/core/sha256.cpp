#include "core/sha256.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/check.h"

namespace moetp {

struct Sha256::Ctx {
  EVP_MD_CTX* md = nullptr;
  ~Ctx() { EVP_MD_CTX_free(md); }
};

Sha256::Sha256() : ctx_(std::make_unique<Ctx>()) {
  ctx_->md = EVP_MD_CTX_new();
  MOETP_CHECK(ctx_->md != nullptr && EVP_DigestInit_ex(ctx_->md, EVP_sha256(), nullptr) == 1,
              "SHA-256: OpenSSL could not initialise a digest");
}

Sha256::~Sha256() = default;

void Sha256::update(const void* data, size_t num_bytes) {
  if (num_bytes == 0) return;
  MOETP_CHECK(EVP_DigestUpdate(ctx_->md, data, num_bytes) == 1, "SHA-256: digest update failed");
}

std::string Sha256::hex() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  MOETP_CHECK(EVP_DigestFinal_ex(ctx_->md, digest, &len) == 1, "SHA-256: digest final failed");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(2 * len, '0');
  for (unsigned int i = 0; i < len; ++i) {
    out[2 * i] = kHex[digest[i] >> 4];
    out[2 * i + 1] = kHex[digest[i] & 15];
  }
  return out;
}

std::string sha256_hex(std::string_view bytes) {
  Sha256 h;
  h.update(bytes);
  return h.hex();
}

std::string sha256_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  MOETP_CHECK(f != nullptr, "cannot open '{}': {}", path, std::strerror(errno));
  Sha256 h;
  std::vector<char> buf(size_t{1} << 20);
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) h.update(buf.data(), n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  MOETP_CHECK(!failed, "cannot read '{}'", path);
  return h.hex();
}

}  // namespace moetp
