// Safetensors reader: maps a file, validates its header against the format (safetensors.h) and
// converts tensors, or row/column blocks of them, to f32 (integers kept) CPU tensors.
#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "core/bf16.h"
#include "core/check.h"

namespace moetp::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian and is copied as is: big-endian hosts are not supported");

namespace {

using nlohmann::json;

struct DTypeBits {
  std::string_view name;
  int bits;
};
constexpr DTypeBits kDTypes[] = {
    {"BOOL", 8},        {"U8", 8},          {"I8", 8},    {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8},
    {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"F4", 4},    {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"I16", 16},
    {"U16", 16},        {"F16", 16},        {"BF16", 16}, {"I32", 32},    {"U32", 32},    {"F32", 32},
    {"C64", 64},        {"F64", 64},        {"I64", 64},  {"U64", 64},
};

// The stored dtypes read()/read_rows() convert, and what they become.
enum class Stored { kF32, kBF16, kF16, kI32, kI64 };
struct Conversion {
  Stored stored;
  size_t stored_bytes;
  DType out;
};

Conversion conversion_for(const std::string& path, const TensorInfo& info) {
  if (info.dtype == "F32") return {Stored::kF32, 4, DType::kF32};
  if (info.dtype == "BF16") return {Stored::kBF16, 2, DType::kF32};
  if (info.dtype == "F16") return {Stored::kF16, 2, DType::kF32};
  if (info.dtype == "I32") return {Stored::kI32, 4, DType::kI32};
  if (info.dtype == "I64") return {Stored::kI64, 8, DType::kI64};
  MOETP_FAIL("{}: tensor '{}' has dtype {}, which cannot be converted (F32, BF16, F16, I32, I64 can); use raw()", path,
             info.name, info.dtype);
}

// count elements from stored bytes to the output type (f32, or the same integer type).
void convert(Stored stored, const std::byte* src, size_t count, void* dst) {
  switch (stored) {
    case Stored::kF32:
    case Stored::kI32:
      std::memcpy(dst, src, count * 4);
      return;
    case Stored::kI64:
      std::memcpy(dst, src, count * 8);
      return;
    case Stored::kBF16:
    case Stored::kF16:
      break;
  }
  float* out = static_cast<float*>(dst);
  for (size_t i = 0; i < count; ++i) {
    uint16_t bits;
    std::memcpy(&bits, src + 2 * i, 2);  // the data area has no alignment guarantee
    out[i] = stored == Stored::kBF16 ? bf16_to_f32(bf16{bits}) : f16_to_f32(bits);
  }
}

// Non-negative integer, or nullopt for negative, fractional and non-numbers.
std::optional<uint64_t> as_u64(const json& j) {
  if (j.is_number_unsigned()) return j.get<uint64_t>();
  if (j.is_number_integer() && j.get<int64_t>() >= 0) return static_cast<uint64_t>(j.get<int64_t>());
  return std::nullopt;
}

// Parses the header, rejecting duplicate keys in any object (nlohmann keeps the last silently).
json parse_header(const std::string& path, std::string_view text) {
  MOETP_CHECK(!text.empty() && text.front() == '{', "{}: header ({} bytes) does not start with '{{' (first byte: {})",
              path, text.size(),
              text.empty() ? std::string("none") : fmt::format("{:#04x}", static_cast<uint8_t>(text[0])));
  // nlohmann treats a NUL byte as the end of input, which would accept NUL padding or a header
  // length that runs into the data; JSON never contains raw NULs.
  const size_t nul = text.find('\0');
  MOETP_CHECK(nul == std::string_view::npos, "{}: header ({} bytes) is not valid JSON: NUL byte at offset {}", path,
              text.size(), nul);
  std::vector<std::unordered_set<std::string>> open_objects;
  std::string duplicate;
  json::parser_callback_t on_event = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) open_objects.emplace_back();
    if (event == json::parse_event_t::object_end) open_objects.pop_back();
    if (event == json::parse_event_t::key && !open_objects.back().insert(parsed.get<std::string>()).second &&
        duplicate.empty()) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text.begin(), text.end(), on_event);
  } catch (const json::exception& e) {
    MOETP_FAIL("{}: header ({} bytes) is not valid JSON: {}", path, text.size(), e.what());
  }
  MOETP_CHECK(duplicate.empty(), "{}: header has the key '{}' twice", path, duplicate);
  MOETP_CHECK(header.is_object(), "{}: header is a JSON {}, not an object", path, header.type_name());
  return header;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const json& j) {
  MOETP_CHECK(j.is_object(), "{}: __metadata__ is a JSON {}, not an object of strings", path, j.type_name());
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : j.items()) {
    MOETP_CHECK(value.is_string(), "{}: __metadata__ '{}' is {} (a JSON {}), not a string", path, key, value.dump(),
                value.type_name());
    out[key] = value.get<std::string>();
  }
  return out;
}

