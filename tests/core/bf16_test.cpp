#include "core/bf16.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>

namespace moetp {
namespace {

uint16_t bits_of(float f) { return f32_to_bf16(f).bits; }
float from_bits(uint32_t u) { return std::bit_cast<float>(u); }

TEST(Bf16, ExactValuesRoundTrip) {
  for (float f : {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 2.0f, 65280.0f, -3.0f}) {
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(f)), f) << f;
  }
  EXPECT_EQ(bits_of(1.0f), 0x3f80);
  EXPECT_EQ(bits_of(-2.0f), 0xc000);
}

TEST(Bf16, RoundsToNearestEven) {
  // 1.0 + half an ulp of bf16: the tie goes to the even mantissa (1.0).
  EXPECT_EQ(bits_of(from_bits(0x3f808000u)), 0x3f80);
  // 1.0 + 1 ulp + half an ulp: tie goes up to the even mantissa 0x3f82.
  EXPECT_EQ(bits_of(from_bits(0x3f818000u)), 0x3f82);
  // Just above the tie rounds up, just below rounds down.
  EXPECT_EQ(bits_of(from_bits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(bits_of(from_bits(0x3f807fffu)), 0x3f80);
  // Negative ties mirror positive ones.
  EXPECT_EQ(bits_of(from_bits(0xbf808000u)), 0xbf80);
}

TEST(Bf16, OverflowInfNanAndDenormals) {
  // The largest f32 rounds up to infinity.
  EXPECT_EQ(bits_of(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(bits_of(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(bits_of(-std::numeric_limits<float>::infinity()), 0xff80);
  // A NaN whose payload sits only in the low bits must stay a NaN (not become Inf).
  const float nan_low = from_bits(0x7f800001u);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(nan_low))));
  EXPECT_TRUE(std::isnan(round_bf16(std::numeric_limits<float>::quiet_NaN())));
  // Denormals round like any other value.
  EXPECT_EQ(bits_of(from_bits(0x00018000u)), 0x0002);
  EXPECT_EQ(bits_of(from_bits(0x00008000u)), 0x0000);
}

TEST(Bf16, RoundingErrorIsAtMostHalfAnUlp) {
  // In [1, 2) a bf16 ulp is 2^-7 (7 stored mantissa bits).
  for (uint32_t u = 0x3f800000u; u < 0x40000000u; u += 0x1357u) {
    const float f = from_bits(u);
    const float r = round_bf16(f);
    EXPECT_LE(std::fabs(r - f), std::ldexp(1.0f, -7) * 0.5f) << f;
  }
}

}  // namespace
}  // namespace moetp
