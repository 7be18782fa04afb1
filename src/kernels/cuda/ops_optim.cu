// Optimiser kernels (device side; contracts in ops.h): the AdamW update on f32 master weights and
// the deterministic sum of squares behind the global gradient norm.
//
// adamw_kernel is the loop body of train::AdamW::step with the same types at every step (f32
// moments, double update) and explicit _rn intrinsics so nvcc cannot contract a multiply and an
// add into one FMA (the host build does not contract either): on the same inputs the new w, m and v
// are bit-identical to the CPU's.
#include "kernels/cuda/ops_common.cuh"

namespace moetp::cuda::launch {

namespace {

using detail::block_sum;
using detail::grid_blocks;

constexpr int kAdamThreads = 256;
constexpr int kSumThreads = 256;
constexpr int64_t kSumMaxBlocks = 1024;
constexpr int64_t kSumItemsPerBlock = 8 * kSumThreads;

__global__ void adamw_kernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, __nv_bfloat16* __restrict__ w_bf16, int64_t n, AdamWArgs a) {
  const float one_minus_b1 = 1.0f - a.beta1;
  const float one_minus_b2 = 1.0f - a.beta2;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gk = g[k];
    // m = b1 · m + (1 − b1) · g;  v = b2 · v + (1 − b2) · g · g   (f32, as the CPU)
    const float mk = __fadd_rn(__fmul_rn(a.beta1, m[k]), __fmul_rn(one_minus_b1, gk));
    const float vk = __fadd_rn(__fmul_rn(a.beta2, v[k]), __fmul_rn(__fmul_rn(one_minus_b2, gk), gk));
    m[k] = mk;
    v[k] = vk;
    // update = (m / bc1) / (sqrt(v / bc2) + eps);  w = f32(w − decay · w − lr · update)   (double)
    const double update = __ddiv_rn(__ddiv_rn(static_cast<double>(mk), a.bias_correction1),
                                    __dadd_rn(__dsqrt_rn(__ddiv_rn(static_cast<double>(vk), a.bias_correction2)),
                                              a.eps));
    const double wk = static_cast<double>(w[k]);
    const float wn = __double2float_rn(__dsub_rn(__dsub_rn(wk, __dmul_rn(a.decay, wk)), __dmul_rn(a.lr, update)));
    w[k] = wn;
    if (w_bf16 != nullptr) w_bf16[k] = __float2bfloat16_rn(wn);
  }
}

// partials[b] = Σ g² over the block's grid-stride share, in double, fixed order for a given n.
__global__ void sum_of_squares_kernel(const float* __restrict__ g, int64_t n, double* __restrict__ partials) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double x = g[k];
    acc = __dadd_rn(acc, __dmul_rn(x, x));
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

}  // namespace

cudaError_t adamw_step(float* w, const float* g, float* m, float* v, uint16_t* w_bf16, int64_t n,
                       const AdamWArgs& args, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  adamw_kernel<<<grid_blocks(n, kAdamThreads, 65535 * 4), kAdamThreads, 0, stream>>>(
      w, g, m, v, reinterpret_cast<__nv_bfloat16*>(w_bf16), n, args);
  return cudaGetLastError();
}

// Depends on n only (not on the device), so the sum is the same on every GPU and every run.
int sum_of_squares_num_partials(int64_t n) {
  return n <= 0 ? 0 : static_cast<int>(grid_blocks(n, kSumItemsPerBlock, kSumMaxBlocks));
}

cudaError_t sum_of_squares_partials(const float* g, int64_t n, double* partials, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  sum_of_squares_kernel<<<sum_of_squares_num_partials(n), kSumThreads, 0, stream>>>(g, n, partials);
  return cudaGetLastError();
}

}  // namespace moetp::cuda::launch
