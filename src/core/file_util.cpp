// File helpers for checkpoint I/O: mmap, atomic writes, similar-name suggestions (file_util.h).
#include "core/file_util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "core/check.h"

namespace moetp {

namespace {

std::string errno_str() { return std::strerror(errno); }

// Closes a descriptor at scope exit.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

std::string parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitute = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, substitute});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

// ---- MappedFile ----

MappedFile MappedFile::open(const std::string& path) {
  FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  MOETP_CHECK(fd.fd >= 0, "cannot open '{}': {}", path, errno_str());
  struct stat st {};
  MOETP_CHECK(::fstat(fd.fd, &st) == 0, "cannot stat '{}': {}", path, errno_str());
  MOETP_CHECK(S_ISREG(st.st_mode), "'{}' is not a regular file", path);
  MappedFile m;
  m.size_ = static_cast<size_t>(st.st_size);
  if (m.size_ > 0) {
    void* addr = ::mmap(nullptr, m.size_, PROT_READ, MAP_PRIVATE, fd.fd, 0);
    MOETP_CHECK(addr != MAP_FAILED, "cannot mmap '{}' ({} bytes): {}", path, m.size_, errno_str());
    m.addr_ = addr;
  }
  return m;
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : addr_(std::exchange(other.addr_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (addr_ != nullptr) ::munmap(addr_, size_);
    addr_ = std::exchange(other.addr_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (addr_ != nullptr) ::munmap(addr_, size_);
}

// ---- AtomicFileWriter ----

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)), tmp_path_(path_ + ".tmp") {
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MOETP_CHECK(fd_ >= 0, "cannot create '{}' (temporary for '{}'): {}", tmp_path_, path_, errno_str());
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_path_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t num_bytes) {
  MOETP_CHECK(fd_ >= 0 && !committed_, "write to '{}' after commit", tmp_path_);
  const char* p = static_cast<const char*>(data);
  while (num_bytes > 0) {
    const ssize_t n = ::write(fd_, p, num_bytes);
    if (n < 0 && errno == EINTR) continue;
    MOETP_CHECK(n > 0, "writing '{}' ({} bytes left): {}", tmp_path_, num_bytes,
                n < 0 ? errno_str() : std::string("wrote nothing"));
    p += n;
    num_bytes -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::commit() {
  MOETP_CHECK(fd_ >= 0 && !committed_, "commit of '{}' twice", path_);
  MOETP_CHECK(::fsync(fd_) == 0, "fsync of '{}' failed: {}", tmp_path_, errno_str());
  const int rc = ::close(std::exchange(fd_, -1));
  MOETP_CHECK(rc == 0, "close of '{}' failed: {}", tmp_path_, errno_str());
  MOETP_CHECK(::rename(tmp_path_.c_str(), path_.c_str()) == 0, "cannot rename '{}' to '{}': {}", tmp_path_, path_,
              errno_str());
  committed_ = true;
  // Make the rename itself durable. Some filesystems refuse fsync on directories; the data is
  // already safe, so that is not an error.
  FdGuard dir{::open(parent_dir(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dir.fd >= 0) (void)::fsync(dir.fd);
}

// ---- misc ----

std::string read_text_file(const std::string& path) {
  MappedFile m = MappedFile::open(path);
  return std::string(reinterpret_cast<const char*>(m.bytes().data()), m.size());
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string similar_names(const std::string& name, const std::vector<std::string>& candidates, size_t max_count) {
  if (candidates.empty()) return "none";
  std::vector<std::pair<size_t, const std::string*>> ranked;
  ranked.reserve(candidates.size());
  for (const std::string& c : candidates) ranked.emplace_back(edit_distance(name, c), &c);
  const size_t count = std::min(max_count, ranked.size());
  std::partial_sort(
      ranked.begin(), ranked.begin() + static_cast<std::ptrdiff_t>(count), ranked.end(),
      [](const auto& a, const auto& b) { return a.first != b.first ? a.first < b.first : *a.second < *b.second; });
  std::string out;
  for (size_t i = 0; i < count; ++i) out += (i ? ", '" : "'") + *ranked[i].second + "'";
  return out;
}

}  // namespace moetp
