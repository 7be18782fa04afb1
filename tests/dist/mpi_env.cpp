#include "dist/mpi_env.h"

namespace moetp::testing {

namespace {
comm::MpiComm* g_world = nullptr;
}

void set_world(comm::MpiComm* world) { g_world = world; }

comm::MpiComm& world() {
  if (g_world == nullptr) throw std::runtime_error("MPI world not initialised (run through mpi_main)");
  return *g_world;
}

}  // namespace moetp::testing
