// Counting wrapper of the runtime's CUDA hooks (kernels/cuda/runtime.h: runtime_hooks), shared by
// the GPU benchmarks: the peak of bytes live in tensors allocated through core's CUDA hooks, exact
// (every alloc/free counted), comparable to torch.cuda.max_memory_allocated. Excludes the few raw
// cudaMalloc's outside the hooks (cuBLAS workspace, small flags). Header-only (one per program).
#pragma once

#include <cstddef>

#include "core/live_bytes.h"
#include "core/tensor.h"
#include "kernels/cuda/runtime.h"

namespace moetp::bench {

inline LiveBytes& alloc_stats() {
  static LiveBytes s;
  return s;
}

inline void* counting_alloc(size_t num_bytes) {
  const size_t n = num_bytes == 0 ? 1 : num_bytes;
  void* p = cuda::runtime_hooks().alloc(n);  // the runtime's allocator (direct or caching, --alloc)
  alloc_stats().add(p, n);
  return p;
}

inline void counting_free(void* p) {
  alloc_stats().remove(p);
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
inline void reset_peak() { alloc_stats().reset_peak(); }

inline size_t peak_bytes() { return alloc_stats().snapshot().peak; }

}  // namespace moetp::bench
