// Counter-based RNG (Philox4x32-10, Salmon et al. 2011). A draw is a pure function of
// (seed, stream id, element index): no state, so any rank can produce element i of any tensor
// without producing the others. Parameter initialisation keys the stream by the parameter's name,
// which makes the initial global model identical whatever the sharding.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string_view>

namespace moetp {

using Philox4x32 = std::array<uint32_t, 4>;

// Philox4x32-10 of counter `ctr` under key `key`.
Philox4x32 philox4x32(Philox4x32 ctr, std::array<uint32_t, 2> key);

// Stream id of a name (FNV-1a 64-bit): stable across runs, platforms and builds.
uint64_t stream_id(std::string_view name);

class CounterRng {
 public:
  CounterRng(uint64_t seed, uint64_t stream) : seed_(seed), stream_(stream) {}

  // Four raw 32-bit words for element `index`.
  Philox4x32 bits(uint64_t index) const;
  // Uniform in [0, 1), 24 bits of resolution.
  float uniform(uint64_t index) const;
  // Standard normal (Box-Muller on the first two words).
  float normal(uint64_t index) const;

  uint64_t seed() const { return seed_; }
  uint64_t stream() const { return stream_; }

 private:
  uint64_t seed_;
  uint64_t stream_;
};

// out[i] = lo + (hi - lo) * uniform(first_index + i)
void fill_uniform(std::span<float> out, const CounterRng& rng, uint64_t first_index, float lo, float hi);
// out[i] = mean + std * normal(first_index + i)
void fill_normal(std::span<float> out, const CounterRng& rng, uint64_t first_index, float mean, float std);

}  // namespace moetp
