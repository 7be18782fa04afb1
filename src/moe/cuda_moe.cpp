// The CUDA MoE layer (contract in cuda_moe.h): argument checks, the layer's buffers, and the
// sequence of kernels. The op kernels are called through their launchers (kernels/cuda/launch.h)
// with the layer's own buffers (the ops.h wrappers return fresh tensors); the indices they read are produced
// here and are in range by construction, so no index-fault record is passed.
#include "moe/cuda_moe.h"

#include <cublas_v2.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include "comm/nccl_comm.h"
#include "kernels/cuda/cast.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/launch.h"
#include "moe/cuda_moe_kernels.h"
#include "moe/all2all_plan.h"
#include "moe/vexpert_plan.h"

namespace moetp::moe {

namespace {

const uint16_t* bits(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data<bf16>()); }
uint16_t* bits(Tensor& t) { return reinterpret_cast<uint16_t*>(t.data<bf16>()); }

Tensor device_empty(Shape shape, DType dtype) { return Tensor::empty(std::move(shape), dtype, Device::kCuda); }

// A defined, contiguous CUDA tensor of `dtype` and `shape`.
void check_cuda_tensor(const Tensor& t, DType dtype, std::initializer_list<int64_t> shape, const char* name) {
  MOETP_CHECK(t.defined(), "{}: tensor is undefined (expected {} {})", name, dtype_name(dtype),
              shape_str(std::vector<int64_t>(shape)));
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
  check_shape(t, shape, name);
}

// `out` becomes a (rows, cols) bf16 CUDA tensor: kept when it already is one, else allocated.
void ensure_output(Tensor& out, int64_t rows, int64_t cols) {
  if (out.defined() && out.dtype() == DType::kBF16 && out.device() == Device::kCuda && out.is_contiguous() &&
      out.shape() == Shape{rows, cols}) {
    return;
  }
  out = device_empty({rows, cols}, DType::kBF16);
}

// Column-major C (m × n, ldc) f32 = op(A) · op(B) with bf16 A and B, f32 accumulation, through the
// layer stream's cuBLAS handle (gemm.h: reductions never in reduced precision). The callers map
// their row-major products onto this as gemm.cpp does.
void gemm_f32_out(const char* what, cudaStream_t stream, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m,
                  int64_t n, int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb, float* C, int64_t ldc) {
  MOETP_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX, "{}: GEMM sizes exceed int32 (m = {}, n = {}, k = {})",
              what, m, n, k);
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t status = cublasGemmEx(
      cuda::cublas_handle(stream), op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, A,
      CUDA_R_16BF, static_cast<int>(lda), B, CUDA_R_16BF, static_cast<int>(ldb), &beta, C, CUDA_R_32F,
      static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  MOETP_CHECK(status == CUBLAS_STATUS_SUCCESS, "{}: cublasGemmEx(m = {}, n = {}, k = {}) failed: {}", what, m, n, k,
              cublasGetStatusString(status));
}

void check_nccl_group(comm::Comm& c, cudaStream_t stream) {
  MOETP_CHECK(c.device() == Device::kCuda,
              "CudaMoeLayer: mesh group '{}' is a host communicator; the CUDA layer needs one over CUDA tensors "
              "(comm::NcclComm)",
              c.name());
  MOETP_CHECK(c.compute_stream() == stream,
              "CudaMoeLayer: mesh group '{}' orders its collectives against another stream than the layer's "
              "(set_compute_stream to CudaMoeOptions::stream)",
              c.name());
}

// The first `rows` rows of a (capacity, cols) CUDA buffer. The first allocation is exact (as the
// expert side's, reserve_expert_side: forced balance never grows, and the per-token buffers are
// sized by N); a growth adds 1/8 slack (at least 64 rows), so that a steady-state step allocates
// nothing. The caller drops its views of `cap` first (else a growth holds old and new at once).
Tensor grow_rows(Tensor& cap, int64_t rows, int64_t cols, DType dtype) {
  if (!cap.defined() || cap.size(0) < rows) {
    const int64_t n = !cap.defined() ? std::max<int64_t>(rows, 1) : std::max<int64_t>(rows + rows / 8, 64);
    cap = Tensor();  // the old one goes first
    cap = device_empty({n, cols}, dtype);
  }
  return cap.narrow_rows(0, rows);
}

// A host i64 vector copied into (a view of) a capacity buffer, ordered on `stream`. Pageable host
// memory: the copy stages the source before returning.
Tensor upload_i64(Tensor& cap, const std::vector<int64_t>& v, cudaStream_t stream) {
  Tensor view = grow_rows(cap, static_cast<int64_t>(v.size()), 1, DType::kI64);
  if (!v.empty()) {
    CUDA_CHECK(cudaMemcpyAsync(view.raw_data(), v.data(), v.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
  }
  return view;
}

void zero_async(Tensor& t, cudaStream_t stream) {
  if (t.num_bytes() > 0) CUDA_CHECK(cudaMemsetAsync(t.raw_data(), 0, t.num_bytes(), stream));
}

}  // namespace

ExpertGemm parse_expert_gemm(const std::string& name) { return parse_option<ExpertGemm>(name, "expert GEMM"); }

const char* expert_gemm_name(ExpertGemm g) { return option_name(g).data(); }

bool grouped_gemm_fits(int64_t hidden, int64_t local_intermediate) {
  return hidden % 8 == 0 && local_intermediate % 8 == 0;
}

void CudaMoeLayer::PinnedDeleter::operator()(void* p) const { cudaFreeHost(p); }

CudaMoeLayer::Streams::~Streams() {
  for (cudaEvent_t e : join) cudaEventDestroy(e);
  if (fork != nullptr) cudaEventDestroy(fork);
  for (cudaStream_t st : side) cudaStreamDestroy(st);
}

CudaMoeLayer::CudaMoeLayer(const MoeConfig& cfg, CudaMoeOptions opts) : cfg_(cfg), opts_(opts) {
  const int64_t H = cfg.hidden, E = cfg.num_experts, K = cfg.top_k, I = cfg.intermediate;
  MOETP_CHECK(H >= 1 && I >= 1, "CudaMoeLayer: hidden ({}) and moe_intermediate_size ({}) must be >= 1", H, I);
  MOETP_CHECK(E >= 1 && E <= cuda::launch::kRouterMaxExperts,
              "CudaMoeLayer: num_experts ({}) must be in [1, {}] (the CUDA router's limit)", E,
              cuda::launch::kRouterMaxExperts);
  MOETP_CHECK(K >= 1 && K <= E, "CudaMoeLayer: top_k ({}) must be in [1, num_experts ({})]", K, E);
  MOETP_CHECK(opts.expert_streams >= 1, "CudaMoeLayer: expert_streams ({}) must be >= 1", opts.expert_streams);
  MOETP_CHECK(opts.expert_streams == 1 || opts.expert_gemm == ExpertGemm::kCublas,
              "CudaMoeLayer: expert_streams = {} needs expert_gemm = cublas (the grouped GEMM is one launch over "
              "all experts)",
              opts.expert_streams);
  L_ = E;
  i_ = I;
  if (opts.mesh != nullptr) {
    const comm::Mesh& mesh = *opts.mesh;
    const int P = mesh.ep_size(), T = mesh.etp_size();
    MOETP_CHECK(cfg.dispatcher == DispatcherKind::kAll2all || cfg.dispatcher == DispatcherKind::kVexpert,
                "CudaMoeLayer: dispatcher '{}' is not implemented on the CUDA backend; use 'all2all' or 'vexpert' "
                "(ep {} x etp {})",
                option_name(cfg.dispatcher), P, T);
    MOETP_CHECK(E % P == 0, "CudaMoeLayer: num_experts ({}) % ep ({}) = {} != 0", E, P, E % P);
    MOETP_CHECK(I % T == 0, "CudaMoeLayer: moe_intermediate_size ({}) % etp ({}) = {} != 0", I, T, I % T);
    check_nccl_group(mesh.ep(), opts.stream);
    check_nccl_group(mesh.etp(), opts.stream);
    if (cfg.dispatcher == DispatcherKind::kVexpert) check_nccl_group(mesh.ep_etp(), opts.stream);
    L_ = E / P;
    i_ = I / T;
  }
  MOETP_CHECK(opts.expert_gemm != ExpertGemm::kGrouped || grouped_gemm_fits(H, i_),
              "CudaMoeLayer: the grouped expert GEMM needs hidden ({}) and the local expert width "
              "moe_intermediate_size / etp ({}) to be multiples of 8; use expert_gemm = cublas (moe.expert_gemm)",
              H, i_);
  if (opts.expert_streams > 1) {
    CUDA_CHECK(cudaEventCreateWithFlags(&streams_.fork, cudaEventDisableTiming));
    for (int c = 0; c < opts.expert_streams; ++c) {
      streams_.side.push_back(nullptr);
      CUDA_CHECK(cudaStreamCreateWithFlags(&streams_.side.back(), cudaStreamNonBlocking));
      streams_.join.push_back(nullptr);
      CUDA_CHECK(cudaEventCreateWithFlags(&streams_.join.back(), cudaEventDisableTiming));
    }
  }
  if (!opts.external_params) {
    params_ = {Tensor::zeros({E, H}, DType::kBF16, Device::kCuda),
               Tensor::zeros({L_, 2 * i_, H}, DType::kBF16, Device::kCuda),
               Tensor::zeros({L_, H, i_}, DType::kBF16, Device::kCuda)};
    grads_ = {Tensor::zeros({E, H}, DType::kF32, Device::kCuda),
              Tensor::zeros({L_, 2 * i_, H}, DType::kF32, Device::kCuda),
              Tensor::zeros({L_, H, i_}, DType::kF32, Device::kCuda)};
  }
  counts_dev_E_ = device_empty({E}, DType::kI32);
  int32_t* pinned = nullptr;
  CUDA_CHECK(cudaMallocHost(&pinned, static_cast<size_t>(E) * sizeof(int32_t)));
  counts_host_.reset(pinned);
  if (opts.expert_gemm == ExpertGemm::kGrouped) {
    offsets_dev_L1_ = device_empty({L_ + 1}, DType::kI64);
    int64_t* off = nullptr;
    CUDA_CHECK(cudaMallocHost(&off, static_cast<size_t>(L_ + 1) * sizeof(int64_t)));
    offsets_host_.reset(off);
  }
  // The zeros above went through the legacy default stream, which a non-blocking layer stream does
  // not wait for.
  CUDA_CHECK(cudaDeviceSynchronize());
}

CudaMoeLayer::~CudaMoeLayer() = default;

int64_t CudaMoeLayer::num_local_experts() const { return L_; }
int64_t CudaMoeLayer::local_intermediate() const { return i_; }

void CudaMoeLayer::set_params(const MoeParams& src) {
  auto load = [](const Tensor& from, Tensor& to, const char* name) {
    MOETP_CHECK(from.defined() && from.shape() == to.shape(), "CudaMoeLayer::set_params: {} must be {}, got {}", name,
                shape_str(to.shape()), from.defined() ? from.describe() : std::string("undefined"));
    MOETP_CHECK(from.dtype() == DType::kF32 || from.dtype() == DType::kBF16,
                "CudaMoeLayer::set_params: {} must be f32 or bf16, got {}", name, from.describe());
    Tensor b;
    if (from.device() == Device::kCpu) {
      b = from.contiguous();
      if (b.dtype() != DType::kBF16) b = b.to(DType::kBF16);
    } else {
      check_contiguous(from, name);
      b = cuda::cast(from, DType::kBF16);
    }
    to.copy_from(b);
  };
  load(src.wg_EH, params_.wg_EH, "wg_EH");
  load(src.w13_L2iH, params_.w13_L2iH, "w13 (L, 2i, H)");
  load(src.w2_LHi, params_.w2_LHi, "w2 (L, H, i)");
  // A pageable host-to-device cudaMemcpy may return before its DMA lands, and a non-blocking layer
  // stream does not wait for the legacy default stream.
  CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaMoeLayer::bind(const MoeParams& work, const MoeParams& grads) {
  const int64_t E = cfg_.num_experts, H = cfg_.hidden;
  const std::pair<const Tensor*, Shape> expect[] = {{&work.wg_EH, {E, H}},           {&work.w13_L2iH, {L_, 2 * i_, H}},
                                                    {&work.w2_LHi, {L_, H, i_}},     {&grads.wg_EH, {E, H}},
                                                    {&grads.w13_L2iH, {L_, 2 * i_, H}}, {&grads.w2_LHi, {L_, H, i_}}};
  for (size_t k = 0; k < 6; ++k) {
    const Tensor& t = *expect[k].first;
    const DType dtype = k < 3 ? DType::kBF16 : DType::kF32;
    MOETP_CHECK(t.defined() && t.shape() == expect[k].second && t.dtype() == dtype && t.device() == Device::kCuda &&
                    t.is_contiguous(),
                "CudaMoeLayer::bind: tensor {} must be a contiguous {}{} CUDA tensor, got {}", k, dtype_name(dtype),
                shape_str(expect[k].second), t.defined() ? t.describe() : std::string("undefined"));
  }
  materialize_zero_grads();
  params_ = work;
  grads_ = grads;
}

void CudaMoeLayer::zero_grads() {
  CUDA_CHECK(cudaMemsetAsync(grads_.wg_EH.raw_data(), 0, grads_.wg_EH.num_bytes(), opts_.stream));
  // The expert gradients (almost all of the layer's) are zeroed by the next backward: on the
  // grouped path its weight-gradient products store instead of adding (experts_backward), on the
  // cuBLAS path begin_expert_grads memsets them before the experts run; or on first read (grads()).
  expert_grads_zero_pending_ = true;
}

void CudaMoeLayer::zero_expert_grads_async() const {
  for (const Tensor* g : {&grads_.w13_L2iH, &grads_.w2_LHi}) {
    CUDA_CHECK(cudaMemsetAsync(const_cast<void*>(g->raw_data()), 0, g->num_bytes(), opts_.stream));
  }
  expert_grads_zero_pending_ = false;
}

void CudaMoeLayer::materialize_zero_grads() const {
  if (!expert_grads_zero_pending_) return;
  zero_expert_grads_async();
  // The reader may be on another stream (the model's): finish before handing the tensors out.
  CUDA_CHECK(cudaStreamSynchronize(opts_.stream));
}

void CudaMoeLayer::begin_expert_grads() {
  // Only the grouped weight gradient can overwrite. The cuBLAS loop adds, and with several expert
  // streams it skips chunks without rows, so its pending zeroing happens here, for every expert,
  // on the layer stream before the chunks fork from it.
  if (expert_grads_zero_pending_ && opts_.expert_gemm != ExpertGemm::kGrouped) zero_expert_grads_async();
}

void CudaMoeLayer::reserve(int64_t N) {
  if (N == num_tokens_) return;
  const int64_t H = cfg_.hidden, E = cfg_.num_experts, K = cfg_.top_k, M = N * K;
  MOETP_CHECK(M <= INT32_MAX, "CudaMoeLayer: N·K = {}·{} = {} dispatched rows exceed the int32 row indices", N, K, M);
  // Old buffers go first (their cudaFree waits for work in flight).
  saved_ = CudaMoeSaved{};
  CudaMoeSaved& s = saved_;
  s.logits_NE = device_empty({N, E}, DType::kF32);
  s.probs_NE = device_empty({N, E}, DType::kF32);
  s.topk_idx_NK = device_empty({N, K}, DType::kI32);
  s.topk_weight_NK = device_empty({N, K}, DType::kF32);
  s.flat_M = device_empty({M}, DType::kI32);
  s.token_M = device_empty({M}, DType::kI64);
  s.pos_NK = device_empty({N, K}, DType::kI32);
  // `vexpert` moves rows through its own send/receive buffers: no slot-side (M, H) rows at all.
  if (!vexpert()) {
    s.x_MH = device_empty({M, H}, DType::kBF16);
    s.y_MH = device_empty({M, H}, DType::kBF16);
  }
  const size_t plan_bytes = launch::routing_plan_workspace_bytes(M);
  plan_workspace_ = device_empty({static_cast<int64_t>((plan_bytes + 7) / 8) + 1}, DType::kI64);
  num_tokens_ = N;
  if (!distributed()) exp_capacity_ = -1;  // the expert side is sized by M: re-derived below
}

void CudaMoeLayer::reserve_expert_side(int64_t R) {
  const int64_t H = cfg_.hidden, i = i_;
  CudaMoeSaved& s = saved_;
  if (R > exp_capacity_) {
    // One GPU: R = M exactly, every step. A mesh: R follows the routing. The first allocation is
    // exact (forced-balance routing never grows); a growth adds 1/8 slack so that the next slightly
    // larger step does not reallocate again (the step-to-step spread of R at ep 4 with real routing
    // is a few percent; the slack costs memory on every (R, ·) buffer, 1/8 of their sum).
    const int64_t cap = !distributed()       ? R
                        : exp_capacity_ < 0 ? std::max<int64_t>(R, 1)
                                            : std::max<int64_t>(R + R / 8, 64);
    MOETP_CHECK(cap <= INT32_MAX, "CudaMoeLayer: {} expert-side rows exceed the int32 row indices", cap);
    // Old buffers go first: the views of the last forward share their storage, so they are dropped
    // too (else old and new would be held at once, at exactly the step whose routing spiked).
    for (Tensor* t : {&cap_x_, &cap_h_, &cap_a_, &cap_y_, &cap_recv_, &cap_gath_, &cap_perm_, &cap_inv_perm_, &s.x_RH,
                      &s.y_RH, &s.h_M2I, &s.a_MI}) {
      *t = Tensor();
    }
    cap_h_ = device_empty({cap, 2 * i}, DType::kBF16);
    cap_a_ = device_empty({cap, i}, DType::kBF16);
    if (distributed()) {
      cap_x_ = device_empty({cap, H}, DType::kBF16);
      cap_y_ = device_empty({cap, H}, DType::kBF16);
      // all2all: y_RH is dead once the forward's move_to_slots has gathered it (the backward reads
      // the slot rows y_MH, never y_RH), and dy_RH is first written by the backward's
      // move_to_experts: one buffer serves both (R·H bf16 less, 0.25 GiB at 2x1, 0.5 GiB at 1x2;
      // saved().y_RH is valid until the backward starts). Every access is in the layer stream's
      // order (the collectives and the expert chunks are joined back to it with events), so the
      // next forward's experts write y only after this backward's move_to_slots has read dx.
      // `vexpert`'s combine backward reads y_RH while it writes dy_RH: two buffers there (the
      // second allocated by the backward, begin_backward_buffers).
      // The all2all exchange's buffer (move_to_experts / move_to_slots); `vexpert` moves its rows
      // through vx_ and never touches it (R·H·2 bytes: 0.25 GiB at 2x1, 0.5 GiB at 1x2). With
      // etp > 1 the all-to-all's rows are this rank's block of the gathered rows (exchange_views).
      if (!vexpert()) {
        if (opts_.mesh->etp_size() > 1) {
          cap_gath_ = device_empty({cap, H}, DType::kBF16);
        } else {
          cap_recv_ = device_empty({cap, H}, DType::kBF16);
        }
        cap_perm_ = device_empty({cap}, DType::kI64);
        cap_inv_perm_ = device_empty({cap}, DType::kI64);
      }
    }
    exp_capacity_ = cap;
  }
  s.h_M2I = cap_h_.narrow_rows(0, R);
  s.a_MI = cap_a_.narrow_rows(0, R);
  if (distributed()) {
    s.x_RH = cap_x_.narrow_rows(0, R);
    s.y_RH = cap_y_.narrow_rows(0, R);
  } else {
    s.x_RH = s.x_MH;
    s.y_RH = s.y_MH;
  }
}

void CudaMoeLayer::release_rows() {
  CudaMoeSaved& s = saved_;
  for (Tensor* t : {&s.x_NH, &s.x_MH, &s.y_MH, &s.x_RH, &s.y_RH, &s.h_M2I, &s.a_MI, &cap_x_, &cap_h_, &cap_a_, &cap_y_,
                    &cap_recv_, &cap_gath_, &cap_perm_, &cap_inv_perm_}) {
    *t = Tensor();
  }
  vx_.drop_views();
  for (Tensor* t : {&vx_.cap_send_token, &vx_.cap_tok_begin, &vx_.cap_tok_rows, &vx_.cap_row_recv, &vx_.cap_row_entry,
                    &vx_.cap_recv_w, &vx_.cap_z, &vx_.cap_back, &vx_.cap_acc, &vx_.cap_dw_q, &vx_.cap_dw_s,
                    &vx_.cap_ws}) {
    *t = Tensor();
  }
  exp_capacity_ = -1;
  num_tokens_ = -1;  // the next forward's reserve() allocates the slot rows again
  has_forward_ = false;
}

void CudaMoeLayer::begin_backward_buffers() {
  const int64_t H = cfg_.hidden, E = cfg_.num_experts, K = cfg_.top_k;
  const CudaMoeSaved& s = saved_;
  const int64_t N = s.x_NH.size(0), M = N * K, R = s.offsets.empty() ? 0 : s.offsets.back();
  dtopk_weight_NK_ = device_empty({N, K}, DType::kF32);
  // On a mesh (all2all) the dispatched slot rows x_MH are dead once move_to_experts has sent them,
  // and dy_MH is first written by the combine backward: one buffer serves both (M·H bf16 less). One
  // GPU: x_MH is the experts' input x_RH, which the backward reads.
  dy_MH_ = vexpert() ? Tensor() : distributed() ? s.x_MH : device_empty({M, H}, DType::kBF16);
  dlogits_NE_ = device_empty({N, E}, DType::kF32);
  dlogits_bf16_NE_ = device_empty({N, E}, DType::kBF16);
  dx_router_NH_ = device_empty({N, H}, DType::kF32);
  da_MI_ = device_empty({R, i_}, DType::kBF16);
  dh_M2I_ = device_empty({R, 2 * i_}, DType::kBF16);
  // One GPU: the expert side is the slot rows. all2all: y_RH's buffer (see reserve_expert_side).
  dy_RH_ = !distributed() ? dy_MH_ : vexpert() ? device_empty({R, H}, DType::kBF16) : cap_y_.narrow_rows(0, R);
}

void CudaMoeLayer::end_backward_buffers() {
  for (Tensor* t : {&dtopk_weight_NK_, &dy_MH_, &dlogits_NE_, &dlogits_bf16_NE_, &dx_router_NH_, &da_MI_, &dh_M2I_,
                    &dy_RH_}) {
    *t = Tensor();
  }
}

void CudaMoeLayer::plan_exchange() {
  // Host MPI exchange of the counts (the NCCL communicators' own host groups, same members and order).
  plan_all2all(*opts_.mesh, saved_.counts_E, ex_);
  saved_.offsets = ex_.offsets;
}

void CudaMoeLayer::upload_exchange() {
  const int64_t R = ex_.num_rows;
  reserve_expert_side(R);
  if (R > 0) {
    // Pageable host memory: the copy stages the source before returning, ordered on the stream.
    CUDA_CHECK(cudaMemcpyAsync(cap_perm_.raw_data(), ex_.perm.data(), static_cast<size_t>(R) * sizeof(int64_t),
                               cudaMemcpyHostToDevice, opts_.stream));
    CUDA_CHECK(cudaMemcpyAsync(cap_inv_perm_.raw_data(), ex_.inv_perm.data(), static_cast<size_t>(R) * sizeof(int64_t),
                               cudaMemcpyHostToDevice, opts_.stream));
  }
}

void CudaMoeLayer::exchange_views(Tensor& recv, Tensor& gathered) {
  if (opts_.mesh->etp_size() > 1) {
    // Rank t's block of the gathered rows is exactly what its all-to-all receives (tp_counts[t] =
    // num_recv): the all-to-all writes there, and the etp all-gather / reduce-scatter run in place
    // (NcclComm: one ncclBroadcast / ncclReduce per rank, whose send buffer is then the receive
    // buffer on the root, NCCL's in-place form).
    gathered = cap_gath_.narrow_rows(0, ex_.num_rows);
    recv = gathered.narrow_rows(ex_.recv_offset, ex_.num_recv);
  } else {
    recv = cap_recv_.narrow_rows(0, ex_.num_recv);
    gathered = recv;
  }
}

void CudaMoeLayer::move_to_experts(const Tensor& slot_MH, Tensor& exp_RH) {
  const comm::Mesh& mesh = *opts_.mesh;
  const int64_t H = cfg_.hidden, R = ex_.num_rows;
  const int64_t row_bytes = H * static_cast<int64_t>(sizeof(bf16));
  Tensor recv, gathered;
  exchange_views(recv, gathered);
  mesh.ep().all_to_all_v(slot_MH, ex_.send_counts, recv, ex_.recv_counts);
  if (mesh.etp_size() > 1) mesh.etp().all_gather_v(recv, gathered, ex_.tp_counts);  // in place
  if (R == 0) return;
  CUDA_CHECK(cuda::launch::gather_rows(gathered.raw_data(), exp_RH.raw_data(), cap_perm_.data<int64_t>(), R, R,
                                       row_bytes, nullptr, opts_.stream));
}

void CudaMoeLayer::move_to_slots(const Tensor& exp_RH, Tensor& slot_MH) {
  const comm::Mesh& mesh = *opts_.mesh;
  const int64_t H = cfg_.hidden, R = ex_.num_rows;
  const int64_t row_bytes = H * static_cast<int64_t>(sizeof(bf16));
  const bool tp = mesh.etp_size() > 1;
  Tensor recv, gathered;
  exchange_views(recv, gathered);
  if (R > 0) {
    CUDA_CHECK(cuda::launch::gather_rows(exp_RH.raw_data(), gathered.raw_data(), cap_inv_perm_.data<int64_t>(), R, R,
                                         row_bytes, nullptr, opts_.stream));
  }
  // The etp partials summed (bf16, NCCL's order) into the rows this rank received (in place: its
  // own block of the gathered rows).
  if (tp) mesh.etp().reduce_scatter_v(gathered, recv, ex_.tp_counts);
  mesh.ep().all_to_all_v(recv, ex_.recv_counts, slot_MH, ex_.send_counts);
}

void CudaMoeLayer::vexpert_plan(int64_t N) {
  const comm::Mesh& mesh = *opts_.mesh;
  comm::Comm& host = mesh.ep_etp().host();
  const int64_t E = cfg_.num_experts, K = cfg_.top_k, L = L_;
  const int P = mesh.ep_size(), T = mesh.etp_size();
  VExpert& v = vx_;

  // The plan of the CPU dispatcher (moe/vexpert_plan.h); counts, local-entry table and weights
  // travel over the host communicator (MPI, same members and order): the receiver plans on the
  // host, so the tables never make a round trip through the GPU.
  VExpertSendPlan& plan = v.send_plan;
  plan_vexpert_send(v.idx_host, v.weight_host, N, K, E, P, T, plan);
  const int64_t C = plan.num_entries;  // K entries per row (vexpert_plan.h)
  v.C = C;
  v.send_counts = plan.send_counts;
  v.recv_counts = host.exchange_counts(v.send_counts);
  v.S = static_cast<int64_t>(plan.send_token.size());
  v.Q = comm::sum_counts(v.recv_counts);
  const int64_t S = v.S, Q = v.Q;
  Tensor recv_meta = Tensor::empty({Q, C}, DType::kI32);
  host.all_to_all_v(Tensor::from_vector<int32_t>(plan.meta, {S, C}), v.send_counts, recv_meta, v.recv_counts);
  v.recv_w_host = Tensor::empty({Q, C}, DType::kF32);
  host.all_to_all_v(Tensor::from_vector<float>(plan.meta_w, {S, C}), v.send_counts, v.recv_w_host, v.recv_counts);
  plan_vexpert_recv(std::span<const int32_t>(recv_meta.data<int32_t>(), static_cast<size_t>(Q * C)), Q, C, L,
                    v.recv_plan);
  saved_.offsets = v.recv_plan.offsets;
}

void CudaMoeLayer::vexpert_buffers(int64_t N) {
  const int64_t H = cfg_.hidden, L = L_;
  const cudaStream_t stream = opts_.stream;
  VExpert& v = vx_;
  const VExpertSendPlan& plan = v.send_plan;
  const VExpertRecvPlan& rp = v.recv_plan;
  const int64_t S = v.S, Q = v.Q, C = v.C;
  const TokenRows tr = vexpert_token_rows(plan.send_token, N);
  const int64_t R = rp.offsets[static_cast<size_t>(L)];
  reserve_expert_side(R);

  // The last forward's views share the capacity buffers' storage: drop them before any grow_rows
  // (whose `cap = Tensor()` frees nothing while a view lives), else a growth holds old and new at
  // once (z and back with their send/recv aliases: (S + Q)·H·4 bytes, 0.45 GiB at 4x1 random), as
  // reserve_expert_side drops its views. Freed as before, only earlier.
  v.drop_views();
  v.send_token = upload_i64(v.cap_send_token, plan.send_token, stream);
  v.tok_begin = upload_i64(v.cap_tok_begin, tr.begin, stream);
  v.tok_rows = upload_i64(v.cap_tok_rows, tr.rows, stream);
  v.row_recv = upload_i64(v.cap_row_recv, rp.row_recv, stream);
  v.row_entry = upload_i64(v.cap_row_entry, rp.row_entry, stream);
  v.recv_w = grow_rows(v.cap_recv_w, Q, C, DType::kF32);
  if (Q > 0) {
    CUDA_CHECK(cudaMemcpyAsync(v.recv_w.raw_data(), v.recv_w_host.raw_data(), v.recv_w_host.num_bytes(),
                               cudaMemcpyHostToDevice, stream));
  }
  v.z_QH = grow_rows(v.cap_z, Q, H, DType::kF32);
  v.back_SH = grow_rows(v.cap_back, S, H, DType::kF32);
  // The bf16 rows live in the first half of the f32 buffers of the same rows: in forward and in
  // backward the sent rows (send_SH) are dead once the first all-to-all has read them, before the
  // second one writes back_SH, and the received rows (recv_QH) once gathered into x_RH (forward) or
  // read by the combine backward, before z_QH is zeroed; every use is ordered on the layer stream
  // (NcclComm orders its stream against it both ways). (S + Q)·H·2 bytes less.
  v.send_SH = v.back_SH.reinterpret(DType::kBF16, {S, H});
  v.recv_QH = v.z_QH.reinterpret(DType::kBF16, {Q, H});
  v.acc_NH = grow_rows(v.cap_acc, N, H, DType::kF32);
  v.dw_QC = grow_rows(v.cap_dw_q, Q, C, DType::kF32);
  v.dw_SC = grow_rows(v.cap_dw_s, S, C, DType::kF32);
  const size_t ws_bytes = cuda::launch::sorted_accumulate_workspace_bytes(std::max(std::max(R, S), int64_t{1}), true);
  v.workspace = grow_rows(v.cap_ws, static_cast<int64_t>((ws_bytes + 7) / 8) + 1, 1, DType::kI64);

}

void CudaMoeLayer::vexpert_dispatch(const Tensor& x_NH) {
  comm::Comm& g = opts_.mesh->ep_etp();
  const int64_t H = cfg_.hidden, N = x_NH.size(0), S = vx_.S, Q = vx_.Q, R = saved_.offsets.back();
  const cudaStream_t stream = opts_.stream;
  const int64_t row_bytes = H * static_cast<int64_t>(sizeof(bf16));
  CudaMoeSaved& s = saved_;
  VExpert& v = vx_;
  // Dispatch: one row per (token, destination), then expert order (local expert, received row, entry).
  if (S > 0) {
    CUDA_CHECK(cuda::launch::gather_rows(x_NH.raw_data(), v.send_SH.raw_data(), v.send_token.data<int64_t>(), S, N,
                                         row_bytes, nullptr, stream));
  }
  g.all_to_all_v(v.send_SH, v.send_counts, v.recv_QH, v.recv_counts);
  if (R > 0) {
    CUDA_CHECK(cuda::launch::gather_rows(v.recv_QH.raw_data(), s.x_RH.raw_data(), v.row_recv.data<int64_t>(), R, Q,
                                         row_bytes, nullptr, stream));
  }
  for_expert_chunks([this](int64_t e0, int64_t e1, cudaStream_t st) { experts_forward(e0, e1, st); });
}

void CudaMoeLayer::vexpert_combine(Tensor& out_NH) {
  comm::Comm& g = opts_.mesh->ep_etp();
  const int64_t H = cfg_.hidden, N = out_NH.size(0), S = vx_.S, Q = vx_.Q, C = vx_.C, R = saved_.offsets.back();
  const cudaStream_t stream = opts_.stream;
  CudaMoeSaved& s = saved_;
  VExpert& v = vx_;
  // Combine: the receiver folds its partials with the received weights (f32), the sums go back
  // (f32) and add into their tokens; one bf16 rounding at the end.
  zero_async(v.z_QH, stream);
  if (R > 0) {
    CUDA_CHECK(cuda::launch::fold_weighted(s.y_RH.raw_data(), true, v.row_recv.data<int64_t>(),
                                           v.row_entry.data<int64_t>(), v.recv_w.data<float>(), C, v.z_QH.data<float>(),
                                           R, Q, H, v.workspace.raw_data(), v.workspace.num_bytes(), nullptr, stream));
  }
  g.all_to_all_v(v.z_QH, v.recv_counts, v.back_SH, v.send_counts);
  zero_async(v.acc_NH, stream);
  if (S > 0) {
    CUDA_CHECK(cuda::launch::scatter_add_rows(v.back_SH.raw_data(), false, v.send_token.data<int64_t>(),
                                              v.acc_NH.data<float>(), S, N, H, v.workspace.raw_data(),
                                              v.workspace.num_bytes(), nullptr, stream));
  }
  CUDA_CHECK(launch::add_to_bf16(v.acc_NH.data<float>(), nullptr, bits(out_NH), N * H, stream));
}

void CudaMoeLayer::vexpert_backward(const Tensor& dout_NH, float* dtopk_NK) {
  const comm::Mesh& mesh = *opts_.mesh;
  comm::Comm& g = mesh.ep_etp();
  const int64_t H = cfg_.hidden, K = cfg_.top_k, N = dout_NH.size(0);
  const cudaStream_t stream = opts_.stream;
  const int64_t row_bytes = H * static_cast<int64_t>(sizeof(bf16));
  CudaMoeSaved& s = saved_;
  VExpert& v = vx_;
  const int64_t S = v.S, Q = v.Q, C = v.C, R = s.offsets.back();

  // Combine backward: dout rows to where the partials were folded (bf16: the rows are exact copies).
  if (S > 0) {
    CUDA_CHECK(cuda::launch::gather_rows(dout_NH.raw_data(), v.send_SH.raw_data(), v.send_token.data<int64_t>(), S, N,
                                         row_bytes, nullptr, stream));
  }
  g.all_to_all_v(v.send_SH, v.send_counts, v.recv_QH, v.recv_counts);
  if (dtopk_NK != nullptr) zero_async(v.dw_QC, stream);
  CUDA_CHECK(launch::vexpert_combine_backward(bits(v.recv_QH), bits(s.y_RH), v.row_recv.data<int64_t>(),
                                              v.row_entry.data<int64_t>(), v.recv_w.data<float>(), C, bits(dy_RH_),
                                              dtopk_NK != nullptr ? v.dw_QC.data<float>() : nullptr, R, H, stream));
  if (dtopk_NK != nullptr) {
    // The (rows, K) gradient table goes back; the T copies of each slot sum into dw[n, k].
    g.all_to_all_v(v.dw_QC, v.recv_counts, v.dw_SC, v.send_counts);
    CUDA_CHECK(launch::vexpert_weight_grad(v.dw_SC.data<float>(), v.tok_begin.data<int64_t>(),
                                           v.tok_rows.data<int64_t>(), dtopk_NK, N, K, stream));
  }
  for_expert_chunks([this](int64_t e0, int64_t e1, cudaStream_t st) { experts_backward(e0, e1, st); });
  // experts_backward left dx_RH in dy_RH_. Dispatch backward: sum per received row, send back, sum
  // per token (f32 throughout).
  zero_async(v.z_QH, stream);
  if (R > 0) {
    CUDA_CHECK(cuda::launch::scatter_add_rows(dy_RH_.raw_data(), true, v.row_recv.data<int64_t>(), v.z_QH.data<float>(),
                                              R, Q, H, v.workspace.raw_data(), v.workspace.num_bytes(), nullptr,
                                              stream));
  }
  g.all_to_all_v(v.z_QH, v.recv_counts, v.back_SH, v.send_counts);
  zero_async(v.acc_NH, stream);
  if (S > 0) {
    CUDA_CHECK(cuda::launch::scatter_add_rows(v.back_SH.raw_data(), false, v.send_token.data<int64_t>(),
                                              v.acc_NH.data<float>(), S, N, H, v.workspace.raw_data(),
                                              v.workspace.num_bytes(), nullptr, stream));
  }
}

void CudaMoeLayer::forward_into(const Tensor& x_NH, Tensor& out_NH) {
  const int64_t H = cfg_.hidden, E = cfg_.num_experts, K = cfg_.top_k;
  MOETP_CHECK(x_NH.defined() && x_NH.ndim() == 2 && x_NH.size(1) == H,
              "CudaMoeLayer::forward: x must be (N, {}), got {}", H,
              x_NH.defined() ? x_NH.describe() : std::string("undefined"));
  const int64_t N = x_NH.size(0), M = N * K;
  check_cuda_tensor(x_NH, DType::kBF16, {N, H}, "CudaMoeLayer::forward x_NH");
  has_forward_ = false;
  routed_tokens_ = -1;
  reserve(N);
  CudaMoeSaved& s = saved_;
  s.x_NH = x_NH;
  ensure_output(out_NH, N, H);
  s.counts_E.assign(static_cast<size_t>(E), 0);
  const cudaStream_t stream = opts_.stream;

  if (N > 0) {
    // Router logits in f32: row-major logits (N, E) = x · wgᵀ  <=>  column-major logitsᵀ (E × N) =
    // op_T(wg as column-major H × E) · x (H × N).
    gemm_f32_out("CudaMoeLayer router logits", stream, CUBLAS_OP_T, CUBLAS_OP_N, E, N, H, params_.wg_EH.raw_data(), H,
                 x_NH.raw_data(), H, s.logits_NE.data<float>(), E);
    CUDA_CHECK(cuda::launch::router_forward(s.logits_NE.data<float>(), s.probs_NE.data<float>(),
                                            s.topk_idx_NK.data<int32_t>(), s.topk_weight_NK.data<float>(), N, E, K,
                                            cfg_.norm_topk_prob, stream));
    if (opts_.force_balance) {
      CUDA_CHECK(launch::force_balance_routing(s.topk_idx_NK.data<int32_t>(), s.topk_weight_NK.data<float>(), N, K,
                                               E, stream));
    }
    // The plan on the GPU; only the per-expert counts come back (collective sizes, GEMM offsets).
    CUDA_CHECK(launch::routing_plan(s.topk_idx_NK.data<int32_t>(), N, K, E, plan_workspace_.raw_data(),
                                    plan_workspace_.num_bytes(), s.flat_M.data<int32_t>(), s.token_M.data<int64_t>(),
                                    s.pos_NK.data<int32_t>(), counts_dev_E_.data<int32_t>(), stream));
    CUDA_CHECK(cudaMemcpyAsync(counts_host_.get(), counts_dev_E_.raw_data(), static_cast<size_t>(E) * sizeof(int32_t),
                               cudaMemcpyDeviceToHost, stream));
    if (vexpert()) {
      // The routing itself goes to the host for the vexpert plan (pageable: returns once copied).
      vx_.idx_host.resize(static_cast<size_t>(M));
      vx_.weight_host.resize(static_cast<size_t>(M));
      CUDA_CHECK(cudaMemcpyAsync(vx_.idx_host.data(), s.topk_idx_NK.raw_data(), static_cast<size_t>(M) * sizeof(int32_t),
                                 cudaMemcpyDeviceToHost, stream));
      CUDA_CHECK(cudaMemcpyAsync(vx_.weight_host.data(), s.topk_weight_NK.raw_data(),
                                 static_cast<size_t>(M) * sizeof(float), cudaMemcpyDeviceToHost, stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int64_t e = 0; e < E; ++e) s.counts_E[static_cast<size_t>(e)] = counts_host_.get()[e];
    // Every id from the router is in [0, E); a shortfall means a broken plan, not bad input.
    MOETP_CHECK(comm::sum_counts(s.counts_E) == M, "CudaMoeLayer: per-expert counts sum to {}, expected N·K = {}",
                comm::sum_counts(s.counts_E), M);
    if (!vexpert()) {
      CUDA_CHECK(cuda::launch::gather_rows(x_NH.raw_data(), s.x_MH.raw_data(), s.token_M.data<int64_t>(), M, N,
                                           H * static_cast<int64_t>(sizeof(bf16)), nullptr, stream));
    }
  } else if (vexpert()) {
    vx_.idx_host.clear();
    vx_.weight_host.clear();
  }
  routed_tokens_ = N;
  if (vexpert()) {
    // Collective even when this rank has no tokens.
    vexpert_plan(N);
    vexpert_buffers(N);
    vexpert_dispatch(x_NH);
    vexpert_combine(out_NH);
    has_forward_ = true;
    return;
  }
  if (distributed()) {
    plan_exchange();  // collective even when this rank has no tokens
    upload_exchange();
    move_to_experts(s.x_MH, s.x_RH);
  } else {
    s.offsets.assign(static_cast<size_t>(E) + 1, 0);
    for (int64_t e = 0; e < E; ++e) s.offsets[e + 1] = s.offsets[e] + s.counts_E[static_cast<size_t>(e)];
    reserve_expert_side(M);
  }
  for_expert_chunks([this](int64_t e0, int64_t e1, cudaStream_t st) { experts_forward(e0, e1, st); });
  if (distributed()) move_to_slots(s.y_RH, s.y_MH);
  if (N > 0) {
    CUDA_CHECK(launch::combine_rows(bits(s.y_MH), s.pos_NK.data<int32_t>(), s.topk_weight_NK.data<float>(), nullptr,
                                    bits(out_NH), N, K, H, stream));
  }
  has_forward_ = true;
}

void CudaMoeLayer::recompute_forward(const Tensor& x_NH) {
  const int64_t H = cfg_.hidden, K = cfg_.top_k;
  MOETP_CHECK(routed_tokens_ >= 0 && !has_forward_,
              "CudaMoeLayer::recompute_forward needs a forward whose rows were released (release_rows)");
  check_cuda_tensor(x_NH, DType::kBF16, {routed_tokens_, H}, "CudaMoeLayer::recompute_forward x_NH");
  const int64_t N = routed_tokens_, M = N * K;
  CudaMoeSaved& s = saved_;
  s.x_NH = x_NH;
  const cudaStream_t stream = opts_.stream;
  if (vexpert()) {
    vexpert_buffers(N);
    vexpert_dispatch(x_NH);  // the backward reads the experts' outputs y_RH, not the combined rows
    has_forward_ = true;
    return;
  }
  s.x_MH = device_empty({M, H}, DType::kBF16);
  s.y_MH = device_empty({M, H}, DType::kBF16);
  if (N > 0) {
    CUDA_CHECK(cuda::launch::gather_rows(x_NH.raw_data(), s.x_MH.raw_data(), s.token_M.data<int64_t>(), M, N,
                                         H * static_cast<int64_t>(sizeof(bf16)), nullptr, stream));
  }
  if (distributed()) {
    upload_exchange();
    move_to_experts(s.x_MH, s.x_RH);
  } else {
    reserve_expert_side(M);
  }
  for_expert_chunks([this](int64_t e0, int64_t e1, cudaStream_t st) { experts_forward(e0, e1, st); });
  if (distributed()) move_to_slots(s.y_RH, s.y_MH);  // the combine backward reads the slot rows
  has_forward_ = true;
}

void CudaMoeLayer::for_expert_chunks(const std::function<void(int64_t, int64_t, cudaStream_t)>& fn) {
  const int64_t L = L_;
  const int64_t S = static_cast<int64_t>(streams_.side.size());
  if (S <= 1 || opts_.expert_gemm == ExpertGemm::kGrouped) {
    fn(0, L, opts_.stream);
    return;
  }
  // Chunk c ends at the first expert whose rows start at or after c/S of all rows.
  const std::vector<int64_t>& off = saved_.offsets;
  const int64_t R = off[L];
  std::vector<int64_t> bounds{0};
  for (int64_t c = 1; c < S; ++c) {
    const int64_t target = c * R / S;
    const int64_t e = std::lower_bound(off.begin(), off.end(), target) - off.begin();
    bounds.push_back(std::clamp(e, bounds.back(), L));
  }
  bounds.push_back(L);
  CUDA_CHECK(cudaEventRecord(streams_.fork, opts_.stream));
  for (int64_t c = 0; c < S; ++c) {
    if (off[bounds[c + 1]] == off[bounds[c]]) continue;  // no rows
    cudaStream_t side = streams_.side[c];
    CUDA_CHECK(cudaStreamWaitEvent(side, streams_.fork, 0));
    fn(bounds[c], bounds[c + 1], side);
    CUDA_CHECK(cudaEventRecord(streams_.join[c], side));
    CUDA_CHECK(cudaStreamWaitEvent(opts_.stream, streams_.join[c], 0));
  }
}

namespace {
// Offsets of experts [e0, e1] relative to their first row.
std::vector<int64_t> chunk_offsets(const std::vector<int64_t>& off, int64_t e0, int64_t e1) {
  std::vector<int64_t> sub(off.begin() + e0, off.begin() + e1 + 1);
  for (int64_t& o : sub) o -= off[e0];
  return sub;
}
}  // namespace

void CudaMoeLayer::experts_forward(int64_t e0, int64_t e1, cudaStream_t stream) {
  CudaMoeSaved& s = saved_;
  const int64_t r0 = s.offsets[e0], rows = s.offsets[e1] - r0, i = i_;
  if (rows == 0) return;
  const Tensor x = s.x_RH.narrow_rows(r0, rows);
  Tensor h = s.h_M2I.narrow_rows(r0, rows), a = s.a_MI.narrow_rows(r0, rows), y = s.y_RH.narrow_rows(r0, rows);
  if (opts_.expert_gemm == ExpertGemm::kGrouped) {
    MOETP_CHECK(e0 == 0 && e1 == L_, "the grouped GEMM runs over all local experts");
    const size_t bytes = static_cast<size_t>(L_ + 1) * sizeof(int64_t);
    std::memcpy(offsets_host_.get(), s.offsets.data(), bytes);
    CUDA_CHECK(cudaMemcpyAsync(offsets_dev_L1_.raw_data(), offsets_host_.get(), bytes, cudaMemcpyHostToDevice, stream));
    cuda::grouped_gemm_fwd(x, offsets_dev_L1_, params_.w13_L2iH, h, stream);
    CUDA_CHECK(cuda::launch::swiglu_forward(bits(h), bits(a), rows, i, stream));
    cuda::grouped_gemm_fwd(a, offsets_dev_L1_, params_.w2_LHi, y, stream);
    return;
  }
  const std::vector<int64_t> off = chunk_offsets(s.offsets, e0, e1);
  cuda::grouped_linear(x, off, params_.w13_L2iH.narrow_rows(e0, e1 - e0), h, stream);
  CUDA_CHECK(cuda::launch::swiglu_forward(bits(h), bits(a), rows, i, stream));
  cuda::grouped_linear(a, off, params_.w2_LHi.narrow_rows(e0, e1 - e0), y, stream);
}

void CudaMoeLayer::experts_backward(int64_t e0, int64_t e1, cudaStream_t stream) {
  CudaMoeSaved& s = saved_;
  const int64_t r0 = s.offsets[e0], rows = s.offsets[e1] - r0, i = i_;
  Tensor dw13 = grads_.w13_L2iH.narrow_rows(e0, e1 - e0), dw2 = grads_.w2_LHi.narrow_rows(e0, e1 - e0);
  // First backward after zero_grads: the grouped weight gradient overwrites (empty experts get
  // zeros; no rows at all: a memset). Still pending here only on the grouped path (one chunk over
  // every expert: begin_expert_grads zeroed the cuBLAS path's gradients); backward_into clears it.
  const bool overwrite = expert_grads_zero_pending_;
  if (rows == 0) {
    // Only on the grouped path (one chunk, the layer stream): no rows at all.
    if (overwrite) zero_expert_grads_async();
    return;
  }
  const Tensor w13 = params_.w13_L2iH.narrow_rows(e0, e1 - e0), w2 = params_.w2_LHi.narrow_rows(e0, e1 - e0);
  const Tensor x = s.x_RH.narrow_rows(r0, rows), h = s.h_M2I.narrow_rows(r0, rows), a = s.a_MI.narrow_rows(r0, rows);
  Tensor dy = dy_RH_.narrow_rows(r0, rows), da = da_MI_.narrow_rows(r0, rows), dh = dh_M2I_.narrow_rows(r0, rows);
  if (opts_.expert_gemm == ExpertGemm::kGrouped) {
    // The offsets forward uploaded are still on the device (a backward follows its own forward).
    MOETP_CHECK(e0 == 0 && e1 == L_, "the grouped GEMM runs over all local experts");
    cuda::grouped_gemm_dgrad(dy, offsets_dev_L1_, w2, da, stream);
    cuda::grouped_gemm_wgrad(dy, a, offsets_dev_L1_, dw2, stream, -1, !overwrite);
    CUDA_CHECK(cuda::launch::swiglu_backward(bits(h), bits(da), bits(dh), rows, i, stream));
    // dx_RH goes into dy's rows: both w2 products above have consumed them (same stream).
    cuda::grouped_gemm_wgrad(dh, x, offsets_dev_L1_, dw13, stream, -1, !overwrite);
    cuda::grouped_gemm_dgrad(dh, offsets_dev_L1_, w13, dy, stream);
    return;
  }
  const std::vector<int64_t> off = chunk_offsets(s.offsets, e0, e1);
  cuda::grouped_linear_backward(dy, a, off, w2, &da, &dw2, stream);
  CUDA_CHECK(cuda::launch::swiglu_backward(bits(h), bits(da), bits(dh), rows, i, stream));
  // dx_RH goes into dy's rows: the w2 backward above has consumed them (same stream).
  cuda::grouped_linear_backward(dh, x, off, w13, &dy, &dw13, stream);
}

Tensor CudaMoeLayer::forward(const Tensor& x_NH) {
  Tensor out;
  forward_into(x_NH, out);
  return out;
}

void CudaMoeLayer::backward_into(const Tensor& dout_NH, const Tensor& d_probs_NE, Tensor& dx_NH) {
  MOETP_CHECK(has_forward_, "CudaMoeLayer::backward needs a forward first (each forward allows one backward)");
  const int64_t H = cfg_.hidden, E = cfg_.num_experts, K = cfg_.top_k;
  CudaMoeSaved& s = saved_;
  const int64_t N = s.x_NH.size(0), M = N * K;
  check_cuda_tensor(dout_NH, DType::kBF16, {N, H}, "CudaMoeLayer::backward dout_NH");
  if (d_probs_NE.defined()) check_cuda_tensor(d_probs_NE, DType::kF32, {N, E}, "CudaMoeLayer::backward d_probs_NE");
  has_forward_ = false;
  ensure_output(dx_NH, N, H);
  const cudaStream_t stream = opts_.stream;
  // Forced routing weights are constants: only an aux-loss gradient reaches the router then.
  const bool routed_grad = !opts_.force_balance;
  const bool router_grad = routed_grad || d_probs_NE.defined();

  // The backward's own buffers, released on return (every path).
  begin_backward_buffers();
  struct Release {
    CudaMoeLayer* layer;
    ~Release() { layer->end_backward_buffers(); }
  } release{this};

  // Combine backward: dy = w · dout[token], and the routing-weight gradient <dout[n], y[i]>.
  float* dtopk = routed_grad ? dtopk_weight_NK_.data<float>() : nullptr;
  begin_expert_grads();
  if (vexpert()) {
    vexpert_backward(dout_NH, dtopk);
  } else {
    if (N > 0) {
      CUDA_CHECK(launch::combine_backward(bits(dout_NH), bits(s.y_MH), s.flat_M.data<int32_t>(),
                                          s.topk_weight_NK.data<float>(), bits(dy_MH_), dtopk, M, K, H, stream));
    }
    if (distributed()) move_to_experts(dy_MH_, dy_RH_);
    for_expert_chunks([this](int64_t e0, int64_t e1, cudaStream_t st) { experts_backward(e0, e1, st); });
    // experts_backward overwrites dy_RH with dx_RH; on a mesh it comes back into dy_MH's rows.
    if (distributed()) move_to_slots(dy_RH_, dy_MH_);
  }
  expert_grads_zero_pending_ = false;  // every expert chunk has overwritten or added (experts_backward)
  if (N == 0) return;
  const Tensor& dx_MH = dy_MH_;

  const float* dx_router = nullptr;
  if (router_grad) {
    CUDA_CHECK(cuda::launch::router_logits_grad(
        s.probs_NE.data<float>(), s.topk_idx_NK.data<int32_t>(), s.topk_weight_NK.data<float>(), dtopk,
        d_probs_NE.defined() ? d_probs_NE.data<float>() : nullptr, dlogits_NE_.data<float>(), N, E, K,
        cfg_.norm_topk_prob, nullptr, stream));
    // The router GEMMs take bf16 operands: dlogits is rounded once.
    CUDA_CHECK(cuda::launch::cast_f32_to_bf16(dlogits_NE_.data<float>(), bits(dlogits_bf16_NE_), N * E, stream));
    cuda::linear_backward(dlogits_bf16_NE_, s.x_NH, params_.wg_EH, nullptr, &grads_.wg_EH, stream);
    // Row-major dx_router (N, H) = dlogits (N, E) · wg (E, H)  <=>  column-major dxᵀ (H × N) =
    // wg (H × E) · dlogitsᵀ (E × N); kept in f32 and added to the expert part before rounding.
    gemm_f32_out("CudaMoeLayer router dx", stream, CUBLAS_OP_N, CUBLAS_OP_N, H, N, E, params_.wg_EH.raw_data(), H,
                 dlogits_bf16_NE_.raw_data(), E, dx_router_NH_.data<float>(), H);
    dx_router = dx_router_NH_.data<float>();
  }
  if (vexpert()) {
    CUDA_CHECK(launch::add_to_bf16(vx_.acc_NH.data<float>(), dx_router, bits(dx_NH), N * H, stream));
    return;
  }
  CUDA_CHECK(
      launch::combine_rows(bits(dx_MH), s.pos_NK.data<int32_t>(), nullptr, dx_router, bits(dx_NH), N, K, H, stream));
}

Tensor CudaMoeLayer::backward(const Tensor& dout_NH, const Tensor& d_probs_NE) {
  Tensor dx;
  backward_into(dout_NH, d_probs_NE, dx);
  return dx;
}

}  // namespace moetp::moe
