// Batches (src/data/loader.h): packing, epoch permutations, data-parallel slices, micro-slices.
// Corpora here have token value = position (t[i] = i, vocab = T), so a row of tokens() names the
// exact stretch of the stream it came from and packing is checked exactly.
#include "data/loader.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "data_testing.h"

namespace moetp::data {
namespace {

using testing::contains_all;
using testing::error_of;

// t[i] = i for i in [0, num_tokens).
TokenFile position_corpus(int64_t num_tokens) {
  std::vector<uint32_t> ids(static_cast<size_t>(num_tokens));
  std::iota(ids.begin(), ids.end(), 0u);
  return TokenFile::from_ids(std::move(ids), static_cast<uint32_t>(num_tokens), "positions");
}

std::vector<int64_t> sorted(std::vector<int64_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}

std::vector<int64_t> iota_vec(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), int64_t{0});
  return v;
}

TEST(Batches, CountsSequencesAsFloorOfTokensMinusOneOverSeqLen) {
  struct Case {
    int64_t num_tokens, seq_len, num_sequences;
  };
  for (const Case c : {Case{4, 3, 1},       // smallest legal: seq_len + 1 tokens
                       Case{10, 3, 3},      // T - 1 divisible: every token used
                       Case{11, 3, 3},      // one token left over
                       Case{12, 3, 3},      // two left over
                       Case{13, 3, 4},
                       Case{2, 1, 1},       // seq_len 1
                       Case{1025, 256, 4}}) {
    const Batches batches(position_corpus(c.num_tokens), c.seq_len, 1, 0);
    EXPECT_EQ(batches.num_sequences(), c.num_sequences) << "T=" << c.num_tokens << " L=" << c.seq_len;
  }
}

TEST(Batches, SequencesShareOneBoundaryToken) {
  const Batches batches(position_corpus(11), 3, 1, 0);  // sequences [0..3], [3..6], [6..9]; t[10] unused
  const std::vector<int64_t> seq_indices = {2, 0, 1, 2};
  const Tensor tokens_BS1 = batches.tokens(seq_indices);
  EXPECT_EQ(tokens_BS1.describe(), "i32[4, 4] cpu");
  EXPECT_EQ(tokens_BS1.to_vector<int32_t>(), (std::vector<int32_t>{6, 7, 8, 9,  //
                                                                  0, 1, 2, 3,  //
                                                                  3, 4, 5, 6,  //
                                                                  6, 7, 8, 9}));
  // Inputs are t[s·L .. s·L + L), targets t[s·L + 1 .. s·L + L]: every token but t[0] is a target once.
  std::vector<int32_t> targets;
  const Tensor all = batches.tokens(iota_vec(batches.num_sequences()));
  for (int64_t s = 0; s < 3; ++s) {
    for (int64_t t = 1; t <= 3; ++t) targets.push_back(all.to_vector<int32_t>()[s * 4 + t]);
  }
  EXPECT_EQ(targets, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(batches.tokens(std::vector<int64_t>{}).describe(), "i32[0, 4] cpu");
}

TEST(Batches, EpochPermutationIsDeterministicAndDiffersPerEpoch) {
  const Batches a(position_corpus(1001), 10, 4, 1234);  // 100 sequences
  const Batches b(position_corpus(1001), 10, 4, 1234);
  const Batches other_seed(position_corpus(1001), 10, 4, 1235);
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    const std::vector<int64_t> perm = a.epoch_permutation(epoch);
    EXPECT_EQ(sorted(perm), iota_vec(100)) << "epoch " << epoch << " is not a permutation";
    EXPECT_NE(perm, iota_vec(100)) << "epoch " << epoch << " is not shuffled";
    EXPECT_EQ(perm, b.epoch_permutation(epoch)) << "epoch " << epoch;
    EXPECT_NE(perm, other_seed.epoch_permutation(epoch)) << "epoch " << epoch;
    EXPECT_NE(perm, a.epoch_permutation(epoch + 1)) << "epoch " << epoch;
  }
}

