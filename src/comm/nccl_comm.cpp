// NCCL backend of Comm (see nccl_comm.h for the mapping onto NCCL, the argument agreement and the
// stream semantics). The argument rules are comm/agreement.h's, shared with the MPI backend, so a
// bad call reads the same on both; only the device wording differs.
#include "comm/nccl_comm.h"

#include "comm/agreement.h"

#include <fmt/ranges.h>

#include <climits>
#include <cstring>
#include <functional>

#include "kernels/cuda/cuda_check.h"

namespace moetp::comm {

// Status checks inside NcclComm members: the message names the call, the group, this rank, the
// device and `context` (the tensors and counts; an expression evaluated only on failure).
#define MOETP_NCCL_OP(call, context)                                                                 \
  do {                                                                                             \
    const ncclResult_t moetp_nccl_ = (call);                                                       \
    if (moetp_nccl_ != ncclSuccess) [[unlikely]] {                                                 \
      const std::string moetp_status_ =                                                            \
          fmt::format("{} ({})", ncclGetErrorString(moetp_nccl_), ncclGetLastError(comm_));        \
      ::moetp::detail::throw_error(__FILE__, __LINE__, failure(#call, moetp_status_, context));    \
    }                                                                                              \
  } while (0)

#define MOETP_CUDA_OP(call, context)                                                               \
  do {                                                                                             \
    const cudaError_t moetp_cuda_ = (call);                                                        \
    if (moetp_cuda_ != cudaSuccess) [[unlikely]] {                                                 \
      const std::string moetp_status_ = cudaGetErrorString(moetp_cuda_);                           \
      ::moetp::detail::throw_error(__FILE__, __LINE__, failure(#call, moetp_status_, context));    \
    }                                                                                              \
  } while (0)

namespace {

ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::kF32: return ncclFloat32;
    case DType::kBF16: return ncclBfloat16;
    case DType::kI32: return ncclInt32;
    case DType::kI64: return ncclInt64;
  }
  MOETP_FAIL("dtype {} has no NCCL type", static_cast<int>(d));
}

using detail::Agreement;

const detail::BackendTraits kNccl{Device::kCuda, "the NCCL backend takes CUDA tensors", true, "NCCL"};

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

// Pointer to row `row` of a contiguous tensor whose rows are `row_bytes` long.
char* row_ptr(const Tensor& t, int64_t row, size_t row_bytes) {
  return static_cast<char*>(t.raw_data()) + static_cast<size_t>(row) * row_bytes;
}

size_t row_bytes_of(const Tensor& t) { return static_cast<size_t>(t.row_numel()) * t.element_size(); }

std::string counts_str(std::span<const int64_t> counts) { return fmt::format("[{}]", fmt::join(counts, ", ")); }

std::vector<int64_t> offsets_of(std::span<const int64_t> counts) {
  std::vector<int64_t> off(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) off[i] = off[i - 1] + counts[i - 1];
  return off;
}

// Ends an NCCL group on unwind (an error inside the group); NCCL then discards the group's work.
class GroupCloser {
 public:
  GroupCloser() = default;
  ~GroupCloser() {
    if (open_) ncclGroupEnd();
  }
  GroupCloser(const GroupCloser&) = delete;
  GroupCloser& operator=(const GroupCloser&) = delete;
  void closed() { open_ = false; }

 private:
  bool open_ = true;
};

}  // namespace

// ---- construction ----

std::unique_ptr<NcclComm> NcclComm::create(Comm& host, std::string name) {
  MOETP_CHECK(host.device() == Device::kCpu, "NcclComm::create '{}': the host communicator '{}' must be a host (cpu) "
              "backend, got {}", name, host.name(), device_name(host.device()));
  // Our own copy of the group (same members, same order), so `host` may be destroyed first.
  std::unique_ptr<Comm> own = host.split(0, host.rank(), name);
  // Agree that every member is ready before any enters ncclCommInitRank, which would wait forever
  // for a member that threw.
  std::string local;
  int device = -1;
  if (!device_available(Device::kCuda)) {
    local = "no CUDA device is registered (call cuda::init(local_rank) before NcclComm::create)";
  } else if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    cudaGetLastError();
    local = fmt::format("cudaGetDevice failed: {}", cudaGetErrorString(err));
  }
  own->raise_if_any(local, "NcclComm::create");

  ncclUniqueId id{};
  int status = ncclSuccess;
  if (own->rank() == 0) status = ncclGetUniqueId(&id);
  status = static_cast<int>(own->all_reduce_scalar(int64_t{status}, ReduceOp::kMax));  // rank 0's; others are 0
  static_assert(sizeof(id) % sizeof(int32_t) == 0);
  Tensor id_words = Tensor::empty({static_cast<int64_t>(sizeof(id) / sizeof(int32_t))}, DType::kI32);
  std::memcpy(id_words.raw_data(), &id, sizeof(id));
  own->broadcast(id_words, 0);
  std::memcpy(&id, id_words.raw_data(), sizeof(id));
  MOETP_CHECK(status == ncclSuccess, "NcclComm::create on group '{}': ncclGetUniqueId failed on rank 0: {}", name,
              ncclGetErrorString(static_cast<ncclResult_t>(status)));

  ncclComm_t comm = nullptr;
  const ncclResult_t init = ncclCommInitRank(&comm, own->size(), id, own->rank());
  std::string init_error;
  if (init != ncclSuccess) {
    init_error = fmt::format("ncclCommInitRank (rank {} of {}, CUDA device {}) failed: {} ({})", own->rank(),
                             own->size(), device, ncclGetErrorString(init), ncclGetLastError(nullptr));
  }
  try {
    own->raise_if_any(init_error, "NcclComm::create");
  } catch (...) {
    if (comm != nullptr) ncclCommAbort(comm);
    throw;
  }
  return std::unique_ptr<NcclComm>(new NcclComm(std::move(own), comm, std::move(name)));
}

NcclComm::NcclComm(std::unique_ptr<Comm> host, ncclComm_t comm, std::string name)
    : host_(std::move(host)), comm_(comm), name_(std::move(name)) {
  rank_ = host_->rank();
  size_ = host_->size();
  try {
    MOETP_CUDA_OP(cudaGetDevice(&device_), "");
    int nccl_rank = -1, nccl_size = -1, nccl_device = -1;
    MOETP_NCCL_OP(ncclCommUserRank(comm_, &nccl_rank), "");
    MOETP_NCCL_OP(ncclCommCount(comm_, &nccl_size), "");
    MOETP_NCCL_OP(ncclCommCuDevice(comm_, &nccl_device), "");
    MOETP_CHECK(nccl_rank == rank_ && nccl_size == size_ && nccl_device == device_,
                "NCCL communicator '{}' is rank {} of {} on CUDA device {}, but its host communicator is rank "
                "{} of {} and the current device is {}",
                name_, nccl_rank, nccl_size, nccl_device, rank_, size_, device_);
    MOETP_CUDA_OP(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "");
    MOETP_CUDA_OP(cudaEventCreateWithFlags(&compute_ready_, cudaEventDisableTiming), "");
    MOETP_CUDA_OP(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming), "");
    barrier_buf_ = Tensor::zeros({1}, DType::kI32, Device::kCuda);
  } catch (...) {
    // The destructor does not run for a half-built object: release what was made.
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (compute_ready_ != nullptr) cudaEventDestroy(compute_ready_);
    if (comm_done_ != nullptr) cudaEventDestroy(comm_done_);
    ncclCommAbort(comm_);
    throw;
  }
}

NcclComm::~NcclComm() {
  // Errors are ignored here: a destructor must not throw, and the process is usually ending.
  cudaStreamSynchronize(stream_);
  ncclResult_t async = ncclSuccess;
  ncclCommGetAsyncError(comm_, &async);
  if (async == ncclSuccess) {
    ncclCommDestroy(comm_);
  } else {
    ncclCommAbort(comm_);
  }
  cudaEventDestroy(compute_ready_);
  cudaEventDestroy(comm_done_);
  cudaStreamDestroy(stream_);
}

std::string NcclComm::failure(const char* call, const std::string& status, const std::string& sizes) const {
  std::string msg = fmt::format("{} failed on group '{}' (rank {} of {}, CUDA device {}): {}", call, name_, rank_,
                                size_, device_, status);
  if (!sizes.empty()) msg += "; " + sizes;
  return msg;
}

// ---- agreement ----

std::string NcclComm::local_state_error() const {
  int current = -1;
  if (const cudaError_t err = cudaGetDevice(&current); err != cudaSuccess) {
    cudaGetLastError();
    return fmt::format("cudaGetDevice failed: {}", cudaGetErrorString(err));
  }
  if (current != device_) {
    return fmt::format("the current CUDA device is {}, but the communicator was created on device {}", current,
                       device_);
  }
  ncclResult_t async = ncclSuccess;
  const ncclResult_t query = ncclCommGetAsyncError(comm_, &async);
  if (query != ncclSuccess || async != ncclSuccess) {
    return fmt::format("the NCCL communicator has failed: {}",
                       ncclGetErrorString(query != ncclSuccess ? query : async));
  }
  return "";
}

// detail::agree over the host communicator, after this member's own state checks; with
// validation off, only a local error is raised, locally.
void NcclComm::agree(const char* op, Agreement& a) {
  const std::string state = local_state_error();
  if (!state.empty()) a.local_error = state;
  if (!validate_) {
    MOETP_CHECK(a.local_error.empty(), "{} on group '{}' (size {}): invalid arguments; rank {}: {}", op, name_,
                size_, rank_, a.local_error);
    return;
  }
  host_->agree(op, a);
}

// ---- streams ----

void NcclComm::enter_stream() {
  const cudaStream_t compute = compute_stream_ != nullptr ? compute_stream_ : cudaStreamLegacy;
  MOETP_CUDA_OP(cudaEventRecord(compute_ready_, compute), "ordering the communication stream after the compute stream");
  MOETP_CUDA_OP(cudaStreamWaitEvent(stream_, compute_ready_, 0), "");
}

void NcclComm::leave_stream() {
  const cudaStream_t compute = compute_stream_ != nullptr ? compute_stream_ : cudaStreamLegacy;
  MOETP_CUDA_OP(cudaEventRecord(comm_done_, stream_), "ordering the compute stream after the communication stream");
  MOETP_CUDA_OP(cudaStreamWaitEvent(compute, comm_done_, 0), "");
}

// ---- collectives ----

void NcclComm::barrier() {
  Agreement a;
  agree("barrier", a);
  enter_stream();
  MOETP_NCCL_OP(ncclAllReduce(barrier_buf_.raw_data(), barrier_buf_.raw_data(), 1, ncclInt32, ncclSum, comm_, stream_),
                "barrier");
  leave_stream();
  MOETP_CUDA_OP(cudaStreamSynchronize(stream_), "barrier");
}

void NcclComm::broadcast(Tensor& t, int root) {
  Agreement a = detail::broadcast_args(kNccl, size_, t, root);
  agree("broadcast", a);
  if (t.num_bytes() == 0) return;
  enter_stream();
  MOETP_NCCL_OP(ncclBroadcast(t.raw_data(), t.raw_data(), t.num_bytes(), ncclUint8, root, comm_, stream_),
                fmt::format("tensor {}, root {}", t.describe(), root));
  leave_stream();
}

void NcclComm::all_reduce(Tensor& t, ReduceOp op) {
  Agreement a = detail::all_reduce_args(kNccl, t, op);
  agree("all_reduce", a);
  if (t.numel() == 0) return;
  enter_stream();
  MOETP_NCCL_OP(ncclAllReduce(t.raw_data(), t.raw_data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()),
                              nccl_op(op), comm_, stream_),
                fmt::format("tensor {}, op {}", t.describe(), op == ReduceOp::kSum ? "sum" : "max"));
  leave_stream();
}

