// Packed rows (rules in packing.h).
#include "data/packing.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "core/check.h"
#include "core/rng.h"

namespace moetp::data {

std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  MOETP_CHECK(epoch >= 0, "epoch ({}) must be >= 0", epoch);
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  const CounterRng rng(seed, stream_id("moetp.data.shuffle") + static_cast<uint64_t>(epoch));
  // Fisher-Yates from the top; draw i picks j uniform in [0, i]. 64 random bits per draw keep the
  // modulo bias below n / 2^64.
  for (int64_t i = n - 1; i > 0; --i) {
    const Philox4x32 w = rng.bits(static_cast<uint64_t>(i));
    const uint64_t r = (static_cast<uint64_t>(w[0]) << 32) | w[1];
    const auto j = static_cast<int64_t>(r % static_cast<uint64_t>(i + 1));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  return perm;
}

std::pair<int64_t, int64_t> micro_rows(int64_t global, int rank, int world, int micro, int num_micro) {
  MOETP_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ({}) outside [0, world size ({}))", rank, world);
  MOETP_CHECK(num_micro >= 1 && micro >= 0 && micro < num_micro, "micro-batch ({}) outside [0, {})", micro,
              num_micro);
  MOETP_CHECK(global % (static_cast<int64_t>(world) * num_micro) == 0,
              "global batch of {} rows does not split over {} ranks x {} micro-batches", global, world, num_micro);
  const int64_t per_micro = global / world / num_micro;
  return {(static_cast<int64_t>(rank) * num_micro + micro) * per_micro, per_micro};
}

// ---------------------------------------------------------------- samples

PackedSamples::PackedSamples(const DatasetSplit& split, int64_t seq_len, OverlongChoice overlong, bool masked)
    : split_(&split), seq_len_(seq_len) {
  MOETP_CHECK(seq_len >= 1, "seq_len ({}) must be >= 1", seq_len);
  const int64_t n = split.num_documents();
  stats_.documents = n;
  if (overlong == OverlongChoice::kAuto) overlong = masked ? OverlongChoice::kTruncate : OverlongChoice::kSplit;
  samples_.reserve(static_cast<size_t>(n));
  for (int64_t d = 0; d < n; ++d) {
    const int64_t L = split.document_length(d);
    if (L < 2) {
      ++stats_.too_short;
      continue;
    }
    if (L - 1 <= seq_len) {
      samples_.push_back({d, 0, L - 1});
      continue;
    }
    switch (overlong) {
      case OverlongChoice::kTruncate:
        ++stats_.truncated;
        stats_.truncated_tokens += L - (seq_len + 1);
        samples_.push_back({d, 0, seq_len});
        break;
      case OverlongChoice::kDrop:
        ++stats_.dropped;
        stats_.truncated_tokens += L;
        break;
      case OverlongChoice::kSplit:
        ++stats_.split;
        for (int64_t b = 0; b + 1 < L; b += seq_len) samples_.push_back({d, b, std::min(seq_len, L - 1 - b)});
        break;
      case OverlongChoice::kAuto:
        break;
    }
  }
  stats_.samples = static_cast<int64_t>(samples_.size());
}

std::vector<int64_t> PackedSamples::pack(const std::vector<int64_t>& order) const {
  std::vector<int64_t> starts{0};
  int64_t used = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const int64_t p = samples_[static_cast<size_t>(order[i])].positions;
    if (used + p > seq_len_) {
      starts.push_back(static_cast<int64_t>(i));
      used = 0;
    }
    used += p;
  }
  if (!order.empty()) starts.push_back(static_cast<int64_t>(order.size()));
  return starts;
}

int64_t PackedSamples::sample_loss_tokens(const Sample& s) const {
  const DocumentView doc = split_->document(s.doc);
  if (doc.mask.empty()) return s.positions;
  int64_t n = 0;
  for (int64_t j = 0; j < s.positions; ++j) n += doc.mask[static_cast<size_t>(s.begin + j + 1)];
  return n;
}

