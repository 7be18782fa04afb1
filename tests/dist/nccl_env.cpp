#include "dist/nccl_env.h"

#include "dist/mpi_env.h"
#include "kernels/cuda/runtime.h"

namespace moetp::testing {

void NcclEnvironment::SetUp() {
  auto& w = world();
  const int64_t fewest = -w.all_reduce_scalar(int64_t{-cuda::device_count()}, comm::ReduceOp::kMax);
  if (fewest < w.size()) {
    skip_reason_ = fmt::format("needs one GPU per rank: {} ranks, but a rank sees {} GPU(s){}", w.size(), fewest,
                               fewest == 0 ? " (" + cuda::unavailable_reason() + ")" : "");
    return;
  }
  try {
    w.run_collectively("cuda::init", [&] { cuda::init(w.rank()); });
    comm_ = comm::NcclComm::create(w, "nccl_world");
  } catch (const Error& e) {
    error_ = e.what();
  }
}

namespace {
NcclEnvironment* const g_env =
    static_cast<NcclEnvironment*>(::testing::AddGlobalTestEnvironment(new NcclEnvironment));
}  // namespace

NcclEnvironment& nccl_env() { return *g_env; }

}  // namespace moetp::testing
