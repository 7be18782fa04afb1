#include "model/lm_head.h"

#include <algorithm>

namespace moetp::model {

double lm_head_loss(backend::Backend& be, const Tensor& f_NH, const Tensor& w_VH, const Tensor& targets_N,
                    int64_t chunk_rows, const LmHeadGrads* grads, Tensor* logits_NV) {
  MOETP_CHECK(chunk_rows >= 1, "lm_head_loss: chunk_rows ({}) must be >= 1", chunk_rows);
  MOETP_CHECK(grads == nullptr || logits_NV == nullptr, "lm_head_loss: logits are returned by a forward only");
  MOETP_CHECK(grads == nullptr || (grads->df_NH != nullptr && grads->dw_VH != nullptr),
              "lm_head_loss: a backward needs df_NH and dw_VH");
  const int64_t N = f_NH.size(0), H = f_NH.size(1), V = w_VH.size(0);
  Tensor df;
  if (grads != nullptr && (chunk_rows < N || N == 0)) {
    Tensor& out = *grads->df_NH;
    if (!out.defined() || out.shape() != Shape{N, H} || out.dtype() != be.compute_dtype()) {
      out = be.empty({N, H}, be.compute_dtype());
    }
    df = out;
  }
  if (logits_NV != nullptr && chunk_rows < N) *logits_NV = be.empty({N, V}, be.compute_dtype());
  double ce_sum = 0;
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N - r0);
    const Tensor f_c = f_NH.narrow_rows(r0, rows);
    Tensor logits_c = be.linear(f_c, w_VH);
    if (logits_NV != nullptr) {
      if (rows == N) {
        *logits_NV = logits_c;
      } else {
        logits_NV->narrow_rows(r0, rows).copy_from(logits_c);
      }
    }
    // dlogits overwrite the logits in place (allowed by the op's contract).
    be.cross_entropy(logits_c, targets_N.narrow_rows(r0, rows), grads != nullptr ? &logits_c : nullptr,
                     grads != nullptr ? static_cast<float>(grads->ce_scale) : 0.0f, ce_sum);
    if (grads != nullptr) {
      Tensor df_c;
      be.linear_backward(logits_c, f_c, w_VH, &df_c, grads->dw_VH);
      if (rows == N) {
        *grads->df_NH = df_c;
      } else {
        df.narrow_rows(r0, rows).copy_from(df_c);
      }
    }
  }
  return ce_sum;
}

}  // namespace moetp::model
