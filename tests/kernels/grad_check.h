// Shared helpers of the CPU kernel tests: fp64 finite differences and error-message checks.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "testing.h"

namespace moetp::testing {

// f32 kernel gradient vs central differences of the fp64 function: relative 1e-4 (absolute 1e-6
// below 1e-2).
inline constexpr Tolerance kGradCheck{1e-4, 1e-2};

inline std::vector<double> to_double(const Tensor& t) {
  const std::vector<float> v = t.to_vector<float>();
  return std::vector<double>(v.begin(), v.end());
}

inline Tensor to_tensor(const std::vector<double>& v, Shape shape) {
  return Tensor::from_vector(std::vector<float>(v.begin(), v.end()), std::move(shape));
}

template <typename Loss>
inline std::vector<double> central_diff(std::vector<double>& p, Loss&& loss) {
  std::vector<double> g(p.size());
  for (size_t c = 0; c < p.size(); ++c) {
    const double saved = p[c], h = 1e-6 * std::max(1.0, std::fabs(saved));
    p[c] = saved + h;
    const double plus = loss();
    p[c] = saved - h;
    const double minus = loss();
    p[c] = saved;
    g[c] = (plus - minus) / (2 * h);
  }
  return g;
}

}  // namespace moetp::testing
