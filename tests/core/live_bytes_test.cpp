// LiveBytes: current and peak bytes of live allocations, by pointer.
#include "core/live_bytes.h"

#include <gtest/gtest.h>

namespace moetp {
namespace {

TEST(LiveBytes, CountsCurrentAndPeakAndIgnoresUnknownPointers) {
  LiveBytes c;
  int a = 0, b = 0, unknown = 0;
  c.add(&a, 100);
  c.add(&b, 50);
  c.remove(&a);
  EXPECT_EQ(c.snapshot().current, 50u);
  EXPECT_EQ(c.snapshot().peak, 150u);
  c.remove(&unknown);  // allocated before counting started
  EXPECT_EQ(c.snapshot().current, 50u);
  c.reset_peak();
  EXPECT_EQ(c.snapshot().peak, 50u) << "a new peak starts at what is live";
  c.add(&a, 20);
  EXPECT_EQ(c.snapshot().peak, 70u);
  c.remove(&a);
  c.remove(&b);
  EXPECT_EQ(c.snapshot().current, 0u);
  EXPECT_EQ(c.snapshot().peak, 70u);
}

}  // namespace
}  // namespace moetp
