#include "moe/row_ops.h"

#include <cstring>

namespace moetp::moe {

namespace {
void check_rows(std::span<const int64_t> rows, int64_t limit, const char* op) {
  for (size_t i = 0; i < rows.size(); ++i) {
    MOETP_CHECK(rows[i] >= 0 && rows[i] < limit, "{}: row index rows[{}] = {} out of range [0, {})", op, i, rows[i],
                limit);
  }
}
}  // namespace

Tensor gather_rows(const Tensor& src_RH, std::span<const int64_t> rows) {
  check_contiguous(src_RH, "gather_rows source");
  check_rows(rows, src_RH.rows(), "gather_rows");
  Shape shape = src_RH.shape();
  shape[0] = static_cast<int64_t>(rows.size());
  Tensor out = Tensor::empty(shape, src_RH.dtype());
  const size_t row_bytes = static_cast<size_t>(src_RH.row_numel()) * src_RH.element_size();
  const char* s = static_cast<const char*>(src_RH.raw_data());
  char* d = static_cast<char*>(out.raw_data());
  for (size_t i = 0; i < rows.size(); ++i) std::memcpy(d + i * row_bytes, s + rows[i] * row_bytes, row_bytes);
  return out;
}

Tensor scatter_rows(const Tensor& src_MH, std::span<const int64_t> rows) {
  check_contiguous(src_MH, "scatter_rows source");
  MOETP_CHECK(static_cast<int64_t>(rows.size()) == src_MH.rows(), "scatter_rows: {} indices for {} rows",
              rows.size(), src_MH.rows());
  check_rows(rows, src_MH.rows(), "scatter_rows");
  Tensor out = Tensor::empty(src_MH.shape(), src_MH.dtype());
  const size_t row_bytes = static_cast<size_t>(src_MH.row_numel()) * src_MH.element_size();
  const char* s = static_cast<const char*>(src_MH.raw_data());
  char* d = static_cast<char*>(out.raw_data());
  for (size_t i = 0; i < rows.size(); ++i) std::memcpy(d + rows[i] * row_bytes, s + i * row_bytes, row_bytes);
  return out;
}

void scatter_add_rows(const Tensor& src_MH, std::span<const int64_t> rows, Tensor& dst_RH) {
  check_dtype(src_MH, DType::kF32, "scatter_add_rows source");
  check_contiguous(dst_RH, "scatter_add_rows destination");
  check_rows(rows, dst_RH.rows(), "scatter_add_rows");
  MOETP_CHECK(static_cast<int64_t>(rows.size()) == src_MH.rows() && src_MH.row_numel() == dst_RH.row_numel(),
              "scatter_add_rows: source {} with {} indices into {}", src_MH.describe(), rows.size(),
              dst_RH.describe());
  const int64_t h = src_MH.row_numel();
  const float* s = src_MH.data<float>();
  float* d = dst_RH.data<float>();
  for (size_t i = 0; i < rows.size(); ++i) {
    float* dr = d + rows[i] * h;
    const float* sr = s + static_cast<int64_t>(i) * h;
    for (int64_t c = 0; c < h; ++c) dr[c] += sr[c];
  }
}

void fold_weighted(const Tensor& y_MH, std::span<const int64_t> rows, std::span<const int64_t> cols,
                   const Tensor& w_RC, Tensor& dst_RH) {
  check_rows(rows, dst_RH.rows(), "fold_weighted");
  check_rows(cols, w_RC.row_numel(), "fold_weighted (cols)");
  const int64_t h = y_MH.row_numel();
  const int64_t c = w_RC.row_numel();
  const float* y = y_MH.data<float>();
  const float* w = w_RC.data<float>();
  float* d = dst_RH.data<float>();
  for (size_t i = 0; i < rows.size(); ++i) {
    const float wi = w[rows[i] * c + cols[i]];
    float* dr = d + rows[i] * h;
    const float* yr = y + static_cast<int64_t>(i) * h;
    for (int64_t k = 0; k < h; ++k) dr[k] += wi * yr[k];
  }
}

Tensor weighted_gather(const Tensor& g_RH, std::span<const int64_t> rows, std::span<const int64_t> cols,
                       const Tensor& w_RC) {
  check_rows(rows, g_RH.rows(), "weighted_gather");
  check_rows(cols, w_RC.row_numel(), "weighted_gather (cols)");
  const int64_t h = g_RH.row_numel();
  const int64_t c = w_RC.row_numel();
  Tensor out = Tensor::empty({static_cast<int64_t>(rows.size()), h}, DType::kF32);
  const float* g = g_RH.data<float>();
  const float* w = w_RC.data<float>();
  float* o = out.data<float>();
  for (size_t i = 0; i < rows.size(); ++i) {
    const float wi = w[rows[i] * c + cols[i]];
    const float* gr = g + rows[i] * h;
    float* orow = o + static_cast<int64_t>(i) * h;
    for (int64_t k = 0; k < h; ++k) orow[k] = wi * gr[k];
  }
  return out;
}

void dot_rows(const Tensor& g_RH, std::span<const int64_t> rows, std::span<const int64_t> cols, const Tensor& y_MH,
              Tensor& dw_RC) {
  check_rows(rows, g_RH.rows(), "dot_rows");
  check_rows(cols, dw_RC.row_numel(), "dot_rows (cols)");
  const int64_t h = g_RH.row_numel();
  const int64_t c = dw_RC.row_numel();
  const float* g = g_RH.data<float>();
  const float* y = y_MH.data<float>();
  float* dw = dw_RC.data<float>();
  for (size_t i = 0; i < rows.size(); ++i) {
    const float* gr = g + rows[i] * h;
    const float* yr = y + static_cast<int64_t>(i) * h;
    double acc = 0;
    for (int64_t k = 0; k < h; ++k) acc += static_cast<double>(gr[k]) * yr[k];
    dw[rows[i] * c + cols[i]] += static_cast<float>(acc);
  }
}

}  // namespace moetp::moe
