// The CUDA backend: bf16 activations and working weights with f32 accumulation (the precision
// policy in backend.h), the kernels of kernels/cuda, cuBLAS, NCCL communicators and the MoE layer of
// moe/cuda_moe.h. Every op is queued on the legacy default stream (NCCL orders its streams against
// it with events); host-visible results synchronise.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "backend/registry.h"
#include "comm/nccl_comm.h"
#include "kernels/cpu/attention.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cast.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "moe/cuda_moe.h"

namespace moetp::backend {

namespace launch {
// cuda_backend_kernels.cu
cudaError_t add_bf16(const uint16_t* a, const uint16_t* b, const uint16_t* c, uint16_t* out, int64_t n,
                     cudaStream_t stream);
cudaError_t scale_f32(float* x, float s, int64_t n, cudaStream_t stream);
cudaError_t column_sums_f64(const float* x, int64_t N, int64_t E, double* out, cudaStream_t stream);
}  // namespace launch

namespace {

void check_cuda(const Tensor& t, DType dtype, const char* name) {
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
}

// moe.expert_gemm resolved for experts of hidden H and local width i, and why (for the banner).
std::pair<moe::ExpertGemm, std::string> resolve_expert_gemm(int64_t hidden, int64_t local_i, ExpertGemmChoice choice) {
  switch (choice) {
    case ExpertGemmChoice::kGrouped: return {moe::ExpertGemm::kGrouped, "moe.expert_gemm"};
    case ExpertGemmChoice::kCublas: return {moe::ExpertGemm::kCublas, "moe.expert_gemm"};
    case ExpertGemmChoice::kAuto: break;
  }
  if (moe::grouped_gemm_fits(hidden, local_i)) return {moe::ExpertGemm::kGrouped, "moe.expert_gemm = auto"};
  return {moe::ExpertGemm::kCublas,
          fmt::format("moe.expert_gemm = auto: hidden {} or expert width {} is not a multiple of 8", hidden, local_i)};
}

// moe::CudaMoeLayer on views of the model's parameters; the aux statistics' probability sums are
// column sums in double on the GPU (E values come back).
class CudaMoeAdapter final : public moe::MoeLayer {
 public:
  CudaMoeAdapter(const moe::MoeConfig& cfg, moe::CudaMoeOptions opts) : layer_(cfg, opts) {}

  const moe::MoeConfig& config() const override { return layer_.config(); }
  int64_t num_local_experts() const override { return layer_.num_local_experts(); }
  int64_t local_intermediate() const override { return layer_.local_intermediate(); }
  void bind(const moe::MoeParams& work, const moe::MoeParams& grads) override { layer_.bind(work, grads); }
  // The router gradient now, the expert gradients by the next backward (moe::CudaMoeLayer::grads).
  void zero_grads() override { layer_.zero_grads(); }
  void materialize_grads() override { (void)static_cast<const moe::CudaMoeLayer&>(layer_).grads(); }
  Tensor forward(const Tensor& x_NH) override { return layer_.forward(x_NH); }
  Tensor backward(const Tensor& dout_NH, const Tensor& d_probs_NE) override {
    return layer_.backward(dout_NH, d_probs_NE);
  }
  void release_activations() override { layer_.release_rows(); }
  void recompute(const Tensor& x_NH) override { layer_.recompute_forward(x_NH); }
  moe::RoutingStats routing_stats() const override {
    const int64_t E = layer_.config().num_experts;
    const Tensor& probs = layer_.saved().probs_NE;
    const int64_t N = probs.defined() ? probs.size(0) : 0;
    moe::RoutingStats out;
    out.counts_E.resize(static_cast<size_t>(E));
    out.prob_sums_E.assign(static_cast<size_t>(E), 0.0f);
    for (int64_t e = 0; e < E; ++e) out.counts_E[e] = static_cast<float>(layer_.counts_E()[static_cast<size_t>(e)]);
    if (N > 0) {
      // Doubles travel in an i64 tensor (core has no f64 dtype); allocated once.
      if (!sums_.defined()) sums_ = Tensor::empty({E}, DType::kI64, Device::kCuda);
      CUDA_CHECK(launch::column_sums_f64(probs.data<float>(), N, E, reinterpret_cast<double*>(sums_.data<int64_t>()),
                                         nullptr));
      const std::vector<int64_t> bits = sums_.to_vector<int64_t>();
      for (int64_t e = 0; e < E; ++e) out.prob_sums_E[e] = static_cast<float>(std::bit_cast<double>(bits[e]));
    }
    return out;
  }
  Tensor router_probs() const override { return layer_.saved().probs_NE; }

