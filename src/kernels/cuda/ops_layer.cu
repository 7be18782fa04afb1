// Dense-layer elementwise and per-row kernels (device side; contracts in ops.h): RMSNorm, RoPE,
// SwiGLU and the fused softmax cross-entropy. Each is a port of the CPU reference loop in
// src/kernels/cpu/: bf16 loads, f32 math (double where the reference's cos/sin need it), one
// rounding to bf16 on store.
#include <type_traits>

#include "kernels/cuda/ops_common.cuh"

namespace moetp::cuda::launch {

namespace {

using detail::block_sum;
using detail::from_f32;
using detail::grid_blocks;
using detail::kFullMask;
using detail::kWarp;
using detail::load_bf16x8;
using detail::record_fault;
using detail::row_threads;
using detail::store_bf16x8;
using detail::to_f32;
using detail::warp_sum;

using bf16_t = __nv_bfloat16;

// ---- RMSNorm ------------------------------------------------------------------------------------

constexpr int kNormWarps = 8;          // rows per block (one warp per row)
constexpr int64_t kDwChunkRows = 64;   // rows per partial dw sum
constexpr int kDwColumns = 128;        // columns per block of the partial dw kernel

__global__ void rmsnorm_forward_kernel(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, float eps,
                                       bf16_t* __restrict__ y, float* __restrict__ rstd, int64_t R, int64_t D) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kNormWarps;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kNormWarps) + threadIdx.x / kWarp; r < R; r += stride) {
    const bf16_t* xr = x + r * D;
    float sum_sq = 0.0f;
    for (int64_t d = lane; d < D; d += kWarp) {
      const float v = to_f32(xr[d]);
      sum_sq = fmaf(v, v, sum_sq);
    }
    sum_sq = warp_sum(sum_sq);
    const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(D) + eps);
    if (lane == 0 && rstd != nullptr) rstd[r] = inv;
    bf16_t* yr = y + r * D;
    for (int64_t d = lane; d < D; d += kWarp) yr[d] = __float2bfloat16_rn(to_f32(w[d]) * (to_f32(xr[d]) * inv));
  }
}

// dx[r, :] = rstd · (g − x · rstd² · (Σ_d g·x) / D), g = dy ⊙ w.
__global__ void rmsnorm_dx_kernel(const bf16_t* __restrict__ dy, const bf16_t* __restrict__ x,
                                  const bf16_t* __restrict__ w, const float* __restrict__ rstd,
                                  bf16_t* __restrict__ dx, int64_t R, int64_t D) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kNormWarps;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kNormWarps) + threadIdx.x / kWarp; r < R; r += stride) {
    const bf16_t* dyr = dy + r * D;
    const bf16_t* xr = x + r * D;
    float dot = 0.0f;
    for (int64_t d = lane; d < D; d += kWarp) dot = fmaf(to_f32(dyr[d]) * to_f32(w[d]), to_f32(xr[d]), dot);
    dot = warp_sum(dot);
    const float inv = rstd[r];
    const float coef = inv * inv * dot / static_cast<float>(D);
    bf16_t* dxr = dx + r * D;
    for (int64_t d = lane; d < D; d += kWarp) {
      dxr[d] = __float2bfloat16_rn(inv * (to_f32(dyr[d]) * to_f32(w[d]) - to_f32(xr[d]) * coef));
    }
  }
}

// partial[chunk, d] = Σ_{r in chunk} dy[r, d] · x[r, d] · rstd[r]; grid (column blocks, chunks).
__global__ void rmsnorm_dw_partial_kernel(const bf16_t* __restrict__ dy, const bf16_t* __restrict__ x,
                                          const float* __restrict__ rstd, float* __restrict__ partial, int64_t R,
                                          int64_t D) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(kDwColumns) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (d >= D) return;
  const int64_t r0 = chunk * kDwChunkRows;
  const int64_t r1 = r0 + kDwChunkRows < R ? r0 + kDwChunkRows : R;
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) acc = fmaf(to_f32(dy[r * D + d]) * to_f32(x[r * D + d]), rstd[r], acc);
  partial[chunk * D + d] = acc;
}

