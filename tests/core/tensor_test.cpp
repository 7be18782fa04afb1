#include "core/tensor.h"

#include <gtest/gtest.h>

#include "testing.h"

namespace moetp {
namespace {

TEST(Tensor, EmptyHasContiguousStridesAndShape) {
  Tensor t = Tensor::empty({2, 3, 4}, DType::kF32);
  EXPECT_EQ(t.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(t.strides(), (Shape{12, 4, 1}));
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.num_bytes(), 96u);
  EXPECT_EQ(t.rows(), 2);
  EXPECT_EQ(t.row_numel(), 12);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.describe(), "f32[2, 3, 4] cpu");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u);
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_vector<int32_t>({0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor v = t.view({3, 2});
  v.data<int32_t>()[5] = 50;
  EXPECT_EQ(t.to_vector<int32_t>()[5], 50);
  EXPECT_EQ(t.view({-1}).shape(), (Shape{6}));
  Tensor row1 = t.narrow_rows(1, 1);
  EXPECT_EQ(row1.to_vector<int32_t>(), (std::vector<int32_t>{3, 4, 50}));
}

TEST(Tensor, SliceAndTransposeAreStridedViews) {
  Tensor t = Tensor::from_vector<int64_t>({0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor col = t.slice(1, 1, 3);
  EXPECT_FALSE(col.is_contiguous());
  EXPECT_EQ(col.contiguous().to_vector<int64_t>(), (std::vector<int64_t>{1, 2, 4, 5}));
  Tensor tt = t.transpose(0, 1);
  EXPECT_EQ(tt.shape(), (Shape{3, 2}));
  EXPECT_EQ(tt.to_vector<int64_t>(), (std::vector<int64_t>{0, 3, 1, 4, 2, 5}));
  Tensor dst = Tensor::zeros({3, 2}, DType::kI64);
  dst.copy_from(tt);
  EXPECT_EQ(dst.to_vector<int64_t>(), (std::vector<int64_t>{0, 3, 1, 4, 2, 5}));
}

TEST(Tensor, ReinterpretSharesTheBytes) {
  Tensor f = Tensor::zeros({3, 2}, DType::kF32);
  Tensor rows = f.narrow_rows(1, 2);  // 16 bytes from byte 8
  Tensor b = rows.reinterpret(DType::kBF16, {2, 3});  // the first 12 of them
  EXPECT_EQ(b.dtype(), DType::kBF16);
  EXPECT_EQ(b.shape(), (Shape{2, 3}));
  EXPECT_TRUE(b.is_contiguous());
  EXPECT_EQ(b.raw_data(), rows.raw_data());
  reinterpret_cast<uint16_t*>(b.raw_data())[1] = 0x3f80;  // the high half of f[1, 0] (little endian): 1.0f
  EXPECT_EQ(f.to_vector<float>()[2], 1.0f);
  EXPECT_EQ(rows.reinterpret(DType::kI64, {2}).shape(), (Shape{2}));
  EXPECT_EQ(f.reinterpret(DType::kBF16, {0, 4}).numel(), 0);
  EXPECT_THROW(rows.reinterpret(DType::kBF16, {3, 3}), Error);  // 18 bytes > 16
  EXPECT_THROW(f.narrow_rows(0, 1).slice(1, 1, 2).reinterpret(DType::kI64, {0}), Error);  // byte 4 is not 8-aligned
  EXPECT_THROW(f.transpose(0, 1).reinterpret(DType::kBF16, {2}), Error);  // not contiguous
  EXPECT_THROW(f.reinterpret(DType::kBF16, {-1, 2}), Error);
}

TEST(Tensor, ZeroSizedTensorsAreValid) {
  Tensor t = Tensor::zeros({0, 5}, DType::kF32);
  EXPECT_EQ(t.numel(), 0);
  EXPECT_EQ(t.clone().shape(), (Shape{0, 5}));
  EXPECT_EQ(t.narrow_rows(0, 0).numel(), 0);
}

TEST(Tensor, DtypeConversions) {
  Tensor f = Tensor::from_vector<float>({1.0f, -2.5f, 3.14159f}, {3});
  Tensor b = f.to(DType::kBF16);
  EXPECT_EQ(b.dtype(), DType::kBF16);
  const std::vector<float> back = b.to(DType::kF32).to_vector<float>();
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], -2.5f);
  EXPECT_EQ(back[2], 3.140625f);
  Tensor i = Tensor::from_vector<int32_t>({-7, 9}, {2}).to(DType::kI64);
  EXPECT_EQ(i.to_vector<int64_t>(), (std::vector<int64_t>{-7, 9}));
}

TEST(TensorBadInput, ErrorsNameTheValues) {
  Tensor t = Tensor::zeros({2, 3}, DType::kF32);
  EXPECT_THROW(
      {
        try {
          t.view({4, 2});
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("view: shape [4, 2] has 8 elements, tensor f32[2, 3] cpu has 6"),
                    std::string::npos)
              << e.what();
          throw;
        }
      },
      Error);
  EXPECT_THROW(t.data<int32_t>(), Error);
  EXPECT_THROW(t.slice(1, 2, 4), Error);
  EXPECT_THROW(t.transpose(0, 1).view({6}), Error);
  EXPECT_THROW(Tensor::empty({2, -1}, DType::kF32), Error);
  EXPECT_THROW(Tensor::from_vector<float>({1, 2, 3}, {2, 2}), Error);
  EXPECT_THROW(Tensor::from_vector<int64_t>({int64_t{1} << 40}, {1}).to(DType::kI32), Error);
  EXPECT_THROW(check_shape(t, {3, 2}, "weight"), Error);
  if (!device_available(Device::kCuda)) {
    try {
      Tensor::empty({4}, DType::kF32, Device::kCuda);
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("no cuda backend is available"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace moetp
