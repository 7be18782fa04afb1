// CPU GEMM and linear: against a naive double-precision triple loop (all four transpose
// combinations, padded leading dimensions with guard values), an integer-valued exact case, the BLAS
// edge cases (K = 0, beta = 0 over NaN, empty M/N), argument errors, and bit-identical results for
// any OpenMP thread count.
#include "kernels/cpu/gemm.h"

#include <cblas.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "testing.h"

namespace moetp {
namespace {

using moetp::testing::close;
using moetp::testing::random_tensor;
using moetp::testing::Tolerance;

constexpr Tolerance kF32Dot = testing::kF32DotVsF64;
constexpr float kGuard = -12345.0f;

// C = alpha · op(A) · op(B) + beta · C in double, row-major with leading dimensions.
void naive_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, double beta, std::vector<double>& C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double a = ta ? A[k * lda + m] : A[m * lda + k];
        const double b = tb ? B[n * ldb + k] : B[k * ldb + n];
        acc += a * b;
      }
      C[m * ldc + n] = alpha * acc + beta * C[m * ldc + n];
    }
  }
}

struct GemmCase {
  bool ta, tb;
  int64_t M, N, K, pad;
};

std::string gemm_case_name(const ::testing::TestParamInfo<GemmCase>& info) {
  const GemmCase& c = info.param;
  return "tA" + std::to_string(c.ta) + "_tB" + std::to_string(c.tb) + "_M" + std::to_string(c.M) + "_N" +
         std::to_string(c.N) + "_K" + std::to_string(c.K) + "_pad" + std::to_string(c.pad);
}

void PrintTo(const GemmCase& c, std::ostream* os) { *os << gemm_case_name(::testing::TestParamInfo<GemmCase>(c, 0)); }

// The first gemm switches OpenBLAS to one thread; the application's OpenMP thread count stays (an
// OpenMP build of OpenBLAS sets both). Declared first, so it sees this process's first gemm.
TEST(CpuGemm, KeepsTheApplicationsThreadCount) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(3);
  std::vector<float> a(64 * 64, 1.0f), b(64 * 64, 1.0f), c(64 * 64, 0.0f);
  cpu::gemm(false, false, 64, 64, 64, 1.0f, a.data(), 64, b.data(), 64, 0.0f, c.data(), 64);
  EXPECT_EQ(omp_get_max_threads(), 3);
  EXPECT_EQ(c[0], 64.0f);
  omp_set_num_threads(saved);
}

class CpuGemmRandom : public ::testing::TestWithParam<GemmCase> {};

TEST_P(CpuGemmRandom, MatchesNaiveTripleLoopAndKeepsGuards) {
  const GemmCase c = GetParam();
  const int64_t a_rows = c.ta ? c.K : c.M, a_cols = c.ta ? c.M : c.K;
  const int64_t b_rows = c.tb ? c.N : c.K, b_cols = c.tb ? c.K : c.N;
  const int64_t lda = a_cols + c.pad, ldb = b_cols + c.pad, ldc = c.N + c.pad;
  const Tensor A = random_tensor({a_rows, lda}, 1, 1);
  const Tensor B = random_tensor({b_rows, ldb}, 1, 2);
  // C has padding columns and one trailing guard row; all of it outside (M, N) must stay kGuard.
  Tensor C = random_tensor({c.M + 1, ldc}, 1, 3);
  float* pc = C.data<float>();
  for (int64_t r = 0; r <= c.M; ++r) {
    for (int64_t j = 0; j < ldc; ++j) {
      if (r == c.M || j >= c.N) pc[r * ldc + j] = kGuard;
    }
  }
  std::vector<double> expected(pc, pc + C.numel());
  const float alpha = 0.75f, beta = -0.5f;
  naive_gemm(c.ta, c.tb, c.M, c.N, c.K, alpha, A.data<float>(), lda, B.data<float>(), ldb, beta, expected, ldc);
  cpu::gemm(c.ta, c.tb, c.M, c.N, c.K, alpha, A.data<float>(), lda, B.data<float>(), ldb, beta, pc, ldc);

  std::vector<float> expected_f(expected.begin(), expected.end());
  EXPECT_TRUE(close(C, Tensor::from_vector(expected_f, {c.M + 1, ldc}), kF32Dot));
  for (int64_t r = 0; r <= c.M; ++r) {
    for (int64_t j = 0; j < ldc; ++j) {
      if (r == c.M || j >= c.N) {
        ASSERT_EQ(pc[r * ldc + j], kGuard) << "guard overwritten at [" << r << ", " << j << "]";
      }
    }
  }
}

