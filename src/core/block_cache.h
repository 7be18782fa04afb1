// A size-bucketed cache of memory blocks in front of a raw allocator: freed blocks are kept and
// handed out again for requests of the same rounded size, so a training step that allocates and
// frees the same tensors every step stops calling the raw allocator after the first step. Its
// use here: the CUDA hooks (kernels/cuda/runtime.h, AllocMode::kCaching), where every cudaFree
// synchronises the device and so exposes the host's time between kernels.
//
// The cache itself knows nothing about streams. Reuse is safe when every use of a block is
// ordered before the work that uses the block next: on the GPU, when all work runs on the legacy
// default stream or on streams ordered with it by events (as NcclComm and CudaMoeLayer do), since
// a block freed by the host is then only touched again by work enqueued later on that order.
//
// Sizes: up to 1 MiB rounded up to a multiple of 512 bytes, above that to a multiple of 2 MiB. A
// raw allocation failure releases every cached block and retries once. Thread-safe (one mutex).
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace moetp {

class BlockCache {
 public:
  using RawAlloc = void* (*)(size_t bytes);  // nullptr when out of memory (must not throw)
  using RawFree = void (*)(void* ptr);

  BlockCache(RawAlloc raw_alloc, RawFree raw_free);
  ~BlockCache();  // raw-frees the cached blocks; blocks still live are left to their owners
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  static size_t round_size(size_t bytes);

  // A block of at least `bytes` (round_size(bytes)): a cached one of that size, else a fresh one;
  // nullptr when the raw allocator fails even after release_cached().
  void* allocate(size_t bytes);
  // Returns a block from allocate() to the cache. Throws moetp::Error for any other pointer.
  void deallocate(void* ptr);
  // Raw-frees every cached (not live) block.
  void release_cached();

  struct Stats {
    size_t live_bytes = 0, cached_bytes = 0, peak_live_bytes = 0;
    size_t raw_allocs = 0, reuses = 0, releases = 0;
  };
  Stats stats() const;

 private:
  void release_locked();  // release_cached() with mu_ held

  RawAlloc raw_alloc_;
  RawFree raw_free_;
  mutable std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;  // rounded size -> cached blocks
  std::unordered_map<void*, size_t> live_;     // block -> rounded size
  Stats stats_;
};

}  // namespace moetp
