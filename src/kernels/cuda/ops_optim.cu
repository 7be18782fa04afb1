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

// Four elements per thread and iteration (16-byte loads and stores); the caller guarantees 16-byte
// aligned w, g, m, v (8-byte aligned w_bf16) and handles the n % 4 tail with adamw_kernel.
__global__ void adamw_kernel_vec4(float4* __restrict__ w, const float4* __restrict__ g, float4* __restrict__ m,
                                  float4* __restrict__ v, uint2* __restrict__ w_bf16, int64_t n4, AdamWArgs a) {
  const float one_minus_b1 = 1.0f - a.beta1;
  const float one_minus_b2 = 1.0f - a.beta2;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n4;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float4 wk = w[k], mk = m[k], vk = v[k];
    const float4 gk = g[k];
    adamw_one(wk.x, gk.x, mk.x, vk.x, a, one_minus_b1, one_minus_b2);
    adamw_one(wk.y, gk.y, mk.y, vk.y, a, one_minus_b1, one_minus_b2);
    adamw_one(wk.z, gk.z, mk.z, vk.z, a, one_minus_b1, one_minus_b2);
    adamw_one(wk.w, gk.w, mk.w, vk.w, a, one_minus_b1, one_minus_b2);
    w[k] = wk;
    m[k] = mk;
    v[k] = vk;
    if (w_bf16 != nullptr) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(wk.x, wk.y), hi = __floats2bfloat162_rn(wk.z, wk.w);
      w_bf16[k] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
    }
  }
}

__global__ void adamw_kernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, __nv_bfloat16* __restrict__ w_bf16, int64_t n, AdamWArgs a) {
  const float one_minus_b1 = 1.0f - a.beta1;
  const float one_minus_b2 = 1.0f - a.beta2;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    adamw_one(w[k], g[k], m[k], v[k], a, one_minus_b1, one_minus_b2);
    if (w_bf16 != nullptr) w_bf16[k] = __float2bfloat16_rn(w[k]);
  }
}

// bf16 moments (optim.state_dtype = bf16): each moment read as f32, updated and used unrounded by
// adamw_one, stored rounded to nearest even (cpu::adamw_step). Four elements per thread where w and
// g are 16-byte and m, v (and w_bf16) 8-byte aligned; the tail and unaligned tensors one by one.
__device__ __forceinline__ void adamw_one_bf16m(float& w, float g, __nv_bfloat16& m16, __nv_bfloat16& v16,
                                                const AdamWArgs& a, float one_minus_b1, float one_minus_b2) {
  float m = __bfloat162float(m16), v = __bfloat162float(v16);
  adamw_one(w, g, m, v, a, one_minus_b1, one_minus_b2);
  m16 = __float2bfloat16_rn(m);
  v16 = __float2bfloat16_rn(v);
}

__global__ void adamw_bf16m_kernel_vec4(float4* __restrict__ w, const float4* __restrict__ g, uint2* __restrict__ m,
                                        uint2* __restrict__ v, uint2* __restrict__ w_bf16, int64_t n4, AdamWArgs a) {
  const float one_minus_b1 = 1.0f - a.beta1;
  const float one_minus_b2 = 1.0f - a.beta2;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n4;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float4 wk = w[k];
    const float4 gk = g[k];
    uint2 mk = m[k], vk = v[k];
    auto* m4 = reinterpret_cast<__nv_bfloat16*>(&mk);
    auto* v4 = reinterpret_cast<__nv_bfloat16*>(&vk);
    adamw_one_bf16m(wk.x, gk.x, m4[0], v4[0], a, one_minus_b1, one_minus_b2);
    adamw_one_bf16m(wk.y, gk.y, m4[1], v4[1], a, one_minus_b1, one_minus_b2);
    adamw_one_bf16m(wk.z, gk.z, m4[2], v4[2], a, one_minus_b1, one_minus_b2);
    adamw_one_bf16m(wk.w, gk.w, m4[3], v4[3], a, one_minus_b1, one_minus_b2);
    w[k] = wk;
    m[k] = mk;
    v[k] = vk;
    if (w_bf16 != nullptr) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(wk.x, wk.y), hi = __floats2bfloat162_rn(wk.z, wk.w);
      w_bf16[k] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
    }
  }
}

__global__ void adamw_bf16m_kernel(float* __restrict__ w, const float* __restrict__ g, __nv_bfloat16* __restrict__ m,
                                   __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ w_bf16, int64_t n,
                                   AdamWArgs a) {
  const float one_minus_b1 = 1.0f - a.beta1;
  const float one_minus_b2 = 1.0f - a.beta2;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    adamw_one_bf16m(w[k], g[k], m[k], v[k], a, one_minus_b1, one_minus_b2);
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
template <typename Moment>
cudaError_t launch_adamw(float* w, const float* g, Moment* m, Moment* v, uint16_t* w_bf16, int64_t n,
                         const AdamWArgs& args, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr bool f32 = std::is_same_v<Moment, float>;
  auto aligned = [](const void* p, uintptr_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; };
  const uintptr_t moment_align = f32 ? 16 : 8;
  int64_t done = 0;
  if (aligned(w, 16) && aligned(g, 16) && aligned(m, moment_align) && aligned(v, moment_align) &&
      (w_bf16 == nullptr || aligned(w_bf16, 8))) {
    const int64_t n4 = n / 4;
    if (n4 > 0) {
      auto* w4 = reinterpret_cast<float4*>(w);
      const auto* g4 = reinterpret_cast<const float4*>(g);
      auto* wb4 = reinterpret_cast<uint2*>(w_bf16);
      const unsigned blocks = grid_blocks(n4, kAdamThreads, 132 * 16);
      if constexpr (f32) {
        adamw_kernel_vec4<<<blocks, kAdamThreads, 0, stream>>>(w4, g4, reinterpret_cast<float4*>(m),
                                                               reinterpret_cast<float4*>(v), wb4, n4, args);
      } else {
        adamw_bf16m_kernel_vec4<<<blocks, kAdamThreads, 0, stream>>>(w4, g4, reinterpret_cast<uint2*>(m),
                                                                     reinterpret_cast<uint2*>(v), wb4, n4, args);
      }
    }
    done = 4 * n4;
  }
  if (done < n) {
    const int64_t rest = n - done;
    const unsigned blocks = grid_blocks(rest, kAdamThreads, 65535 * 4);
    auto* wb = w_bf16 == nullptr ? nullptr : reinterpret_cast<__nv_bfloat16*>(w_bf16) + done;
    if constexpr (f32) {
      adamw_kernel<<<blocks, kAdamThreads, 0, stream>>>(w + done, g + done, m + done, v + done, wb, rest, args);
    } else {
      adamw_bf16m_kernel<<<blocks, kAdamThreads, 0, stream>>>(w + done, g + done,
                                                              reinterpret_cast<__nv_bfloat16*>(m) + done,
                                                              reinterpret_cast<__nv_bfloat16*>(v) + done, wb, rest,
                                                              args);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t adamw_step(float* w, const float* g, float* m, float* v, uint16_t* w_bf16, int64_t n,
                       const AdamWArgs& args, cudaStream_t stream) {
  return launch_adamw(w, g, m, v, w_bf16, n, args, stream);
}

cudaError_t adamw_step_bf16_moments(float* w, const float* g, uint16_t* m, uint16_t* v, uint16_t* w_bf16, int64_t n,
                                    const AdamWArgs& args, cudaStream_t stream) {
  return launch_adamw(w, g, m, v, w_bf16, n, args, stream);
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
