// CUDA runtime glue (host code): device selection, the allocation/copy hooks core uses for Device::kCuda
// tensors, and errors that name the call and the sizes (out-of-memory reports what was free).
#include "kernels/cuda/runtime.h"

#include "core/tensor.h"
#include "kernels/cuda/cuda_check.h"

namespace moetp::cuda {

namespace {

void* cuda_alloc(size_t num_bytes) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, num_bytes == 0 ? 1 : num_bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    int dev = -1;
    cudaGetDevice(&dev);
    MOETP_FAIL("cudaMalloc of {} bytes on device {} failed: {} ({} bytes free of {})", num_bytes, dev,
               cudaGetErrorString(err), free_bytes, total_bytes);
  }
  return p;
}

void cuda_free(void* p) { cudaFree(p); }

void cuda_copy(void* dst, Device dst_device, const void* src, Device src_device, size_t num_bytes) {
  cudaMemcpyKind kind = cudaMemcpyDefault;
  if (dst_device == Device::kCuda && src_device == Device::kCpu) kind = cudaMemcpyHostToDevice;
  if (dst_device == Device::kCpu && src_device == Device::kCuda) kind = cudaMemcpyDeviceToHost;
  if (dst_device == Device::kCuda && src_device == Device::kCuda) kind = cudaMemcpyDeviceToDevice;
  CUDA_CHECK(cudaMemcpy(dst, src, num_bytes, kind));
}

void cuda_memset_zero(void* dst, size_t num_bytes) { CUDA_CHECK(cudaMemset(dst, 0, num_bytes)); }

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string unavailable_reason() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return fmt::format("no usable CUDA device: {}", cudaGetErrorString(err));
  }
  if (n == 0) return "no CUDA device visible";
  return "";
}

void init(int device) {
  const int n = device_count();
  MOETP_CHECK(n > 0, "CUDA init: {}", unavailable_reason());
  MOETP_CHECK(device >= 0 && device < n, "CUDA init: device {} requested but {} visible", device, n);
  CUDA_CHECK(cudaSetDevice(device));
  DeviceHooks hooks;
  hooks.alloc = cuda_alloc;
  hooks.free = cuda_free;
  hooks.copy = cuda_copy;
  hooks.memset_zero = cuda_memset_zero;
  register_device_hooks(Device::kCuda, hooks);
}

}  // namespace moetp::cuda
