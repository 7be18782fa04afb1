// Sequence packing, epoch shuffling and data-parallel slices (formulas in loader.h).
#include "data/loader.h"

#include <limits>
#include <utility>

#include "core/check.h"

namespace moetp::data {

Batches::Batches(TokenFile file, int64_t seq_len, int64_t global_batch_size, uint64_t seed)
    : file_(std::move(file)), seq_len_(seq_len), global_batch_size_(global_batch_size), seed_(seed) {
  MOETP_CHECK(seq_len >= 1, "seq_len ({}) must be >= 1", seq_len);
  MOETP_CHECK(global_batch_size >= 1, "global_batch_size ({}) must be >= 1", global_batch_size);
  MOETP_CHECK(file_.vocab_size() <= static_cast<uint32_t>(std::numeric_limits<int32_t>::max()),
              "token file '{}': vocab_size ({}) does not fit the i32 token tensor", file_.path(),
              file_.vocab_size());
  const auto num_tokens = static_cast<int64_t>(file_.num_tokens());
  MOETP_CHECK(seq_len + 1 <= num_tokens, "seq_len + 1 ({}) > num_tokens ({}) in token file '{}'", seq_len + 1,
              num_tokens, file_.path());
  num_sequences_ = (num_tokens - 1) / seq_len;
  MOETP_CHECK(num_sequences_ >= global_batch_size,
              "token file '{}' has {} sequences of seq_len {} (num_tokens {}), fewer than global_batch_size ({})",
              file_.path(), num_sequences_, seq_len, num_tokens, global_batch_size);
}

std::vector<int64_t> Batches::epoch_permutation(int64_t epoch) const {
  return data::epoch_permutation(num_sequences_, seed_, epoch);
}

std::vector<int64_t> Batches::global_batch(int64_t step) const {
  MOETP_CHECK(step >= 0, "step ({}) must be >= 0", step);
  const int64_t epoch = epoch_of(step);
  if (epoch != cached_epoch_) {
    cached_permutation_ = epoch_permutation(epoch);
    cached_epoch_ = epoch;
  }
  const int64_t start = (step % steps_per_epoch()) * global_batch_size_;
  const auto first = cached_permutation_.begin() + start;
  return std::vector<int64_t>(first, first + global_batch_size_);
}

std::vector<int64_t> Batches::rank_slice(int64_t step, int rank, int world_size) const {
  MOETP_CHECK(world_size >= 1, "world_size ({}) must be >= 1", world_size);
  MOETP_CHECK(rank >= 0 && rank < world_size, "rank ({}) outside [0, world_size ({}))", rank, world_size);
  MOETP_CHECK(global_batch_size_ % world_size == 0, "global_batch_size ({}) % world_size ({}) != 0",
              global_batch_size_, world_size);
  const std::vector<int64_t> batch = global_batch(step);
  const int64_t per_rank = global_batch_size_ / world_size;
  const auto first = batch.begin() + rank * per_rank;
  return std::vector<int64_t>(first, first + per_rank);
}

Tensor Batches::tokens(std::span<const int64_t> seq_indices) const {
  const auto num_rows = static_cast<int64_t>(seq_indices.size());
  const int64_t row_len = seq_len_ + 1;
  Tensor tokens_BS1 = Tensor::empty({num_rows, row_len}, DType::kI32);
  int32_t* out = tokens_BS1.data<int32_t>();
  const std::span<const uint32_t> ids = file_.ids();
  for (int64_t b = 0; b < num_rows; ++b) {
    const int64_t seq_idx = seq_indices[static_cast<size_t>(b)];
    MOETP_CHECK(seq_idx >= 0 && seq_idx < num_sequences_, "sequence index {} (row {}) outside [0, {})", seq_idx, b,
                num_sequences_);
    const uint32_t* src = ids.data() + seq_idx * seq_len_;
    // Ids are < vocab_size <= INT32_MAX (checked in the constructor), so the cast is exact.
    for (int64_t t = 0; t < row_len; ++t) out[b * row_len + t] = static_cast<int32_t>(src[t]);
  }
  return tokens_BS1;
}

TokenRows Batches::rows(std::span<const int64_t> seq_indices) const {
  const Tensor t = tokens(seq_indices);
  const int64_t B = t.size(0), S = seq_len_;
  const int32_t* p = t.data<int32_t>();
  TokenRows out;
  out.rows = B;
  out.seq_len = S;
  out.inputs.resize(static_cast<size_t>(B * S));
  out.targets.resize(static_cast<size_t>(B * S));
  out.positions.resize(static_cast<size_t>(B * S));
  out.doc_offsets.resize(static_cast<size_t>(B + 1));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      const auto k = static_cast<size_t>(b * S + s);
      out.inputs[k] = p[b * (S + 1) + s];
      out.targets[k] = p[b * (S + 1) + s + 1];
      out.positions[k] = static_cast<int32_t>(s);
    }
    out.doc_offsets[static_cast<size_t>(b + 1)] = (b + 1) * S;
  }
  out.loss_tokens = B * S;
  return out;
}

std::vector<int64_t> micro_slice(std::span<const int64_t> slice, int micro, int num_micro) {
  MOETP_CHECK(num_micro >= 1, "num_micro ({}) must be >= 1", num_micro);
  MOETP_CHECK(micro >= 0 && micro < num_micro, "micro ({}) outside [0, num_micro ({}))", micro, num_micro);
  const auto size = static_cast<int64_t>(slice.size());
  MOETP_CHECK(size % num_micro == 0, "slice size ({}) % num_micro ({}) != 0", size, num_micro);
  const int64_t per_micro = size / num_micro;
  const auto first = slice.begin() + micro * per_micro;
  return std::vector<int64_t>(first, first + per_micro);
}

}  // namespace moetp::data