void NcclComm::all_gather(const Tensor& in, Tensor& out) {
  Agreement a = detail::all_gather_args(kNccl, size_, in, out);
  agree("all_gather", a);
  if (in.num_bytes() == 0) return;
  enter_stream();
  MOETP_NCCL_OP(ncclAllGather(in.raw_data(), out.raw_data(), in.num_bytes(), ncclUint8, comm_, stream_),
                fmt::format("input {}, output {}", in.describe(), out.describe()));
  leave_stream();
}

void NcclComm::all_gather_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) {
  Agreement a = detail::all_gather_v_args(kNccl, rank_, size_, in, out, counts);
  agree("all_gather_v", a);
  if (in.row_numel() == 0 || out.rows() == 0) return;
  // One broadcast per rank with rows, rooted there; on the other ranks the send buffer is the
  // receive buffer (NCCL reads the send buffer on the root only).
  const size_t row_bytes = row_bytes_of(in);
  const std::vector<int64_t> offsets = offsets_of(counts);
  enter_stream();
  {
    MOETP_NCCL_OP(ncclGroupStart(), "all_gather_v");
    GroupCloser group;
    for (int r = 0; r < size_; ++r) {
      if (counts[r] == 0) continue;
      char* dst = row_ptr(out, offsets[r], row_bytes);
      const void* src = r == rank_ ? in.raw_data() : dst;
      MOETP_NCCL_OP(ncclBroadcast(src, dst, static_cast<size_t>(counts[r]) * row_bytes, ncclUint8, r, comm_, stream_),
                    fmt::format("all_gather_v block of rank {} ({} rows); input {}, output {}, counts {}", r,
                                counts[r], in.describe(), out.describe(), counts_str(counts)));
    }
    group.closed();
    MOETP_NCCL_OP(ncclGroupEnd(), fmt::format("all_gather_v of input {} into output {}, counts {}", in.describe(),
                                              out.describe(), counts_str(counts)));
  }
  leave_stream();
}

