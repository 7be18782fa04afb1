#include "kernels/cpu/optim.h"

#include <cmath>
#include <tuple>
#include <type_traits>

#include "core/bf16.h"

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

namespace {

inline float load(float x) { return x; }
inline float load(bf16 x) { return bf16_to_f32(x); }

template <typename Moment>
void adamw_loop(float* wp, const float* gp, Moment* mp, Moment* vp, int64_t n, float b1, float b2, float bc1, float bc2,
                float eps, float lr, float decay) {
  for (int64_t k = 0; k < n; ++k) {
    const float m = b1 * load(mp[k]) + (1.0f - b1) * gp[k];
    const float v = b2 * load(vp[k]) + (1.0f - b2) * gp[k] * gp[k];
    const float update = (m / bc1) / (std::sqrt(v / bc2) + eps);
    wp[k] = (wp[k] - decay * wp[k]) - lr * update;
    if constexpr (std::is_same_v<Moment, float>) {
      mp[k] = m;
      vp[k] = v;
    } else {
      mp[k] = f32_to_bf16(m);
      vp[k] = f32_to_bf16(v);
    }
  }
}

}  // namespace

void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step) {
  MOETP_CHECK(step >= 1, "AdamW step counts from 1, got {}", step);
  MOETP_CHECK((m.dtype() == DType::kF32 || m.dtype() == DType::kBF16) && v.dtype() == m.dtype(),
              "adamw: the moments must both be f32 or both bf16, got m {} and v {}", m.describe(), v.describe());
  for (const auto& [t, name, dtype] :
       {std::tuple<const Tensor*, const char*, DType>{&w, "adamw w", DType::kF32}, {&g, "adamw g", DType::kF32},
        {&m, "adamw m", m.dtype()}, {&v, "adamw v", m.dtype()}}) {
    check_dtype(*t, dtype, name);
    check_device(*t, Device::kCpu, name);
    check_contiguous(*t, name);
    MOETP_CHECK(t->shape() == w.shape(), "{}: shape {} differs from the weight's {}", name, shape_str(t->shape()),
                shape_str(w.shape()));
  }
  const float bc1 = static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(step)));
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float eps_f = static_cast<float>(eps), lr_f = static_cast<float>(lr);
  const float decay = static_cast<float>(lr * weight_decay);
  if (m.dtype() == DType::kF32) {
    adamw_loop(w.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), w.numel(), b1, b2, bc1, bc2, eps_f,
               lr_f, decay);
  } else {
    adamw_loop(w.data<float>(), g.data<float>(), m.data<bf16>(), v.data<bf16>(), w.numel(), b1, b2, bc1, bc2, eps_f,
               lr_f, decay);
  }
}

double sum_of_squares(const Tensor& g) {
  check_dtype(g, DType::kF32, "sum_of_squares");
  check_device(g, Device::kCpu, "sum_of_squares");
  check_contiguous(g, "sum_of_squares");
  const float* p = g.data<float>();
  double s = 0;
  for (int64_t i = 0; i < g.numel(); ++i) s += static_cast<double>(p[i]) * p[i];
  return s;
}

void scale(Tensor& g, float s) {
  check_dtype(g, DType::kF32, "scale");
  check_device(g, Device::kCpu, "scale");
  check_contiguous(g, "scale");
  float* p = g.data<float>();
  for (int64_t i = 0; i < g.numel(); ++i) p[i] *= s;
}

}  // namespace moetp::cpu
