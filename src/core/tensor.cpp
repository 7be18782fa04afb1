#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "core/bf16.h"

namespace moetp {

namespace {
DeviceHooks g_hooks[2];
constexpr size_t kCpuAlignment = 64;
}  // namespace

void register_device_hooks(Device device, const DeviceHooks& hooks) {
  g_hooks[static_cast<int>(device)] = hooks;
}

bool device_available(Device device) {
  return device == Device::kCpu || g_hooks[static_cast<int>(device)].alloc != nullptr;
}

Storage::Storage(size_t num_bytes, Device device) : num_bytes_(num_bytes), device_(device) {
  if (device == Device::kCpu) {
    const size_t rounded = ((num_bytes + kCpuAlignment - 1) / kCpuAlignment) * kCpuAlignment;
    data_ = std::aligned_alloc(kCpuAlignment, rounded == 0 ? kCpuAlignment : rounded);
    MOETP_CHECK(data_ != nullptr, "out of host memory allocating {} bytes", num_bytes);
    return;
  }
  const DeviceHooks& h = g_hooks[static_cast<int>(device)];
  MOETP_CHECK(h.alloc != nullptr,
              "no {} backend is available (built without CUDA, or the backend was not initialised)",
              device_name(device));
  data_ = h.alloc(num_bytes);
}

Storage::~Storage() {
  if (device_ == Device::kCpu) {
    std::free(data_);
  } else if (data_ != nullptr) {
    g_hooks[static_cast<int>(device_)].free(data_);
  }
}

int64_t shape_numel(std::span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::string shape_str(std::span<const int64_t> shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

Shape contiguous_strides(std::span<const int64_t> shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  for (int64_t s : shape) MOETP_CHECK(s >= 0, "negative dimension in shape {}", shape_str(shape));
  Tensor t;
  t.dtype_ = dtype;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  t.storage_ = std::make_shared<Storage>(static_cast<size_t>(t.numel()) * dtype_size(dtype), device);
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  t.zero_();
  return t;
}

int64_t Tensor::size(int64_t dim) const {
  const int64_t n = ndim();
  const int64_t d = dim < 0 ? dim + n : dim;
  MOETP_CHECK(d >= 0 && d < n, "dim {} out of range for tensor {}", dim, describe());
  return shape_[d];
}

int64_t Tensor::row_numel() const {
  if (shape_.empty()) return 1;
  return shape_numel(std::span<const int64_t>(shape_).subspan(1));
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int64_t i = ndim() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  MOETP_CHECK(defined(), "access to an undefined tensor");
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<int64_t>(element_size());
}

Tensor Tensor::view(Shape shape) const {
  check_contiguous(*this, "view source");
  int64_t infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MOETP_CHECK(infer < 0, "view: more than one -1 in {}", shape_str(shape));
      infer = static_cast<int64_t>(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    MOETP_CHECK(known > 0 && numel() % known == 0, "view: cannot infer -1 in {} for {} elements",
                shape_str(shape), numel());
    shape[infer] = numel() / known;
  }
  MOETP_CHECK(shape_numel(shape) == numel(), "view: shape {} has {} elements, tensor {} has {}",
              shape_str(shape), shape_numel(shape), describe(), numel());
  Tensor t = *this;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::reinterpret(DType dtype, Shape shape) const {
  MOETP_CHECK(defined(), "reinterpret of an undefined tensor");
  check_contiguous(*this, "reinterpret source");
  for (int64_t d : shape) MOETP_CHECK(d >= 0, "reinterpret: negative size in {}", shape_str(shape));
  const size_t esize = dtype_size(dtype);
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * esize;
  MOETP_CHECK(bytes <= num_bytes(), "reinterpret: {}{} needs {} bytes, {} has {}", dtype_name(dtype),
              shape_str(shape), bytes, describe(), num_bytes());
  const size_t byte_offset = static_cast<size_t>(offset_) * element_size();
  MOETP_CHECK(byte_offset % esize == 0, "reinterpret: {} starts at byte {}, not aligned to {} ({} bytes)", describe(),
              byte_offset, dtype_name(dtype), esize);
  Tensor t = *this;
  t.dtype_ = dtype;
  t.offset_ = static_cast<int64_t>(byte_offset / esize);
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice(int64_t dim, int64_t start, int64_t end) const {
  const int64_t n = ndim();
  const int64_t d = dim < 0 ? dim + n : dim;
  MOETP_CHECK(d >= 0 && d < n, "slice: dim {} out of range for {}", dim, describe());
  MOETP_CHECK(0 <= start && start <= end && end <= shape_[d],
              "slice: [{}, {}) out of range for dim {} of {}", start, end, d, describe());
  Tensor t = *this;
  t.offset_ += start * strides_[d];
  t.shape_[d] = end - start;
  return t;
}

Tensor Tensor::transpose(int64_t dim0, int64_t dim1) const {
  const int64_t n = ndim();
  MOETP_CHECK(dim0 >= 0 && dim0 < n && dim1 >= 0 && dim1 < n, "transpose({}, {}) on {}", dim0, dim1,
              describe());
  Tensor t = *this;
  std::swap(t.shape_[dim0], t.shape_[dim1]);
  std::swap(t.strides_[dim0], t.strides_[dim1]);
  return t;
}

namespace {
// Strided element copy on the CPU, any rank, elements of `esize` bytes.
void strided_copy(char* dst, std::span<const int64_t> dst_strides, const char* src,
                  std::span<const int64_t> src_strides, std::span<const int64_t> shape, size_t esize) {
  if (shape.empty()) {
    std::memcpy(dst, src, esize);
    return;
  }
  if (shape.size() == 1) {
    if (dst_strides[0] == 1 && src_strides[0] == 1) {
      std::memcpy(dst, src, esize * static_cast<size_t>(shape[0]));
      return;
    }
    for (int64_t i = 0; i < shape[0]; ++i) {
      std::memcpy(dst + i * dst_strides[0] * static_cast<int64_t>(esize),
                  src + i * src_strides[0] * static_cast<int64_t>(esize), esize);
    }
    return;
  }
  for (int64_t i = 0; i < shape[0]; ++i) {
    strided_copy(dst + i * dst_strides[0] * static_cast<int64_t>(esize), dst_strides.subspan(1),
                 src + i * src_strides[0] * static_cast<int64_t>(esize), src_strides.subspan(1),
                 shape.subspan(1), esize);
  }
}
}  // namespace

void Tensor::copy_from(const Tensor& src) {
  MOETP_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, "copy_from: source {} does not match destination {}",
              src.describe(), describe());
  if (numel() == 0) return;
  if (device() == Device::kCpu && src.device() == Device::kCpu) {
    strided_copy(static_cast<char*>(raw_data()), strides_, static_cast<const char*>(src.raw_data()),
                 src.strides_, shape_, element_size());
    return;
  }
  check_contiguous(*this, "copy_from destination");
  check_contiguous(src, "copy_from source");
  const Device hook_dev = device() == Device::kCpu ? src.device() : device();
  const DeviceHooks& h = g_hooks[static_cast<int>(hook_dev)];
  MOETP_CHECK(h.copy != nullptr, "no {} backend for copy", device_name(hook_dev));
  h.copy(raw_data(), device(), src.raw_data(), src.device(), num_bytes());
}

void Tensor::zero_() {
  if (numel() == 0) return;
  check_contiguous(*this, "zero_");
  if (device() == Device::kCpu) {
    std::memset(raw_data(), 0, num_bytes());
  } else {
    g_hooks[static_cast<int>(device())].memset_zero(raw_data(), num_bytes());
  }
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  t.copy_from(*this);
  return t;
}

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::to(Device target) const {
  if (target == device()) return *this;
  Tensor src = contiguous();
  Tensor t = empty(shape_, dtype_, target);
  t.copy_from(src);
  return t;
}

Tensor Tensor::to(DType target) const {
  if (target == dtype_) return *this;
  check_device(*this, Device::kCpu, "dtype conversion source");
  Tensor src = contiguous();
  Tensor t = empty(shape_, target);
  const int64_t n = numel();
  if (dtype_ == DType::kF32 && target == DType::kBF16) {
    const float* s = src.data<float>();
    bf16* d = t.data<bf16>();
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
  } else if (dtype_ == DType::kBF16 && target == DType::kF32) {
    const bf16* s = src.data<bf16>();
    float* d = t.data<float>();
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
  } else if (dtype_ == DType::kI32 && target == DType::kI64) {
    const int32_t* s = src.data<int32_t>();
    int64_t* d = t.data<int64_t>();
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  } else if (dtype_ == DType::kI64 && target == DType::kI32) {
    const int64_t* s = src.data<int64_t>();
    int32_t* d = t.data<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      MOETP_CHECK(s[i] >= INT32_MIN && s[i] <= INT32_MAX, "i64 -> i32: element {} = {} overflows", i, s[i]);
      d[i] = static_cast<int32_t>(s[i]);
    }
  } else {
    MOETP_FAIL("conversion {} -> {} is not supported", dtype_name(dtype_), dtype_name(target));
  }
  return t;
}

std::string Tensor::describe() const {
  if (!defined()) return "undefined";
  return fmt::format("{}{} {}", dtype_name(dtype_), shape_str(shape_), device_name(device()));
}

void check_dtype(const Tensor& t, DType expected, const char* name) {
  MOETP_CHECK(t.defined() && t.dtype() == expected, "{}: expected dtype {}, got {}", name, dtype_name(expected),
              t.describe());
}

void check_device(const Tensor& t, Device expected, const char* name) {
  MOETP_CHECK(t.defined() && t.device() == expected, "{}: expected device {}, got {}", name,
              device_name(expected), t.describe());
}

void check_shape(const Tensor& t, std::span<const int64_t> expected, const char* name) {
  MOETP_CHECK(t.defined() && std::equal(t.shape().begin(), t.shape().end(), expected.begin(), expected.end()),
              "{}: expected shape {}, got {}", name, shape_str(expected), t.describe());
}

void check_contiguous(const Tensor& t, const char* name) {
  MOETP_CHECK(t.defined() && t.is_contiguous(), "{}: tensor {} must be contiguous (strides {})", name,
              t.describe(), shape_str(t.strides()));
}

}  // namespace moetp
