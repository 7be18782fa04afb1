// Packed rows: documents of a dataset split (dataset.h) packed into rows of seq_len positions for
// training and evaluation, without cross-contamination between documents.
//
// Samples. A document of L tokens t[0 .. L) trains L - 1 positions: inputs t[0 .. L-1), targets
// t[1 .. L); target j (= t[j+1]) carries loss iff mask[j+1] when the dataset has loss masks, else
// always. A document with more than S = seq_len positions (L - 1 > S) is over-long
// (OverlongChoice, core/options.h; kAuto is kSplit without loss masks, kTruncate with them):
//   kTruncate  keeps t[0 .. S+1) (the first S positions);
//   kSplit     cuts it into pieces t[k·S .. min(k·S + S + 1, L)) for k = 0, 1, ... while the
//              piece has a position (consecutive pieces share one token, like a stream cut into
//              rows), each piece a sample of its own;
//   kDrop      leaves it out.
// Documents of one token have no position and are left out. Each is counted (PackingStats).
//
// Rows. Training epoch e visits the samples in the order of the permutation P_e (epoch_permutation
// below: a pure function of (seed, e)); evaluation visits them in written order. Rows are packed
// next-fit: a sample goes into the current row when it fits the row's remaining positions,
// otherwise the row is closed and a new one starts. A closed row's remaining positions are
// padding: input id 0, no loss, one padding document. Within a row every sample is its own
// document (attention stays inside it) and its positions restart at 0.
//
// Steps. Epoch e has R_e rows and floor(R_e / G) steps (G = global_batch_size); step k of the run
// takes rows [j·G, (j+1)·G) of the epoch it falls in, and the last R_e mod G rows of each epoch are
// skipped (a different set each epoch, as the order differs). Data-parallel rank r of P gets rows
// [r·G/P, (r+1)·G/P) of the global batch, micro-batch m of M the m-th of M equal parts of those.
// Evaluation (EvalRows) takes the rows in order, G per batch, the last batch filled with
// all-padding rows, so every rank runs the same number of forwards.
//
// Loss normalisation: the loss of a step is the sum of the per-token cross-entropies over the
// loss-carrying targets of the global batch divided by their number (global_loss_tokens), so a
// token weighs the same whichever row, rank or micro-batch holds it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/options.h"
#include "data/dataset.h"

namespace moetp::data {

// Targets without loss (padding, masked tokens, the model's kIgnoreIndex).
inline constexpr int32_t kNoLoss = -100;


// A micro-batch as flat vectors of N = rows · seq_len entries (the model's Batch is built from
// these: model::Batch::from_packed).
struct TokenRows {
  int64_t rows = 0, seq_len = 0;
  std::vector<int32_t> inputs, targets, positions;  // targets kNoLoss where no loss
  std::vector<int64_t> doc_offsets;                 // cu_seqlens over the N positions (D + 1 entries)
  int64_t loss_tokens = 0;                          // targets != kNoLoss
  int64_t padding = 0;                              // padding positions
};

// Fisher-Yates permutation of [0, n) drawn from CounterRng(seed, stream_id("moetp.data.shuffle") + epoch):
// a pure function of (n, seed, epoch). Shared by the token-file loader (loader.h) and packing.
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

struct PackingStats {
  int64_t documents = 0;        // documents of the split
  int64_t samples = 0;          // samples after the over-long rule
  int64_t too_short = 0;        // one-token documents left out
  int64_t truncated = 0;        // over-long documents truncated
  int64_t split = 0;            // over-long documents split
  int64_t dropped = 0;          // over-long documents dropped
  int64_t truncated_tokens = 0;  // tokens cut off by kTruncate or lost by kDrop
};

// The sample list of a split (shared by training and evaluation rows).
class PackedSamples {
 public:
  PackedSamples(const DatasetSplit& split, int64_t seq_len, OverlongChoice overlong, bool masked);
  struct Sample {
    int64_t doc;
    int64_t begin;      // first token in the document
    int64_t positions;  // 1 .. seq_len: tokens - 1
  };
  const std::vector<Sample>& samples() const { return samples_; }
  const PackingStats& stats() const { return stats_; }
  const DatasetSplit& split() const { return *split_; }
  int64_t seq_len() const { return seq_len_; }
  // Packs the samples visited in `order` next-fit; returns the row starts into `order`
  // (R + 1 entries, 0 first, order.size() last).
  std::vector<int64_t> pack(const std::vector<int64_t>& order) const;
  // Rows [first, first + count) of a packing (order, starts) as flat vectors. Rows with index
  // >= the packing's row count are all padding. Errors name the document and position of an id
  // outside [0, vocab_size).
  TokenRows rows(const std::vector<int64_t>& order, const std::vector<int64_t>& starts, int64_t first,
                 int64_t count) const;
  // Loss-carrying targets of those rows.
  int64_t loss_tokens(const std::vector<int64_t>& order, const std::vector<int64_t>& starts, int64_t first,
                      int64_t count) const;

