// NCCL backend of Comm: CUDA tensors, one process per GPU, NCCL collectives on a communication
// stream of the communicator's own. The CUDA path's counterpart of MpiComm (the spec): same calls,
// same semantics, same argument agreement and the same error messages, so the EP x ETP dispatch and
// gradient reductions run unchanged on either backend (tests/dist/nccl_collectives_test.cpp holds
// this backend bit-exactly to MpiComm).
//
// How each Comm call maps onto NCCL (counts are rows of dim 0, host values from the caller):
//   broadcast         ncclBroadcast, in place, as bytes
//   all_reduce        ncclAllReduce, in place; sum/max on f32, bf16, i32, i64
//   all_gather        ncclAllGather, as bytes
//   all_gather_v      one ncclBroadcast per rank with rows, inside one ncclGroupStart/End; `in`
//                     may be this rank's own block of `out` (in place: NCCL's send buffer ==
//                     receive buffer on the root; CudaMoeLayer's etp exchange relies on it)
//   reduce_scatter    ncclReduceScatter; f32, bf16, i32, i64
//   reduce_scatter_v  one ncclReduce per destination rank with rows (root = that rank), one group;
//                     `out` may be this rank's own block of `in` (in place, as above)
//   all_to_all_v      ncclSend/ncclRecv per peer with rows, one group; the self piece is a
//                     cudaMemcpyAsync on the communication stream
//   split             MPI_Comm_split of the host communicator + ncclCommSplit (same color, key)
//   barrier           a 1-element ncclAllReduce, then the host waits for the communication stream
// Zero-row pieces issue no NCCL call (every rank skips the same pieces, since counts are agreed).
// Unlike MPI, NCCL reduces bf16 natively, so reductions accept bf16 here (MpiComm rejects it):
// each partial sum is rounded to bf16, in an order NCCL chooses, so bf16 sums are exact only when
// every partial sum is representable (small integers), and are not reproducible across algorithms.
//
// Argument agreement (set_validate, default on): before any data moves, the same words MpiComm
// agrees on (dtype, row width, counts, root, reduce op, and whether each rank's own arguments are
// valid) are exchanged with one MPI_Allgather over the host communicator this object owns; a
// mismatch or a local error on any rank becomes the same moetp::Error on every rank (the messages
// read as MpiComm's), so NCCL is never entered with arguments that would hang or corrupt memory,
// and the communicator stays usable. set_validate(false) skips the exchange (no host round trip per
// call, for performance runs): local errors are then thrown on the failing rank only, and arguments
// that disagree across ranks hang NCCL or corrupt memory.
//
// Stream semantics (every collective): the communication stream first waits for the work already
// enqueued on the compute stream (an event; the legacy default stream unless set_compute_stream
// named another), the collective is enqueued on the communication stream, and the compute stream
// is then made to wait for its completion (another event). The call returns without waiting for
// the GPU; work the caller enqueues on the compute stream afterwards, and the blocking copies of
// Tensor::to / to_vector (legacy default stream), see the result. A compute stream created with
// cudaStreamNonBlocking does not order the legacy default stream: a caller using one synchronises it
// before reading results through Tensor::to. Input tensors must stay allocated until the collective
// has run: core's CUDA allocator frees with cudaFree, which waits for the device, so dropping a
// tensor right after a call is safe.
//
// Threading: one thread per communicator; the CUDA device current at create() must be current at
// every call (checked, and agreed like any other argument).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "comm/comm.h"

namespace moetp::comm::detail {
struct Agreement;
}

namespace moetp::comm {

class NcclComm final : public Comm {
 public:
  // Collective over `host` (every member calls it, in the same order as other collectives). The
  // caller has selected this rank's GPU (cuda::init(local_rank)) before; the communicator uses
  // that device. Duplicates `host` (the NcclComm owns its own MpiComm for argument agreement, so
  // `host` may be destroyed first); rank 0 creates the NCCL unique id and broadcasts it over host;
  // every member then calls ncclCommInitRank. Ranks equal host's ranks. Throws moetp::Error (on
  // every rank alike) when a member has no CUDA device selected or rank 0 cannot create the id.
  static std::unique_ptr<NcclComm> create(Comm& host, std::string name);
  ~NcclComm() override;  // waits for the communication stream, then destroys the communicator
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return name_; }
  Device device() const override { return Device::kCuda; }

  // The stream every collective runs on (non-blocking; owned by this object).
  cudaStream_t stream() const { return stream_; }
  // Work the collectives are ordered against (see the header comment). nullptr = the legacy
  // default stream (the default). The stream must belong to this communicator's device and outlive
  // its use here. Local: no communication. Inherited by split().
  void set_compute_stream(cudaStream_t compute_stream) override { compute_stream_ = compute_stream; }
  cudaStream_t compute_stream() const override { return compute_stream_; }
  // Cross-rank argument agreement before every collective (default on; see the header comment).
  // Must be set to the same value on every member. Inherited by split().
  void set_validate(bool validate) { validate_ = validate; }
  bool validate() const { return validate_; }
  // The host communicator used for agreement (same ranks and size as this one).
  Comm& host() override { return *host_; }
  // Agreement through host() (with validation off: local errors only, locally).
  void agree(const char* op, detail::Agreement& a) override;
  ncclComm_t raw() const { return comm_; }
  int cuda_device() const { return device_; }

  // Returns once every member has reached the barrier and this member's earlier collectives and
  // compute-stream work have completed on the GPU.
  void barrier() override;
  void broadcast(Tensor& t, int root) override;
  void all_reduce(Tensor& t, ReduceOp op) override;
  void all_gather(const Tensor& in, Tensor& out) override;
  void all_gather_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) override;
  void reduce_scatter(const Tensor& in, Tensor& out) override;
  void reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) override;
  void all_to_all_v(const Tensor& in, std::span<const int64_t> send_counts, Tensor& out,
                    std::span<const int64_t> recv_counts) override;
  // Collective over this communicator: a new NcclComm over the members with the same color, ranked
  // by (key, rank), with its own split host communicator; validate and compute stream carry over.
  std::unique_ptr<Comm> split(int color, int key, std::string name) override;

 private:
  // Takes ownership of `host` (same members and order as `comm`) and of `comm`.
  NcclComm(std::unique_ptr<Comm> host, ncclComm_t comm, std::string name);

  // Local checks every call makes (device current, no asynchronous NCCL error); "" when fine.
  std::string local_state_error() const;
  // Orders the communication stream after the compute stream, and back (see the header comment).
  void enter_stream();
  void leave_stream();
  // "{call} failed on group 'g' (rank r of n, CUDA device d): {status}; {sizes}"
  std::string failure(const char* call, const std::string& status, const std::string& sizes) const;

  std::unique_ptr<Comm> host_;
  ncclComm_t comm_ = nullptr;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  int device_ = -1;
  bool validate_ = true;
  cudaStream_t stream_ = nullptr;          // owned
  cudaStream_t compute_stream_ = nullptr;  // not owned; nullptr = legacy default stream
  cudaEvent_t compute_ready_ = nullptr;    // recorded on the compute stream before a collective
  cudaEvent_t comm_done_ = nullptr;        // recorded on the communication stream after it
  Tensor barrier_buf_;                     // i32[1] on the device, for barrier()
};

}  // namespace moetp::comm
