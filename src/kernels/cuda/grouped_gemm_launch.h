// Raw-pointer launchers of the Hopper grouped GEMM (grouped_gemm.cu; Tensor wrappers and the
// contract in grouped_gemm.h). bf16 is passed as uint16_t bits. Requirements, checked by the host
// wrappers: 1 <= L <= kGroupedGemmMaxGroups; M, N, K < 2^31; N % 8 == 0 and K % 8 == 0 (TMA row
// strides are multiples of 16 bytes); every pointer 16-byte aligned; offsets on the device, L + 1
// int64 entries, 0 = offsets[0] <= ... <= offsets[L] = M (values outside [0, M] are clamped, a
// decrease is treated as an empty group; the results are then meaningless but memory stays in bounds).
// One launch per call, no host synchronisation, asynchronous on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moetp::cuda::launch {

inline constexpr int64_t kGroupedGemmMaxGroups = 1024;
// Tile configurations: config c has tile N = kGroupedGemmTileN[c], stage K = 64, and as many pipeline
// stages as fit in shared memory; cooperative (tile M = 128, both consumer warpgroups on each tile) or
// ping-pong (kGroupedGemmPingpong[c]: tile M = 64, tiles alternate between the consumer warpgroups so
// that one's epilogue overlaps the other's mainloop), and cooperative with the staged epilogue
// (kGroupedGemmStaged[c]: fwd/dgrad outputs go through shared memory and TMA stores, wgrad's
// through shared memory and TMA reduce-adds into dW, grouped_gemm_layout.h; one pipeline stage fewer). config < 0: chosen per shape
// (grouped_gemm_auto_config: staged, tile N 192 or 128 by a wave model, as measured).
inline constexpr int kGroupedGemmConfigs = 9;
inline constexpr int kGroupedGemmTileN[kGroupedGemmConfigs] = {128, 192, 256, 128, 192, 256, 128, 192, 256};
inline constexpr bool kGroupedGemmPingpong[kGroupedGemmConfigs] = {false, false, false, true, true,
                                                                   true,  false, false, false};
inline constexpr bool kGroupedGemmStaged[kGroupedGemmConfigs] = {false, false, false, false, false,
                                                                 false, true,  true,  true};
// The configuration `config < 0` picks for an output of n_out columns (fwd: N, dgrad and wgrad: K)
// and m_tiles output-row tiles of 128 (fwd/dgrad: ceil(M / 128), a lower bound; wgrad: L·ceil(N / 128))
// on a GPU of num_sms SMs: staged, tile N 192 or 128 by a wave model (grouped_gemm.cu).
int grouped_gemm_auto_config(int64_t n_out, int64_t m_tiles, int num_sms);
// What the launchers use with config < 0: product 0 fwd, 1 dgrad, 2 wgrad at the sizes of their
// arguments, on the current device. -1 if the device cannot be queried.
int grouped_gemm_auto_config_for(int product, int64_t M, int64_t N, int64_t K, int64_t L);
int grouped_gemm_stages(int config);

// y[rows of l] = x[rows of l] · w[l]ᵀ. x (M, K), w (L, N, K), y (M, N) bf16, overwritten. K >= 1.
cudaError_t grouped_gemm_fwd(const uint16_t* x, const uint16_t* w, const int64_t* offsets, uint16_t* y, int64_t M,
                             int64_t N, int64_t K, int64_t L, cudaStream_t stream, int config = -1);
// dx[rows of l] = dy[rows of l] · w[l]. dy (M, N), w (L, N, K), dx (M, K) bf16, overwritten. N >= 1.
cudaError_t grouped_gemm_dgrad(const uint16_t* dy, const uint16_t* w, const int64_t* offsets, uint16_t* dx, int64_t M,
                               int64_t N, int64_t K, int64_t L, cudaStream_t stream, int config = -1);
// dw[l] += dy[rows of l]ᵀ · x[rows of l]. dy (M, N), x (M, K) bf16, dw (L, N, K) f32 accumulated
// (beta = 1); empty groups leave dw[l] untouched. Deterministic (each dw element has one owner tile).
// accumulate = false: dw[l] = dy[rows of l]ᵀ · x[rows of l] (stores, dw is not read; empty groups get
// dw[l] = 0): the first accumulation after zeroing, without the zeroing or the read.
cudaError_t grouped_gemm_wgrad(const uint16_t* dy, const uint16_t* x, const int64_t* offsets, float* dw, int64_t M,
                               int64_t N, int64_t K, int64_t L, cudaStream_t stream, int config = -1,
                               bool accumulate = true);

}  // namespace moetp::cuda::launch
