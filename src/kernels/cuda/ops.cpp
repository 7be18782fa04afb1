// Host wrappers of the CUDA ops (contracts in ops.h): argument checks worded as the CPU kernels',
// workspace, the launch (ops_*.cu through launch.h) and a launch check. The index-fault record is
// one small device buffer per process, allocated on first use on the current device.
#include "kernels/cuda/ops.h"

#include <climits>
#include <cmath>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"

namespace moetp::cuda {

namespace {

// t is a defined, contiguous CUDA tensor of `dtype` with `ndim` dimensions (cpu::check_f32_cpu's
// messages, on the CUDA device).
void check_cuda(const Tensor& t, DType dtype, int64_t ndim, const char* name) {
  MOETP_CHECK(t.defined(), "{}: tensor is undefined", name);
  MOETP_CHECK(t.ndim() == ndim, "{}: expected {} dimensions, got {}", name, ndim, t.describe());
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
}

// As check_cuda, any number of dimensions >= 1.
void check_cuda_any(const Tensor& t, DType dtype, const char* name) {
  MOETP_CHECK(t.defined(), "{}: tensor is undefined", name);
  MOETP_CHECK(t.ndim() >= 1, "{}: expected at least 1 dimension, got {}", name, t.describe());
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
}

// A 1-D index tensor of `dtype` with `n` entries (n < 0: any length).
void check_index(const Tensor& t, DType dtype, int64_t n, const char* op, const char* name) {
  MOETP_CHECK(t.defined() && t.ndim() == 1 && (n < 0 || t.size(0) == n), "{}: {} must be ({}), got {}", op, name,
              n < 0 ? std::string("n") : std::to_string(n), t.describe());
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
}

// Positions inside the sorted scatter-adds are int32.
void check_rows_fit_int32(int64_t M, const char* op) {
  MOETP_CHECK(M <= INT32_MAX, "{}: {} rows exceed the int32 positions of the sorted scatter-add", op, M);
}

const uint16_t* bits(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data<bf16>()); }
uint16_t* bits(Tensor& t) { return reinterpret_cast<uint16_t*>(t.data<bf16>()); }

// Scratch device memory of at least num_bytes (8-byte elements).
Tensor workspace(size_t num_bytes) {
  return Tensor::empty({static_cast<int64_t>((num_bytes + 7) / 8)}, DType::kI64, Device::kCuda);
}

launch::IndexFault* fault_slot() {
  static launch::IndexFault* slot = [] {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, sizeof(launch::IndexFault)));
    CUDA_CHECK(cudaMemset(p, 0, sizeof(launch::IndexFault)));
    return static_cast<launch::IndexFault*>(p);
  }();
  return slot;
}

std::string describe_fault(const launch::IndexFault& f) {
  using launch::IndexOp;
  const auto op = static_cast<IndexOp>(f.op);
  switch (op) {
    case IndexOp::kEmbeddingForward:
    case IndexOp::kEmbeddingBackward:
      return fmt::format("{}: token id {} at position {} is not in [0, {}) (vocab size V = {})",
                         op == IndexOp::kEmbeddingForward ? "embedding_forward" : "embedding_backward", f.value,
                         f.position, f.limit, f.limit);
    case IndexOp::kRopePosition:
      return fmt::format("rope: position {} at token {} is negative", f.value, f.position);
    case IndexOp::kGatherRows:
      return fmt::format("gather_rows: row index rows[{}] = {} out of range [0, {})", f.position, f.value, f.limit);
    case IndexOp::kScatterAddRows:
      return fmt::format("scatter_add_rows: row index rows[{}] = {} out of range [0, {})", f.position, f.value,
                         f.limit);
    case IndexOp::kFoldWeightedRows:
      return fmt::format("fold_weighted: row index rows[{}] = {} out of range [0, {})", f.position, f.value, f.limit);
    case IndexOp::kFoldWeightedCols:
      return fmt::format("fold_weighted (cols): column index cols[{}] = {} out of range [0, {})", f.position, f.value,
                         f.limit);
    case IndexOp::kRouterTopkIdx:
      return fmt::format("router_logits_grad: topk_idx (flat position {}) = {} is not an expert id in [0, {})",
                         f.position, f.value, f.limit);
    case IndexOp::kCrossEntropyTarget:
      return fmt::format(
          "cross_entropy: target {} at position {} is neither in [0, {}) (vocab size V) nor the ignore index -100",
          f.value, f.position, f.limit);
    case IndexOp::kNone:
      break;
  }
  return fmt::format("unknown op {}: index {} at position {} (bound {})", f.op, f.value, f.position, f.limit);
}

}  // namespace