void NcclComm::reduce_scatter(const Tensor& in, Tensor& out) {
  Agreement a = detail::reduce_scatter_args(kNccl, size_, in, out);
  agree("reduce_scatter", a);
  if (out.numel() == 0) return;
  enter_stream();
  MOETP_NCCL_OP(ncclReduceScatter(in.raw_data(), out.raw_data(), static_cast<size_t>(out.numel()),
                                  nccl_type(in.dtype()), ncclSum, comm_, stream_),
                fmt::format("input {}, output {}", in.describe(), out.describe()));
  leave_stream();
}

void NcclComm::reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) {
  Agreement a = detail::reduce_scatter_v_args(kNccl, rank_, size_, in, out, counts);
  agree("reduce_scatter_v", a);
  if (in.row_numel() == 0 || in.rows() == 0) return;
  // One reduce per destination block, rooted at its owner (the receive buffer matters on the root
  // only, so the other ranks pass none).
  const size_t row_bytes = row_bytes_of(in);
  const std::vector<int64_t> offsets = offsets_of(counts);
  const ncclDataType_t type = nccl_type(in.dtype());
  enter_stream();
  {
    MOETP_NCCL_OP(ncclGroupStart(), "reduce_scatter_v");
    GroupCloser group;
    for (int q = 0; q < size_; ++q) {
      if (counts[q] == 0) continue;
      void* dst = q == rank_ ? out.raw_data() : nullptr;
      MOETP_NCCL_OP(ncclReduce(row_ptr(in, offsets[q], row_bytes), dst, static_cast<size_t>(counts[q] * in.row_numel()),
                               type, ncclSum, q, comm_, stream_),
                    fmt::format("reduce_scatter_v block of rank {} ({} rows); input {}, output {}, counts {}", q,
                                counts[q], in.describe(), out.describe(), counts_str(counts)));
    }
    group.closed();
    MOETP_NCCL_OP(ncclGroupEnd(), fmt::format("reduce_scatter_v of input {} into output {}, counts {}",
                                              in.describe(), out.describe(), counts_str(counts)));
  }
  leave_stream();
}

