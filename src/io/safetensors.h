// Safetensors reader and writer (https://github.com/huggingface/safetensors), single files and
// sharded directories (`model.safetensors.index.json`). Checkpoint loading (HF weights, native
// checkpoints) reads through here; sharded loading uses read_rows to touch only a rank's slice.
//
// Format: 8-byte little-endian u64 N, then N bytes of UTF-8 JSON (starting with '{', optionally
// padded with trailing spaces), then the data area. The JSON maps each tensor name to
//   {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
// with offsets relative to the first byte of the data area; an optional "__metadata__" entry maps
// strings to strings. Data is little-endian and row-major (C order), with no strides.
//
// What the reader accepts (everything else is an Error naming the file, the tensor and the values):
//   - header length N <= 100'000'000 (the reference implementation's limit) and N <= file size - 8
//   - the header starts with '{', parses as a JSON object, and has no duplicate keys
//   - each tensor: dtype is one of the safetensors dtypes (kDTypes below), shape holds non-negative
//     integers, data_offsets holds two non-negative integers with begin <= end <= data area size,
//     and end - begin == numel × dtype bits / 8 exactly
//   - no two tensors share a byte; gaps between tensors (and after the last) are allowed
//   - empty tensors (a 0 in the shape, begin == end) and 0-d scalars (shape []) are allowed
// Only F32, BF16, F16, I32 and I64 can be converted by read()/read_rows(); tensors of the other
// dtypes are validated and reachable through raw().
#pragma once

#include <bit>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "core/file_util.h"

namespace moetp::io {

// Header length limit (bytes), as in the reference implementation.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Bits per element of a safetensors dtype name ("F32" -> 32, "F4" -> 4), or nullopt if unknown.
// Known: BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ F4 F6_E2M3 F6_E3M2 I16 U16 F16
// BF16 I32 U32 F32 C64 F64 I64 U64.
std::optional<int> dtype_bits(std::string_view dtype);

// IEEE binary16 -> f32, exact for every input: normals, subnormals (mantissa · 2^-24), ±0, ±inf;
// NaNs stay NaN with sign and payload kept (quiet bit included).
constexpr float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return std::bit_cast<float>(sign);
  // Subnormal: shift the leading 1 up to the implicit-bit position (bit 10); each shift lowers the
  // exponent by one from the smallest normal, 2^-14 (biased f32 exponent 113).
  uint32_t f32_exponent = 113;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --f32_exponent;
  }
  return std::bit_cast<float>(sign | (f32_exponent << 23) | ((mantissa & 0x3ffu) << 13));
}

// One tensor's header entry. begin/end are ABSOLUTE byte offsets in the file (the header's
// relative data_offsets plus 8 + N), so raw bytes are file[begin, end).
struct TensorInfo {
  std::string name;
  std::string dtype;  // safetensors spelling: "F32", "BF16", ...
  Shape shape;        // [] for a 0-d scalar
  uint64_t begin = 0;
  uint64_t end = 0;
};

// A validated, memory-mapped safetensors file. Move-only; the mapping lives as long as the object.
// All methods are const and safe to call from several threads at once.
class SafetensorsFile {
 public:
  // Maps and validates `path` (see the file comment for the rules). Errors start with the path.
  static SafetensorsFile open(const std::string& path);

  // All tensors, sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Errors when missing, listing up to 3 similar names in the file.
  const TensorInfo& info(const std::string& name) const;
  // The "__metadata__" map (empty if absent).
  std::map<std::string, std::string> metadata() const { return metadata_; }

  // The whole tensor as a new contiguous CPU tensor of the same shape: F32 copied, BF16 and F16
  // converted exactly to f32; I32 and I64 kept as i32 / i64. Other dtypes: Error (use raw()).
  Tensor read(const std::string& name) const;
  // Rows [row_begin, row_begin + num_rows) of dim 0 and, for tensors of >= 2 dims, columns
  // [col_begin, col_end) of dim 1 (col_end == -1 means "to the end"), all of the remaining dims:
  //   tensor (R, C, rest...) -> out (num_rows, col_end - col_begin, rest...)
  // For a 1-D tensor, col_begin must be 0 and col_end -1. Same dtype conversion as read().
  // Copies only the selected bytes out of the mapping, so only the pages holding them are read from
  // disk (plus kernel read-ahead): this is what sharded (tensor-parallel) loading relies on.
  // Equals read(name).slice(0, row_begin, row_begin + num_rows).slice(1, col_begin, col_end).
  Tensor read_rows(const std::string& name, int64_t row_begin, int64_t num_rows, int64_t col_begin = 0,
                   int64_t col_end = -1) const;
  // The tensor's bytes as stored (little-endian), pointing into the mapping.
  std::span<const std::byte> raw(const std::string& name) const;