void check_index_faults(cudaStream_t stream) {
  CUDA_CHECK(cudaStreamSynchronize(stream));
  launch::IndexFault f{};
  launch::IndexFault* slot = fault_slot();
  CUDA_CHECK(cudaMemcpy(&f, slot, sizeof(f), cudaMemcpyDeviceToHost));
  if (f.count == 0) return;
  CUDA_CHECK(cudaMemset(slot, 0, sizeof(launch::IndexFault)));
  MOETP_FAIL("{} ({} bad index value(s) since the last check)", describe_fault(f), f.count);
}

// ---- embedding ----------------------------------------------------------------------------------

Tensor embedding_forward(const Tensor& ids_N, const Tensor& table_VH, cudaStream_t stream) {
  check_cuda(table_VH, DType::kBF16, 2, "embedding table_VH");
  const int64_t V = table_VH.size(0), H = table_VH.size(1);
  check_index(ids_N, DType::kI32, -1, "embedding_forward", "ids_N");
  const int64_t N = ids_N.size(0);
  Tensor y_NH = Tensor::empty({N, H}, DType::kBF16, Device::kCuda);
  CUDA_CHECK(
      launch::embedding_forward(ids_N.data<int32_t>(), bits(table_VH), bits(y_NH), N, V, H, fault_slot(), stream));
  return y_NH;
}

void embedding_backward(const Tensor& ids_N, const Tensor& dy_NH, Tensor& dtable_VH, cudaStream_t stream) {
  check_cuda(dtable_VH, DType::kF32, 2, "embedding dtable_VH (accumulated into; must be defined)");
  const int64_t V = dtable_VH.size(0), H = dtable_VH.size(1);
  check_index(ids_N, DType::kI32, -1, "embedding_backward", "ids_N");
  const int64_t N = ids_N.size(0);
  check_cuda(dy_NH, DType::kBF16, 2, "embedding dy_NH");
  check_shape(dy_NH, {N, H}, "embedding dy_NH");
  check_rows_fit_int32(N, "embedding_backward");
  if (N == 0 || H == 0) return;
  const size_t ws_bytes = launch::sorted_accumulate_workspace_bytes(N, /*key64=*/false);
  Tensor ws = workspace(ws_bytes);
  CUDA_CHECK(launch::embedding_backward(ids_N.data<int32_t>(), bits(dy_NH), dtable_VH.data<float>(), N, V, H,
                                        ws.raw_data(), ws_bytes, fault_slot(), stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));  // before the workspace is freed
}

// ---- RMSNorm ------------------------------------------------------------------------------------

namespace {
int64_t check_rmsnorm_shapes(const Tensor& x_RD, const Tensor& w_D, const char* op) {
  check_cuda(x_RD, DType::kBF16, 2, "rmsnorm x_RD");
  check_cuda(w_D, DType::kBF16, 1, "rmsnorm w_D");
  const int64_t D = x_RD.size(1);
  MOETP_CHECK(w_D.size(0) == D, "{}: w_D {} does not match x_RD {} (D = {})", op, w_D.describe(), x_RD.describe(),
              D);
  MOETP_CHECK(D >= 1, "{}: normalised size D must be >= 1, got x_RD {}", op, x_RD.describe());
  return D;
}
}  // namespace

