// Embedding gather/scatter-add. The scatter runs token by token, so repeated ids accumulate in a
// fixed order and the result does not depend on the thread count.
#include "kernels/cpu/embedding.h"

#include <algorithm>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

namespace {

// ids are checked in full before anything is written, so a bad id leaves the outputs untouched.
void check_ids(const Tensor& ids_N, int64_t V, const char* op) {
  MOETP_CHECK(ids_N.defined() && ids_N.ndim() == 1, "{}: ids_N must be (N), got {}", op, ids_N.describe());
  check_dtype(ids_N, DType::kI32, "embedding ids_N");
  check_device(ids_N, Device::kCpu, "embedding ids_N");
  check_contiguous(ids_N, "embedding ids_N");
  const int32_t* ids = ids_N.data<int32_t>();
  for (int64_t n = 0; n < ids_N.size(0); ++n) {
    MOETP_CHECK(ids[n] >= 0 && ids[n] < V, "{}: token id {} at position {} is not in [0, {}) (vocab size V = {})", op,
                ids[n], n, V, V);
  }
}

}  // namespace

Tensor embedding_forward(const Tensor& ids_N, const Tensor& table_VH) {
  check_f32_cpu(table_VH, 2, "embedding table_VH");
  const int64_t V = table_VH.size(0), H = table_VH.size(1);
  check_ids(ids_N, V, "embedding_forward");
  const int64_t N = ids_N.size(0);
  Tensor y_NH = Tensor::empty({N, H}, DType::kF32);
  const int32_t* ids = ids_N.data<int32_t>();
  const float* table = table_VH.data<float>();
  float* y = y_NH.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) std::copy_n(table + ids[n] * H, H, y + n * H);
  return y_NH;
}

void embedding_backward(const Tensor& ids_N, const Tensor& dy_NH, Tensor& dtable_VH) {
  check_f32_cpu(dtable_VH, 2, "embedding dtable_VH (accumulated into; must be defined)");
  const int64_t V = dtable_VH.size(0), H = dtable_VH.size(1);
  check_ids(ids_N, V, "embedding_backward");
  const int64_t N = ids_N.size(0);
  check_f32_cpu(dy_NH, 2, "embedding dy_NH");
  check_shape(dy_NH, {N, H}, "embedding dy_NH");
  const int32_t* ids = ids_N.data<int32_t>();
  const float* dy = dy_NH.data<float>();
  float* dtable = dtable_VH.data<float>();
  for (int64_t n = 0; n < N; ++n) {
    float* row = dtable + ids[n] * H;
    const float* g = dy + n * H;
    for (int64_t c = 0; c < H; ++c) row[c] += g[c];
  }
}

}  // namespace moetp::cpu