 private:
  moe::CudaMoeLayer layer_;
  mutable Tensor sums_;
};

// Events at phase boundaries on the legacy stream; finish() waits for the last one and adds the
// gaps between consecutive marks to the phase that started at the earlier mark.
class PhaseTimer {
 public:
  ~PhaseTimer() {
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
  }
  void mark(const char* phase) {
    if (names_.size() == pool_.size()) {
      pool_.push_back(nullptr);
      CUDA_CHECK(cudaEventCreate(&pool_.back()));
    }
    CUDA_CHECK(cudaEventRecord(pool_[names_.size()], nullptr));
    names_.emplace_back(phase);
  }
  void finish(std::map<std::string, double>& acc) {
    if (names_.empty()) return;
    mark("end");
    CUDA_CHECK(cudaEventSynchronize(pool_[names_.size() - 1]));
    for (size_t i = 0; i + 1 < names_.size(); ++i) {
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, pool_[i], pool_[i + 1]));
      acc[names_[i]] += ms;
    }
    names_.clear();
  }

 private:
  std::vector<cudaEvent_t> pool_;
  std::vector<std::string> names_;  // the phase starting at pool_[i]
};

class CudaBackend final : public Backend {
 public:
  Device device() const override { return Device::kCuda; }
  DType compute_dtype() const override { return DType::kBF16; }
  int visible_devices() const override { return cuda::device_count(); }
  std::string unavailable_reason() const override { return cuda::unavailable_reason(); }
  // The caching allocator by default: with cudaFree per temporary, every free synchronises the
  // device (docs/performance.md, Allocator).
  void init(int local_rank, AllocatorChoice allocator) override {
    cuda::init(local_rank, allocator == AllocatorChoice::kDirect ? cuda::AllocMode::kDirect : cuda::AllocMode::kCaching);
  }
  std::unique_ptr<comm::Comm> make_comm(comm::Comm& host, const std::string& name) override {
    return comm::NcclComm::create(host, name);
  }
  void synchronize() override { CUDA_CHECK(cudaDeviceSynchronize()); }
  void set_deterministic(bool on) override { deterministic_ = on; }
  void check_faults() override { cuda::check_index_faults(); }
  double peak_memory_bytes() const override { return static_cast<double>(cuda::memory_stats().peak_live_bytes); }
  void reset_peak_memory() override { cuda::reset_peak_memory(); }
  std::string peak_memory_phase() const override { return cuda::memory_stats().peak_phase; }
  DeviceMemory device_memory() const override {
    const cuda::DeviceMemory m = cuda::device_memory();
    return {static_cast<double>(m.free_bytes), static_cast<double>(m.total_bytes)};
  }
  void set_memory_phase(const char* phase) override { cuda::set_memory_phase(phase); }

  void set_phase_timing(bool on) override {
    if (on && !timer_) timer_ = std::make_unique<PhaseTimer>();
    if (!on) timer_.reset();
  }
  void mark(const char* phase) override {
    cuda::set_memory_phase(phase);
    if (timer_) timer_->mark(phase);
  }
  void finish_phases() override {
    if (timer_) timer_->finish(phase_ms_);
  }
  const std::map<std::string, double>& phase_ms() const override { return phase_ms_; }
  void reset_phase_ms() override { phase_ms_.clear(); }

  void cast_into(const Tensor& src, Tensor& dst) override {
    check_device(src, Device::kCuda, "cast_into source");
    check_device(dst, Device::kCuda, "cast_into destination");
    dst.copy_from(src.dtype() == dst.dtype() ? src : cuda::cast(src, dst.dtype()));
  }

