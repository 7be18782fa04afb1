// The CPU backend: f32 tensors in host memory, the kernels of kernels/cpu, the MoE layer of
// moe/moe_block.h over the MPI mesh. Every op is synchronous.
#include <algorithm>
#include <chrono>
#include <vector>

#include "backend/backend.h"
#include "backend/registry.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/experts.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/optim.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"

namespace moetp::backend {

namespace {

// moe::MoeBlock (router, dispatcher, experts) on views of the model's parameters.
class CpuMoeLayer final : public moe::MoeLayer {
 public:
  CpuMoeLayer(const moe::MoeConfig& cfg, const comm::Mesh& mesh) : block_(cfg, mesh) {}

  const moe::MoeConfig& config() const override { return block_.config(); }
  int64_t num_local_experts() const override { return block_.num_local_experts(); }
  int64_t local_intermediate() const override { return block_.local_intermediate(); }
  void bind(const moe::MoeParams& work, const moe::MoeParams& grads) override {
    work_ = work;
    grads_ = grads;
  }
  void zero_grads() override {
    for (Tensor* g : {&grads_.wg_EH, &grads_.w13_L2iH, &grads_.w2_LHi}) g->zero_();
  }
  void materialize_grads() override {}
  Tensor forward(const Tensor& x_NH) override { return block_.forward(x_NH, work_, saved_); }
  Tensor backward(const Tensor& dout_NH, const Tensor& d_probs_NE) override {
    return block_.backward(dout_NH, d_probs_NE, work_, saved_, grads_);
  }
  void release_activations() override { block_.release(saved_); }
  void recompute(const Tensor& x_NH) override { block_.recompute(x_NH, work_, saved_); }
  moe::RoutingStats routing_stats() const override {
    return {saved_.counts_E.to_vector<float>(), saved_.prob_sum_E.to_vector<float>()};
  }
  Tensor router_probs() const override { return saved_.router.probs_NE; }

 private:
  moe::MoeBlock block_;
  moe::MoeParams work_, grads_;
  moe::MoeSaved saved_;
};

class CpuBackend final : public Backend {
 public:

  Device device() const override { return Device::kCpu; }
  DType compute_dtype() const override { return DType::kF32; }
  int visible_devices() const override { return 1; }
  std::string unavailable_reason() const override { return ""; }
  void init(int /*local_rank*/, AllocatorChoice /*allocator*/) override {}
  std::unique_ptr<comm::Comm> make_comm(comm::Comm& /*host*/, const std::string& /*name*/) override { return nullptr; }
  void synchronize() override {}
  void set_deterministic(bool /*on*/) override {}  // every CPU kernel runs in a fixed order
  void check_faults() override {}
  double peak_memory_bytes() const override { return -1; }
  void reset_peak_memory() override {}
  std::string peak_memory_phase() const override { return ""; }
  void set_memory_phase(const char* /*phase*/) override {}
  DeviceMemory device_memory() const override { return {}; }

  void set_phase_timing(bool on) override {
    timing_ = on;
    names_.clear();
    stamps_.clear();
  }
  void mark(const char* phase) override {
    if (!timing_) return;
    names_.emplace_back(phase);
    stamps_.push_back(std::chrono::steady_clock::now());
  }
  void finish_phases() override {
    if (!timing_ || names_.empty()) return;
    stamps_.push_back(std::chrono::steady_clock::now());
    for (size_t i = 0; i < names_.size(); ++i) {
      phase_ms_[names_[i]] += std::chrono::duration<double, std::milli>(stamps_[i + 1] - stamps_[i]).count();
    }
    names_.clear();
    stamps_.clear();
  }
  const std::map<std::string, double>& phase_ms() const override { return phase_ms_; }
  void reset_phase_ms() override { phase_ms_.clear(); }

  void cast_into(const Tensor& src, Tensor& dst) override { dst.copy_from(src.to(dst.dtype())); }

