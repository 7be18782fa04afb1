// Access to the world communicator inside multi-rank tests (set by mpi_main.cpp).
#pragma once

#include <gtest/gtest.h>

#include "comm/mpi_comm.h"

namespace moetp::testing {

void set_world(comm::MpiComm* world);
comm::MpiComm& world();

}  // namespace moetp::testing

// Skips the test unless the job has exactly `n` ranks (each binary runs at several -np values).
#define MOETP_REQUIRE_WORLD_SIZE(n)                                                               \
  do {                                                                                            \
    if (::moetp::testing::world().size() != (n)) {                                                \
      GTEST_SKIP() << "needs " << (n) << " ranks, job has " << ::moetp::testing::world().size(); \
    }                                                                                             \
  } while (0)
