// Router softmax + top-k and its logits gradient (device side; contracts in ops.h). One warp per
// token with the token's E values in shared memory; ports of cpu::router_forward (after the logits
// GEMM) and cpu::router_logits_grad.
#include <climits>

#include "kernels/cuda/ops_common.cuh"

namespace moetp::cuda::launch {

namespace {

using detail::grid_blocks;
using detail::kFullMask;
using detail::kWarp;
using detail::record_fault;
using detail::warp_max;
using detail::warp_sum;

constexpr int kRouterWarps = 4;  // tokens per block

// softmax in f32 (max-subtracted); top-K by probability, descending, ties to the lower expert id.
__global__ void router_forward_kernel(const float* __restrict__ logits, float* __restrict__ probs,
                                      int32_t* __restrict__ topk_idx, float* __restrict__ topk_weight, int64_t N,
                                      int E, int K, bool norm_topk_prob) {
  extern __shared__ float router_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float* p = router_smem + static_cast<int64_t>(warp) * E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRouterWarps;
  for (int64_t n = blockIdx.x * static_cast<int64_t>(kRouterWarps) + warp; n < N; n += stride) {
    const float* l = logits + n * E;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int e = lane; e < E; e += kWarp) {
      const float v = expf(l[e] - mx);
      p[e] = v;
      sum += v;
    }
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += kWarp) {
      const float q = p[e] / sum;
      p[e] = q;
      probs[n * E + e] = q;
    }
    __syncwarp();
    // K rounds of a warp argmax; a chosen expert is marked −1 (below every probability). NaN ranks
    // as −0.5: below every real probability, above the marks, so a NaN row still picks K distinct
    // experts (the lowest ids) instead of indexing out of bounds.
    double selected_sum = 0.0;
    for (int k = 0; k < K; ++k) {
      float best = -2.0f;
      int best_e = INT_MAX;
      for (int e = lane; e < E; e += kWarp) {
        float q = p[e];
        if (q != q) q = -0.5f;
        if (q > best) {  // e ascends within a lane, so ties keep the lower id
          best = q;
          best_e = e;
        }
      }
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, best, off);
        const int oe = __shfl_xor_sync(kFullMask, best_e, off);
        if (ov > best || (ov == best && oe < best_e)) {
          best = ov;
          best_e = oe;
        }
      }
      if (lane == 0) {
        const float chosen = p[best_e];  // best_e < E: K <= E leaves an unmarked expert every round
        topk_idx[n * K + k] = best_e;
        topk_weight[n * K + k] = chosen;
        p[best_e] = -1.0f;
        selected_sum += chosen;
      }
      __syncwarp();
    }
    if (lane == 0 && norm_topk_prob) {
      for (int k = 0; k < K; ++k) {
        topk_weight[n * K + k] = static_cast<float>(topk_weight[n * K + k] / selected_sum);
      }
    }
    __syncwarp();  // p is rewritten by the warp's next token
  }
}

// dlogits = softmax backward of dp, dp = d_probs + the top-k weights' gradient (double, as the CPU).
__global__ void router_logits_grad_kernel(const float* __restrict__ probs, const int32_t* __restrict__ topk_idx,
                                          const float* __restrict__ topk_weight,
                                          const float* __restrict__ d_topk_weight, const float* __restrict__ d_probs,
                                          float* __restrict__ dlogits, int64_t N, int E, int K, bool norm_topk_prob,
                                          IndexFault* fault) {
  extern __shared__ double router_grad_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  double* dp = router_grad_smem + static_cast<int64_t>(warp) * E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRouterWarps;
  for (int64_t n = blockIdx.x * static_cast<int64_t>(kRouterWarps) + warp; n < N; n += stride) {
    const float* p = probs + n * E;
    for (int e = lane; e < E; e += kWarp) dp[e] = d_probs != nullptr ? static_cast<double>(d_probs[n * E + e]) : 0.0;
    __syncwarp();
    if (d_topk_weight != nullptr) {
      const int32_t* idx = topk_idx + n * K;
      const float* dw = d_topk_weight + n * K;
      double s = 0.0, dot = 0.0;
      if (norm_topk_prob) {
        // w_k = p_k / s, s = Σ_k p_k  =>  dp_j += (dw_j − Σ_k dw_k · w_k) / s.
        for (int k = lane; k < K; k += kWarp) {
          const int e = idx[k];
          if (e >= 0 && e < E) s += p[e];
          dot += static_cast<double>(dw[k]) * topk_weight[n * K + k];
        }
        s = warp_sum(s);
        dot = warp_sum(dot);
      }
      for (int k = lane; k < K; k += kWarp) {
        const int e = idx[k];
        if (e < 0 || e >= E) {
          record_fault(fault, IndexOp::kRouterTopkIdx, n * K + k, e, E);
          continue;
        }
        atomicAdd(&dp[e], norm_topk_prob ? (dw[k] - dot) / s : static_cast<double>(dw[k]));
      }
      __syncwarp();
    }
    // Softmax backward: dl_e = p_e · (dp_e − Σ_f p_f · dp_f).
    double dot = 0.0;
    for (int e = lane; e < E; e += kWarp) dot += p[e] * dp[e];
    dot = warp_sum(dot);
    for (int e = lane; e < E; e += kWarp) dlogits[n * E + e] = static_cast<float>(p[e] * (dp[e] - dot));
    __syncwarp();  // dp is rewritten by the warp's next token
  }
}

}  // namespace

cudaError_t router_forward(const float* logits, float* probs, int32_t* topk_idx, float* topk_weight, int64_t N,
                           int64_t E, int64_t K, bool norm_topk_prob, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (E < 1 || E > kRouterMaxExperts || K < 1 || K > E) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(kRouterWarps) * static_cast<size_t>(E) * sizeof(float);
  router_forward_kernel<<<grid_blocks(N, kRouterWarps), kRouterWarps * kWarp, smem, stream>>>(
      logits, probs, topk_idx, topk_weight, N, static_cast<int>(E), static_cast<int>(K), norm_topk_prob);
  return cudaGetLastError();
}

cudaError_t router_logits_grad(const float* probs, const int32_t* topk_idx, const float* topk_weight,
                               const float* d_topk_weight, const float* d_probs, float* dlogits, int64_t N, int64_t E,
                               int64_t K, bool norm_topk_prob, IndexFault* fault, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (E < 1 || E > kRouterMaxExperts || K < 1 || K > E) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(kRouterWarps) * static_cast<size_t>(E) * sizeof(double);
  router_logits_grad_kernel<<<grid_blocks(N, kRouterWarps), kRouterWarps * kWarp, smem, stream>>>(
      probs, topk_idx, topk_weight, d_topk_weight, d_probs, dlogits, N, static_cast<int>(E), static_cast<int>(K),
      norm_topk_prob, fault);
  return cudaGetLastError();
}

}  // namespace moetp::cuda::launch