Tensor rmsnorm_forward(const Tensor& x_RD, const Tensor& w_D, float eps, Tensor* rstd_R, cudaStream_t stream) {
  const int64_t D = check_rmsnorm_shapes(x_RD, w_D, "rmsnorm_forward");
  MOETP_CHECK(eps > 0.0f, "rmsnorm_forward: eps ({}) must be > 0", eps);
  const int64_t R = x_RD.size(0);
  Tensor y_RD = Tensor::empty({R, D}, DType::kBF16, Device::kCuda);
  float* rstd = nullptr;
  if (rstd_R != nullptr) {
    *rstd_R = Tensor::empty({R}, DType::kF32, Device::kCuda);
    rstd = rstd_R->data<float>();
  }
  CUDA_CHECK(launch::rmsnorm_forward(bits(x_RD), bits(w_D), eps, bits(y_RD), rstd, R, D, stream));
  return y_RD;
}

void rmsnorm_backward(const Tensor& dy_RD, const Tensor& x_RD, const Tensor& w_D, const Tensor& rstd_R,
                      Tensor& dx_RD, Tensor& dw_D, cudaStream_t stream) {
  const int64_t D = check_rmsnorm_shapes(x_RD, w_D, "rmsnorm_backward");
  const int64_t R = x_RD.size(0);
  check_cuda(dy_RD, DType::kBF16, 2, "rmsnorm dy_RD");
  check_shape(dy_RD, {R, D}, "rmsnorm dy_RD");
  check_cuda(rstd_R, DType::kF32, 1, "rmsnorm rstd_R (saved by the forward)");
  check_shape(rstd_R, {R}, "rmsnorm rstd_R");
  if (!dx_RD.defined()) dx_RD = Tensor::empty({R, D}, DType::kBF16, Device::kCuda);
  check_cuda(dx_RD, DType::kBF16, 2, "rmsnorm dx_RD");
  check_shape(dx_RD, {R, D}, "rmsnorm dx_RD");
  check_cuda(dw_D, DType::kF32, 1, "rmsnorm dw_D (accumulated into; must be defined)");
  check_shape(dw_D, {D}, "rmsnorm dw_D");
  if (R == 0) return;
  const int64_t chunks = launch::rmsnorm_dw_chunks(R);
  MOETP_CHECK(chunks <= 65535, "rmsnorm_backward: {} rows exceed the {} rows one call handles", R,
              int64_t{65535} * 64);
  Tensor partial = Tensor::empty({chunks, D}, DType::kF32, Device::kCuda);
  CUDA_CHECK(launch::rmsnorm_backward(bits(dy_RD), bits(x_RD), bits(w_D), rstd_R.data<float>(), bits(dx_RD),
                                      dw_D.data<float>(), partial.data<float>(), R, D, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));  // before the workspace is freed
}

// ---- RoPE ---------------------------------------------------------------------------------------

namespace {
void rope_rotate(Tensor& x_NhD, const Tensor& positions_N, double theta, double sign, const char* op,
                 cudaStream_t stream) {
  check_cuda(x_NhD, DType::kBF16, 3, op);
  const int64_t N = x_NhD.size(0), h = x_NhD.size(1), D = x_NhD.size(2);
  MOETP_CHECK(D % 2 == 0, "{}: head_dim D ({}) must be even ({})", op, D, x_NhD.describe());
  MOETP_CHECK(D <= 4096, "{}: head_dim D ({}) exceeds the 4096 the CUDA kernel supports ({})", op, D,
              x_NhD.describe());
  MOETP_CHECK(theta > 0.0, "{}: rope theta ({}) must be > 0", op, theta);
  MOETP_CHECK(positions_N.defined() && positions_N.ndim() == 1 && positions_N.size(0) == N,
              "{}: positions_N must be (N) = ({}) to match x {}, got {}", op, N, x_NhD.describe(),
              positions_N.describe());
  check_dtype(positions_N, DType::kI32, "rope positions_N");
  check_device(positions_N, Device::kCuda, "rope positions_N");
  check_contiguous(positions_N, "rope positions_N");
  CUDA_CHECK(launch::rope(bits(x_NhD), positions_N.data<int32_t>(), N, h, D, theta, sign, fault_slot(), stream));
}
}  // namespace

void rope_forward(Tensor& x_NhD, const Tensor& positions_N, double theta, cudaStream_t stream) {
  rope_rotate(x_NhD, positions_N, theta, 1.0, "rope_forward x_NhD", stream);
}

