// Row movement and folding primitives shared by the dispatchers (CPU, f32). A dispatcher reduces
// to: which table row each dispatched row came from (`rows`), and which weight column applies
// (`cols`). Every primitive loops over dispatched rows in order, so results are deterministic.
#pragma once

#include <span>

#include "core/tensor.h"

namespace moetp::moe {

// out[i] = src[rows[i]]                                   src (R, H) -> out (len(rows), H)
Tensor gather_rows(const Tensor& src_RH, std::span<const int64_t> rows);
// dst[rows[i]] = src[i]  (rows must be a permutation)     dst (R, H), R == len(rows)
Tensor scatter_rows(const Tensor& src_MH, std::span<const int64_t> rows);
// dst[rows[i]] += src[i]                                   dst (R, H), accumulated
void scatter_add_rows(const Tensor& src_MH, std::span<const int64_t> rows, Tensor& dst_RH);
// dst[rows[i]] += w[rows[i], cols[i]] · y[i]               w (R, C)
void fold_weighted(const Tensor& y_MH, std::span<const int64_t> rows, std::span<const int64_t> cols,
                   const Tensor& w_RC, Tensor& dst_RH);
// out[i] = w[rows[i], cols[i]] · g[rows[i]]                g (R, H) -> out (len(rows), H)
Tensor weighted_gather(const Tensor& g_RH, std::span<const int64_t> rows, std::span<const int64_t> cols,
                       const Tensor& w_RC);
// dw[rows[i], cols[i]] += <g[rows[i]], y[i]>               dw (R, C), accumulated
void dot_rows(const Tensor& g_RH, std::span<const int64_t> rows, std::span<const int64_t> cols,
              const Tensor& y_MH, Tensor& dw_RC);

}  // namespace moetp::moe
