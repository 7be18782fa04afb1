// Tensor: owning, reference-counted storage plus a shape/stride view. Row-major by default.
// Views (view, slice, transpose) share storage; clone/contiguous/to copy. CPU memory is 64-byte
// aligned; CUDA memory comes from the allocator the CUDA backend registers (core never links CUDA).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"

namespace moetp {

using Shape = std::vector<int64_t>;

// Hooks a device backend registers so core can allocate, free and copy its memory.
struct DeviceHooks {
  void* (*alloc)(size_t num_bytes) = nullptr;
  void (*free)(void* ptr) = nullptr;
  // Copies num_bytes between any two devices; blocking with respect to the host.
  void (*copy)(void* dst, Device dst_device, const void* src, Device src_device, size_t num_bytes) = nullptr;
  void (*memset_zero)(void* dst, size_t num_bytes) = nullptr;
};
void register_device_hooks(Device device, const DeviceHooks& hooks);
bool device_available(Device device);

class Storage {
 public:
  Storage(size_t num_bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t num_bytes() const { return num_bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t num_bytes_ = 0;
  Device device_ = Device::kCpu;
};

std::string shape_str(std::span<const int64_t> shape);
int64_t shape_numel(std::span<const int64_t> shape);

class Tensor {
 public:
  Tensor() = default;  // undefined tensor: defined() == false

  static Tensor empty(Shape shape, DType dtype, Device device = Device::kCpu);
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::kCpu);
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, Shape shape);
  template <typename T>
  static Tensor full(Shape shape, T value);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t ndim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t dim) const;
  int64_t numel() const { return shape_numel(shape_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::kCpu; }
  size_t element_size() const { return dtype_size(dtype_); }
  size_t num_bytes() const { return static_cast<size_t>(numel()) * element_size(); }
  bool is_contiguous() const;
  // Rows = size of dim 0 (1 for a scalar); row_numel = elements per row.
  int64_t rows() const { return shape_.empty() ? 1 : shape_[0]; }
  int64_t row_numel() const;

  // Typed access; checks the dtype. Pointer to the first element of the view.
  template <typename T>
  T* data();
  template <typename T>
  const T* data() const;
  void* raw_data() const;
  // Typed CPU element read/write of a contiguous tensor (checks device and bounds).
  template <typename T>
  std::vector<T> to_vector() const;

  // Views (share storage).
  Tensor view(Shape shape) const;                              // contiguous only; one -1 allowed
  Tensor slice(int64_t dim, int64_t start, int64_t end) const;  // [start, end) along dim
  Tensor narrow_rows(int64_t start, int64_t length) const { return slice(0, start, start + length); }
  Tensor transpose(int64_t dim0, int64_t dim1) const;
  // The first bytes of this contiguous view read as a contiguous `dtype` tensor of `shape` (shares
  // storage; for a buffer whose halves serve two dtypes at different times). Needs the bytes to fit
  // in this view and its start to be aligned to `dtype`.
  Tensor reinterpret(DType dtype, Shape shape) const;

  // Copies.
  Tensor clone() const;       // contiguous copy on the same device
  Tensor contiguous() const;  // *this when already contiguous
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;  // CPU conversion f32 <-> bf16, i32 <-> i64
  void copy_from(const Tensor& src);  // same shape and dtype; any devices
  void zero_();

  // "f32[4, 8] cpu"
  std::string describe() const;

 private:
  std::shared_ptr<Storage> storage_;
  int64_t offset_ = 0;  // in elements
  Shape shape_;
  Shape strides_;
  DType dtype_ = DType::kF32;
};

Shape contiguous_strides(std::span<const int64_t> shape);

// Checks used at API boundaries; messages name the tensor and the values.
void check_dtype(const Tensor& t, DType expected, const char* name);
void check_device(const Tensor& t, Device expected, const char* name);
void check_shape(const Tensor& t, std::span<const int64_t> expected, const char* name);
inline void check_shape(const Tensor& t, std::initializer_list<int64_t> expected, const char* name) {
  check_shape(t, std::span<const int64_t>(expected.begin(), expected.size()), name);
}
void check_contiguous(const Tensor& t, const char* name);

// ---- template implementations ----
template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, Shape shape) {
  MOETP_CHECK(shape_numel(shape) == static_cast<int64_t>(values.size()),
              "from_vector: {} values do not fill shape {}", values.size(), shape_str(shape));
  Tensor t = empty(std::move(shape), DTypeOf<T>::value);
  std::copy(values.begin(), values.end(), t.data<T>());
  return t;
}

template <typename T>
Tensor Tensor::full(Shape shape, T value) {
  Tensor t = empty(std::move(shape), DTypeOf<T>::value);
  T* p = t.data<T>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = value;
  return t;
}

template <typename T>
T* Tensor::data() {
  MOETP_CHECK(DTypeOf<T>::value == dtype_, "tensor {} accessed as {}", describe(),
              dtype_name(DTypeOf<T>::value));
  return static_cast<T*>(raw_data());
}

template <typename T>
const T* Tensor::data() const {
  MOETP_CHECK(DTypeOf<T>::value == dtype_, "tensor {} accessed as {}", describe(),
              dtype_name(DTypeOf<T>::value));
  return static_cast<const T*>(raw_data());
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor c = to(Device::kCpu).contiguous();
  const T* p = c.data<T>();
  return std::vector<T>(p, p + c.numel());
}

}  // namespace moetp