void rope_backward(Tensor& dx_NhD, const Tensor& positions_N, double theta, cudaStream_t stream) {
  rope_rotate(dx_NhD, positions_N, theta, -1.0, "rope_backward dx_NhD", stream);
}

// ---- SwiGLU -------------------------------------------------------------------------------------

Tensor swiglu_forward(const Tensor& h_M2i, cudaStream_t stream) {
  check_cuda(h_M2i, DType::kBF16, 2, "swiglu h_M2i");
  MOETP_CHECK(h_M2i.size(1) % 2 == 0, "swiglu: h_M2i width {} is odd ({})", h_M2i.size(1), h_M2i.describe());
  const int64_t M = h_M2i.size(0), i = h_M2i.size(1) / 2;
  Tensor a_Mi = Tensor::empty({M, i}, DType::kBF16, Device::kCuda);
  CUDA_CHECK(launch::swiglu_forward(bits(h_M2i), bits(a_Mi), M, i, stream));
  return a_Mi;
}

Tensor swiglu_backward(const Tensor& h_M2i, const Tensor& da_Mi, cudaStream_t stream) {
  check_cuda(h_M2i, DType::kBF16, 2, "swiglu_backward h_M2i");
  MOETP_CHECK(h_M2i.size(1) % 2 == 0, "swiglu_backward: h_M2i width {} is odd ({})", h_M2i.size(1),
              h_M2i.describe());
  const int64_t M = h_M2i.size(0), i = h_M2i.size(1) / 2;
  check_cuda(da_Mi, DType::kBF16, 2, "swiglu_backward da_Mi");
  check_shape(da_Mi, {M, i}, "swiglu_backward da_Mi");
  Tensor dh_M2i = Tensor::empty({M, 2 * i}, DType::kBF16, Device::kCuda);
  CUDA_CHECK(launch::swiglu_backward(bits(h_M2i), bits(da_Mi), bits(dh_M2i), M, i, stream));
  return dh_M2i;
}

// ---- router -------------------------------------------------------------------------------------

RouterOutput router_forward(const Tensor& logits_NE, int64_t K, bool norm_topk_prob, cudaStream_t stream) {
  check_cuda(logits_NE, DType::kF32, 2, "router logits_NE");
  const int64_t N = logits_NE.size(0), E = logits_NE.size(1);
  MOETP_CHECK(K >= 1 && K <= E, "router: top-k K ({}) must be in [1, num_experts E ({})]", K, E);
  MOETP_CHECK(E <= launch::kRouterMaxExperts, "router: num_experts E ({}) exceeds the {} the CUDA kernel supports",
              E, launch::kRouterMaxExperts);
  RouterOutput out;
  out.probs_NE = Tensor::empty({N, E}, DType::kF32, Device::kCuda);
  out.topk_idx_NK = Tensor::empty({N, K}, DType::kI32, Device::kCuda);
  out.topk_weight_NK = Tensor::empty({N, K}, DType::kF32, Device::kCuda);
  CUDA_CHECK(launch::router_forward(logits_NE.data<float>(), out.probs_NE.data<float>(),
                                    out.topk_idx_NK.data<int32_t>(), out.topk_weight_NK.data<float>(), N, E, K,
                                    norm_topk_prob, stream));
  return out;
}

