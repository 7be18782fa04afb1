#include "kernels/cpu/optim.h"

#include <cmath>

#include "kernels/cpu/gemm.h"

namespace moetp::cpu {

void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step) {
  MOETP_CHECK(step >= 1, "AdamW step counts from 1, got {}", step);
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&w, "adamw w"}, {&g, "adamw g"},
                                {&m, "adamw m"}, {&v, "adamw v"}}) {
    check_dtype(*t, DType::kF32, name);
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
  float* wp = w.data<float>();
  const float* gp = g.data<float>();
  float* mp = m.data<float>();
  float* vp = v.data<float>();
  for (int64_t k = 0; k < w.numel(); ++k) {
    mp[k] = b1 * mp[k] + (1.0f - b1) * gp[k];
    vp[k] = b2 * vp[k] + (1.0f - b2) * gp[k] * gp[k];
    const float update = (mp[k] / bc1) / (std::sqrt(vp[k] / bc2) + eps_f);
    wp[k] = (wp[k] - decay * wp[k]) - lr_f * update;
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