std::vector<GemmCase> gemm_cases() {
  std::vector<GemmCase> cases;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      cases.push_back({ta, tb, 1, 1, 1, 0});
      cases.push_back({ta, tb, 7, 5, 3, 0});
      cases.push_back({ta, tb, 7, 5, 3, 2});
      cases.push_back({ta, tb, 33, 17, 65, 3});
      cases.push_back({ta, tb, 100, 64, 48, 0});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuGemmRandom, ::testing::ValuesIn(gemm_cases()), gemm_case_name);

TEST(CpuGemm, IntegerInputsAreExact) {
  // Small integers: every product and partial sum is an integer below 2^24, so f32 is exact.
  const int64_t M = 13, N = 11, K = 37;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE("trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb));
      std::vector<float> a(M * K), b(K * N);
      for (size_t x = 0; x < a.size(); ++x) a[x] = static_cast<float>(static_cast<int64_t>(x * 7 % 9) - 4);
      for (size_t x = 0; x < b.size(); ++x) b[x] = static_cast<float>(static_cast<int64_t>(x * 5 % 11) - 5);
      const int64_t lda = ta ? M : K, ldb = tb ? K : N;
      std::vector<float> expected(M * N);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) {
          int64_t acc = 0;
          for (int64_t k = 0; k < K; ++k) {
            acc += static_cast<int64_t>(ta ? a[k * lda + m] : a[m * lda + k]) *
                   static_cast<int64_t>(tb ? b[n * ldb + k] : b[k * ldb + n]);
          }
          expected[m * N + n] = static_cast<float>(2 * acc + 3);  // alpha = 2, beta = 1 over C = 3
        }
      }
      Tensor C = Tensor::full<float>({M, N}, 3.0f);
      cpu::gemm(ta, tb, M, N, K, 2.0f, a.data(), lda, b.data(), ldb, 1.0f, C.data<float>(), N);
      ASSERT_FALSE(moetp::testing::all_zero(expected));
      EXPECT_TRUE(moetp::testing::bit_equal(C, Tensor::from_vector(expected, {M, N})));
    }
  }
}

TEST(CpuGemm, ZeroKAppliesBetaOnly) {
  Tensor C = Tensor::from_vector<float>({1, -2, 3, 4, 5, -6}, {2, 3});
  cpu::gemm(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 1, 2.0f, C.data<float>(), 3);
  EXPECT_EQ(C.to_vector<float>(), (std::vector<float>{2, -4, 6, 8, 10, -12}));
  C.data<float>()[4] = NAN;
  cpu::gemm(true, true, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 1, 0.0f, C.data<float>(), 3);
  EXPECT_EQ(C.to_vector<float>(), (std::vector<float>(6, 0.0f)));
}

TEST(CpuGemm, BetaZeroOverwritesNaN) {
  const Tensor A = random_tensor({4, 3}, 2, 1);
  const Tensor B = random_tensor({3, 5}, 2, 2);
  Tensor C = Tensor::full<float>({4, 5}, NAN);
  cpu::gemm(false, false, 4, 5, 3, 1.0f, A.data<float>(), 3, B.data<float>(), 5, 0.0f, C.data<float>(), 5);
  for (float v : C.to_vector<float>()) EXPECT_TRUE(std::isfinite(v));
}

TEST(CpuGemm, EmptyMOrNIsANoOp) {
  Tensor C = Tensor::full<float>({1, 1}, 7.0f);
  cpu::gemm(false, false, 0, 1, 3, 1.0f, nullptr, 3, nullptr, 1, 0.0f, C.data<float>(), 1);
  cpu::gemm(false, false, 1, 0, 3, 1.0f, nullptr, 3, nullptr, 1, 0.0f, C.data<float>(), 1);
  EXPECT_EQ(C.to_vector<float>()[0], 7.0f);
}

using testing::expect_error;

TEST(CpuGemm, RejectsBadLeadingDimensions) {
  std::vector<float> a(12), b(12), c(16);
  expect_error([&] { cpu::gemm(false, false, 4, 4, 3, 1.0f, a.data(), 2, b.data(), 4, 0.0f, c.data(), 4); },
               {"lda (2) < 3"});
  expect_error([&] { cpu::gemm(false, true, 4, 4, 3, 1.0f, a.data(), 3, b.data(), 2, 0.0f, c.data(), 4); },
               {"ldb (2) < 3"});
  expect_error([&] { cpu::gemm(false, false, 4, 4, 3, 1.0f, a.data(), 3, b.data(), 4, 0.0f, c.data(), 3); },
               {"ldc (3) < N (4)"});
}

