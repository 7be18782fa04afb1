// Counting wrapper of the runtime's CUDA hooks (kernels/cuda/runtime.h: runtime_hooks), shared by
// the GPU benchmarks: the peak of bytes live in tensors allocated through core's CUDA hooks, exact
// (every alloc/free counted), comparable to torch.cuda.max_memory_allocated. Excludes the few raw
// cudaMalloc's outside the hooks (cuBLAS workspace, small flags). Header-only (one per program).
#pragma once

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <unordered_map>

#include "core/tensor.h"
#include "kernels/cuda/runtime.h"

namespace moetp::bench {

struct AllocStats {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;
  size_t current = 0, peak = 0;
};
inline AllocStats& alloc_stats() {
  static AllocStats s;
  return s;
}

inline void* counting_alloc(size_t num_bytes) {
  const size_t n = num_bytes == 0 ? 1 : num_bytes;
  void* p = cuda::runtime_hooks().alloc(n);  // the runtime's allocator (direct or caching, --alloc)
  AllocStats& s = alloc_stats();
  std::lock_guard<std::mutex> lock(s.mu);
  s.live[p] = n;
  s.current += n;
  s.peak = std::max(s.peak, s.current);
  return p;
}

inline void counting_free(void* p) {
  {
    AllocStats& s = alloc_stats();
    std::lock_guard<std::mutex> lock(s.mu);
    if (const auto it = s.live.find(p); it != s.live.end()) {
      s.current -= it->second;
      s.live.erase(it);
    }
  }
  cuda::runtime_hooks().free(p);
}

// After cuda::init: every later CUDA tensor allocation is counted.
inline void install_counting_hooks() {
  DeviceHooks hooks = cuda::runtime_hooks();  // copies and memset as the runtime's
  hooks.alloc = counting_alloc;
  hooks.free = counting_free;
  register_device_hooks(Device::kCuda, hooks);
}

// The peak restarts from the bytes live now.
inline void reset_peak() {
  AllocStats& s = alloc_stats();
  std::lock_guard<std::mutex> lock(s.mu);
  s.peak = s.current;
}

inline size_t peak_bytes() {
  AllocStats& s = alloc_stats();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.peak;
}

}  // namespace moetp::bench
