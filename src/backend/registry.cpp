#include "backend/registry.h"

#include <algorithm>

#include "kernels/cpu/gemm.h"

namespace moetp::backend {

Backend* find(Device device) {
  switch (device) {
    case Device::kCpu: return &cpu_backend();
    case Device::kCuda:
#if MOETP_HAVE_CUDA
      return &cuda_backend();
#else
      return nullptr;
#endif
  }
  return nullptr;
}

int64_t default_logit_chunk_rows(Device device, int64_t vocab) {
  const int64_t v = std::max<int64_t>(vocab, 1);
  if (device == Device::kCpu) {
    const int64_t rows = kLogitChunkElemsCpu / v;
    return std::max<int64_t>(cpu::kGemmBlock, rows / cpu::kGemmBlock * cpu::kGemmBlock);
  }
  const int64_t rows = kLogitChunkElemsCuda / v;
  return rows >= kLogitChunkAlign ? rows / kLogitChunkAlign * kLogitChunkAlign : std::max<int64_t>(1, rows);
}

Backend& get(Device device) {
  Backend* b = find(device);
  MOETP_CHECK(b != nullptr, "this build has no {} backend (configure with CUDA to train on GPUs)",
              device_name(device));
  return *b;
}

}  // namespace moetp::backend
