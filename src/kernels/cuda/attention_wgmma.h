// The Hopper (sm_90a) attention kernels: TMA + wgmma (attention_wgmma_fwd.cu). Reached through
// attention_forward_tc's configurations 2 (two-stage ring, each consumer on its own) and 3 (three
// stages, consumers taking turns: `pingpong`); packed documents as there (B = 1, S = the flat token
// count, row_len = the original row length for the statistics' layout).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moetp::cuda::launch {

cudaError_t attention_forward_wgmma(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                                    const int64_t* docs, int64_t num_docs, int64_t row_len, int64_t B, int64_t S,
                                    int64_t Hq, int64_t Hkv, int64_t D, float scale, bool pingpong,
                                    cudaStream_t stream);

}  // namespace moetp::cuda::launch
