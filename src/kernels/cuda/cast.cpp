#include "kernels/cuda/cast.h"

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"

namespace moetp::cuda {

Tensor cast(const Tensor& src, DType dtype) {
  check_device(src, Device::kCuda, "cast source");
  check_contiguous(src, "cast source");
  if (src.dtype() == dtype) return src;
  Tensor out = Tensor::empty(src.shape(), dtype, Device::kCuda);
  if (src.dtype() == DType::kF32 && dtype == DType::kBF16) {
    CUDA_CHECK(launch::cast_f32_to_bf16(src.data<float>(), reinterpret_cast<uint16_t*>(out.data<bf16>()),
                                        src.numel(), nullptr));
  } else if (src.dtype() == DType::kBF16 && dtype == DType::kF32) {
    CUDA_CHECK(launch::cast_bf16_to_f32(reinterpret_cast<const uint16_t*>(src.data<bf16>()), out.data<float>(),
                                        src.numel(), nullptr));
  } else {
    MOETP_FAIL("cuda::cast {} -> {} is not supported", dtype_name(src.dtype()), dtype_name(dtype));
  }
  CUDA_CHECK(cudaStreamSynchronize(nullptr));
  return out;
}

}  // namespace moetp::cuda