TEST(CpuLinear, ForwardAndBackwardMatchNaive) {
  const int64_t M = 9, K = 6, N = 4;
  const Tensor x = random_tensor({M, K}, 3, 1);
  const Tensor w = random_tensor({N, K}, 3, 2);
  const Tensor dy = random_tensor({M, N}, 3, 3);
  const Tensor dw0 = random_tensor({N, K}, 3, 4);
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  const float* pdy = dy.data<float>();
  std::vector<float> y_ref(M * N), dx_ref(M * K), dw_ref = dw0.to_vector<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(px[m * K + k]) * pw[n * K + k];
      y_ref[m * N + n] = static_cast<float>(acc);
    }
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) acc += static_cast<double>(pdy[m * N + n]) * pw[n * K + k];
      dx_ref[m * K + k] = static_cast<float>(acc);
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      double acc = dw_ref[n * K + k];
      for (int64_t m = 0; m < M; ++m) acc += static_cast<double>(pdy[m * N + n]) * px[m * K + k];
      dw_ref[n * K + k] = static_cast<float>(acc);
    }
  }
  EXPECT_TRUE(close(cpu::linear(x, w), Tensor::from_vector(y_ref, {M, N}), kF32Dot));

  Tensor dx = Tensor::full<float>({M, K}, NAN);  // overwritten
  Tensor dw = dw0.clone();                       // accumulated
  cpu::linear_backward(dy, x, w, &dx, &dw);
  EXPECT_TRUE(close(dx, Tensor::from_vector(dx_ref, {M, K}), kF32Dot));
  EXPECT_TRUE(close(dw, Tensor::from_vector(dw_ref, {N, K}), kF32Dot));

  Tensor dx_alloc;  // undefined: allocated
  cpu::linear_backward(dy, x, w, &dx_alloc, nullptr);
  EXPECT_TRUE(moetp::testing::bit_equal(dx_alloc, dx));
  Tensor dw_only = dw0.clone();
  cpu::linear_backward(dy, x, w, nullptr, &dw_only);
  EXPECT_TRUE(moetp::testing::bit_equal(dw_only, dw));
}

// cpu::gemm threads over fixed tiles (gemm.h), so its bits do not depend on the OpenMP thread
// count. The shapes are split into 2 to 8 tiles of rows and columns, or stay one call (narrow with a
// tall K: the weight-gradient GEMMs). Controls: the values are such that the order
// of the K sum shows in the bits (the same product with K split in two calls differs), and
// OpenBLAS's own threading, which cpu::gemm turns off, is reported when it changes the bits (it does
// for every shape here with OpenBLAS 0.3.21 on an AMD EPYC).
TEST(CpuGemm, BitIdenticalForAnyThreadCount) {
  struct Shape3 {
    bool ta, tb;
    int64_t M, N, K;
  };
  const Shape3 shapes[] = {{false, true, 256, 192, 1024}, {false, false, 333, 70, 513}, {true, false, 16, 32, 20000},
                           {true, false, 64, 48, 4099},   {false, true, 1000, 16, 128}, {true, true, 129, 257, 300},
                           {false, true, 200, 2100, 64}};
  const int saved = omp_get_max_threads();
  for (const Shape3& s : shapes) {
    SCOPED_TRACE(fmt::format("ta {} tb {} M {} N {} K {}", s.ta, s.tb, s.M, s.N, s.K));
    const Tensor a = random_tensor({s.M * s.K}, 11, 1, -1.0f, 1.0f);
    Tensor b = random_tensor({s.K * s.N}, 11, 2, -1.0f, 1.0f);
    for (int64_t x = 0; x < b.numel(); x += 5) b.data<float>()[x] *= 1000.0f;  // mixed magnitudes
    const Tensor c0 = random_tensor({s.M, s.N}, 11, 3);
    const int64_t lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
    auto product = [&](int threads) {
      omp_set_num_threads(threads);
      Tensor c = c0.clone();
      cpu::gemm(s.ta, s.tb, s.M, s.N, s.K, 0.5f, a.data<float>(), lda, b.data<float>(), ldb, 1.0f, c.data<float>(),
                s.N);
      return c;
    };
    const Tensor one = product(1);
    for (int threads : {2, 3, 4}) EXPECT_TRUE(moetp::testing::bit_equal(product(threads), one)) << threads << " threads";

    const int64_t k1 = s.K / 3 + 1;
    Tensor split = c0.clone();
    const float* a2 = a.data<float>() + (s.ta ? k1 * lda : k1);
    const float* b2 = b.data<float>() + (s.tb ? k1 : k1 * ldb);
    cpu::gemm(s.ta, s.tb, s.M, s.N, k1, 0.5f, a.data<float>(), lda, b.data<float>(), ldb, 1.0f, split.data<float>(), s.N);
    cpu::gemm(s.ta, s.tb, s.M, s.N, s.K - k1, 0.5f, a2, lda, b2, ldb, 1.0f, split.data<float>(), s.N);
    EXPECT_FALSE(moetp::testing::bit_equal(split, one)) << "the order of the K sum does not show in these values";

#ifdef OPENBLAS_VERSION
    EXPECT_EQ(openblas_get_num_threads(), 1) << "cpu::gemm runs OpenBLAS single-threaded";
    auto openblas_threaded = [&](int threads) {
      openblas_set_num_threads(threads);
      Tensor c = c0.clone();
      cblas_sgemm(CblasRowMajor, s.ta ? CblasTrans : CblasNoTrans, s.tb ? CblasTrans : CblasNoTrans,
                  static_cast<int>(s.M), static_cast<int>(s.N), static_cast<int>(s.K), 0.5f, a.data<float>(),
                  static_cast<int>(lda), b.data<float>(), static_cast<int>(ldb), 1.0f, c.data<float>(),
                  static_cast<int>(s.N));
      return c;
    };
    const Tensor blas1 = openblas_threaded(1);
    if (!moetp::testing::bit_equal(openblas_threaded(3), blas1)) {
      std::printf("note: OpenBLAS's own 3 threads change the bits of this product (cpu::gemm does not use them)\n");
    }
    openblas_set_num_threads(1);
#endif
  }
  omp_set_num_threads(saved);
}

