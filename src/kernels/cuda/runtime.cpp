// CUDA runtime glue (host code): device selection, the allocation/copy hooks core uses for Device::kCuda
// tensors, and errors that name the call and the sizes (out-of-memory reports what was free).
#include "kernels/cuda/runtime.h"

#include "core/block_cache.h"
#include "core/live_bytes.h"
#include "core/tensor.h"
#include "kernels/cuda/cuda_check.h"

namespace moetp::cuda {

namespace {

// cudaMalloc that returns nullptr when out of memory (the cache's raw allocator).
void* raw_cuda_malloc(size_t num_bytes) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, num_bytes == 0 ? 1 : num_bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the (non-sticky) error
    return nullptr;
  }
  CUDA_CHECK(err);
  return p;
}

void raw_cuda_free(void* p) { cudaFree(p); }

AllocMode g_mode = AllocMode::kDirect;
bool g_initialised = false;
BlockCache* g_cache = nullptr;  // kCaching; lives until the process ends (blocks may outlive main)

// kDirect's byte count (kCaching: the cache counts).
LiveBytes& direct_count() {
  static auto* c = new LiveBytes;  // never destroyed: tensors may be freed after main returns
  return *c;
}

[[noreturn]] void fail_alloc(size_t num_bytes, const std::string& what) {
  cudaGetLastError();
  size_t free_bytes = 0, total_bytes = 0;
  cudaMemGetInfo(&free_bytes, &total_bytes);
  int dev = -1;
  cudaGetDevice(&dev);
  MOETP_FAIL("cudaMalloc of {} bytes on device {} failed: {} ({} bytes free of {}{})", num_bytes, dev, what,
             free_bytes, total_bytes,
             g_cache != nullptr ? fmt::format("; the caching allocator released its cache and retried") : "");
}

// The phase the program is in (set_memory_phase) and the phase of the current peak. Host-side, in
// allocation order (the order the live bytes are counted in). One process, one host thread
// allocating at a time (the trainer); a data race here would only mislabel the peak.
const char* g_phase = "";
const char* g_peak_phase = "";
size_t g_tagged_peak = 0;

size_t current_peak();

void note_peak() {
  const size_t peak = current_peak();
  if (peak > g_tagged_peak) {
    g_tagged_peak = peak;
    g_peak_phase = g_phase;
  }
}

void* cuda_alloc(size_t num_bytes) {
  if (g_cache != nullptr) {
    void* p = g_cache->allocate(num_bytes);
    if (p == nullptr) fail_alloc(num_bytes, "out of memory");
    note_peak();
    return p;
  }
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, num_bytes == 0 ? 1 : num_bytes);
  if (err != cudaSuccess) fail_alloc(num_bytes, cudaGetErrorString(err));
  direct_count().add(p, num_bytes);
  note_peak();
  return p;
}

void cuda_free(void* p) {
  if (g_cache != nullptr) {
    g_cache->deallocate(p);
    return;
  }
  direct_count().remove(p);
  cudaFree(p);
}

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

void init(int device, AllocMode mode) {
  MOETP_CHECK(!g_initialised || mode == g_mode, "CUDA init: allocation mode {} asked, but the process already uses {}",
              mode == AllocMode::kCaching ? "caching" : "direct", g_mode == AllocMode::kCaching ? "caching" : "direct");
  const int n = device_count();
  MOETP_CHECK(n > 0, "CUDA init: {}", unavailable_reason());
  MOETP_CHECK(device >= 0 && device < n, "CUDA init: device {} requested but {} visible", device, n);
  CUDA_CHECK(cudaSetDevice(device));
  register_device_hooks(Device::kCuda, runtime_hooks());
  if (mode == AllocMode::kCaching && g_cache == nullptr) g_cache = new BlockCache(raw_cuda_malloc, raw_cuda_free);
  g_mode = mode;
  g_initialised = true;
}

DeviceMemory device_memory() {
  DeviceMemory m;
  CUDA_CHECK(cudaMemGetInfo(&m.free_bytes, &m.total_bytes));
  return m;
}

MemoryStats memory_stats() {
  if (g_cache != nullptr) {
    const BlockCache::Stats s = g_cache->stats();
    return {s.live_bytes, s.peak_live_bytes, g_peak_phase};
  }
  const LiveBytes::Snapshot s = direct_count().snapshot();
  return {s.current, s.peak, g_peak_phase};
}

namespace {
size_t current_peak() { return g_cache != nullptr ? g_cache->stats().peak_live_bytes : direct_count().snapshot().peak; }
}  // namespace

void reset_peak_memory() {
  if (g_cache != nullptr) {
    g_cache->reset_peak();
  } else {
    direct_count().reset_peak();
  }
  g_tagged_peak = current_peak();
  g_peak_phase = g_phase;
}

void set_memory_phase(const char* phase) { g_phase = phase; }

DeviceHooks runtime_hooks() {
  DeviceHooks hooks;
  hooks.alloc = cuda_alloc;
  hooks.free = cuda_free;
  hooks.copy = cuda_copy;
  hooks.memset_zero = cuda_memset_zero;
  return hooks;
}

}  // namespace moetp::cuda
