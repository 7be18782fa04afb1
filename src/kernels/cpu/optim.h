// Optimizer kernels, CPU reference (f32 tensors): AdamW's element update, the sum of squares of a
// gradient and its scaling. Pure functions: no communication, no configuration.
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace moetp::cpu {

// One AdamW step (decoupled weight decay, bias-corrected moments), PyTorch's formula on f32
// parameters. The per-step scalars are computed in double and rounded once to f32; the element
// update is all f32, every operation correctly rounded and none contracted, so the CUDA kernel
// reproduces it bit for bit:
//   m = b1·m + (1 − b1)·g;  v = b2·v + (1 − b2)·g²;  u = (m / bc1) / (sqrt(v / bc2) + eps)
//   w = (w − f32(lr·wd)·w) − lr·u
//   w, m, v [IN/OUT] f32, contiguous, one shape;  g [IN] f32, the same shape
//   m, v may instead both be bf16 (optim.state_dtype = bf16): each moment is read as f32, updated
//   as above, used unrounded in this step's update and stored rounded to nearest even
//   step counts from 1; weight_decay 0 = no decay
void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step);

// Σ g² in double, elements in storage order (f32, contiguous).
double sum_of_squares(const Tensor& g);

// g *= s (f32, contiguous).
void scale(Tensor& g, float s);

}  // namespace moetp::cpu
