#include "core/block_cache.h"

#include <algorithm>

#include "core/check.h"

namespace moetp {

namespace {
constexpr size_t kSmall = size_t{1} << 20;  // 1 MiB
constexpr size_t kSmallRound = 512;
constexpr size_t kLargeRound = size_t{2} << 20;  // 2 MiB
}  // namespace

BlockCache::BlockCache(RawAlloc raw_alloc, RawFree raw_free) : raw_alloc_(raw_alloc), raw_free_(raw_free) {
  MOETP_CHECK(raw_alloc != nullptr && raw_free != nullptr, "BlockCache needs a raw allocator and a raw free");
}

BlockCache::~BlockCache() { release_cached(); }

size_t BlockCache::round_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  const size_t unit = bytes <= kSmall ? kSmallRound : kLargeRound;
  return (bytes + unit - 1) / unit * unit;
}

size_t BlockCache::reuse_limit(size_t size) { return size <= kSmall ? size : size + size / 8; }

void* BlockCache::allocate(size_t bytes) {
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  void* p = nullptr;
  size_t block = size;
  // Best fit among the cached blocks no larger than reuse_limit(size) (the map holds no empty lists).
  if (auto it = free_.lower_bound(size); it != free_.end() && it->first <= reuse_limit(size)) {
    block = it->first;
    p = it->second.back();
    it->second.pop_back();
    if (it->second.empty()) free_.erase(it);
    stats_.cached_bytes -= block;
    ++stats_.reuses;
  } else {
    p = raw_alloc_(size);
    if (p == nullptr && stats_.cached_bytes > 0) {
      release_locked();
      ++stats_.releases;
      p = raw_alloc_(size);
    }
    if (p == nullptr) return nullptr;
    ++stats_.raw_allocs;
  }
  live_[p] = block;
  stats_.live_bytes += block;
  stats_.peak_live_bytes = std::max(stats_.peak_live_bytes, stats_.live_bytes);
  return p;
}

void BlockCache::deallocate(void* ptr) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = live_.find(ptr);
  MOETP_CHECK(it != live_.end(), "BlockCache::deallocate: {} was not allocated by this cache (or freed twice)", ptr);
  const size_t size = it->second;
  live_.erase(it);
  stats_.live_bytes -= size;
  free_[size].push_back(ptr);
  stats_.cached_bytes += size;
}

void BlockCache::release_cached() {
  std::lock_guard<std::mutex> lock(mu_);
  release_locked();
}

void BlockCache::reset_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.peak_live_bytes = stats_.live_bytes;
}

void BlockCache::release_locked() {
  for (auto& [size, blocks] : free_) {
    for (void* b : blocks) raw_free_(b);
  }
  free_.clear();
  stats_.cached_bytes = 0;
}

BlockCache::Stats BlockCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace moetp
