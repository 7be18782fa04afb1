// Comm: the collectives moetp needs, over one group of ranks. Backends: MPI (host memory, the CPU
// reference path) and NCCL (device memory, the CUDA path). Every call is collective over the group:
// all members must call it in the same order with consistent arguments.
//
// Counts are in rows of dim 0 (a row = all trailing dims, `Tensor::row_numel()` elements); every
// tensor in one call has the same dtype and row width. Arguments are validated across the group
// before any data moves (counts that disagree between sender and receiver, dtypes or row widths
// that differ between ranks): every member then throws the same moetp::Error naming the values,
// so a bad call never hangs or corrupts memory.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"

// A CUDA stream (cudaStream_t is CUstream_st*), named without CUDA's headers.
struct CUstream_st;

namespace moetp::comm::detail {
struct Agreement;
}

namespace moetp::comm {

enum class ReduceOp { kSum, kMax };

class Comm {
 public:
  virtual ~Comm() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // e.g. "world", "ep", for messages
  virtual Device device() const = 0;     // where this backend's tensors live
  // The same members in the same order, for host (CPU) tensors: this communicator on a host
  // backend; a device backend's own host communicator (counts, scalars, planning tables).
  virtual Comm& host() = 0;
  // Argument agreement before a collective (comm/agreement.h): every member passes the words its
  // call must agree on and its local error; on any mismatch or error every member throws the same
  // moetp::Error. One small host exchange; a device backend agrees through host().
  virtual void agree(const char* op, detail::Agreement& a) = 0;
  // Device backends order their collectives against a compute stream (see nccl_comm.h); nullptr =
  // the legacy default stream. A host backend has none: compute_stream() is nullptr and setting a
  // stream throws, naming the group.
  virtual void set_compute_stream(CUstream_st* stream);
  virtual CUstream_st* compute_stream() const { return nullptr; }

  virtual void barrier() = 0;
  // t (same shape on every rank) takes root's values.
  virtual void broadcast(Tensor& t, int root) = 0;
  // In place, element-wise over ranks. f32, i32, i64.
  virtual void all_reduce(Tensor& t, ReduceOp op) = 0;
  // out = concat over ranks of in; out.rows == size() * in.rows. Equal counts.
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // out = concat over ranks r of in_r, where in_r has counts[r] rows; counts identical on all ranks,
  // counts[rank()] == in.rows, out.rows == sum(counts).
  virtual void all_gather_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) = 0;
  // in.rows == size() * out.rows; out = sum over ranks of block rank() of in. f32, i32, i64.
  virtual void reduce_scatter(const Tensor& in, Tensor& out) = 0;
  // in.rows == sum(counts); out.rows == counts[rank()]; counts identical on all ranks.
  virtual void reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) = 0;
  // Sends in rows [sum(send_counts[0..q)), +send_counts[q]) to rank q; receives recv_counts[q] rows
  // from rank q into out in rank order. send_counts[q] on rank r must equal recv_counts[r] on q.
  virtual void all_to_all_v(const Tensor& in, std::span<const int64_t> send_counts, Tensor& out,
                            std::span<const int64_t> recv_counts) = 0;
  // Members with the same color form a new group, ordered by (key, rank). color >= 0.
  virtual std::unique_ptr<Comm> split(int color, int key, std::string name) = 0;

  // Convenience built on the primitives.
  int64_t all_reduce_scalar(int64_t v, ReduceOp op);
  double all_reduce_scalar(double v, ReduceOp op);
  // Every rank's value, in rank order.
  std::vector<int64_t> all_gather_scalar(int64_t v);
  // Exchanges per-destination counts: returns recv_counts (recv[q] = what q sends to me).
  std::vector<int64_t> exchange_counts(std::span<const int64_t> send_counts);
  // Collective error agreement: every member passes its local error ("" when fine). If any member
  // has one, every member throws the same moetp::Error listing each failing rank's message, so a
  // failure on one rank (NaN logits, bad input) stops the whole group instead of hanging it.
  void raise_if_any(const std::string& local_error, const char* what);
  // Runs fn(); a moetp::Error it throws on any member is re-thrown on every member (see above).
  template <typename Fn>
  void run_collectively(const char* what, Fn&& fn) {
    std::string err;
    try {
      fn();
    } catch (const Error& e) {
      err = e.what();
    }
    raise_if_any(err, what);
  }
};

int64_t sum_counts(std::span<const int64_t> counts);

// This rank's index among the members on its host, and how many members share that host (by host
// name, through the host communicator). Collective.
struct NodeLocal {
  int rank = 0;
  int size = 1;
};
NodeLocal node_local(Comm& group);

}  // namespace moetp::comm