TEST(CpuLinear, RejectsMismatchedShapes) {
  const Tensor x = random_tensor({3, 5}, 4, 1);
  const Tensor w = random_tensor({2, 4}, 4, 2);
  expect_error([&] { cpu::linear(x, w); }, {"f32[2, 4]", "f32[3, 5]", "K = 5"});
  const Tensor w_ok = random_tensor({2, 5}, 4, 3);
  const Tensor dy = random_tensor({3, 3}, 4, 4);
  Tensor dx;
  expect_error([&] { cpu::linear_backward(dy, x, w_ok, &dx, nullptr); }, {"dy_MN", "[3, 2]", "f32[3, 3]"});
}

}  // namespace
// Rows [r0, r0 + m) of C computed by a call on those rows alone equal the same rows of the whole
// product when r0 and m are multiples of kGemmBlock or the chunk runs to the end (gemm.h): what the
// row-chunked LM head relies on. Every transpose combination, wide and narrow N.
TEST(CpuGemm, AlignedRowChunksReproduceTheWholeProduct) {
  struct Shape3 {
    bool ta, tb;
    int64_t M, N, K;
  };
  const Shape3 shapes[] = {{false, true, 700, 2500, 96}, {false, false, 333, 70, 513}, {true, false, 300, 1030, 77},
                           {true, true, 260, 129, 300}};
  for (const Shape3& s : shapes) {
    SCOPED_TRACE(fmt::format("ta {} tb {} M {} N {} K {}", s.ta, s.tb, s.M, s.N, s.K));
    const Tensor a = random_tensor({s.M * s.K}, 12, 1, -1.0f, 1.0f);
    const Tensor b = random_tensor({s.K * s.N}, 12, 2, -1.0f, 1.0f);
    const int64_t lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
    Tensor whole = Tensor::zeros({s.M, s.N}, DType::kF32);
    cpu::gemm(s.ta, s.tb, s.M, s.N, s.K, 1.0f, a.data<float>(), lda, b.data<float>(), ldb, 0.0f,
              whole.data<float>(), s.N);
    for (const int64_t chunk : {cpu::kGemmBlock, 2 * cpu::kGemmBlock}) {
      Tensor chunked = Tensor::zeros({s.M, s.N}, DType::kF32);
      for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
        const int64_t m = std::min(chunk, s.M - r0);
        cpu::gemm(s.ta, s.tb, m, s.N, s.K, 1.0f, a.data<float>() + (s.ta ? r0 : r0 * lda), lda, b.data<float>(), ldb,
                  0.0f, chunked.data<float>() + r0 * s.N, s.N);
      }
      EXPECT_TRUE(moetp::testing::bit_equal(chunked, whole)) << "chunks of " << chunk << " rows";
    }
  }
}

}  // namespace moetp
