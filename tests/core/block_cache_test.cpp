// BlockCache against a fake raw allocator (host malloc with a byte budget): rounding, reuse of
// freed blocks, the release-and-retry on a raw failure, bad frees, and the statistics.
#include "core/block_cache.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <string>

#include "core/check.h"

namespace moetp {
namespace {

// A raw allocator with a budget, counting its calls.
struct Fake {
  static inline size_t budget = 0, used = 0, allocs = 0, frees = 0;
  static inline std::map<void*, size_t> live;
  static void reset(size_t b) {
    budget = b;
    used = allocs = frees = 0;
    live.clear();
  }
  static void* alloc(size_t bytes) {
    if (used + bytes > budget) return nullptr;
    void* p = std::malloc(bytes);
    used += bytes;
    ++allocs;
    live[p] = bytes;
    return p;
  }
  static void free(void* p) {
    ++frees;
    used -= live.at(p);
    live.erase(p);
    std::free(p);
  }
};

TEST(BlockCache, RoundsSmallTo512AndLargeTo2MiB) {
  EXPECT_EQ(BlockCache::round_size(0), 512u);
  EXPECT_EQ(BlockCache::round_size(1), 512u);
  EXPECT_EQ(BlockCache::round_size(512), 512u);
  EXPECT_EQ(BlockCache::round_size(513), 1024u);
  EXPECT_EQ(BlockCache::round_size(size_t{1} << 20), size_t{1} << 20);
  EXPECT_EQ(BlockCache::round_size((size_t{1} << 20) + 1), size_t{2} << 20);
  EXPECT_EQ(BlockCache::round_size((size_t{5} << 20) + 7), size_t{6} << 20);
}

TEST(BlockCache, ReusesFreedBlocksOfTheSameRoundedSize) {
  Fake::reset(size_t{64} << 20);
  {
    BlockCache cache(Fake::alloc, Fake::free);
    void* a = cache.allocate(1000);  // 1024
    void* b = cache.allocate(3000);  // 3072
    EXPECT_EQ(Fake::allocs, 2u);
    cache.deallocate(a);
    EXPECT_EQ(cache.allocate(1024), a) << "same rounded size: the cached block";
    EXPECT_EQ(Fake::allocs, 2u);
    void* c = cache.allocate(600);  // 1024 again, none cached now: a fresh block
    EXPECT_NE(c, a);
    EXPECT_EQ(Fake::allocs, 3u);
    cache.deallocate(b);
    void* d = cache.allocate(2000);  // 2048: not the cached 3072 block
    EXPECT_NE(d, b);
    const BlockCache::Stats s = cache.stats();
    EXPECT_EQ(s.live_bytes, 1024u + 1024u + 2048u);
    EXPECT_EQ(s.cached_bytes, 3072u);
    EXPECT_EQ(s.reuses, 1u);
    EXPECT_EQ(s.raw_allocs, 4u);
    EXPECT_EQ(s.peak_live_bytes, 1024u + 3072u + 1024u) << "a, b and c were live at once";
    for (void* p : {a, c, d}) cache.deallocate(p);
    EXPECT_EQ(cache.stats().live_bytes, 0u);
    EXPECT_EQ(Fake::frees, 0u) << "nothing goes back to the raw allocator while cached";
  }
  EXPECT_EQ(Fake::frees, 4u) << "the destructor releases every cached block";
  EXPECT_TRUE(Fake::live.empty());
}

TEST(BlockCache, LargeRequestsTakeTheSmallestCachedBlockWithinAnEighthMore) {
  constexpr size_t MiB = size_t{1} << 20;
  EXPECT_EQ(BlockCache::reuse_limit(4096), 4096u) << "small: exact size only";
  EXPECT_EQ(BlockCache::reuse_limit(64 * MiB), 72 * MiB);
  Fake::reset(size_t{1} << 30);
  BlockCache cache(Fake::alloc, Fake::free);
  void* b100 = cache.allocate(100 * MiB);
  void* b90 = cache.allocate(90 * MiB);
  void* b200 = cache.allocate(200 * MiB);
  for (void* p : {b100, b90, b200}) cache.deallocate(p);
  ASSERT_EQ(Fake::allocs, 3u);
  // 88 MiB (limit 99): the 90 MiB block, the smallest that fits; 100 MiB stays cached.
  void* a = cache.allocate(88 * MiB);
  EXPECT_EQ(a, b90);
  EXPECT_EQ(cache.stats().live_bytes, 90 * MiB) << "the whole block counts as live";
  // 95 MiB (rounded 96, limit 108): the 100 MiB block.
  void* b = cache.allocate(95 * MiB);
  EXPECT_EQ(b, b100);
  // 150 MiB (limit 168): the 200 MiB block is more than an eighth larger: a fresh block.
  void* c = cache.allocate(150 * MiB);
  EXPECT_NE(c, b200);
  EXPECT_EQ(Fake::allocs, 4u);
  EXPECT_EQ(cache.stats().cached_bytes, 200 * MiB);
  EXPECT_EQ(cache.stats().reuses, 2u);
  for (void* p : {a, b, c}) cache.deallocate(p);
  EXPECT_EQ(cache.stats().cached_bytes, 90 * MiB + 100 * MiB + 200 * MiB + 150 * MiB);
}

TEST(BlockCache, TheReuseLimitIsInclusiveAndExact) {
  constexpr size_t MiB = size_t{1} << 20;
  Fake::reset(size_t{1} << 30);
  BlockCache cache(Fake::alloc, Fake::free);
  void* b72 = cache.allocate(72 * MiB);
  void* b74 = cache.allocate(74 * MiB);
  cache.deallocate(b74);
  // 64 MiB (limit 72): only the 74 MiB block is cached, 2 MiB past the limit: a fresh block.
  void* a = cache.allocate(64 * MiB);
  EXPECT_NE(a, b74);
  cache.deallocate(b72);
  // Now the 72 MiB block, exactly at the limit, is taken.
  void* b = cache.allocate(64 * MiB);
  EXPECT_EQ(b, b72);
  for (void* p : {a, b}) cache.deallocate(p);
}

TEST(BlockCache, PeakCountsLiveBytesOnly) {
  Fake::reset(size_t{64} << 20);
  BlockCache cache(Fake::alloc, Fake::free);
  void* a = cache.allocate(512);
  void* b = cache.allocate(512);
  cache.deallocate(a);
  cache.deallocate(b);
  void* c = cache.allocate(512);
  EXPECT_EQ(cache.stats().peak_live_bytes, 1024u);
  cache.reset_peak();
  EXPECT_EQ(cache.stats().peak_live_bytes, 512u) << "a new peak starts at what is live";
  void* d = cache.allocate(1000);
  cache.deallocate(d);
  EXPECT_EQ(cache.stats().peak_live_bytes, 512u + 1024u);
  cache.deallocate(c);
}

TEST(BlockCache, ReleasesTheCacheAndRetriesWhenTheRawAllocatorFails) {
  Fake::reset(size_t{6} << 20);  // room for three 2 MiB blocks
  BlockCache cache(Fake::alloc, Fake::free);
  void* a = cache.allocate(size_t{2} << 20);
  void* b = cache.allocate(size_t{2} << 20);
  cache.deallocate(a);
  cache.deallocate(b);
  // 4 MiB: no cached block of that size and only 2 MiB of budget left; the two cached 2 MiB blocks
  // are released and the retry succeeds.
  void* big = cache.allocate(size_t{4} << 20);
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(cache.stats().releases, 1u);
  EXPECT_EQ(cache.stats().cached_bytes, 0u);
  EXPECT_EQ(Fake::frees, 2u);
  // Nothing cached and no budget: nullptr (the caller reports out of memory).
  EXPECT_EQ(cache.allocate(size_t{4} << 20), nullptr);
  cache.deallocate(big);
}

TEST(BlockCache, RejectsPointersItDidNotHandOut) {
  Fake::reset(size_t{1} << 20);
  BlockCache cache(Fake::alloc, Fake::free);
  int x = 0;
  try {
    cache.deallocate(&x);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("was not allocated by this cache (or freed twice)"), std::string::npos);
  }
  void* a = cache.allocate(100);
  cache.deallocate(a);
  EXPECT_THROW(cache.deallocate(a), Error) << "a double free is caught";
}

}  // namespace
}  // namespace moetp
