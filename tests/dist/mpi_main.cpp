// main() for multi-rank GoogleTest binaries launched by CTest through mpirun.
// Rank 0 prints the usual GoogleTest output; other ranks print only their failures, prefixed
// with their rank. At the end the failure flag is OR-reduced so every rank (and so mpirun, and
// so CTest) returns non-zero when any rank failed.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "dist/mpi_env.h"

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed()) {
      std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
    }
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  moetp::comm::MpiRuntime runtime(&argc, &argv);
  auto world = moetp::comm::MpiComm::world();
  moetp::testing::set_world(world.get());
  const int rank = world->rank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int local = RUN_ALL_TESTS();
  int any = local;
  MPI_Allreduce(&local, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any != 0 && local == 0) std::fprintf(stderr, "a test failed on another rank\n");
  moetp::testing::set_world(nullptr);
  world.reset();
  return any;
}