 private:
  const DatasetSplit* split_;
  int64_t seq_len_;
  std::vector<Sample> samples_;
  PackingStats stats_;
  int64_t sample_loss_tokens(const Sample& s) const;
};

// Training rows of a dataset split: epochs, steps, rank slices and micro-batches (above).
// The dataset must outlive this object.
class PackedBatches {
 public:
  // Errors (moetp::Error naming values): seq_len < 1, global_batch_size < 1, fewer rows in the
  // first epoch than global_batch_size.
  PackedBatches(const Dataset& dataset, const std::string& split, int64_t seq_len, int64_t global_batch_size,
                uint64_t seed, OverlongChoice overlong);

  const PackingStats& stats() const { return samples_.stats(); }
  int64_t global_batch_size() const { return global_batch_size_; }
  int64_t seq_len() const { return samples_.seq_len(); }
  // Rows and steps of epoch e (>= 0).
  int64_t rows_in_epoch(int64_t epoch) const;
  int64_t steps_in_epoch(int64_t epoch) const { return rows_in_epoch(epoch) / global_batch_size_; }
  int64_t epoch_of(int64_t step) const;

  // Data-parallel rank `rank` of `world`, micro-batch `micro` of `num_micro`, of step `step`
  // (0-based). Errors: world, rank, micro out of range or not dividing global_batch_size.
  TokenRows micro_batch(int64_t step, int rank, int world, int micro, int num_micro) const;
  // Loss-carrying targets of the global batch of `step`, and its padding positions.
  int64_t global_loss_tokens(int64_t step) const;
  int64_t global_padding(int64_t step) const;

 private:
  struct Epoch {
    std::vector<int64_t> order, starts;
  };
  const Epoch& epoch(int64_t e) const;
  // (epoch, first row of the step in it)
  std::pair<int64_t, int64_t> locate(int64_t step) const;
  PackedSamples samples_;
  int64_t global_batch_size_;
  uint64_t seed_;
  mutable std::map<int64_t, Epoch> epochs_;    // packed epochs (the current ones are kept)
  mutable std::vector<int64_t> epoch_first_step_;  // first step of epochs 0, 1, ... computed so far
};

// Evaluation rows of a split: its samples in written order, packed once; batch b of
// num_batches() holds rows [b·G, (b+1)·G), all-padding past the end.
class EvalRows {
 public:
  EvalRows(const Dataset& dataset, const std::string& split, int64_t seq_len, int64_t global_batch_size,
           OverlongChoice overlong);
  const PackingStats& stats() const { return samples_.stats(); }
  int64_t seq_len() const { return samples_.seq_len(); }
  int64_t num_rows() const { return static_cast<int64_t>(starts_.size()) - 1; }
  int64_t num_batches() const { return (num_rows() + global_batch_size_ - 1) / global_batch_size_; }
  int64_t loss_tokens() const { return loss_tokens_; }
  TokenRows micro_batch(int64_t batch, int rank, int world, int micro, int num_micro) const;

 private:
  PackedSamples samples_;
  int64_t global_batch_size_;
  std::vector<int64_t> order_, starts_;
  int64_t loss_tokens_ = 0;
};

// Rank `rank` of `world`, micro-batch `micro` of `num_micro`: [first, first + count) of a global
// batch of `global` rows. Errors name the values.
std::pair<int64_t, int64_t> micro_rows(int64_t global, int rank, int world, int micro, int num_micro);

}  // namespace moetp::data
