// MPI backend of Comm: host (CPU) tensors, MPI's own collectives (MPI_Allgatherv, MPI_Alltoallv,
// ...). Arguments are agreed on across the group first (one small MPI_Allgather), so a mismatch
// becomes the same moetp::Error on every rank instead of a hang.
//
// f32 sums (all_reduce kSum, reduce_scatter, reduce_scatter_v) are deterministic: every element is
// ((x_0 + x_1) + x_2) + ... + x_{P-1} over the ranks' values in rank order, computed by the rank
// that owns the element's block after an MPI_Alltoallv (then MPI_Allgatherv for all_reduce). The
// bits therefore do not depend on message size, on how a buffer is split into calls, or on whether
// a sum runs as all_reduce or as reduce_scatter(_v) + all_gather(_v). Integer sums and kMax are
// exact in any order and use MPI_Allreduce / MPI_Reduce_scatter(_block).
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "comm/comm.h"

namespace moetp::comm::detail {
struct Agreement;
}

namespace moetp::comm {

// Initialises MPI (MPI_THREAD_FUNNELED) for the life of the object; finalises on destruction.
// Safe to construct when MPI is already initialised (then it does not finalise).
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

 private:
  bool owns_ = false;
};

class MpiComm final : public Comm {
 public:
  // Duplicates `comm` (so moetp's traffic never mixes with the caller's) and takes ownership.
  MpiComm(MPI_Comm comm, std::string name);
  ~MpiComm() override;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  static std::unique_ptr<MpiComm> world();

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return name_; }
  Device device() const override { return Device::kCpu; }
  Comm& host() override { return *this; }
  void agree(const char* op, detail::Agreement& a) override;
  MPI_Comm raw() const { return comm_; }

  void barrier() override;
  void broadcast(Tensor& t, int root) override;
  void all_reduce(Tensor& t, ReduceOp op) override;
  void all_gather(const Tensor& in, Tensor& out) override;
  void all_gather_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) override;
  void reduce_scatter(const Tensor& in, Tensor& out) override;
  void reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) override;
  void all_to_all_v(const Tensor& in, std::span<const int64_t> send_counts, Tensor& out,
                    std::span<const int64_t> recv_counts) override;
  std::unique_ptr<Comm> split(int color, int key, std::string name) override;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace moetp::comm