  Tensor embedding_forward(const Tensor& ids_N, const Tensor& table_VH) override {
    return cpu::embedding_forward(ids_N, table_VH);
  }
  void embedding_backward(const Tensor& ids_N, const Tensor& dy_NH, Tensor& dtable_VH) override {
    cpu::embedding_backward(ids_N, dy_NH, dtable_VH);
  }
  Tensor rmsnorm_forward(const Tensor& x_RD, const Tensor& w_D, float eps, Tensor* rstd_R) override {
    return cpu::rmsnorm_forward(x_RD, w_D, eps, rstd_R);
  }
  void rmsnorm_backward(const Tensor& dy_RD, const Tensor& x_RD, const Tensor& w_D, const Tensor& rstd_R,
                        Tensor& dx_RD, Tensor& dw_D) override {
    cpu::rmsnorm_backward(dy_RD, x_RD, w_D, rstd_R, dx_RD, dw_D);
  }
  Tensor linear(const Tensor& x_MK, const Tensor& w_NK) override { return cpu::linear(x_MK, w_NK); }
  void linear_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, Tensor* dx_MK,
                       Tensor* dw_NK) override {
    cpu::linear_backward(dy_MN, x_MK, w_NK, dx_MK, dw_NK);
  }
  // Two GEMMs (the reference rounds each projection on its own).
  Tensor linear_stacked(const Tensor& x_MK, const Tensor& w_NK, int64_t n0) override {
    const int64_t M = x_MK.size(0), N = w_NK.size(0);
    const Tensor y0 = cpu::linear(x_MK, w_NK.narrow_rows(0, n0)), y1 = cpu::linear(x_MK, w_NK.narrow_rows(n0, N - n0));
    Tensor out = Tensor::empty({M, N}, DType::kF32);
    out.slice(1, 0, n0).copy_from(y0);
    out.slice(1, n0, N).copy_from(y1);
    return out;
  }
  void linear_stacked_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, int64_t n0, Tensor& dx_MK,
                               Tensor& dw_NK) override {
    const int64_t N = w_NK.size(0);
    Tensor dx1, dw0 = dw_NK.narrow_rows(0, n0), dw1 = dw_NK.narrow_rows(n0, N - n0);
    cpu::linear_backward(dy_MN.slice(1, 0, n0).contiguous(), x_MK, w_NK.narrow_rows(0, n0), &dx_MK, &dw0);
    cpu::linear_backward(dy_MN.slice(1, n0, N).contiguous(), x_MK, w_NK.narrow_rows(n0, N - n0), &dx1, &dw1);
    add_into(dx_MK, dx1, Tensor());
  }
  void rope_forward(Tensor& x_NhD, const Tensor& positions_N, double theta) override {
    cpu::rope_forward(x_NhD, positions_N, theta);
  }
  void rope_backward(Tensor& dx_NhD, const Tensor& positions_N, double theta) override {
    cpu::rope_backward(dx_NhD, positions_N, theta);
  }
  Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& lse_BQS,
                           std::span<const int64_t> docs) override {
    cpu::AttentionSaved saved;
    Tensor out = cpu::attention_forward(q, k, v, &saved, docs);
    lse_BQS = saved.lse_BQS;
    return out;
  }
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& /*out*/,
                          const Tensor& lse_BQS, Tensor& dq, Tensor& dk, Tensor& dv,
                          std::span<const int64_t> docs) override {
    cpu::attention_backward(dout, q, k, v, cpu::AttentionSaved{lse_BQS}, dq, dk, dv, docs);
  }
  Tensor swiglu_forward(const Tensor& h_M2i) override { return cpu::swiglu_forward(h_M2i); }
  Tensor swiglu_backward(const Tensor& h_M2i, const Tensor& da_Mi) override {
    return cpu::swiglu_backward(h_M2i, da_Mi);
  }
  void add_into(Tensor& dst, const Tensor& a, const Tensor& b) override {
    cpu::check_f32_cpu(dst, dst.ndim(), "add_into dst");
    cpu::check_f32_cpu(a, a.ndim(), "add_into src");
    MOETP_CHECK(a.shape() == dst.shape(), "add_into: {} into {}", a.describe(), dst.describe());
    float* d = dst.data<float>();
    const float* s = a.data<float>();
    for (int64_t i = 0; i < dst.numel(); ++i) d[i] += s[i];
    if (b.defined()) add_into(dst, b, Tensor());
  }
  void cross_entropy(const Tensor& logits_NV, const Tensor& targets_N, Tensor* dlogits_NV, float grad_scale,
                     double& loss_sum) override {
    // Row losses added to the running sum in row order: chunked heads sum exactly as the whole.
    loss_sum = cpu::cross_entropy_forward(logits_NV, targets_N, dlogits_NV, grad_scale, loss_sum).loss_sum;
  }

  double sum_of_squares(const Tensor& g) override { return cpu::sum_of_squares(g); }
  std::vector<double> sums_of_squares(std::span<const Tensor> gs) override {
    std::vector<double> out;
    for (const Tensor& g : gs) out.push_back(cpu::sum_of_squares(g));
    return out;
  }
  void scale(Tensor& g, float s) override { cpu::scale(g, s); }
  void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const AdamWHyper& h, Tensor* work) override {
    cpu::adamw_step(w, g, m, v, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step);
    if (work != nullptr && work->raw_data() != w.raw_data()) cast_into(w, *work);
  }

  std::unique_ptr<moe::MoeLayer> make_moe_layer(const moe::MoeConfig& cfg, const moe::MoeLayerOptions& opts) override {
    MOETP_CHECK(opts.mesh != nullptr, "the CPU MoE layer runs over a mesh (none given)");
    MOETP_CHECK(!opts.force_balance, "moe.force_balance is implemented on the CUDA device only");
    MOETP_CHECK(opts.expert_gemm == ExpertGemmChoice::kAuto, "moe.expert_gemm = {} applies to the CUDA device only",
                option_name(opts.expert_gemm));
    return std::make_unique<CpuMoeLayer>(cfg, *opts.mesh);
  }
  std::string describe_expert_gemm(int64_t, int64_t, ExpertGemmChoice) const override { return ""; }

 private:
  bool timing_ = false;
  std::vector<std::string> names_;
  std::vector<std::chrono::steady_clock::time_point> stamps_;
  std::map<std::string, double> phase_ms_;
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

}  // namespace moetp::backend
