// The element-wise kernels the CUDA backend (cuda_backend.cpp) needs that kernels/cuda does not
// have: the residual add of bf16 tensors, out = bf16(f32(a) + f32(b) [+ f32(c)]), one rounding
// (RNE; CPU reference: the f32 add_into of cpu_backend.cpp); the gradient scale of clipping (x *= s
// in f32, as cpu::scale); the per-expert sums of the router probabilities of the aux loss (column
// sums in double, as cpu::router_stats; a fixed order, so deterministic). Raw pointers only; the
// host code checks shapes, dtypes and devices before launching.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moetp::backend::launch {

namespace {

__global__ void add_bf16_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* c,
                                __nv_bfloat16* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = __bfloat162float(a[i]) + __bfloat162float(b[i]);
    if (c != nullptr) s += __bfloat162float(c[i]);
    out[i] = __float2bfloat16_rn(s);
  }
}

__global__ void scale_f32_kernel(float* x, float s, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] *= s;
  }
}

constexpr int kColumnThreads = 256;

// One block per column e: Σ_n x[n, e] in double, thread t summing rows t, t + 256, ..., then a
// fixed tree over the threads.
__global__ void column_sums_kernel(const float* x, int64_t N, int64_t E, double* out) {
  __shared__ double part[kColumnThreads];
  const int64_t e = blockIdx.x;
  double s = 0;
  for (int64_t n = threadIdx.x; n < N; n += kColumnThreads) s += static_cast<double>(x[n * E + e]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kColumnThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[e] = part[0];
}

int grid_for(int64_t n, int threads) {
  const int64_t want = (n + threads - 1) / threads;
  return static_cast<int>(want < 65535 ? want : 65535);
}

}  // namespace

cudaError_t scale_f32(float* x, float s, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  scale_f32_kernel<<<grid_for(n, 256), 256, 0, stream>>>(x, s, n);
  return cudaGetLastError();
}

// out[e] = Σ_n x[n, e] in double; x (N, E) f32 row-major, out (E) doubles. E <= 2^31 - 1.
cudaError_t column_sums_f64(const float* x, int64_t N, int64_t E, double* out, cudaStream_t stream) {
  if (E <= 0) return cudaSuccess;
  column_sums_kernel<<<static_cast<unsigned>(E), kColumnThreads, 0, stream>>>(x, N, E, out);
  return cudaGetLastError();
}

// a, b, c (nullable), out: n bf16 values each (raw uint16_t bits); out may alias a, b or c
// (each element is read before it is written, by the same thread).
cudaError_t add_bf16(const uint16_t* a, const uint16_t* b, const uint16_t* c, uint16_t* out, int64_t n,
                     cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t want = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 65535 ? want : 65535);
  add_bf16_kernel<<<blocks, threads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(a),
                                                  reinterpret_cast<const __nv_bfloat16*>(b),
                                                  reinterpret_cast<const __nv_bfloat16*>(c),
                                                  reinterpret_cast<__nv_bfloat16*>(out), n);
  return cudaGetLastError();
}

}  // namespace moetp::backend::launch