// One tensor entry; offsets stay relative to the data area here.
TensorInfo parse_entry(const std::string& path, const std::string& name, const json& j, uint64_t data_bytes) {
  MOETP_CHECK(j.is_object(), "{}: tensor '{}' entry is {}, not an object", path, name, j.dump());
  const auto field = [&](const char* key) -> const json& {
    auto it = j.find(key);
    MOETP_CHECK(it != j.end(), "{}: tensor '{}' has no \"{}\" (entry {})", path, name, key, j.dump());
    return *it;
  };
  TensorInfo info;
  info.name = name;
  const json& dtype = field("dtype");
  MOETP_CHECK(dtype.is_string(), "{}: tensor '{}' dtype {} is not a string", path, name, dtype.dump());
  info.dtype = dtype.get<std::string>();
  const std::optional<int> bits = dtype_bits(info.dtype);
  MOETP_CHECK(bits.has_value(), "{}: tensor '{}' has unknown dtype '{}'", path, name, info.dtype);

  const json& shape = field("shape");
  MOETP_CHECK(shape.is_array(), "{}: tensor '{}' shape {} is not an array", path, name, shape.dump());
  uint64_t numel = 1;
  bool overflow = false;
  for (const json& d : shape) {
    const std::optional<uint64_t> dim = as_u64(d);
    MOETP_CHECK(dim.has_value() && *dim <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                "{}: tensor '{}' shape {} holds {}, not a non-negative integer", path, name, shape.dump(), d.dump());
    info.shape.push_back(static_cast<int64_t>(*dim));
    overflow |= __builtin_mul_overflow(numel, *dim, &numel);
  }
  uint64_t num_bits = 0;
  overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(*bits), &num_bits);
  MOETP_CHECK(!overflow, "{}: tensor '{}' shape {} is too large", path, name, shape_str(info.shape));
  MOETP_CHECK(num_bits % 8 == 0, "{}: tensor '{}' dtype {} shape {} is {} bits, not a whole number of bytes", path,
              name, info.dtype, shape_str(info.shape), num_bits);

  const json& offsets = field("data_offsets");
  const bool two = offsets.is_array() && offsets.size() == 2;
  const std::optional<uint64_t> begin = two ? as_u64(offsets[0]) : std::nullopt;
  const std::optional<uint64_t> end = two ? as_u64(offsets[1]) : std::nullopt;
  MOETP_CHECK(begin && end, "{}: tensor '{}' data_offsets {} are not two non-negative integers", path, name,
              offsets.dump());
  MOETP_CHECK(*begin <= *end, "{}: tensor '{}' data_offsets [{}, {}] end before they begin", path, name, *begin, *end);
  MOETP_CHECK(*end - *begin == num_bits / 8,
              "{}: tensor '{}' data_offsets [{}, {}] hold {} bytes but dtype {} shape {} needs {}", path, name, *begin,
              *end, *end - *begin, info.dtype, shape_str(info.shape), num_bits / 8);
  MOETP_CHECK(*end <= data_bytes, "{}: tensor '{}' data_offsets [{}, {}] run past the end of the data area ({} bytes)",
              path, name, *begin, *end, data_bytes);
  info.begin = *begin;
  info.end = *end;
  return info;
}

void check_no_overlap(const std::string& path, const std::vector<TensorInfo>& tensors) {
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : tensors) {
    if (t.end > t.begin) by_offset.push_back(&t);  // empty tensors hold no bytes
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
  });
  // Sorted by begin, any overlap shows up between neighbours.
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& a = *by_offset[i - 1];
    const TensorInfo& b = *by_offset[i];
    MOETP_CHECK(a.end <= b.begin, "{}: tensors '{}' data_offsets [{}, {}] and '{}' data_offsets [{}, {}] overlap", path,
                a.name, a.begin, a.end, b.name, b.begin, b.end);
  }
}

}  // namespace

