// Safetensors writers: SafetensorsStreamWriter writes a space-padded header, then packed tensor
// data one tensor at a time, through AtomicFileWriter, so a failed or interrupted write leaves the
// old file in place; write_safetensors checks every tensor first, then streams them sorted by name
// (safetensors.h).
#include <algorithm>

#include "core/bf16.h"
#include "core/check.h"
#include "io/safetensors.h"

namespace moetp::io {

namespace {

using nlohmann::json;

// Converted elements go out in chunks, so a large tensor is never held twice in memory.
constexpr size_t kChunkElems = size_t{1} << 16;

size_t stored_bytes(const std::string& dtype) { return dtype == "BF16" ? 2 : dtype == "I64" ? 8 : 4; }

void check_name_and_dtype(const std::string& path, const std::string& name, const std::string& dtype) {
  MOETP_CHECK(!name.empty() && name != "__metadata__", "write_safetensors {}: invalid tensor name '{}'", path, name);
  MOETP_CHECK(dtype == "F32" || dtype == "BF16" || dtype == "I32" || dtype == "I64",
              "write_safetensors {}: tensor '{}' has dtype '{}' (F32, BF16, I32 or I64 can be written)", path, name,
              dtype);
}

void check_tensor(const std::string& path, const WriteTensor& w) {
  check_name_and_dtype(path, w.name, w.dtype);
  MOETP_CHECK(w.value.defined(), "write_safetensors {}: tensor '{}' is undefined", path, w.name);
  const DType v = w.value.dtype();
  const bool is_float = v == DType::kF32 || v == DType::kBF16;
  const bool ok = ((w.dtype == "F32" || w.dtype == "BF16") && is_float) || (w.dtype == "I32" && v == DType::kI32) ||
                  (w.dtype == "I64" && v == DType::kI64);
  MOETP_CHECK(ok,
              "write_safetensors {}: tensor '{}' ({}) cannot be written as dtype '{}' "
              "(F32 and BF16 take f32 or bf16, I32 takes i32, I64 takes i64)",
              path, w.name, w.value.describe(), w.dtype);
}

template <typename Out, typename In, typename Fn>
void write_converted(AtomicFileWriter& out, const In* src, size_t count, Fn convert_one) {
  std::vector<Out> buf(std::min(kChunkElems, count));
  for (size_t i = 0; i < count; i += kChunkElems) {
    const size_t n = std::min(kChunkElems, count - i);
    for (size_t j = 0; j < n; ++j) buf[j] = convert_one(src[i + j]);
    out.write(buf.data(), n * sizeof(Out));
  }
}

// `value` is a contiguous CPU tensor that check_tensor accepted for `dtype`.
void write_data(AtomicFileWriter& out, const Tensor& value, const std::string& dtype) {
  const size_t count = static_cast<size_t>(value.numel());
  if (dtype == "BF16" && value.dtype() == DType::kF32) {
    write_converted<uint16_t>(out, value.data<float>(), count, [](float f) { return f32_to_bf16(f).bits; });
  } else if (dtype == "F32" && value.dtype() == DType::kBF16) {
    write_converted<float>(out, value.data<bf16>(), count, [](bf16 h) { return bf16_to_f32(h); });
  } else {
    out.write(value.raw_data(), value.num_bytes());  // same representation: bytes as they are
  }
}

}  // namespace

SafetensorsStreamWriter::SafetensorsStreamWriter(std::string path, std::vector<Entry> entries,
                                                 const std::map<std::string, std::string>& metadata)
    : path_(std::move(path)), entries_(std::move(entries)) {
  std::vector<const std::string*> names;
  for (const Entry& e : entries_) {
    check_name_and_dtype(path_, e.name, e.dtype);
    names.push_back(&e.name);
  }
  std::sort(names.begin(), names.end(), [](const std::string* a, const std::string* b) { return *a < *b; });
  for (size_t i = 1; i < names.size(); ++i) {
    MOETP_CHECK(*names[i - 1] != *names[i], "write_safetensors {}: duplicate tensor name '{}'", path_, *names[i]);
  }
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  for (const Entry& e : entries_) {
    const uint64_t num_bytes = static_cast<uint64_t>(shape_numel(e.shape)) * stored_bytes(e.dtype);
    json shape = json::array();
    for (int64_t d : e.shape) shape.push_back(d);
    header[e.name] = {{"dtype", e.dtype},
                      {"shape", shape},
                      {"data_offsets", json::array({data_bytes_, data_bytes_ + num_bytes})}};
    data_bytes_ += num_bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {  // e.g. a name or metadata value that is not valid UTF-8
    MOETP_FAIL("write_safetensors {}: cannot encode the header: {}", path_, e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // data area starts 8-byte aligned
  uint8_t length_le[8];
  for (int i = 0; i < 8; ++i) length_le[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  out_ = std::make_unique<AtomicFileWriter>(path_);
  out_->write(length_le, sizeof(length_le));
  out_->write(text.data(), text.size());
}

SafetensorsStreamWriter::~SafetensorsStreamWriter() = default;

void SafetensorsStreamWriter::write_next(const Tensor& value) {
  MOETP_CHECK(next_ < entries_.size(), "write_safetensors {}: a tensor after the last of {} entries", path_,
              entries_.size());
  const Entry& e = entries_[next_];
  check_tensor(path_, WriteTensor{e.name, value, e.dtype});
  MOETP_CHECK(value.shape() == e.shape, "write_safetensors {}: tensor '{}' is {}, its entry says shape {}", path_,
              e.name, value.describe(), shape_str(e.shape));
  write_data(*out_, value.to(Device::kCpu).contiguous(), e.dtype);
  ++next_;
}

void SafetensorsStreamWriter::commit() {
  MOETP_CHECK(next_ == entries_.size(), "write_safetensors {}: commit after {} of {} tensors", path_, next_,
              entries_.size());
  out_->commit();
}

void write_safetensors(const std::string& path, const std::vector<WriteTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<const WriteTensor*> sorted;
  for (const WriteTensor& w : tensors) {
    check_tensor(path, w);
    sorted.push_back(&w);
  }
  std::sort(sorted.begin(), sorted.end(), [](const WriteTensor* a, const WriteTensor* b) { return a->name < b->name; });
  std::vector<SafetensorsStreamWriter::Entry> entries;
  for (const WriteTensor* w : sorted) entries.push_back({w->name, w->value.shape(), w->dtype});
  SafetensorsStreamWriter out(path, std::move(entries), metadata);
  for (const WriteTensor* w : sorted) out.write_next(w->value);
  out.commit();
}

}  // namespace moetp::io
