// Element types and devices a Tensor can hold. The CPU reference path computes in f32; the CUDA
// path stores parameters and activations in bf16 with f32 accumulation. i32/i64 hold ids and counts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace moetp {

enum class DType : uint8_t { kF32, kBF16, kI32, kI64 };
enum class Device : uint8_t { kCpu, kCuda };

constexpr size_t dtype_size(DType d) {
  switch (d) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "?";
}

constexpr std::string_view device_name(Device d) { return d == Device::kCpu ? "cpu" : "cuda"; }

// bf16 storage type: the upper 16 bits of an IEEE f32.
struct bf16 {
  uint16_t bits;
};

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kF32; };
template <> struct DTypeOf<bf16> { static constexpr DType value = DType::kBF16; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::kI32; };
template <> struct DTypeOf<int64_t> { static constexpr DType value = DType::kI64; };

}  // namespace moetp
