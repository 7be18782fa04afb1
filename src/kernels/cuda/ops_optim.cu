// Optimiser kernels (device side; contracts in ops.h): the AdamW update on f32 master weights (f32 or
// bf16 moments) and the deterministic sum of squares behind the global gradient norm.
//
// adamw_one is the loop body of train::AdamW::step with the same types (all f32) and explicit _rn
// intrinsics so nvcc cannot contract a multiply and an add into one FMA (the host build does not
// contract either; f32 division and square root are correctly rounded on both sides): on the same
// inputs the new w, m and v are bit-identical to the CPU's. The update is memory-bound (30 bytes
// per element with the bf16 copy), hence the 16-byte vector path.
#include <type_traits>

#include "kernels/cuda/ops_common.cuh"

namespace moetp::cuda::launch {

namespace {

using detail::block_sum;
using detail::grid_blocks;

constexpr int kAdamThreads = 256;
constexpr int kSumThreads = 256;
constexpr int64_t kSumMaxBlocks = 1024;
constexpr int64_t kSumItemsPerBlock = 8 * kSumThreads;

// One element: train::AdamW::step's body, every operation an explicitly rounded f32 intrinsic.
__device__ __forceinline__ void adamw_one(float& w, float g, float& m, float& v, const AdamWArgs& a,
                                          float one_minus_b1, float one_minus_b2) {
  // m = b1 · m + (1 − b1) · g;  v = b2 · v + (1 − b2) · g · g
  m = __fadd_rn(__fmul_rn(a.beta1, m), __fmul_rn(one_minus_b1, g));
  v = __fadd_rn(__fmul_rn(a.beta2, v), __fmul_rn(__fmul_rn(one_minus_b2, g), g));
  // update = (m / bc1) / (sqrt(v / bc2) + eps);  w = (w − decay · w) − lr · update
  const float update =
      __fdiv_rn(__fdiv_rn(m, a.bias_correction1), __fadd_rn(__fsqrt_rn(__fdiv_rn(v, a.bias_correction2)), a.eps));
  w = __fsub_rn(__fsub_rn(w, __fmul_rn(a.decay, w)), __fmul_rn(a.lr, update));
}

// Storage of the moments: f32 as they are; bf16 (optim.state_dtype = bf16) read as f32, updated and
// used unrounded by adamw_one, stored rounded to nearest even (cpu::adamw_step). Vec is four moments
// (16 bytes f32, 8 bytes bf16).
struct F32Moments {
  using Elem = float;
  using Vec = float4;
  static __device__ __forceinline__ float load(Elem x) { return x; }
  static __device__ __forceinline__ Elem store(float x) { return x; }
  static __device__ __forceinline__ float4 load4(const Vec& x) { return x; }
  static __device__ __forceinline__ Vec store4(const float4& x) { return x; }
};
struct BF16Moments {
  using Elem = __nv_bfloat16;
  using Vec = uint2;
  static __device__ __forceinline__ float load(Elem x) { return __bfloat162float(x); }
  static __device__ __forceinline__ Elem store(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float4 load4(const Vec& x) {
    const auto* h = reinterpret_cast<const __nv_bfloat16*>(&x);
    return make_float4(__bfloat162float(h[0]), __bfloat162float(h[1]), __bfloat162float(h[2]), __bfloat162float(h[3]));
  }
  static __device__ __forceinline__ Vec store4(const float4& x) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y), hi = __floats2bfloat162_rn(x.z, x.w);
    return make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
};

// Four elements per thread and iteration (16-byte loads and stores of w and g); the caller
// guarantees 16-byte aligned w and g, Vec-aligned m and v, 8-byte aligned w_bf16, and handles the
// n % 4 tail with adamw_kernel.
template <typename M>
__global__ void adamw_kernel_vec4(float4* __restrict__ w, const float4* __restrict__ g, typename M::Vec* __restrict__ m,
                                  typename M::Vec* __restrict__ v, uint2* __restrict__ w_bf16, int64_t n4, AdamWArgs a) {
  const float one_minus_b1 = 1.0f - a.beta1;
  const float one_minus_b2 = 1.0f - a.beta2;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n4;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float4 wk = w[k], mk = M::load4(m[k]), vk = M::load4(v[k]);
    const float4 gk = g[k];
    adamw_one(wk.x, gk.x, mk.x, vk.x, a, one_minus_b1, one_minus_b2);
    adamw_one(wk.y, gk.y, mk.y, vk.y, a, one_minus_b1, one_minus_b2);
    adamw_one(wk.z, gk.z, mk.z, vk.z, a, one_minus_b1, one_minus_b2);
    adamw_one(wk.w, gk.w, mk.w, vk.w, a, one_minus_b1, one_minus_b2);
    w[k] = wk;
    m[k] = M::store4(mk);
    v[k] = M::store4(vk);
    if (w_bf16 != nullptr) w_bf16[k] = BF16Moments::store4(wk);
  }
}

template <typename M>
__global__ void adamw_kernel(float* __restrict__ w, const float* __restrict__ g, typename M::Elem* __restrict__ m,
                             typename M::Elem* __restrict__ v, __nv_bfloat16* __restrict__ w_bf16, int64_t n,
                             AdamWArgs a) {
  const float one_minus_b1 = 1.0f - a.beta1;
  const float one_minus_b2 = 1.0f - a.beta2;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float mk = M::load(m[k]), vk = M::load(v[k]);
    adamw_one(w[k], g[k], mk, vk, a, one_minus_b1, one_minus_b2);
    m[k] = M::store(mk);
    v[k] = M::store(vk);
    if (w_bf16 != nullptr) w_bf16[k] = __float2bfloat16_rn(w[k]);
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

namespace {

// Both moment dtypes: the 16-byte vector kernel over the first 4·(n / 4) elements where w and g
// are 16-byte and m, v (f32: 16-byte; bf16: 8-byte) and w_bf16 8-byte aligned, then the element
// kernel over the rest.
template <typename M>
cudaError_t launch_adamw(float* w, const float* g, typename M::Elem* m, typename M::Elem* v, uint16_t* w_bf16,
                         int64_t n, const AdamWArgs& args, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  auto aligned = [](const void* p, uintptr_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; };
  constexpr uintptr_t moment_align = sizeof(typename M::Vec);
  int64_t done = 0;
  if (aligned(w, 16) && aligned(g, 16) && aligned(m, moment_align) && aligned(v, moment_align) &&
      (w_bf16 == nullptr || aligned(w_bf16, 8))) {
    const int64_t n4 = n / 4;
    if (n4 > 0) {
      const unsigned blocks = grid_blocks(n4, kAdamThreads, 132 * 16);
      adamw_kernel_vec4<M><<<blocks, kAdamThreads, 0, stream>>>(
          reinterpret_cast<float4*>(w), reinterpret_cast<const float4*>(g), reinterpret_cast<typename M::Vec*>(m),
          reinterpret_cast<typename M::Vec*>(v), reinterpret_cast<uint2*>(w_bf16), n4, args);
    }
    done = 4 * n4;
  }
  if (done < n) {
    const int64_t rest = n - done;
    const unsigned blocks = grid_blocks(rest, kAdamThreads, 65535 * 4);
    auto* wb = w_bf16 == nullptr ? nullptr : reinterpret_cast<__nv_bfloat16*>(w_bf16) + done;
    adamw_kernel<M><<<blocks, kAdamThreads, 0, stream>>>(w + done, g + done, m + done, v + done, wb, rest, args);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t adamw_step(float* w, const float* g, float* m, float* v, uint16_t* w_bf16, int64_t n,
                       const AdamWArgs& args, cudaStream_t stream) {
  return launch_adamw<F32Moments>(w, g, m, v, w_bf16, n, args, stream);
}

cudaError_t adamw_step_bf16_moments(float* w, const float* g, uint16_t* m, uint16_t* v, uint16_t* w_bf16, int64_t n,
                                    const AdamWArgs& args, cudaStream_t stream) {
  return launch_adamw<BF16Moments>(w, g, reinterpret_cast<__nv_bfloat16*>(m), reinterpret_cast<__nv_bfloat16*>(v),
                                   w_bf16, n, args, stream);
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