int64_t PackedSamples::loss_tokens(const std::vector<int64_t>& order, const std::vector<int64_t>& starts,
                                   int64_t first, int64_t count) const {
  const int64_t R = static_cast<int64_t>(starts.size()) - 1;
  int64_t n = 0;
  for (int64_t r = first; r < std::min(first + count, R); ++r) {
    for (int64_t i = starts[static_cast<size_t>(r)]; i < starts[static_cast<size_t>(r) + 1]; ++i) {
      n += sample_loss_tokens(samples_[static_cast<size_t>(order[static_cast<size_t>(i)])]);
    }
  }
  return n;
}

TokenRows PackedSamples::rows(const std::vector<int64_t>& order, const std::vector<int64_t>& starts, int64_t first,
                              int64_t count) const {
  const int64_t S = seq_len_, R = static_cast<int64_t>(starts.size()) - 1;
  const uint32_t vocab = split_->vocab_size();
  TokenRows out;
  out.rows = count;
  out.seq_len = S;
  const auto N = static_cast<size_t>(count * S);
  out.inputs.assign(N, 0);
  out.targets.assign(N, kNoLoss);
  out.positions.assign(N, 0);
  out.doc_offsets.push_back(0);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = first + r;
    int64_t at = r * S;  // next free position
    if (row < R) {
      for (int64_t i = starts[static_cast<size_t>(row)]; i < starts[static_cast<size_t>(row) + 1]; ++i) {
        const Sample& s = samples_[static_cast<size_t>(order[static_cast<size_t>(i)])];
        const DocumentView doc = split_->document(s.doc);
        for (int64_t j = 0; j <= s.positions; ++j) {
          const uint32_t id = doc.ids[static_cast<size_t>(s.begin + j)];
          MOETP_CHECK(id < vocab, "split '{}' document {} token {}: id {} outside the vocabulary ({})",
                      split_->name(), s.doc, s.begin + j, id, vocab);
        }
        for (int64_t j = 0; j < s.positions; ++j) {
          const auto k = static_cast<size_t>(at + j);
          const auto t = static_cast<size_t>(s.begin + j);
          out.inputs[k] = static_cast<int32_t>(doc.ids[t]);
          const bool loss = doc.mask.empty() || doc.mask[t + 1] != 0;
          out.targets[k] = loss ? static_cast<int32_t>(doc.ids[t + 1]) : kNoLoss;
          out.loss_tokens += loss ? 1 : 0;
          out.positions[k] = static_cast<int32_t>(j);
        }
        at += s.positions;
        out.doc_offsets.push_back(at);
      }
    }
    const int64_t end = (r + 1) * S;
    if (at < end) {
      for (int64_t k = at; k < end; ++k) out.positions[static_cast<size_t>(k)] = static_cast<int32_t>(k - at);
      out.padding += end - at;
      out.doc_offsets.push_back(end);
    }
  }
  return out;
}

// ---------------------------------------------------------------- training

PackedBatches::PackedBatches(const Dataset& dataset, const std::string& split, int64_t seq_len,
                             int64_t global_batch_size, uint64_t seed, OverlongChoice overlong)
    : samples_(dataset.split(split), seq_len, overlong, dataset.has_loss_mask()), global_batch_size_(global_batch_size), seed_(seed) {
  MOETP_CHECK(global_batch_size >= 1, "global_batch_size ({}) must be >= 1", global_batch_size);
  const int64_t rows = rows_in_epoch(0);
  MOETP_CHECK(rows >= global_batch_size,
              "dataset '{}' split '{}': {} documents pack into {} rows of seq_len {}, fewer than global_batch_size "
              "({})",
              dataset.dir(), split, samples_.stats().documents, rows, seq_len, global_batch_size);
}

const PackedBatches::Epoch& PackedBatches::epoch(int64_t e) const {
  const auto it = epochs_.find(e);
  if (it != epochs_.end()) return it->second;
  // Keep at most two packed epochs (a step and the next one may straddle an epoch boundary).
  while (epochs_.size() >= 2) epochs_.erase(epochs_.begin());
  Epoch ep;
  ep.order = epoch_permutation(static_cast<int64_t>(samples_.samples().size()), seed_, e);
  ep.starts = samples_.pack(ep.order);
  return epochs_.emplace(e, std::move(ep)).first->second;
}

