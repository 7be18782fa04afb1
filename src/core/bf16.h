// f32 <-> bf16 conversion, round-to-nearest-even; NaN stays NaN (quiet), Inf stays Inf.
// Header-only and constexpr-friendly so host code, tests and the CUDA backend's host side agree.
#pragma once

#include <bit>
#include <cstdint>

#include "core/dtype.h"

namespace moetp {

constexpr bf16 f32_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return bf16{static_cast<uint16_t>((u >> 16) | 0x0040u)};  // quiet NaN, sign kept
  }
  const uint32_t lsb = (u >> 16) & 1u;
  const uint32_t rounded = u + 0x7fffu + lsb;
  return bf16{static_cast<uint16_t>(rounded >> 16)};
}

constexpr float bf16_to_f32(bf16 h) { return std::bit_cast<float>(static_cast<uint32_t>(h.bits) << 16); }

// Rounds an f32 through bf16 and back: what storing a value in bf16 does to it.
constexpr float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

}  // namespace moetp
