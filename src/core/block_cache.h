// A size-bucketed cache of memory blocks in front of a raw allocator: freed blocks are kept and
// handed out again for later requests of about their size (below), so a training step that allocates and
// frees the same tensors every step stops calling the raw allocator after the first step. Its
// use here: the CUDA hooks (kernels/cuda/runtime.h, AllocMode::kCaching), where every cudaFree
// synchronises the device and so exposes the host's time between kernels.
//
// The cache itself knows nothing about streams. Reuse is safe when every use of a block is
// ordered before the work that uses the block next: on the GPU, when all work runs on the legacy
// default stream or on streams ordered with it by events (as NcclComm and CudaMoeLayer do), since
// a block freed by the host is then only touched again by work enqueued later on that order.
//
// Sizes: up to 1 MiB rounded up to a multiple of 512 bytes, above that to a multiple of 2 MiB.
// Reuse: a small request takes a cached block of exactly its rounded size; a large one the smallest
// cached block of at most 1/8 more (reuse_limit), so the MoE buffers, whose sizes follow the routing
// and change a little every step, reuse last step's blocks instead of piling up one block per size.
// A raw allocation failure releases every cached block and retries once. Thread-safe (one mutex).
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
  // The largest cached block a request of rounded size `size` may take.
  static size_t reuse_limit(size_t size);

  // A block of at least `bytes` (round_size(bytes)): the smallest cached one up to reuse_limit,
  // else a fresh one; nullptr when the raw allocator fails even after release_cached(). The stats
  // count the whole block as live.
  void* allocate(size_t bytes);
  // Returns a block from allocate() to the cache. Throws moetp::Error for any other pointer.
  void deallocate(void* ptr);
  // Raw-frees every cached (not live) block.
  void release_cached();
  // Starts a new peak: peak_live_bytes = live_bytes.
  void reset_peak();

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
  std::map<size_t, std::vector<void*>> free_;  // block size -> cached blocks (never an empty list)
  std::unordered_map<void*, size_t> live_;     // block -> rounded size
  Stats stats_;
};

}  // namespace moetp
