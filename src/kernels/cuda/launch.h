// Kernel launchers: the boundary between host C++ (compiled by g++, uses Tensor, fmt and
// moetp::Error) and device code (compiled by nvcc, sees only raw pointers and sizes). Launchers
// return the launch's cudaError_t; the host wrapper turns it into a moetp::Error naming the op.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moetp::cuda::launch {

// dst[i] = bf16(src[i]) round-to-nearest-even; dst holds raw bf16 bits.
cudaError_t cast_f32_to_bf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);
// dst[i] = f32(src[i]).
cudaError_t cast_bf16_to_f32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream);

}  // namespace moetp::cuda::launch
