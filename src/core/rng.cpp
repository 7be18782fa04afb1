#include "core/rng.h"

#include <cmath>

namespace moetp {

namespace {
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}
}  // namespace

Philox4x32 philox4x32(Philox4x32 ctr, std::array<uint32_t, 2> key) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, ctr[0], hi0, lo0);
    mulhilo(kMul1, ctr[2], hi1, lo1);
    ctr = {hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0};
    key[0] += kWeyl0;
    key[1] += kWeyl1;
  }
  return ctr;
}

uint64_t stream_id(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

Philox4x32 CounterRng::bits(uint64_t index) const {
  const Philox4x32 ctr = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                          static_cast<uint32_t>(stream_), static_cast<uint32_t>(stream_ >> 32)};
  return philox4x32(ctr, {static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32)});
}

float CounterRng::uniform(uint64_t index) const {
  return static_cast<float>(bits(index)[0] >> 8) * (1.0f / 16777216.0f);
}

float CounterRng::normal(uint64_t index) const {
  const Philox4x32 b = bits(index);
  // u1 in (0, 1] so log is finite; u2 in [0, 1).
  const double u1 = (static_cast<double>(b[0] >> 8) + 1.0) / 16777216.0;
  const double u2 = static_cast<double>(b[1] >> 8) / 16777216.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

void fill_uniform(std::span<float> out, const CounterRng& rng, uint64_t first_index, float lo, float hi) {
  for (size_t i = 0; i < out.size(); ++i) out[i] = lo + (hi - lo) * rng.uniform(first_index + i);
}

void fill_normal(std::span<float> out, const CounterRng& rng, uint64_t first_index, float mean, float std) {
  for (size_t i = 0; i < out.size(); ++i) out[i] = mean + std * rng.normal(first_index + i);
}

}  // namespace moetp
