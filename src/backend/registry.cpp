#include "backend/registry.h"

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

Backend& get(Device device) {
  Backend* b = find(device);
  MOETP_CHECK(b != nullptr, "this build has no {} backend (configure with CUDA to train on GPUs)",
              device_name(device));
  return *b;
}

}  // namespace moetp::backend
