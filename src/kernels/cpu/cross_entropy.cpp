// Row-parallel log-softmax cross-entropy. Per-row losses go to a buffer and are summed serially, so
// the result is bit-identical for any OpenMP thread count.
#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

CrossEntropyResult cross_entropy_forward(const Tensor& logits_NV, const Tensor& targets_N, Tensor* dlogits_NV,
                                         float grad_scale, double loss_start) {
  check_f32_cpu(logits_NV, 2, "cross_entropy logits_NV");
  const int64_t N = logits_NV.size(0), V = logits_NV.size(1);
  MOETP_CHECK(targets_N.defined() && targets_N.ndim() == 1 && targets_N.size(0) == N,
              "cross_entropy: targets_N must be (N) = ({}) to match logits_NV {}, got {}", N, logits_NV.describe(),
              targets_N.describe());
  check_dtype(targets_N, DType::kI32, "cross_entropy targets_N");
  check_device(targets_N, Device::kCpu, "cross_entropy targets_N");
  check_contiguous(targets_N, "cross_entropy targets_N");
  const int32_t* targets = targets_N.data<int32_t>();
  CrossEntropyResult result;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = targets[n];
    MOETP_CHECK(t == kIgnoreIndex || (t >= 0 && t < V),
                "cross_entropy: target {} at position {} is neither in [0, {}) (vocab size V) nor the ignore index {}",
                t, n, V, kIgnoreIndex);
    if (t != kIgnoreIndex) ++result.num_targets;
  }
  float* dlogits = nullptr;
  if (dlogits_NV != nullptr) {
    if (!dlogits_NV->defined()) *dlogits_NV = Tensor::empty({N, V}, DType::kF32);
    check_f32_cpu(*dlogits_NV, 2, "cross_entropy dlogits_NV");
    check_shape(*dlogits_NV, {N, V}, "cross_entropy dlogits_NV");
    dlogits = dlogits_NV->data<float>();
  }

  const float* logits = logits_NV.data<float>();
  std::vector<double> row_loss(static_cast<size_t>(N), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = targets[n];
    float* drow = dlogits != nullptr ? dlogits + n * V : nullptr;
    if (t == kIgnoreIndex) {
      if (drow != nullptr) std::fill(drow, drow + V, 0.0f);
      continue;
    }
    const float* row = logits + n * V;
    const double row_max = *std::max_element(row, row + V);
    double sum = 0.0;
    for (int64_t c = 0; c < V; ++c) sum += std::exp(static_cast<double>(row[c]) - row_max);
    const double lse = row_max + std::log(sum);
    const double target_logit = row[t];  // read before drow (which may alias row) is written
    row_loss[n] = lse - target_logit;
    if (drow != nullptr) {
      for (int64_t c = 0; c < V; ++c) {
        drow[c] = static_cast<float>(grad_scale * (std::exp(static_cast<double>(row[c]) - lse) - (c == t ? 1.0 : 0.0)));
      }
    }
  }
  result.loss_sum = loss_start;
  for (int64_t n = 0; n < N; ++n) result.loss_sum += row_loss[n];
  return result;
}

}  // namespace moetp::cpu
