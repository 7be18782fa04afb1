// One NCCL communicator over the MPI world, shared by every test of a multi-GPU test binary (link
// tests/dist/nccl_env.cpp into it; it registers itself as a gtest global environment). Rank r uses
// GPU r. Whether to skip is decided together (a rank that skipped alone would leave the others
// waiting in a collective): every rank must see at least world-size GPUs, else every test that
// calls MOETP_REQUIRE_NCCL skips with the reason, so a machine without a GPU passes by skipping.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "comm/nccl_comm.h"

namespace moetp::testing {

class NcclEnvironment : public ::testing::Environment {
 public:
  void SetUp() override;
  void TearDown() override { comm_.reset(); }

  const std::string& skip_reason() const { return skip_reason_; }
  const std::string& error() const { return error_; }
  comm::NcclComm* comm() const { return comm_.get(); }

 private:
  std::string skip_reason_;
  std::string error_;
  std::unique_ptr<comm::NcclComm> comm_;
};

NcclEnvironment& nccl_env();

}  // namespace moetp::testing

// Skips the test (on every rank alike) without a GPU per rank; fails if NCCL could not start.
#define MOETP_REQUIRE_NCCL()                                                           \
  do {                                                                                 \
    auto& env_ = ::moetp::testing::nccl_env();                                         \
    if (!env_.skip_reason().empty()) GTEST_SKIP() << env_.skip_reason();               \
    ASSERT_TRUE(env_.error().empty()) << env_.error();                                 \
    ASSERT_NE(env_.comm(), nullptr);                                                   \
  } while (0)
