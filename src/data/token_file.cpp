// Token file reader and atomic writer (format in token_file.h). POSIX I/O: the writer needs
// fsync + rename for its all-or-nothing guarantee, and the reader uses fstat for the exact size.
#include "data/token_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "core/check.h"

namespace moetp::data {
namespace {

static_assert(sizeof(kTokenFileMagic) == 8);

// Owns a file descriptor.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now so that the caller sees close()'s error (it can report a failed delayed write).
  int close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

uint32_t byteswap32(uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
}

void put_le(unsigned char* dst, uint64_t value, int num_bytes) {
  for (int i = 0; i < num_bytes; ++i) dst[i] = static_cast<unsigned char>(value >> (8 * i));
}

uint64_t get_le(const unsigned char* src, int num_bytes) {
  uint64_t value = 0;
  for (int i = 0; i < num_bytes; ++i) value |= static_cast<uint64_t>(src[i]) << (8 * i);
  return value;
}

// Printable form of raw bytes for error messages: ASCII as is, anything else as \xNN.
std::string escape_bytes(const unsigned char* bytes, size_t num_bytes) {
  std::string out;
  for (size_t i = 0; i < num_bytes; ++i) {
    const unsigned char c = bytes[i];
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '"') {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  return out;
}

void check_ids(std::span<const uint32_t> ids, uint32_t vocab_size, const std::string& name) {
  MOETP_CHECK(vocab_size > 0, "token file '{}': vocab_size is 0", name);
  for (size_t pos = 0; pos < ids.size(); ++pos) {
    MOETP_CHECK(ids[pos] < vocab_size, "token file '{}': token id {} at position {} is >= vocab_size {}", name,
                ids[pos], pos, vocab_size);
  }
}

void write_all(int fd, const void* data, size_t num_bytes, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (num_bytes > 0) {
    const ssize_t n = ::write(fd, p, num_bytes);
    if (n < 0 && errno == EINTR) continue;
    MOETP_CHECK(n > 0, "writing '{}' failed: {}", path, std::strerror(errno));
    p += n;
    num_bytes -= static_cast<size_t>(n);
  }
}

void read_all(int fd, void* data, size_t num_bytes, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (num_bytes > 0) {
    const ssize_t n = ::read(fd, p, num_bytes);
    if (n < 0 && errno == EINTR) continue;
    MOETP_CHECK(n >= 0, "reading token file '{}' failed: {}", path, std::strerror(errno));
    MOETP_CHECK(n > 0, "token file '{}' ended early ({} bytes still expected); was it changed while reading?",
                path, num_bytes);
    p += n;
    num_bytes -= static_cast<size_t>(n);
  }
}

void write_file_contents(int fd, std::span<const uint32_t> ids, uint32_t vocab_size, const std::string& path) {
  unsigned char header[kTokenFileHeaderBytes];
  std::memcpy(header, kTokenFileMagic, 8);
  put_le(header + 8, kTokenFileVersion, 4);
  put_le(header + 12, vocab_size, 4);
  put_le(header + 16, ids.size(), 8);
  write_all(fd, header, sizeof(header), path);
  if constexpr (std::endian::native == std::endian::little) {
    write_all(fd, ids.data(), ids.size_bytes(), path);
  } else {
    std::vector<uint32_t> chunk;
    for (size_t start = 0; start < ids.size(); start += 1 << 16) {
      const size_t end = std::min(ids.size(), start + (size_t{1} << 16));
      chunk.assign(ids.begin() + static_cast<ptrdiff_t>(start), ids.begin() + static_cast<ptrdiff_t>(end));
      for (uint32_t& v : chunk) v = byteswap32(v);
      write_all(fd, chunk.data(), chunk.size() * sizeof(uint32_t), path);
    }
  }
}

}  // namespace

void write_token_file(const std::string& path, std::span<const uint32_t> ids, uint32_t vocab_size) {
  check_ids(ids, vocab_size, path);
  const std::string tmp_path = path + ".tmp";
  Fd fd(::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  MOETP_CHECK(fd.get() >= 0, "cannot create '{}': {}", tmp_path, std::strerror(errno));
  try {
    write_file_contents(fd.get(), ids, vocab_size, tmp_path);
    // fsync before rename: otherwise a crash can leave `path` renamed but with no data behind it.
    MOETP_CHECK(::fsync(fd.get()) == 0, "fsync of '{}' failed: {}", tmp_path, std::strerror(errno));
    MOETP_CHECK(fd.close() == 0, "closing '{}' failed: {}", tmp_path, std::strerror(errno));
    MOETP_CHECK(std::rename(tmp_path.c_str(), path.c_str()) == 0, "renaming '{}' to '{}' failed: {}", tmp_path,
                path, std::strerror(errno));
  } catch (...) {
    ::unlink(tmp_path.c_str());
    throw;
  }
}

TokenFile TokenFile::open(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  MOETP_CHECK(fd.get() >= 0, "cannot open token file '{}': {}", path, std::strerror(errno));
  struct stat st {};
  MOETP_CHECK(::fstat(fd.get(), &st) == 0, "cannot stat token file '{}': {}", path, std::strerror(errno));
  MOETP_CHECK(S_ISREG(st.st_mode), "token file '{}' is not a regular file", path);
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  MOETP_CHECK(file_bytes >= kTokenFileHeaderBytes,
              "token file '{}' is truncated: {} bytes, smaller than the {}-byte header", path, file_bytes,
              kTokenFileHeaderBytes);

  unsigned char header[kTokenFileHeaderBytes];
  read_all(fd.get(), header, sizeof(header), path);
  MOETP_CHECK(std::memcmp(header, kTokenFileMagic, 8) == 0,
              "token file '{}': bad magic \"{}\" (expected \"MOETPTOK\"); not a token file?", path,
              escape_bytes(header, 8));
  const auto version = static_cast<uint32_t>(get_le(header + 8, 4));
  MOETP_CHECK(version == kTokenFileVersion, "token file '{}': version {} (this reader supports version {})", path,
              version, kTokenFileVersion);
  const auto vocab_size = static_cast<uint32_t>(get_le(header + 12, 4));
  MOETP_CHECK(vocab_size > 0, "token file '{}': vocab_size is 0", path);
  const uint64_t num_tokens = get_le(header + 16, 8);
  constexpr uint64_t kMaxTokens = (std::numeric_limits<uint64_t>::max() - kTokenFileHeaderBytes) / 4;
  MOETP_CHECK(num_tokens <= kMaxTokens, "token file '{}': num_tokens {} in the header cannot fit in any file",
              path, num_tokens);
  const uint64_t expected_bytes = kTokenFileHeaderBytes + 4 * num_tokens;
  MOETP_CHECK(file_bytes >= expected_bytes,
              "token file '{}' is truncated: {} bytes, expected {} (24-byte header + 4 x {} tokens)", path,
              file_bytes, expected_bytes, num_tokens);
  MOETP_CHECK(file_bytes == expected_bytes,
              "token file '{}' has the wrong size: {} bytes, expected {} (24-byte header + 4 x {} tokens)", path,
              file_bytes, expected_bytes, num_tokens);

  std::vector<uint32_t> ids(num_tokens);
  read_all(fd.get(), ids.data(), ids.size() * sizeof(uint32_t), path);
  if constexpr (std::endian::native == std::endian::big) {
    for (uint32_t& v : ids) v = byteswap32(v);
  }
  return from_ids(std::move(ids), vocab_size, path);
}

TokenFile TokenFile::from_ids(std::vector<uint32_t> ids, uint32_t vocab_size, std::string name) {
  check_ids(ids, vocab_size, name);
  TokenFile file;
  file.path_ = std::move(name);
  file.vocab_size_ = vocab_size;
  file.ids_ = std::make_shared<const std::vector<uint32_t>>(std::move(ids));
  return file;
}

}  // namespace moetp::data