int64_t PackedBatches::rows_in_epoch(int64_t e) const {
  return static_cast<int64_t>(epoch(e).starts.size()) - 1;
}

std::pair<int64_t, int64_t> PackedBatches::locate(int64_t step) const {
  MOETP_CHECK(step >= 0, "step ({}) must be >= 0", step);
  if (epoch_first_step_.empty()) epoch_first_step_.push_back(0);
  // Extend the table of epoch starts until it passes `step`.
  while (true) {
    const auto e = static_cast<int64_t>(epoch_first_step_.size()) - 1;
    const int64_t steps = steps_in_epoch(e);
    MOETP_CHECK(steps >= 1, "epoch {} packs into {} rows, fewer than global_batch_size ({})", e, rows_in_epoch(e),
                global_batch_size_);
    if (epoch_first_step_.back() + steps > step) break;
    epoch_first_step_.push_back(epoch_first_step_.back() + steps);
  }
  const auto it = std::upper_bound(epoch_first_step_.begin(), epoch_first_step_.end(), step);
  const auto e = static_cast<int64_t>(it - epoch_first_step_.begin()) - 1;
  return {e, (step - epoch_first_step_[static_cast<size_t>(e)]) * global_batch_size_};
}

int64_t PackedBatches::epoch_of(int64_t step) const { return locate(step).first; }

TokenRows PackedBatches::micro_batch(int64_t step, int rank, int world, int micro, int num_micro) const {
  const auto [e, row0] = locate(step);
  const auto [first, count] = micro_rows(global_batch_size_, rank, world, micro, num_micro);
  const Epoch& ep = epoch(e);
  return samples_.rows(ep.order, ep.starts, row0 + first, count);
}

int64_t PackedBatches::global_loss_tokens(int64_t step) const {
  const auto [e, row0] = locate(step);
  const Epoch& ep = epoch(e);
  return samples_.loss_tokens(ep.order, ep.starts, row0, global_batch_size_);
}

int64_t PackedBatches::global_padding(int64_t step) const {
  const auto [e, row0] = locate(step);
  const Epoch& ep = epoch(e);
  int64_t used = 0;
  for (int64_t r = row0; r < row0 + global_batch_size_; ++r) {
    for (int64_t i = ep.starts[static_cast<size_t>(r)]; i < ep.starts[static_cast<size_t>(r) + 1]; ++i) {
      used += samples_.samples()[static_cast<size_t>(ep.order[static_cast<size_t>(i)])].positions;
    }
  }
  return global_batch_size_ * samples_.seq_len() - used;
}

// ---------------------------------------------------------------- evaluation

EvalRows::EvalRows(const Dataset& dataset, const std::string& split, int64_t seq_len, int64_t global_batch_size,
                   OverlongChoice overlong)
    : samples_(dataset.split(split), seq_len, overlong, dataset.has_loss_mask()), global_batch_size_(global_batch_size) {
  MOETP_CHECK(global_batch_size >= 1, "global_batch_size ({}) must be >= 1", global_batch_size);
  order_.resize(samples_.samples().size());
  std::iota(order_.begin(), order_.end(), int64_t{0});
  starts_ = samples_.pack(order_);
  if (starts_.empty()) starts_.push_back(0);
  MOETP_CHECK(num_rows() >= 1, "dataset '{}' split '{}' has no document with a target at seq_len {}", dataset.dir(),
              split, seq_len);
  loss_tokens_ = samples_.loss_tokens(order_, starts_, 0, num_rows());
}

TokenRows EvalRows::micro_batch(int64_t batch, int rank, int world, int micro, int num_micro) const {
  MOETP_CHECK(batch >= 0 && batch < num_batches(), "evaluation batch {} outside [0, {})", batch, num_batches());
  const auto [first, count] = micro_rows(global_batch_size_, rank, world, micro, num_micro);
  return samples_.rows(order_, starts_, batch * global_batch_size_ + first, count);
}

}  // namespace moetp::data
