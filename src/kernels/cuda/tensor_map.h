// TMA tensor maps of the Hopper kernels (grouped GEMM, attention).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "kernels/cuda/grouped_gemm_layout.h"

namespace moetp::cuda::launch {

// Packed row-major bf16 (f32 where spec.f32) tensor of spec.rank <= 4 dimensions (dims innermost
// first; dimension d steps over dims[0]·...·dims[d-1] elements) with a box of spec.box elements,
// 128B swizzle, zero fill out of bounds. cudaErrorNotSupported without a driver that encodes them.
cudaError_t make_tensor_map(CUtensorMap* map, const void* base, const ggemm::MapSpec& spec);

}  // namespace moetp::cuda::launch
