// Packing of dataset documents into rows (src/data/packing.h): the over-long rules, next-fit rows
// checked token by token (inputs, targets, positions, document offsets, padding, masks), every
// sample exactly once per epoch, rank and micro-batch slices that tile the global batch, the
// evaluation rows' padding batch, and ids outside the vocabulary named.
#include "data/packing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "data/source.h"
#include "data_testing.h"

namespace moetp::data {
namespace {

using testing::contains_all;
using testing::error_of;
using testing::ScratchDir;

// A dataset whose document d has the given length; token i of document d is 100·d + i (so each
// token names its document and place); masks (when given) per document.
std::string make_dataset(const ScratchDir& s, const std::string& name, const std::vector<int>& lengths,
                         const std::vector<std::vector<uint8_t>>& masks = {}, uint32_t vocab = 10000) {
  const std::string dir = s.path(name);
  DatasetWriter w(dir, {.vocab_size = vocab, .loss_mask = !masks.empty()});
  for (size_t d = 0; d < lengths.size(); ++d) {
    std::vector<uint32_t> ids(static_cast<size_t>(lengths[d]));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint32_t>(100 * d + i);
    w.add(kTrainSplit, ids, masks.empty() ? std::span<const uint8_t>() : std::span<const uint8_t>(masks[d]));
  }
  w.finish({});
  return dir;
}

TEST(Packing, OverlongDocumentsAreTruncatedSplitOrDropped) {
  ScratchDir s;
  const Dataset ds = Dataset::open(make_dataset(s, "ds", {1, 3, 9, 20}));
  const DatasetSplit& split = ds.split(kTrainSplit);
  using Sample = PackedSamples::Sample;
  auto samples = [&](OverlongChoice o) {
    const PackedSamples p(split, 8, o, false);
    std::vector<std::vector<int64_t>> out;
    for (const Sample& x : p.samples()) out.push_back({x.doc, x.begin, x.positions});
    return std::make_pair(out, p.stats());
  };
  const auto [tr, trs] = samples(OverlongChoice::kTruncate);
  EXPECT_EQ(tr, (std::vector<std::vector<int64_t>>{{1, 0, 2}, {2, 0, 8}, {3, 0, 8}}));
  EXPECT_EQ(trs.too_short, 1);
  EXPECT_EQ(trs.truncated, 1);  // document 2 (9 tokens, 8 positions) fits exactly
  EXPECT_EQ(trs.truncated_tokens, 20 - 9);
  const auto [sp, sps] = samples(OverlongChoice::kSplit);
  // 20 tokens, 19 positions: pieces t[0..9), t[8..17), t[16..20).
  EXPECT_EQ(sp, (std::vector<std::vector<int64_t>>{{1, 0, 2}, {2, 0, 8}, {3, 0, 8}, {3, 8, 8}, {3, 16, 3}}));
  EXPECT_EQ(sps.split, 1);
  const auto [dr, drs] = samples(OverlongChoice::kDrop);
  EXPECT_EQ(dr, (std::vector<std::vector<int64_t>>{{1, 0, 2}, {2, 0, 8}}));
  EXPECT_EQ(drs.dropped, 1);
  EXPECT_EQ(samples(OverlongChoice::kAuto).first, sp);             // no masks: split
  EXPECT_EQ(PackedSamples(split, 8, OverlongChoice::kAuto, true).samples().size(), tr.size());  // masks: truncate
}

TEST(Packing, RowsHoldWholeDocumentsNextFitWithPadding) {
  ScratchDir s;
  // Positions 3, 4, 2, 8 at S = 8: rows [3 + 4 | pad 1], [2 | pad 6], [8].
  const Dataset ds = Dataset::open(make_dataset(s, "ds", {4, 5, 3, 9}));
  const EvalRows rows(ds, kTrainSplit, 8, 2, OverlongChoice::kAuto);
  ASSERT_EQ(rows.num_rows(), 3);
  ASSERT_EQ(rows.num_batches(), 2);
  EXPECT_EQ(rows.loss_tokens(), 3 + 4 + 2 + 8);
  const TokenRows b0 = rows.micro_batch(0, 0, 1, 0, 1);
  const int32_t N = kNoLoss;
  EXPECT_EQ(b0.rows, 2);
  EXPECT_EQ(b0.inputs, (std::vector<int32_t>{0, 1, 2, 100, 101, 102, 103, 0, /**/ 200, 201, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(b0.targets, (std::vector<int32_t>{1, 2, 3, 101, 102, 103, 104, N, /**/ 201, 202, N, N, N, N, N, N}));
  EXPECT_EQ(b0.positions, (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 3, 0, /**/ 0, 1, 0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(b0.doc_offsets, (std::vector<int64_t>{0, 3, 7, 8, 10, 16}));
  EXPECT_EQ(b0.loss_tokens, 9);
  EXPECT_EQ(b0.padding, 7);
  // The second batch: the last row, then a row of padding only (every rank runs the same batches).
  const TokenRows b1 = rows.micro_batch(1, 0, 1, 0, 1);
  EXPECT_EQ(std::vector<int32_t>(b1.targets.begin(), b1.targets.begin() + 8),
            (std::vector<int32_t>{301, 302, 303, 304, 305, 306, 307, 308}));
  EXPECT_EQ(std::vector<int32_t>(b1.targets.begin() + 8, b1.targets.end()), std::vector<int32_t>(8, N));
  EXPECT_EQ(b1.doc_offsets, (std::vector<int64_t>{0, 8, 16}));
  EXPECT_EQ(b1.padding, 8);
  // Rank 1 of 2 gets row 1 of the batch.
  const TokenRows r1 = rows.micro_batch(0, 1, 2, 0, 1);
  EXPECT_EQ(r1.inputs, std::vector<int32_t>(b0.inputs.begin() + 8, b0.inputs.end()));
  EXPECT_EQ(r1.doc_offsets, (std::vector<int64_t>{0, 2, 8}));
}

TEST(Packing, LossMasksSilenceTargets) {
  ScratchDir s;
  // Mask of a target = the mask of the token it predicts (mask[j + 1] for position j).
  const Dataset ds = Dataset::open(make_dataset(s, "ds", {5}, {{1, 0, 1, 1, 0}}));
  const EvalRows rows(ds, kTrainSplit, 6, 1, OverlongChoice::kAuto);
  const TokenRows b = rows.micro_batch(0, 0, 1, 0, 1);
  EXPECT_EQ(b.targets, (std::vector<int32_t>{kNoLoss, 2, 3, kNoLoss, kNoLoss, kNoLoss}));
  EXPECT_EQ(b.loss_tokens, 2);
  EXPECT_EQ(rows.loss_tokens(), 2);
}

TEST(Packing, EveryEpochVisitsEverySampleOnceAndSlicesTileTheBatch) {
  ScratchDir s;
  std::vector<int> lengths;
  for (int d = 0; d < 60; ++d) lengths.push_back(2 + (d * 37) % 30);
  const Dataset ds = Dataset::open(make_dataset(s, "ds", lengths));
  const int64_t S = 16, G = 4;
  const PackedBatches pb(ds, kTrainSplit, S, G, 7, OverlongChoice::kSplit);
  const PackedBatches same(ds, kTrainSplit, S, G, 7, OverlongChoice::kSplit);
  const PackedBatches other(ds, kTrainSplit, S, G, 8, OverlongChoice::kSplit);
  // Each sample is identified by its first (input, target) pair: 100·d + begin, and its length.
  const int64_t total_samples = pb.stats().samples;
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    int64_t first_step = 0;
    for (int64_t e = 0; e < epoch; ++e) first_step += pb.steps_in_epoch(e);
    std::multiset<int32_t> seen;
    int64_t positions = 0;
    for (int64_t k = first_step; k < first_step + pb.steps_in_epoch(epoch); ++k) {
      ASSERT_EQ(pb.epoch_of(k), epoch);
      const TokenRows all = pb.micro_batch(k, 0, 1, 0, 1);
      EXPECT_EQ(all.loss_tokens, pb.global_loss_tokens(k));
      EXPECT_EQ(all.padding, pb.global_padding(k));
      EXPECT_EQ(all.inputs, same.micro_batch(k, 0, 1, 0, 1).inputs);
      // Ranks x micro-batches, in order, tile the global batch.
      std::vector<int32_t> tiled;
      for (int r = 0; r < 2; ++r) {
        for (int m = 0; m < 2; ++m) {
          const TokenRows part = pb.micro_batch(k, r, 2, m, 2);
          EXPECT_EQ(part.rows, 1);
          tiled.insert(tiled.end(), part.inputs.begin(), part.inputs.end());
        }
      }
      EXPECT_EQ(tiled, all.inputs);
      for (size_t d = 0; d + 1 < all.doc_offsets.size(); ++d) {
        const auto b = static_cast<size_t>(all.doc_offsets[d]);
        if (all.targets[b] == kNoLoss) continue;  // padding
        EXPECT_EQ(all.positions[b], 0);
        seen.insert(all.inputs[b]);
        positions += all.doc_offsets[d + 1] - all.doc_offsets[d];
        // Inside a document, targets are the next token of the same document.
        for (auto t = b; t < static_cast<size_t>(all.doc_offsets[d + 1]); ++t) {
          EXPECT_EQ(all.targets[t], all.inputs[t] + 1);
        }
      }
    }
    // The rows past the last full batch are skipped; everything else appears exactly once.
    EXPECT_LE(static_cast<int64_t>(seen.size()), total_samples);
    EXPECT_GE(static_cast<int64_t>(seen.size()), total_samples - (pb.rows_in_epoch(epoch) % G) * S);
    EXPECT_EQ(std::set<int32_t>(seen.begin(), seen.end()).size(), seen.size()) << "a sample repeated";
  }
  EXPECT_NE(pb.micro_batch(0, 0, 1, 0, 1).inputs, pb.micro_batch(pb.steps_in_epoch(0), 0, 1, 0, 1).inputs);
  EXPECT_NE(pb.micro_batch(0, 0, 1, 0, 1).inputs, other.micro_batch(0, 0, 1, 0, 1).inputs);
  // A step far ahead (resume) equals the same step reached in order.
  const PackedBatches fresh(ds, kTrainSplit, S, G, 7, OverlongChoice::kSplit);
  const int64_t far = pb.steps_in_epoch(0) + pb.steps_in_epoch(1) + 3;
  EXPECT_EQ(fresh.micro_batch(far, 0, 1, 0, 1).inputs, pb.micro_batch(far, 0, 1, 0, 1).inputs);
  EXPECT_TRUE(contains_all(error_of([&] { pb.micro_batch(0, 0, 3, 0, 1); }), {"4 rows", "3 ranks"}));
}

TEST(Packing, ErrorsNameTheValues) {
  ScratchDir s;
  const Dataset ds = Dataset::open(make_dataset(s, "ds", {3, 3}));
  EXPECT_TRUE(contains_all(error_of([&] { PackedBatches(ds, kTrainSplit, 4, 3, 1, OverlongChoice::kAuto); }),
                           {"2 documents pack into 1 rows", "fewer than global_batch_size (3)"}));
  EXPECT_TRUE(contains_all(error_of([&] { PackedBatches(ds, kValidSplit, 4, 1, 1, OverlongChoice::kAuto); }),
                           {"no split 'valid'"}));
  // An id the manifest's vocabulary does not allow (a manifest edited by hand) is named when its row
  // is built: document 1 holds ids 100, 101, 102.
  const std::string dir = make_dataset(s, "small", {3, 3});
  nlohmann::json m = nlohmann::json::parse(testing::read_bytes(dir + "/manifest.json"));
  m["vocab_size"] = 101;
  testing::write_bytes(dir + "/manifest.json", m.dump());
  const Dataset small = Dataset::open(dir);
  const EvalRows rows(small, kTrainSplit, 8, 1, OverlongChoice::kAuto);
  EXPECT_TRUE(contains_all(error_of([&] { rows.micro_batch(0, 0, 1, 0, 1); }),
                           {"document 1 token 1", "id 101", "vocabulary (101)"}));
}

TEST(TrainData, TokenFilesAndDatasetsBehindOneInterface) {
  ScratchDir s;
  const std::string dir = make_dataset(s, "ds", {5, 7, 9, 11, 13, 4, 6});
  DataOptions o;
  o.path = dir;
  o.seq_len = 8;
  o.global_batch_size = 2;
  o.seed = 1;
  const auto data = open_train_data(o);
  EXPECT_EQ(data->identity().at("kind"), "dataset");
  EXPECT_EQ(data->identity().at("manifest_sha256"), Dataset::open(dir).manifest_sha256());
  EXPECT_EQ(data->micro_batch(0, 0, 1, 0, 1).rows, 2);
  const std::string tf = s.path("t.tokens");
  std::vector<uint32_t> ids(100);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint32_t>(i);
  write_token_file(tf, ids, 256);
  o.path = tf;
  const auto file = open_train_data(o);
  EXPECT_EQ(file->identity().at("kind"), "token_file");
  EXPECT_EQ(file->global_loss_tokens(0), 16);
  const TokenRows r = file->micro_batch(0, 0, 1, 0, 1);
  EXPECT_EQ(r.doc_offsets, (std::vector<int64_t>{0, 8, 16}));
  for (size_t i = 0; i < r.inputs.size(); ++i) EXPECT_EQ(r.targets[i], r.inputs[i] + 1);
}

}  // namespace
}  // namespace moetp::data
