// Sequence packing, shuffling and data-parallel sharding: which token sequences each rank trains
// on at each step. The training loop asks for rank_slice(step, dp_rank, dp_size), optionally cuts
// it into micro-batches with micro_slice, and turns indices into an i32 token tensor with tokens().
//
// Packing. The corpus is one token stream t[0 .. T). Sequence s (0 <= s < num_sequences) is the
// seq_len + 1 tokens t[s·seq_len .. s·seq_len + seq_len]: inputs are the first seq_len, targets the
// last seq_len (inputs shifted by one). Consecutive sequences share one boundary token, so every
// token except t[0] is a target exactly once per epoch, and num_sequences = floor((T - 1) / seq_len).
//
// Shuffling. Epoch e uses the permutation P_e = epoch_permutation(num_sequences, seed, e) of
// packing.h: Fisher-Yates driven by CounterRng(seed, stream_id("moetp.data.shuffle") + e), so P_e
// is a pure function of (seed, e) and differs between epochs. An epoch has steps_per_epoch = floor(num_sequences / global_batch_size)
// steps; step k takes P_e[j·G .. (j+1)·G) with e = k / steps_per_epoch, j = k % steps_per_epoch,
// G = global_batch_size. The last num_sequences % G entries of each P_e are skipped (a different
// set each epoch), so a global batch never repeats a sequence.
//
// Sharding. Data-parallel rank r of P gets the contiguous slice [r·G/P, (r+1)·G/P) of the global
// batch. The global batch does not depend on P, so the slices of all ranks are disjoint and their
// union is the same set of sequences for any P that divides G.
//
// Resume. Everything is a pure function of (file, seq_len, global_batch_size, seed, step): a
// checkpoint stores the step (DataPosition) and the run continues from it on any number of ranks.
// Changing seq_len, global_batch_size or seed changes which sequences later steps see.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.h"
#include "data/packing.h"
#include "data/token_file.h"

namespace moetp::data {

// Where the data stream stands; the only data state a checkpoint needs.
struct DataPosition {
  int64_t step = 0;
};

class Batches {
 public:
  // Errors (moetp::Error quoting the values): seq_len < 1, global_batch_size < 1,
  // seq_len + 1 > num_tokens, fewer than global_batch_size sequences, vocab_size > INT32_MAX.
  Batches(TokenFile file, int64_t seq_len, int64_t global_batch_size, uint64_t seed);

  const TokenFile& file() const { return file_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t global_batch_size() const { return global_batch_size_; }
  uint64_t seed() const { return seed_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t steps_per_epoch() const { return num_sequences_ / global_batch_size_; }
  int64_t epoch_of(int64_t step) const { return step / steps_per_epoch(); }

  // P_e: a permutation of [0, num_sequences). epoch >= 0.
  std::vector<int64_t> epoch_permutation(int64_t epoch) const;

  // The global_batch_size sequence indices of step `step` (>= 0), in batch order.
  std::vector<int64_t> global_batch(int64_t step) const;

  // Data-parallel rank `rank`'s contiguous part of global_batch(step): global_batch_size /
  // world_size indices. Errors: world_size < 1, rank outside [0, world_size), or
  // global_batch_size % world_size != 0.
  std::vector<int64_t> rank_slice(int64_t step, int rank, int world_size) const;

  // Token tensor of the given sequences:
  //   tokens_BS1  [OUT]  (B, seq_len + 1) i32 CPU, B = seq_indices.size();
  //                      row b = t[s·seq_len .. s·seq_len + seq_len] for s = seq_indices[b].
  // inputs = tokens_BS1[:, :seq_len], targets = tokens_BS1[:, 1:]. Each index must be in
  // [0, num_sequences).
  Tensor tokens(std::span<const int64_t> seq_indices) const;
  // The same sequences as TokenRows: inputs and targets as above, one document per row,
  // positions 0 .. seq_len-1, every target carrying loss.
  TokenRows rows(std::span<const int64_t> seq_indices) const;

 private:
  TokenFile file_;
  int64_t seq_len_;
  int64_t global_batch_size_;
  uint64_t seed_;
  int64_t num_sequences_;
  // Last permutation computed (consecutive steps reuse it). Makes const calls not thread-safe:
  // use one Batches per thread.
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_permutation_;
};

// Micro-batch `micro` of `num_micro` equal contiguous parts of a rank's slice.
// Errors: num_micro < 1, micro outside [0, num_micro), slice.size() % num_micro != 0.
std::vector<int64_t> micro_slice(std::span<const int64_t> slice, int micro, int num_micro);

}  // namespace moetp::data
