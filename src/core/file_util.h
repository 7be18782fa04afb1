// File helpers: a read-only memory map (RAII), an atomic file writer (write `path.tmp`, fsync,
// rename onto `path`), and the "similar names" list that missing-name errors quote. Used by the
// checkpoint formats (safetensors), dataset folders and token files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moetp {

// A whole regular file mapped read-only (PROT_READ, MAP_PRIVATE). Move-only; unmaps on
// destruction. The descriptor is closed right after mmap: the mapping keeps the inode alive, so a
// file replaced by rename() (as the writers here do) keeps reading its old contents. Truncating
// a mapped file in place (not done by anything here) would make later reads fault (SIGBUS).
// An empty file maps to an empty span without calling mmap.
class MappedFile {
 public:
  MappedFile() = default;
  // Errors name the path and strerror: missing file, not a regular file, mmap failure.
  static MappedFile open(const std::string& path);
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  std::span<const std::byte> bytes() const { return {static_cast<const std::byte*>(addr_), size_}; }
  uint64_t size() const { return size_; }

 private:
  void* addr_ = nullptr;
  size_t size_ = 0;
};

// Writes a file so that a crash or an error never leaves a half-written file at `path`:
// bytes go to `path + ".tmp"` (created or truncated, mode 0644); commit() fsyncs it, renames it
// onto `path` (atomic on POSIX; replaces an existing file) and fsyncs the directory (best effort).
// If the writer is destroyed without a successful commit(), the .tmp file is removed and `path` is
// left exactly as it was. One writer per path at a time (two would share the .tmp name).
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  void write(const void* data, size_t num_bytes);  // appends; retries short writes and EINTR
  void commit();                                   // fsync + close + rename + fsync(dir)
  const std::string& path() const { return path_; }
  const std::string& tmp_path() const { return tmp_path_; }

 private:
  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

// Whole file as a string; errors name the path and strerror.
std::string read_text_file(const std::string& path);

bool is_regular_file(const std::string& path);

// Up to max_count of `candidates` closest to `name` by edit distance, quoted and comma-separated
// ("'a', 'b'"), or "none" when there are no candidates. For "no tensor 'x' (similar: ...)" errors.
std::string similar_names(const std::string& name, const std::vector<std::string>& candidates, size_t max_count = 3);

}  // namespace moetp