// dw[d] += Σ_chunk partial[chunk, d], one block per column in a fixed tree order (deterministic).
__global__ void rmsnorm_dw_reduce_kernel(const float* __restrict__ partial, float* __restrict__ dw, int64_t chunks,
                                         int64_t D) {
  __shared__ float scratch[kWarp];
  for (int64_t d = blockIdx.x; d < D; d += gridDim.x) {
    float acc = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) acc += partial[c * D + d];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) dw[d] += acc;
  }
}

// ---- RoPE ---------------------------------------------------------------------------------------

// One block per token: the token's cos/sin (double, as the CPU reference) go to shared memory once,
// then every (head, j) pair of the token is rotated.
__global__ void rope_kernel(bf16_t* __restrict__ x, const int32_t* __restrict__ positions, int64_t N, int64_t h,
                            int64_t D, double theta, double sign, IndexFault* fault) {
  extern __shared__ double cos_sin[];  // [0, half): cos, [half, D): sign · sin
  const int64_t half = D / 2;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int32_t pos = positions[n];
    if (pos < 0) {  // uniform over the block
      if (threadIdx.x == 0) record_fault(fault, IndexOp::kRopePosition, n, pos, 0);
      continue;
    }
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
      const double inv_freq = pow(theta, -static_cast<double>(2 * j) / static_cast<double>(D));
      double s, c;
      sincos(static_cast<double>(pos) * inv_freq, &s, &c);
      cos_sin[j] = c;
      cos_sin[half + j] = sign * s;
    }
    __syncthreads();
    bf16_t* xt = x + n * h * D;
    for (int64_t t = threadIdx.x; t < h * half; t += blockDim.x) {
      const int64_t head = t / half, j = t % half;
      bf16_t* xv = xt + head * D;
      const double a = to_f32(xv[j]), b = to_f32(xv[j + half]);
      const double c = cos_sin[j], s = cos_sin[half + j];
      // double -> f32 -> bf16: the CPU reference's f32 result, then the storage rounding.
      xv[j] = __float2bfloat16_rn(static_cast<float>(a * c - b * s));
      xv[j + half] = __float2bfloat16_rn(static_cast<float>(b * c + a * s));
    }
    __syncthreads();  // before the next token overwrites cos_sin
  }
}

// ---- SwiGLU -------------------------------------------------------------------------------------

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

__global__ void swiglu_forward_kernel(const bf16_t* __restrict__ h, bf16_t* __restrict__ a, int64_t M, int64_t i) {
  const int64_t n = M * i;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = e / i, c = e - m * i;
    const float g = to_f32(h[m * 2 * i + c]);
    const float up = to_f32(h[m * 2 * i + i + c]);
    a[e] = __float2bfloat16_rn(g * sigmoid(g) * up);
  }
}

__global__ void swiglu_backward_kernel(const bf16_t* __restrict__ h, const bf16_t* __restrict__ da,
                                       bf16_t* __restrict__ dh, int64_t M, int64_t i) {
  const int64_t n = M * i;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = e / i, c = e - m * i;
    const float g = to_f32(h[m * 2 * i + c]);
    const float up = to_f32(h[m * 2 * i + i + c]);
    const float s = sigmoid(g);
    const float d = to_f32(da[e]);
    dh[m * 2 * i + c] = __float2bfloat16_rn(d * up * s * (1.0f + g * (1.0f - s)));
    dh[m * 2 * i + i + c] = __float2bfloat16_rn(d * g * s);
  }
}

// ---- cross-entropy ------------------------------------------------------------------------------

constexpr int kCeThreads = 512;
constexpr int32_t kIgnoreIndex = -100;

// Online (max, Σ exp(x − max)) pair; an empty pair has max = −inf and sum = 0.
struct MaxSum {
  float max, sum;
};

// e^x on the SFU (ex2.approx of x·log2 e; relative error about 2^-22, far below the bf16 rounding of
// dlogits); e^-inf = 0.
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * fast_exp(a.max - m) + b.sum * fast_exp(b.max - m)};
}