void NcclComm::all_to_all_v(const Tensor& in, std::span<const int64_t> send_counts, Tensor& out,
                            std::span<const int64_t> recv_counts) {
  Agreement a = detail::all_to_all_v_args(kNccl, size_, in, send_counts, out, recv_counts);
  agree("all_to_all_v", a);
  if (in.row_numel() == 0) return;
  // The agreement has checked this already; without it, the copy to itself must still fit.
  MOETP_CHECK(send_counts[rank_] == recv_counts[rank_],
              "all_to_all_v on group '{}': rank {} sends {} rows to itself but expects {}", name_, rank_,
              send_counts[rank_], recv_counts[rank_]);
  const size_t row_bytes = row_bytes_of(in);
  const std::vector<int64_t> send_offsets = offsets_of(send_counts);
  const std::vector<int64_t> recv_offsets = offsets_of(recv_counts);
  const auto describe_call = [&] {
    return fmt::format("input {}, output {}, send_counts {}, recv_counts {}", in.describe(), out.describe(),
                       counts_str(send_counts), counts_str(recv_counts));
  };
  enter_stream();
  {
    MOETP_NCCL_OP(ncclGroupStart(), describe_call());
    GroupCloser group;
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      if (send_counts[q] > 0) {
        const size_t num_bytes = static_cast<size_t>(send_counts[q]) * row_bytes;
        MOETP_NCCL_OP(ncclSend(row_ptr(in, send_offsets[q], row_bytes), num_bytes, ncclUint8, q, comm_, stream_),
                      fmt::format("send of {} rows to rank {}; {}", send_counts[q], q, describe_call()));
      }
      if (recv_counts[q] > 0) {
        const size_t num_bytes = static_cast<size_t>(recv_counts[q]) * row_bytes;
        MOETP_NCCL_OP(ncclRecv(row_ptr(out, recv_offsets[q], row_bytes), num_bytes, ncclUint8, q, comm_, stream_),
                      fmt::format("receive of {} rows from rank {}; {}", recv_counts[q], q, describe_call()));
      }
    }
    group.closed();
    MOETP_NCCL_OP(ncclGroupEnd(), describe_call());
  }
  if (send_counts[rank_] > 0) {
    void* dst = row_ptr(out, recv_offsets[rank_], row_bytes);
    const void* src = row_ptr(in, send_offsets[rank_], row_bytes);
    const size_t num_bytes = static_cast<size_t>(send_counts[rank_]) * row_bytes;
    MOETP_CUDA_OP(cudaMemcpyAsync(dst, src, num_bytes, cudaMemcpyDeviceToDevice, stream_),
                  fmt::format("copy of {} rows to itself; {}", send_counts[rank_], describe_call()));
  }
  leave_stream();
}

std::unique_ptr<Comm> NcclComm::split(int color, int key, std::string name) {
  Agreement a = detail::split_args(color);
  agree("split", a);
  // Host first (MPI_Comm_split orders by (key, rank) as ncclCommSplit does; the constructor checks
  // that the two agree), then the device communicator.
  std::unique_ptr<Comm> sub_host = host_->split(color, key, name);
  ncclComm_t sub = nullptr;
  MOETP_NCCL_OP(ncclCommSplit(comm_, color, key, &sub, nullptr),
                fmt::format("split '{}', color {}, key {}", name, color, key));
  std::unique_ptr<NcclComm> result(new NcclComm(std::move(sub_host), sub, std::move(name)));
  result->validate_ = validate_;
  result->compute_stream_ = compute_stream_;
  return result;
}

}  // namespace moetp::comm