  Tensor embedding_forward(const Tensor& ids_N, const Tensor& table_VH) override {
    return cuda::embedding_forward(ids_N, table_VH);
  }
  void embedding_backward(const Tensor& ids_N, const Tensor& dy_NH, Tensor& dtable_VH) override {
    cuda::embedding_backward(ids_N, dy_NH, dtable_VH);
  }
  Tensor rmsnorm_forward(const Tensor& x_RD, const Tensor& w_D, float eps, Tensor* rstd_R) override {
    return cuda::rmsnorm_forward(x_RD, w_D, eps, rstd_R);
  }
  void rmsnorm_backward(const Tensor& dy_RD, const Tensor& x_RD, const Tensor& w_D, const Tensor& rstd_R,
                        Tensor& dx_RD, Tensor& dw_D) override {
    cuda::rmsnorm_backward(dy_RD, x_RD, w_D, rstd_R, dx_RD, dw_D);
  }
  Tensor linear(const Tensor& x_MK, const Tensor& w_NK) override { return cuda::linear(x_MK, w_NK); }
  void linear_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, Tensor* dx_MK,
                       Tensor* dw_NK) override {
    cuda::linear_backward(dy_MN, x_MK, w_NK, dx_MK, dw_NK);
  }
  // One GEMM over both projections.
  Tensor linear_stacked(const Tensor& x_MK, const Tensor& w_NK, int64_t /*n0*/) override {
    return cuda::linear(x_MK, w_NK);
  }
  void linear_stacked_backward(const Tensor& dy_MN, const Tensor& x_MK, const Tensor& w_NK, int64_t /*n0*/,
                               Tensor& dx_MK, Tensor& dw_NK) override {
    cuda::linear_backward(dy_MN, x_MK, w_NK, &dx_MK, &dw_NK);
  }
  void rope_forward(Tensor& x_NhD, const Tensor& positions_N, double theta) override {
    cuda::rope_forward(x_NhD, positions_N, theta);
  }
  void rope_backward(Tensor& dx_NhD, const Tensor& positions_N, double theta) override {
    cuda::rope_backward(dx_NhD, positions_N, theta);
  }
  Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& lse_BQS,
                           std::span<const int64_t> docs) override {
    return cuda::attention_forward(q, k, v, &lse_BQS, nullptr, device_docs(q, docs));
  }
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse_BQS, Tensor& dq, Tensor& dk, Tensor& dv,
                          std::span<const int64_t> docs) override {
    cuda::attention_backward(dout, q, k, v, out, lse_BQS, dq, dk, dv, nullptr, deterministic_, device_docs(q, docs));
  }
  Tensor swiglu_forward(const Tensor& h_M2i) override { return cuda::swiglu_forward(h_M2i); }
  Tensor swiglu_backward(const Tensor& h_M2i, const Tensor& da_Mi) override {
    return cuda::swiglu_backward(h_M2i, da_Mi);
  }
  void add_into(Tensor& dst, const Tensor& a, const Tensor& b) override {
    check_cuda(dst, DType::kBF16, "add_into dst");
    check_cuda(a, DType::kBF16, "add_into src");
    MOETP_CHECK(a.shape() == dst.shape(), "add_into: {} into {}", a.describe(), dst.describe());
    if (b.defined()) {
      check_cuda(b, DType::kBF16, "add_into src");
      MOETP_CHECK(b.shape() == dst.shape(), "add_into: {} into {}", b.describe(), dst.describe());
    }
    auto* d = static_cast<uint16_t*>(dst.raw_data());
    CUDA_CHECK(launch::add_bf16(d, static_cast<const uint16_t*>(a.raw_data()),
                                b.defined() ? static_cast<const uint16_t*>(b.raw_data()) : nullptr, d, dst.numel(),
                                nullptr));
  }
  // Per-row losses come back to the host and are added in row order.
  void cross_entropy(const Tensor& logits_NV, const Tensor& targets_N, Tensor* dlogits_NV, float grad_scale,
                     double& loss_sum) override {
    const Tensor loss = cuda::cross_entropy_forward(logits_NV, targets_N, dlogits_NV, grad_scale);
    for (float v : loss.to_vector<float>()) loss_sum += v;
  }

  double sum_of_squares(const Tensor& g) override { return cuda::sum_of_squares(g); }
  std::vector<double> sums_of_squares(std::span<const Tensor> gs) override { return cuda::sums_of_squares(gs); }
  void scale(Tensor& g, float s) override {
    check_cuda(g, DType::kF32, "scale");
    CUDA_CHECK(launch::scale_f32(g.data<float>(), s, g.numel(), nullptr));
  }
  void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const AdamWHyper& h, Tensor* work) override {
    cuda::AdamWHyper hyper;
    hyper.lr = h.lr;
    hyper.beta1 = h.beta1;
    hyper.beta2 = h.beta2;
    hyper.eps = h.eps;
    hyper.weight_decay = h.weight_decay;
    hyper.step = h.step;
    cuda::adamw_step(w, g, m, v, hyper, work);
  }

  std::unique_ptr<moe::MoeLayer> make_moe_layer(const moe::MoeConfig& cfg, const moe::MoeLayerOptions& opts) override {
    moe::CudaMoeOptions mo;
    mo.force_balance = opts.force_balance;
    mo.expert_streams = opts.expert_streams;
    // A mesh of one rank runs as one GPU without communicators (the `local` dispatcher); on a larger
    // one `local` (ep = etp = 1, data parallel) moves rows as `all2all` over groups of one.
    mo.mesh = opts.mesh != nullptr && opts.mesh->world().size() > 1 ? opts.mesh : nullptr;
    mo.external_params = true;
    const int64_t T = mo.mesh != nullptr ? mo.mesh->etp_size() : 1;
    MOETP_CHECK(cfg.intermediate % T == 0, "moe_intermediate_size ({}) % etp ({}) = {} != 0", cfg.intermediate, T,
                cfg.intermediate % T);
    mo.expert_gemm = resolve_expert_gemm(cfg.hidden, cfg.intermediate / T, opts.expert_gemm).first;
    moe::MoeConfig c = cfg;
    if (mo.mesh == nullptr) {
      c.dispatcher = DispatcherKind::kLocal;
    } else if (c.dispatcher == DispatcherKind::kLocal) {
      c.dispatcher = DispatcherKind::kAll2all;
    }
    return std::make_unique<CudaMoeAdapter>(c, mo);
  }
  std::string describe_expert_gemm(int64_t hidden, int64_t local_i, ExpertGemmChoice choice) const override {
    const auto [gemm, why] = resolve_expert_gemm(hidden, local_i, choice);
    return fmt::format("expert GEMM {} ({})", moe::expert_gemm_name(gemm), why);
  }

 private:
  std::unique_ptr<PhaseTimer> timer_;
  std::map<std::string, double> phase_ms_;
  bool deterministic_ = false;  // train.deterministic

  // Packed documents on the device (undefined for one per row), uploaded once per distinct offsets
  // (a micro-batch's layers and backward reuse them). The offsets are checked as the CPU checks them.
  Tensor device_docs(const Tensor& q_BSQD, std::span<const int64_t> docs) {
    const int64_t B = q_BSQD.size(0), S = q_BSQD.size(1);
    if (docs.empty() || cpu::documents_are_rows(docs, B, S)) return Tensor();
    if (!std::equal(docs.begin(), docs.end(), docs_host_.begin(), docs_host_.end())) {
      cpu::check_document_offsets(docs, B * S, "attention");
      docs_host_.assign(docs.begin(), docs.end());
      docs_dev_ = Tensor::from_vector<int64_t>(docs_host_, {static_cast<int64_t>(docs_host_.size())}).to(Device::kCuda);
    }
    return docs_dev_;
  }
  std::vector<int64_t> docs_host_;
  Tensor docs_dev_;
};

}  // namespace

Backend& cuda_backend() {
  static CudaBackend backend;
  return backend;
}

}  // namespace moetp::backend