Tensor router_logits_grad(const RouterOutput& fwd, bool norm_topk_prob, const Tensor& d_topk_weight_NK,
                          const Tensor& d_probs_NE, cudaStream_t stream) {
  check_cuda(fwd.probs_NE, DType::kF32, 2, "router fwd.probs_NE");
  const int64_t N = fwd.probs_NE.size(0), E = fwd.probs_NE.size(1);
  check_cuda(fwd.topk_weight_NK, DType::kF32, 2, "router fwd.topk_weight_NK");
  const int64_t K = fwd.topk_weight_NK.size(1);
  check_shape(fwd.topk_weight_NK, {N, K}, "router fwd.topk_weight_NK");
  check_cuda(fwd.topk_idx_NK, DType::kI32, 2, "router fwd.topk_idx_NK");
  check_shape(fwd.topk_idx_NK, {N, K}, "router fwd.topk_idx_NK");
  MOETP_CHECK(K >= 1 && K <= E, "router: top-k K ({}) must be in [1, num_experts E ({})]", K, E);
  MOETP_CHECK(E <= launch::kRouterMaxExperts, "router: num_experts E ({}) exceeds the {} the CUDA kernel supports",
              E, launch::kRouterMaxExperts);
  if (d_topk_weight_NK.defined()) {
    check_cuda(d_topk_weight_NK, DType::kF32, 2, "router d_topk_weight_NK");
    check_shape(d_topk_weight_NK, {N, K}, "router d_topk_weight_NK");
  }
  if (d_probs_NE.defined()) {
    check_cuda(d_probs_NE, DType::kF32, 2, "router d_probs_NE");
    check_shape(d_probs_NE, {N, E}, "router d_probs_NE");
  }
  Tensor dlogits_NE = Tensor::empty({N, E}, DType::kF32, Device::kCuda);
  CUDA_CHECK(launch::router_logits_grad(
      fwd.probs_NE.data<float>(), fwd.topk_idx_NK.data<int32_t>(), fwd.topk_weight_NK.data<float>(),
      d_topk_weight_NK.defined() ? d_topk_weight_NK.data<float>() : nullptr,
      d_probs_NE.defined() ? d_probs_NE.data<float>() : nullptr, dlogits_NE.data<float>(), N, E, K, norm_topk_prob,
      fault_slot(), stream));
  return dlogits_NE;
}

// ---- row movement -------------------------------------------------------------------------------

Tensor gather_rows(const Tensor& src_RH, const Tensor& rows_M, cudaStream_t stream) {
  check_contiguous(src_RH, "gather_rows source");
  check_device(src_RH, Device::kCuda, "gather_rows source");
  MOETP_CHECK(src_RH.ndim() >= 1, "gather_rows: source {} must have at least 1 dimension", src_RH.describe());
  check_index(rows_M, DType::kI64, -1, "gather_rows", "rows_M");
  Shape shape = src_RH.shape();
  shape[0] = rows_M.size(0);
  Tensor out = Tensor::empty(shape, src_RH.dtype(), Device::kCuda);
  const int64_t row_bytes = src_RH.row_numel() * static_cast<int64_t>(src_RH.element_size());
  CUDA_CHECK(launch::gather_rows(src_RH.raw_data(), out.raw_data(), rows_M.data<int64_t>(), rows_M.size(0),
                                 src_RH.rows(), row_bytes, fault_slot(), stream));
  return out;
}

namespace {
// src is bf16 or f32 with rows of dst's width; returns whether it is bf16.
bool check_accumulate_source(const Tensor& src_MH, const Tensor& dst_RH, int64_t M, const char* op,
                             const char* src_name) {
  MOETP_CHECK(src_MH.defined() && (src_MH.dtype() == DType::kBF16 || src_MH.dtype() == DType::kF32),
              "{}: {} must be bf16 or f32, got {}", op, src_name, src_MH.describe());
  check_cuda_any(src_MH, src_MH.dtype(), src_name);
  check_cuda_any(dst_RH, DType::kF32, "row accumulation destination (f32, accumulated into)");
  MOETP_CHECK(src_MH.rows() == M && src_MH.row_numel() == dst_RH.row_numel(),
              "{}: source {} with {} indices into {}", op, src_MH.describe(), M, dst_RH.describe());
  check_rows_fit_int32(M, op);
  return src_MH.dtype() == DType::kBF16;
}
}  // namespace