// Adds k values to a pair: one rescale per group (at most), then one exponential per value.
template <int k>
__device__ __forceinline__ void accumulate(MaxSum& ms, const float (&x)[k]) {
  float m = x[0];
#pragma unroll
  for (int i = 1; i < k; ++i) m = fmaxf(m, x[i]);
  if (m == -INFINITY) return;
  if (m > ms.max) {
    ms.sum = ms.max == -INFINITY ? 0.0f : ms.sum * fast_exp(ms.max - m);
    ms.max = m;
  }
#pragma unroll
  for (int i = 0; i < k; ++i) ms.sum += fast_exp(x[i] - ms.max);
}

// One block per row, two passes over it (the second mostly from L2): the (max, Σ exp) pair, then
// dlogits = scale · (softmax − onehot). bf16 rows of a multiple of 8 elements move 16 bytes per
// thread (`vec`); other rows one element at a time. The target logit is read before the block's first
// barrier and every dlogits element is written by the thread that read that logit, so dlogits may
// alias logits.
template <typename T>
__global__ void __launch_bounds__(kCeThreads) cross_entropy_kernel(const T* logits, const int32_t* __restrict__ targets,
                                                                   float* __restrict__ loss, T* dlogits,
                                                                   float grad_scale, int64_t N, int64_t V, bool vec,
                                                                   IndexFault* fault) {
  __shared__ MaxSum scratch[kCeThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int32_t t = targets[n];
    T* drow = dlogits == nullptr ? nullptr : dlogits + n * V;
    if (t < 0 || t >= V) {  // uniform over the block
      if (t != kIgnoreIndex && threadIdx.x == 0) record_fault(fault, IndexOp::kCrossEntropyTarget, n, t, V);
      if (threadIdx.x == 0) loss[n] = 0.0f;
      if (drow != nullptr) {
        for (int64_t c = threadIdx.x; c < V; c += blockDim.x) drow[c] = from_f32<T>(0.0f);
      }
      continue;
    }
    const T* row = logits + n * V;
    const float target_logit = to_f32(row[t]);
    MaxSum ms{-INFINITY, 0.0f};
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (vec) {
        for (int64_t c = threadIdx.x; c < V / 8; c += blockDim.x) {
          float x[8];
          load_bf16x8(row + 8 * c, x);
          accumulate(ms, x);
        }
      }
    }
    if (!vec) {
      for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
        const float x[1] = {to_f32(row[c])};
        accumulate(ms, x);
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const MaxSum other{__shfl_xor_sync(kFullMask, ms.max, off), __shfl_xor_sync(kFullMask, ms.sum, off)};
      ms = combine(ms, other);
    }
    if (lane == 0) scratch[warp] = ms;
    __syncthreads();
    MaxSum total{-INFINITY, 0.0f};
    for (int w = 0; w < kCeThreads / kWarp; ++w) total = combine(total, scratch[w]);
    __syncthreads();  // scratch is reused by the next row
    const float lse = total.max + logf(total.sum);
    if (threadIdx.x == 0) loss[n] = lse - target_logit;
    if (drow == nullptr) continue;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (vec) {
        for (int64_t c = threadIdx.x; c < V / 8; c += blockDim.x) {
          float x[8];
          load_bf16x8(row + 8 * c, x);
#pragma unroll
          for (int i = 0; i < 8; ++i) x[i] = grad_scale * (fast_exp(x[i] - lse) - (8 * c + i == t ? 1.0f : 0.0f));
          store_bf16x8(drow + 8 * c, x);
        }
      }
    }
    if (!vec) {
      for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
        const float p = fast_exp(to_f32(row[c]) - lse);
        drow[c] = from_f32<T>(grad_scale * (c == t ? p - 1.0f : p));
      }
    }
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

cudaError_t rmsnorm_forward(const uint16_t* x, const uint16_t* w, float eps, uint16_t* y, float* rstd, int64_t R,
                            int64_t D, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  rmsnorm_forward_kernel<<<grid_blocks(R, kNormWarps), kNormWarps * kWarp, 0, stream>>>(
      reinterpret_cast<const bf16_t*>(x), reinterpret_cast<const bf16_t*>(w), eps, reinterpret_cast<bf16_t*>(y),
      rstd, R, D);
  return cudaGetLastError();
}