TEST(Batches, PinsTheShuffle) {
  // Checkpoints resume by step, so the shuffle must not change between builds; a change to the
  // formula in loader.h must update these values on purpose. They were cross-checked against an
  // independent Python implementation of the formula (Philox4x32-10, FNV-1a stream id, Fisher-Yates).
  const Batches batches(position_corpus(101), 10, 10, 42);  // 10 sequences, 1 step per epoch
  EXPECT_EQ(batches.epoch_permutation(0), (std::vector<int64_t>{7, 3, 2, 5, 9, 1, 6, 8, 4, 0}));
  EXPECT_EQ(batches.epoch_permutation(1), (std::vector<int64_t>{1, 6, 3, 5, 4, 8, 9, 7, 0, 2}));
}

TEST(Batches, StepsWalkThePermutationAndWrapIntoTheNextEpoch) {
  const Batches batches(position_corpus(231), 10, 4, 7);  // 23 sequences, 5 steps per epoch, 3 skipped
  ASSERT_EQ(batches.num_sequences(), 23);
  ASSERT_EQ(batches.steps_per_epoch(), 5);
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    const std::vector<int64_t> perm = batches.epoch_permutation(epoch);
    std::vector<int64_t> seen;
    for (int64_t j = 0; j < 5; ++j) {
      const int64_t step = epoch * 5 + j;
      EXPECT_EQ(batches.epoch_of(step), epoch);
      const std::vector<int64_t> batch = batches.global_batch(step);
      EXPECT_EQ(batch, std::vector<int64_t>(perm.begin() + 4 * j, perm.begin() + 4 * j + 4)) << "step " << step;
      seen.insert(seen.end(), batch.begin(), batch.end());
    }
    EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 20u) << "epoch " << epoch << " repeats";
  }
}

TEST(Batches, StateIsAPureFunctionOfStep) {
  // Resume: a fresh Batches asked for step k (in any order) gives what a long-running one gave.
  const Batches running(position_corpus(501), 8, 6, 99);  // 62 sequences, 10 steps per epoch
  std::vector<std::vector<int64_t>> history;
  for (int64_t step = 0; step < 35; ++step) history.push_back(running.global_batch(step));
  const Batches resumed(position_corpus(501), 8, 6, 99);
  for (int64_t step : {34, 0, 17, 10, 9, 33}) {
    EXPECT_EQ(resumed.global_batch(step), history[static_cast<size_t>(step)]) << "step " << step;
  }
  const DataPosition position{17};
  EXPECT_EQ(resumed.global_batch(position.step), history[17]);
}

TEST(Batches, GlobalBatchIsTheSameForWorldSizes124) {
  const Batches batches(position_corpus(2001), 16, 8, 5);  // 125 sequences
  for (int64_t step = 0; step < 40; ++step) {              // crosses two epoch boundaries
    const std::vector<int64_t> global = batches.global_batch(step);
    for (int world_size : {1, 2, 4}) {
      std::vector<int64_t> joined;
      for (int rank = 0; rank < world_size; ++rank) {
        const std::vector<int64_t> slice = batches.rank_slice(step, rank, world_size);
        EXPECT_EQ(slice.size(), static_cast<size_t>(8 / world_size));
        joined.insert(joined.end(), slice.begin(), slice.end());
      }
      // Concatenated in rank order the slices are the global batch: disjoint and covering.
      EXPECT_EQ(joined, global) << "step " << step << " world_size " << world_size;
      EXPECT_EQ(std::set<int64_t>(joined.begin(), joined.end()).size(), 8u);
    }
  }
  // Tokens of a rank's slice are the matching rows of the global batch's tokens.
  const std::vector<int64_t> global = batches.global_batch(3);
  const std::vector<int32_t> all = batches.tokens(global).to_vector<int32_t>();
  const std::vector<int32_t> rank2 = batches.tokens(batches.rank_slice(3, 2, 4)).to_vector<int32_t>();
  EXPECT_EQ(rank2, std::vector<int32_t>(all.begin() + 4 * 17, all.begin() + 6 * 17));
}