void scatter_add_rows(const Tensor& src_MH, const Tensor& rows_M, Tensor& dst_RH, cudaStream_t stream) {
  check_index(rows_M, DType::kI64, -1, "scatter_add_rows", "rows_M");
  const int64_t M = rows_M.size(0);
  const bool src_bf16 = check_accumulate_source(src_MH, dst_RH, M, "scatter_add_rows", "scatter_add_rows source");
  const int64_t H = dst_RH.row_numel();
  if (M == 0 || H == 0) return;
  const size_t ws_bytes = launch::sorted_accumulate_workspace_bytes(M, /*key64=*/true);
  Tensor ws = workspace(ws_bytes);
  CUDA_CHECK(launch::scatter_add_rows(src_MH.raw_data(), src_bf16, rows_M.data<int64_t>(), dst_RH.data<float>(), M,
                                      dst_RH.rows(), H, ws.raw_data(), ws_bytes, fault_slot(), stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));  // before the workspace is freed
}

void fold_weighted(const Tensor& y_MH, const Tensor& rows_M, const Tensor& cols_M, const Tensor& w_RC,
                   Tensor& dst_RH, cudaStream_t stream) {
  check_index(rows_M, DType::kI64, -1, "fold_weighted", "rows_M");
  const int64_t M = rows_M.size(0);
  check_index(cols_M, DType::kI64, M, "fold_weighted", "cols_M");
  const bool y_bf16 = check_accumulate_source(y_MH, dst_RH, M, "fold_weighted", "fold_weighted y_MH");
  check_cuda(w_RC, DType::kF32, 2, "fold_weighted w_RC");
  MOETP_CHECK(w_RC.size(0) == dst_RH.rows(), "fold_weighted: w_RC {} must have one row per destination row ({})",
              w_RC.describe(), dst_RH.describe());
  const int64_t H = dst_RH.row_numel();
  if (M == 0 || H == 0) return;
  const size_t ws_bytes = launch::sorted_accumulate_workspace_bytes(M, /*key64=*/true);
  Tensor ws = workspace(ws_bytes);
  CUDA_CHECK(launch::fold_weighted(y_MH.raw_data(), y_bf16, rows_M.data<int64_t>(), cols_M.data<int64_t>(),
                                   w_RC.data<float>(), w_RC.size(1), dst_RH.data<float>(), M, dst_RH.rows(), H,
                                   ws.raw_data(), ws_bytes, fault_slot(), stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));  // before the workspace is freed
}

// ---- cross-entropy ------------------------------------------------------------------------------

Tensor cross_entropy_forward(const Tensor& logits_NV, const Tensor& targets_N, Tensor* dlogits_NV, float grad_scale,
                             cudaStream_t stream) {
  MOETP_CHECK(logits_NV.defined() && (logits_NV.dtype() == DType::kF32 || logits_NV.dtype() == DType::kBF16),
              "cross_entropy: logits_NV must be f32 or bf16, got {}", logits_NV.describe());
  check_cuda(logits_NV, logits_NV.dtype(), 2, "cross_entropy logits_NV");
  const int64_t N = logits_NV.size(0), V = logits_NV.size(1);
  MOETP_CHECK(targets_N.defined() && targets_N.ndim() == 1 && targets_N.size(0) == N,
              "cross_entropy: targets_N must be (N) = ({}) to match logits_NV {}, got {}", N, logits_NV.describe(),
              targets_N.describe());
  check_dtype(targets_N, DType::kI32, "cross_entropy targets_N");
  check_device(targets_N, Device::kCuda, "cross_entropy targets_N");
  check_contiguous(targets_N, "cross_entropy targets_N");
  void* dlogits = nullptr;
  if (dlogits_NV != nullptr) {
    if (!dlogits_NV->defined()) *dlogits_NV = Tensor::empty({N, V}, logits_NV.dtype(), Device::kCuda);
    check_cuda(*dlogits_NV, logits_NV.dtype(), 2, "cross_entropy dlogits_NV");
    check_shape(*dlogits_NV, {N, V}, "cross_entropy dlogits_NV");
    dlogits = dlogits_NV->raw_data();
  }
  Tensor loss_N = Tensor::empty({N}, DType::kF32, Device::kCuda);
  CUDA_CHECK(launch::cross_entropy_forward(logits_NV.raw_data(), logits_NV.dtype() == DType::kBF16,
                                           targets_N.data<int32_t>(), loss_N.data<float>(), dlogits, grad_scale, N, V,
                                           fault_slot(), stream));
  return loss_N;
}

