// Sequence packing, epoch shuffling and data-parallel slices (formulas in loader.h).
#include "data/loader.h"

#include <limits>
#include <numeric>
#include <utility>

#include "core/check.h"
#include "core/rng.h"

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
  MOETP_CHECK(epoch >= 0, "epoch ({}) must be >= 0", epoch);
  std::vector<int64_t> perm(static_cast<size_t>(num_sequences_));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  const CounterRng rng(seed_, stream_id("moetp.data.shuffle") + static_cast<uint64_t>(epoch));
  // Fisher-Yates from the top; draw i picks j uniform in [0, i]. 64 random bits per draw keep the
  // modulo bias below num_sequences / 2^64.
  for (int64_t i = num_sequences_ - 1; i > 0; --i) {
    const Philox4x32 w = rng.bits(static_cast<uint64_t>(i));
    const uint64_t r = (static_cast<uint64_t>(w[0]) << 32) | w[1];
    const auto j = static_cast<int64_t>(r % static_cast<uint64_t>(i + 1));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  return perm;
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