TEST(Batches, MicroSlicesSplitARankSliceInOrder) {
  const Batches batches(position_corpus(2001), 16, 12, 3);
  const std::vector<int64_t> slice = batches.rank_slice(5, 1, 2);  // 6 sequences
  for (int num_micro : {1, 2, 3, 6}) {
    std::vector<int64_t> joined;
    for (int micro = 0; micro < num_micro; ++micro) {
      const std::vector<int64_t> part = micro_slice(slice, micro, num_micro);
      EXPECT_EQ(part.size(), static_cast<size_t>(6 / num_micro));
      joined.insert(joined.end(), part.begin(), part.end());
    }
    EXPECT_EQ(joined, slice) << "num_micro " << num_micro;
  }
  EXPECT_TRUE(contains_all(error_of([&] { micro_slice(slice, 0, 4); }), {"slice size (6) % num_micro (4) != 0"}));
  EXPECT_TRUE(contains_all(error_of([&] { micro_slice(slice, 2, 2); }), {"micro (2)", "num_micro (2)"}));
  EXPECT_TRUE(contains_all(error_of([&] { micro_slice(slice, 0, 0); }), {"num_micro (0)"}));
}

TEST(Batches, RejectsBadConfigurationsQuotingTheValues) {
  EXPECT_TRUE(contains_all(error_of([] { Batches(position_corpus(100), 100, 1, 0); }),
                           {"seq_len + 1 (101) > num_tokens (100)", "'positions'"}));
  EXPECT_TRUE(contains_all(error_of([] { Batches(position_corpus(100), 10, 10, 0); }),
                           {"'positions'", "9 sequences", "seq_len 10", "num_tokens 100", "global_batch_size (10)"}));
  EXPECT_TRUE(contains_all(error_of([] { Batches(position_corpus(100), 0, 1, 0); }), {"seq_len (0)"}));
  EXPECT_TRUE(contains_all(error_of([] { Batches(position_corpus(100), 4, 0, 0); }), {"global_batch_size (0)"}));
  const Batches batches(position_corpus(100), 4, 6, 0);
  EXPECT_TRUE(contains_all(error_of([&] { batches.rank_slice(0, 0, 4); }),
                           {"global_batch_size (6) % world_size (4) != 0"}));
  EXPECT_TRUE(contains_all(error_of([&] { batches.rank_slice(0, 2, 2); }), {"rank (2)", "world_size (2)"}));
  EXPECT_TRUE(contains_all(error_of([&] { batches.rank_slice(0, 0, 0); }), {"world_size (0)"}));
  EXPECT_TRUE(contains_all(error_of([&] { batches.global_batch(-1); }), {"step (-1)"}));
  EXPECT_TRUE(contains_all(error_of([&] { batches.tokens(std::vector<int64_t>{0, 24}); }),
                           {"sequence index 24", "row 1", "[0, 24)"}));
}

TEST(Batches, ShippedCorpusGivesTextWindows) {
  // Real shape: seq_len 256, global batch 32 over 4 data-parallel ranks of 2 micro-batches.
  const std::string root = MOETP_REPO_DIR;
  const Batches batches(TokenFile::open(root + "/data/kjv.tokens"), 256, 32, 1);
  const std::string text = testing::read_bytes(root + "/data/kjv.txt");
  EXPECT_EQ(batches.num_sequences(), static_cast<int64_t>((text.size() - 1) / 256));
  const std::vector<int64_t> slice = micro_slice(batches.rank_slice(100, 3, 4), 1, 2);
  ASSERT_EQ(slice.size(), 4u);
  const std::vector<int32_t> tokens = batches.tokens(slice).to_vector<int32_t>();
  for (size_t b = 0; b < slice.size(); ++b) {
    std::vector<uint32_t> row(tokens.begin() + static_cast<int64_t>(b) * 257,
                              tokens.begin() + static_cast<int64_t>(b + 1) * 257);
    EXPECT_EQ(decode_bytes(row), text.substr(static_cast<size_t>(slice[b]) * 256, 257)) << "sequence " << slice[b];
  }
}

}  // namespace
}  // namespace moetp::data