std::optional<int> dtype_bits(std::string_view dtype) {
  for (const DTypeBits& d : kDTypes) {
    if (d.name == dtype) return d.bits;
  }
  return std::nullopt;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  f.map_ = MappedFile::open(path);
  const std::span<const std::byte> bytes = f.map_.bytes();
  MOETP_CHECK(bytes.size() >= 8, "{}: file is {} bytes, too short for the 8-byte header length", path, bytes.size());
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | static_cast<uint8_t>(bytes[i]);
  MOETP_CHECK(header_bytes <= kMaxHeaderBytes, "{}: header length {} exceeds the limit of {} bytes", path, header_bytes,
              kMaxHeaderBytes);
  MOETP_CHECK(header_bytes <= bytes.size() - 8, "{}: header length {} runs past the end of the file ({} bytes)", path,
              header_bytes, bytes.size());
  const uint64_t data_begin = 8 + header_bytes;
  const uint64_t data_bytes = bytes.size() - data_begin;

  const json header =
      parse_header(path, std::string_view(reinterpret_cast<const char*>(bytes.data()) + 8, header_bytes));
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      f.metadata_ = parse_metadata(path, value);
    } else {
      f.tensors_.push_back(parse_entry(path, key, value, data_bytes));  // items() are sorted by key
    }
  }
  check_no_overlap(path, f.tensors_);
  for (size_t i = 0; i < f.tensors_.size(); ++i) {
    f.tensors_[i].begin += data_begin;
    f.tensors_[i].end += data_begin;
    f.index_.emplace(f.tensors_[i].name, i);
  }
  return f;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::vector<std::string> names;
    for (const TensorInfo& t : tensors_) names.push_back(t.name);
    MOETP_FAIL("{}: no tensor '{}' (the file has {} tensors; similar: {})", path_, name, tensors_.size(),
               similar_names(name, names));
  }
  return tensors_[it->second];
}

std::span<const std::byte> SafetensorsFile::raw(const std::string& name) const {
  const TensorInfo& t = info(name);
  return map_.bytes().subspan(t.begin, t.end - t.begin);
}

Tensor SafetensorsFile::read(const std::string& name) const {
  const TensorInfo& t = info(name);
  const Conversion c = conversion_for(path_, t);
  Tensor out = Tensor::empty(t.shape, c.out);
  convert(c.stored, map_.bytes().data() + t.begin, static_cast<size_t>(out.numel()), out.raw_data());
  return out;
}

Tensor SafetensorsFile::read_rows(const std::string& name, int64_t row_begin, int64_t num_rows, int64_t col_begin,
                                  int64_t col_end) const {
  const TensorInfo& t = info(name);
  const Conversion c = conversion_for(path_, t);
  MOETP_CHECK(!t.shape.empty(), "{}: tensor '{}' is 0-d; read_rows needs at least 1 dimension", path_, name);
  const int64_t rows = t.shape[0];
  MOETP_CHECK(row_begin >= 0 && num_rows >= 0 && row_begin <= rows - num_rows,
              "{}: tensor '{}' shape {}: rows [{}, {} + {}) out of range [0, {})", path_, name, shape_str(t.shape),
              row_begin, row_begin, num_rows, rows);
  Shape out_shape = t.shape;
  out_shape[0] = num_rows;
  int64_t cols = 1, col_end_resolved = 1;
  if (t.shape.size() == 1) {
    MOETP_CHECK(col_begin == 0 && col_end == -1, "{}: tensor '{}' is 1-D {}: columns [{}, {}) need >= 2 dims", path_,
                name, shape_str(t.shape), col_begin, col_end);
    col_begin = 0;
  } else {
    cols = t.shape[1];
    col_end_resolved = col_end == -1 ? cols : col_end;
    MOETP_CHECK(col_begin >= 0 && col_begin <= col_end_resolved && col_end_resolved <= cols,
                "{}: tensor '{}' shape {}: columns [{}, {}) out of range [0, {})", path_, name, shape_str(t.shape),
                col_begin, col_end, cols);
    out_shape[1] = col_end_resolved - col_begin;
  }
  const int64_t inner = shape_numel(std::span<const int64_t>(t.shape).subspan(std::min<size_t>(2, t.shape.size())));
  const size_t row_elems = static_cast<size_t>(cols * inner);
  const size_t copy_elems = static_cast<size_t>((col_end_resolved - col_begin) * inner);
  const size_t skip_elems = static_cast<size_t>(col_begin * inner);

  Tensor out = Tensor::empty(out_shape, c.out);
  const std::byte* src = map_.bytes().data() + t.begin;
  char* dst = static_cast<char*>(out.raw_data());
  if (copy_elems == row_elems) {  // whole rows: one contiguous block
    convert(c.stored, src + static_cast<size_t>(row_begin) * row_elems * c.stored_bytes,
            static_cast<size_t>(num_rows) * row_elems, dst);
    return out;
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    const size_t first = static_cast<size_t>(row_begin + r) * row_elems + skip_elems;
    convert(c.stored, src + first * c.stored_bytes, copy_elems,
            dst + static_cast<size_t>(r) * copy_elems * out.element_size());
  }
  return out;
}

}  // namespace moetp::io
