// The CUDA cast kernels against the CPU conversion (core/bf16.h), bit-exactly, on random inputs
// including ties, NaN and Inf. Label `cuda`: skips with a message where no GPU is visible.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>

#include "core/bf16.h"
#include "kernels/cuda/cast.h"
#include "kernels/cuda/runtime.h"
#include "testing.h"

namespace moetp {
namespace {

class CudaCast : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "CUDA test skipped: " << cuda::unavailable_reason();
    cuda::init(0);
  }
};

TEST_F(CudaCast, F32ToBf16MatchesCpuBitExactly) {
  for (int64_t n : {int64_t{1}, int64_t{255}, int64_t{4097}, int64_t{1} << 20}) {
    Tensor x = testing::random_tensor({n}, 3, static_cast<uint64_t>(n), -100.0f, 100.0f);
    float* p = x.data<float>();
    p[0] = std::bit_cast<float>(0x3f808000u);  // a tie
    if (n > 3) {
      p[1] = std::numeric_limits<float>::infinity();
      p[2] = -7.0f;  // NaN is checked on its own below: its bit pattern is not fixed
      p[3] = std::numeric_limits<float>::max();
    }
    Tensor gpu = cuda::cast(x.to(Device::kCuda), DType::kBF16).to(Device::kCpu);
    EXPECT_TRUE(testing::bit_equal(gpu, x.to(DType::kBF16))) << "n=" << n;
    Tensor back = cuda::cast(gpu.to(Device::kCuda), DType::kF32).to(Device::kCpu);
    EXPECT_TRUE(testing::bit_equal(back, gpu.to(DType::kF32))) << "n=" << n;
  }
}

TEST_F(CudaCast, NanStaysNan) {
  Tensor x = Tensor::from_vector<float>({std::numeric_limits<float>::quiet_NaN(), std::bit_cast<float>(0x7f800001u)}, {2});
  const std::vector<float> back =
      cuda::cast(cuda::cast(x.to(Device::kCuda), DType::kBF16), DType::kF32).to(Device::kCpu).to_vector<float>();
  EXPECT_TRUE(std::isnan(back[0]));
  EXPECT_TRUE(std::isnan(back[1]));
}

TEST_F(CudaCast, EmptyTensor) {
  Tensor x = Tensor::empty({0}, DType::kF32, Device::kCuda);
  EXPECT_EQ(cuda::cast(x, DType::kBF16).numel(), 0);
}

}  // namespace
}  // namespace moetp