  uint64_t file_size() const { return map_.size(); }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;  // only open() makes one
  std::string path_;
  MappedFile map_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// One tensor to write. `value` is any CPU (or device) tensor, strided views allowed; it is
// converted to `dtype` on write:
//   "F32"  <- f32 (bit-exact copy) or bf16 (exact widening)
//   "BF16" <- f32 (round to nearest even, core/bf16.h f32_to_bf16) or bf16 (copy)
//   "I32"  <- i32,  "I64" <- i64
struct WriteTensor {
  std::string name;
  Tensor value;
  std::string dtype = "F32";
};

// Writes a safetensors file that the reference implementation reads too: header entries sorted by
// name, data packed in that same order with no gaps, header padded with spaces so that the data
// area starts at a multiple of 8 bytes. Atomic (AtomicFileWriter): the bytes go to path + ".tmp",
// which is fsynced and renamed onto `path`, so `path` is either the old file or the complete new
// one. Every argument is checked before anything is created: duplicate names, the reserved name
// "__metadata__", an empty name, an undefined tensor or an unsupported dtype pair are Errors.
void write_safetensors(const std::string& path, const std::vector<WriteTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A safetensors file written one tensor at a time, for data too large to hold at once: the
// entries (name, shape, dtype) are given up front and written as the header; each tensor's data
// then follows through write_next, in the order of the entries (data_offsets follow that order,
// which the format allows; write_safetensors passes them sorted by name), and commit() renames the
// file into place (AtomicFileWriter: destroyed uncommitted, the temporary is removed). Names and
// dtypes are checked as write_safetensors checks them before the temporary is created; each value
// must have its entry's shape and a dtype the entry's dtype takes (same conversions).
class SafetensorsStreamWriter {
 public:
  struct Entry {
    std::string name;
    Shape shape;
    std::string dtype = "F32";
  };
  SafetensorsStreamWriter(std::string path, std::vector<Entry> entries,
                          const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsStreamWriter();
  SafetensorsStreamWriter(const SafetensorsStreamWriter&) = delete;
  SafetensorsStreamWriter& operator=(const SafetensorsStreamWriter&) = delete;

  void write_next(const Tensor& value);  // the data of entry number written() (any device, strided)
  size_t written() const { return next_; }
  uint64_t data_bytes() const { return data_bytes_; }  // the whole data area
  void commit();                         // after the last entry

 private:
  std::string path_;
  std::vector<Entry> entries_;
  size_t next_ = 0;
  uint64_t data_bytes_ = 0;
  std::unique_ptr<AtomicFileWriter> out_;
};

// ---- sharded checkpoints ----

// model.safetensors.index.json: {"metadata": {"total_size": N, ...}, "weight_map": {tensor: file}}.
// File names are relative to the index's directory.
struct IndexFile {
  std::map<std::string, std::string> weight_map;   // tensor name -> shard file name
  std::map<std::string, nlohmann::json> metadata;  // e.g. "total_size" -> total data bytes
};

// Reads and validates an index: a JSON object with a non-empty "weight_map" object of non-empty
// string file names that stay inside the directory (not absolute, no ".." part), and an optional
// "metadata" object whose "total_size", if present, is a non-negative integer. Other top-level keys
// are ignored. Errors name the path, the key and the value.
IndexFile read_index(const std::string& path);
// Writes the index (2-space indented JSON, trailing newline) atomically, as write_safetensors does.
void write_index(const std::string& path, const IndexFile& index);

inline constexpr const char* kSingleFileName = "model.safetensors";
inline constexpr const char* kIndexFileName = "model.safetensors.index.json";

// A checkpoint directory: `dir/model.safetensors`, or else `dir/model.safetensors.index.json` plus
// the shard files it names (the order transformers uses when both exist). Every shard is opened
// (mapped and validated) once, at open(). In the sharded case, names() are exactly the index's
// tensors: a tensor the index lists but its file lacks, or a file the index names that does not
// exist, is an Error naming the index, the tensor and the file; tensors present in a shard but
// absent from the index are ignored.
class SafetensorsDir {
 public:
  static SafetensorsDir open(const std::string& dir);

  bool contains(const std::string& name) const { return file_of_.count(name) != 0; }
  // Errors when missing, listing up to 3 similar names.
  const SafetensorsFile& file_of(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  Tensor read(const std::string& name) const { return file_of(name).read(name); }
  Tensor read_rows(const std::string& name, int64_t row_begin, int64_t num_rows, int64_t col_begin = 0,
                   int64_t col_end = -1) const {
    return file_of(name).read_rows(name, row_begin, num_rows, col_begin, col_end);
  }
  const std::string& dir() const { return dir_; }
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  SafetensorsDir() = default;  // only open() makes one
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> file_of_;  // tensor name -> index into files_
};

}  // namespace moetp::io