int64_t rmsnorm_dw_chunks(int64_t R) { return (R + kDwChunkRows - 1) / kDwChunkRows; }

cudaError_t rmsnorm_backward(const uint16_t* dy, const uint16_t* x, const uint16_t* w, const float* rstd,
                             uint16_t* dx, float* dw, float* dw_partial, int64_t R, int64_t D, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  const auto* dy_b = reinterpret_cast<const bf16_t*>(dy);
  const auto* x_b = reinterpret_cast<const bf16_t*>(x);
  const int64_t chunks = rmsnorm_dw_chunks(R);
  if (chunks > 65535) {
    // grid.y limit; callers with more rows split the call (R > 4M rows of one norm is not a shape we run).
    return cudaErrorInvalidConfiguration;
  }
  const dim3 partial_grid(static_cast<unsigned>((D + kDwColumns - 1) / kDwColumns), static_cast<unsigned>(chunks));
  rmsnorm_dw_partial_kernel<<<partial_grid, kDwColumns, 0, stream>>>(dy_b, x_b, rstd, dw_partial, R, D);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  rmsnorm_dw_reduce_kernel<<<grid_blocks(D, 1, 65535), row_threads(chunks), 0, stream>>>(dw_partial, dw, chunks, D);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  rmsnorm_dx_kernel<<<grid_blocks(R, kNormWarps), kNormWarps * kWarp, 0, stream>>>(
      dy_b, x_b, reinterpret_cast<const bf16_t*>(w), rstd, reinterpret_cast<bf16_t*>(dx), R, D);
  return cudaGetLastError();
}

cudaError_t rope(uint16_t* x, const int32_t* positions, int64_t N, int64_t h, int64_t D, double theta, double sign,
                 IndexFault* fault, cudaStream_t stream) {
  if (N == 0 || h == 0 || D == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(D) * sizeof(double);
  rope_kernel<<<grid_blocks(N), row_threads(h * (D / 2)), smem, stream>>>(reinterpret_cast<bf16_t*>(x), positions, N,
                                                                         h, D, theta, sign, fault);
  return cudaGetLastError();
}

cudaError_t swiglu_forward(const uint16_t* h, uint16_t* a, int64_t M, int64_t i, cudaStream_t stream) {
  if (M * i == 0) return cudaSuccess;
  swiglu_forward_kernel<<<grid_blocks(M * i, 256, 65535 * 4), 256, 0, stream>>>(reinterpret_cast<const bf16_t*>(h),
                                                                               reinterpret_cast<bf16_t*>(a), M, i);
  return cudaGetLastError();
}

cudaError_t swiglu_backward(const uint16_t* h, const uint16_t* da, uint16_t* dh, int64_t M, int64_t i,
                            cudaStream_t stream) {
  if (M * i == 0) return cudaSuccess;
  swiglu_backward_kernel<<<grid_blocks(M * i, 256, 65535 * 4), 256, 0, stream>>>(
      reinterpret_cast<const bf16_t*>(h), reinterpret_cast<const bf16_t*>(da), reinterpret_cast<bf16_t*>(dh), M, i);
  return cudaGetLastError();
}

cudaError_t cross_entropy_forward(const void* logits, bool logits_bf16, const int32_t* targets, float* loss,
                                  void* dlogits, float grad_scale, int64_t N, int64_t V, IndexFault* fault,
                                  cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (logits_bf16) {
    // 16-byte rows: every row start is 16-byte aligned when V % 8 == 0 and both bases are.
    const bool vec = V % 8 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(dlogits) % 16 == 0;
    cross_entropy_kernel<bf16_t><<<grid_blocks(N), kCeThreads, 0, stream>>>(
        static_cast<const bf16_t*>(logits), targets, loss, static_cast<bf16_t*>(dlogits), grad_scale, N, V, vec,
        fault);
  } else {
    cross_entropy_kernel<float><<<grid_blocks(N), kCeThreads, 0, stream>>>(
        static_cast<const float*>(logits), targets, loss, static_cast<float*>(dlogits), grad_scale, N, V, false, fault);
  }
  return cudaGetLastError();
}

}  // namespace moetp::cuda::launch