// ---- optimiser ----------------------------------------------------------------------------------

void adamw_step(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const AdamWHyper& hyper, Tensor* w_bf16,
                cudaStream_t stream) {
  MOETP_CHECK(hyper.step >= 1, "AdamW step counts from 1, got {}", hyper.step);
  check_cuda_any(w, DType::kF32, "adamw w (f32 master weights)");
  check_cuda_any(g, DType::kF32, "adamw g");
  check_shape(g, w.shape(), "adamw g");
  MOETP_CHECK((m.dtype() == DType::kF32 || m.dtype() == DType::kBF16) && v.dtype() == m.dtype(),
              "adamw: the moments must both be f32 or both bf16, got m {} and v {}", m.describe(), v.describe());
  check_cuda_any(m, m.dtype(), "adamw m (exp_avg)");
  check_shape(m, w.shape(), "adamw m (exp_avg)");
  check_cuda_any(v, m.dtype(), "adamw v (exp_avg_sq)");
  check_shape(v, w.shape(), "adamw v (exp_avg_sq)");
  uint16_t* w16 = nullptr;
  if (w_bf16 != nullptr) {
    check_cuda_any(*w_bf16, DType::kBF16, "adamw w_bf16 (bf16 copy of the weights)");
    check_shape(*w_bf16, w.shape(), "adamw w_bf16 (bf16 copy of the weights)");
    w16 = bits(*w_bf16);
  }
  // Exactly the scalars train::AdamW::step derives.
  launch::AdamWArgs args{};
  args.beta1 = static_cast<float>(hyper.beta1);
  args.beta2 = static_cast<float>(hyper.beta2);
  args.bias_correction1 = static_cast<float>(1.0 - std::pow(hyper.beta1, static_cast<double>(hyper.step)));
  args.bias_correction2 = static_cast<float>(1.0 - std::pow(hyper.beta2, static_cast<double>(hyper.step)));
  args.eps = static_cast<float>(hyper.eps);
  args.lr = static_cast<float>(hyper.lr);
  args.decay = static_cast<float>(hyper.lr * hyper.weight_decay);
  if (m.dtype() == DType::kF32) {
    CUDA_CHECK(launch::adamw_step(w.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), w16, w.numel(),
                                  args, stream));
  } else {
    CUDA_CHECK(launch::adamw_step_bf16_moments(w.data<float>(), g.data<float>(), bits(m), bits(v), w16, w.numel(), args,
                                               stream));
  }
}

double sum_of_squares(const Tensor& g, cudaStream_t stream) { return sums_of_squares({&g, 1}, stream)[0]; }

std::vector<double> sums_of_squares(std::span<const Tensor> gs, cudaStream_t stream) {
  // Every tensor's partials into one buffer, one copy to the host, one synchronisation; each sum
  // is its partials added in order, as for one tensor.
  std::vector<int64_t> first(gs.size() + 1, 0);
  for (size_t i = 0; i < gs.size(); ++i) {
    check_cuda_any(gs[i], DType::kF32, "sum_of_squares g");
    first[i + 1] = first[i] + launch::sum_of_squares_num_partials(gs[i].numel());
  }
  std::vector<double> out(gs.size(), 0.0);
  if (first.back() == 0) return out;
  Tensor partials = workspace(static_cast<size_t>(first.back()) * sizeof(double));
  auto* dev = static_cast<double*>(partials.raw_data());
  for (size_t i = 0; i < gs.size(); ++i) {
    if (gs[i].numel() == 0) continue;
    CUDA_CHECK(launch::sum_of_squares_partials(gs[i].data<float>(), gs[i].numel(), dev + first[i], stream));
  }
  std::vector<double> host(static_cast<size_t>(first.back()));
  CUDA_CHECK(cudaMemcpyAsync(host.data(), dev, host.size() * sizeof(double), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  for (size_t i = 0; i < gs.size(); ++i) {
    double sum = 0.0;
    for (int64_t k = first[i]; k < first[i + 1]; ++k) sum += host[static_cast<size_t>(k)];
    out[i] = sum;
  }
  return out;
}

}  // namespace moetp::cuda
