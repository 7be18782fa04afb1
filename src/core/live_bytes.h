// Bytes held by live allocations and their peak, keyed by pointer (thread-safe): what a counting
// allocator wrapper needs. Used by the CUDA runtime's direct allocator (kernels/cuda/runtime.cpp,
// cuda::memory_stats) and by the benchmarks' counting hooks (bench/cuda_alloc_counter.h).
#pragma once

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <unordered_map>

namespace moetp {

class LiveBytes {
 public:
  // p now holds `bytes`.
  void add(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = bytes;
    current_ += bytes;
    peak_ = std::max(peak_, current_);
  }
  // p is gone; a pointer never added is ignored (allocated before counting started).
  void remove(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    if (const auto it = live_.find(p); it != live_.end()) {
      current_ -= it->second;
      live_.erase(it);
    }
  }
  // The peak restarts from the bytes live now.
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = current_;
  }
  struct Snapshot {
    size_t current = 0, peak = 0;
  };
  Snapshot snapshot() const {
    std::lock_guard<std::mutex> lock(mu_);
    return {current_, peak_};
  }

 private:
  mutable std::mutex mu_;
  std::unordered_map<void*, size_t> live_;
  size_t current_ = 0, peak_ = 0;
};

}  // namespace moetp
