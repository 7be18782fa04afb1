// CUDA runtime glue, callable from host code that does not include CUDA headers.
// init() registers the CUDA device hooks with core (allocation, copies) for the current device.
#pragma once

#include <string>

#include "core/tensor.h"

namespace moetp::cuda {

// Number of visible CUDA devices; 0 when there is no driver or no GPU (never throws).
int device_count();
// Why device_count() is 0, for skip messages ("no CUDA driver", "no device", ...).
std::string unavailable_reason();
// How core's CUDA tensors get their memory. kDirect: cudaMalloc / cudaFree per tensor (every
// cudaFree synchronises the device). kCaching: a core/block_cache.h cache in front of cudaMalloc:
// freed blocks are reused by later allocations (of the same rounded size, or for a request over
// 1 MiB the smallest cached block up to 1/8 larger) without a device synchronisation; on an
// allocation failure the cache is released (cudaFree) and the allocation retried. kCaching is
// safe when all work on core tensors runs on the legacy default stream or on streams ordered with
// it by events (NcclComm, CudaMoeLayer's side streams); a caller that uses a non-blocking stream
// must synchronise it before dropping the tensors it used.
enum class AllocMode { kDirect, kCaching };

// Selects `device` and registers the hooks; throws moetp::Error naming the device and the cause.
// The allocation mode is process-wide: a later init with another mode than the first is an error.
void init(int device, AllocMode mode = AllocMode::kDirect);

// Bytes held by live core tensors on this process's device (under kCaching the whole cached block
// each tensor took) and their peak since init() or the last reset_peak_memory(). Comparable to
// torch.cuda.memory_allocated / max_memory_allocated; excludes the CUDA context, cuBLAS and NCCL
// workspaces and (kCaching) the free blocks the cache holds.
struct MemoryStats {
  size_t live_bytes = 0, peak_live_bytes = 0;
  const char* peak_phase = "";  // the phase (set_memory_phase) in which the peak was reached
};
MemoryStats memory_stats();
// cudaMemGetInfo of the current device: free and total bytes as the driver counts them.
struct DeviceMemory {
  size_t free_bytes = 0, total_bytes = 0;
};
DeviceMemory device_memory();
void reset_peak_memory();
// Names what the program does from now on (a string that outlives the process's use of it, e.g. a
// literal), for MemoryStats::peak_phase.
void set_memory_phase(const char* phase);

// The hooks init() registers with core (allocation per the AllocMode, copies, memset), for programs
// that wrap them (e.g. to count bytes) and register the wrapper. Valid after init().
DeviceHooks runtime_hooks();

}  // namespace moetp::cuda
