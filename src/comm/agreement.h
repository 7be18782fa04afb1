// Cross-rank argument agreement, shared by every Comm backend (internal to src/comm).
//
// Before a collective moves data, each member contributes a few words (its local verdict, dtype,
// row width, counts) through one MPI_Allgather on the host; every member evaluates the same
// table, so a bad call becomes the same moetp::Error on every member instead of a hang or a
// corrupted buffer, and the group stays usable. The argument rules of each collective live here
// once, so the MPI and NCCL backends accept the same calls and word their errors the same.
#pragma once

#include <mpi.h>

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "comm/comm.h"

namespace moetp::comm::detail {

struct Agreement {
  std::string local_error;     // non-empty when this rank's own arguments are invalid
  std::vector<int64_t> words;  // padded/truncated to num_words; same layout on every rank
  size_t num_words = 0;
  // Given words[r] of every rank r, returns "" when consistent or a message naming the values.
  std::function<std::string(const std::vector<std::vector<int64_t>>&)> check;
};

// Runs the agreement over `comm` (collective). Throws on every member alike:
//   "<op> on group '<group>' (size n): invalid arguments; rank r: <its message>" or
//   "<op> on group '<group>' (size n): <what the check found>".
void agree(MPI_Comm comm, const std::string& group, const char* op, Agreement& a);

// What a backend accepts, for the argument rules and their messages.
struct BackendTraits {
  Device device;            // where its tensors live
  const char* takes;        // "the MPI backend takes host (cpu) tensors"
  bool reduces_bf16;        // whether all_reduce / reduce_scatter accept bf16
  const char* backend;      // "MPI", for "... not supported by the MPI backend"
};

// The argument rules of each collective (local checks, words, cross-rank check).
Agreement broadcast_args(const BackendTraits& b, int size, const Tensor& t, int root);
Agreement all_reduce_args(const BackendTraits& b, const Tensor& t, ReduceOp op);
Agreement all_gather_args(const BackendTraits& b, int size, const Tensor& in, const Tensor& out);
Agreement all_gather_v_args(const BackendTraits& b, int rank, int size, const Tensor& in, const Tensor& out,
                            std::span<const int64_t> counts);
Agreement reduce_scatter_args(const BackendTraits& b, int size, const Tensor& in, const Tensor& out);
Agreement reduce_scatter_v_args(const BackendTraits& b, int rank, int size, const Tensor& in, const Tensor& out,
                                std::span<const int64_t> counts);
Agreement all_to_all_v_args(const BackendTraits& b, int size, const Tensor& in, std::span<const int64_t> send_counts,
                            const Tensor& out, std::span<const int64_t> recv_counts);
Agreement split_args(int color);

// MPI status check for host code in src/comm.
std::string mpi_error_string(int code);
#define MOETP_MPI_CHECK(call) MOETP_STATUS_CHECK(call, MPI_SUCCESS, ::moetp::comm::detail::mpi_error_string)

}  // namespace moetp::comm::detail
