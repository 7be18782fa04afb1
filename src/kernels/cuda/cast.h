// Element-wise dtype casts on the GPU: f32 -> bf16 (round-to-nearest-even, as core/bf16.h) and
// bf16 -> f32. Contract shared with the CPU path Tensor::to(DType).
//   src  [IN]  contiguous CUDA tensor, f32 or bf16
//   returns    contiguous CUDA tensor of the same shape in `dtype`
#pragma once

#include "core/tensor.h"

namespace moetp::cuda {

Tensor cast(const Tensor& src, DType dtype);

}  // namespace moetp::cuda
