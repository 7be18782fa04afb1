// Dataset folders: a tokenized corpus as `moetp tokenize` writes it and the training loader reads
// it, memory-mapped (corpora larger than RAM work).
//
// Layout of DIR (all integers little-endian, no headers):
//   manifest.json          written last; a folder without it is not a dataset
//   <split>-NNNNN.ids      uint32 token ids of the shard's documents, back to back
//   <split>-NNNNN.docs     uint64 document offsets into .ids: D + 1 entries, 0 first, the shard's
//                          token count last, strictly increasing (no empty documents)
//   <split>-NNNNN.mask     uint8 per token, 0 or 1: whether the token carries loss as a target
//                          (only when the manifest's "loss_mask" is true; otherwise every token does)
// Splits are "train" and optionally "valid". The manifest (kDatasetFormat, version
// kDatasetVersion) records the tokenizer (kind, sha256, vocab_size, eos_id), the sources (path,
// sha256, bytes, documents per split, skips), per split and per shard the documents, tokens and
// loss-carrying tokens with the sha256 of each shard file, and the skip counts by reason.
//
// Atomicity: DatasetWriter writes everything into DIR.partial-<pid>, fsyncs it, writes the
// manifest last, and renames the folder onto DIR. An interrupted write leaves at most a
// .partial-<pid> folder, never a DIR that Dataset::open would accept.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace moetp::data {

inline constexpr const char* kDatasetFormat = "moetp-dataset";
inline constexpr int kDatasetVersion = 1;
inline constexpr const char* kTrainSplit = "train";
inline constexpr const char* kValidSplit = "valid";

// Counts of one split or one shard.
struct SplitCounts {
  int64_t documents = 0;
  int64_t tokens = 0;
  int64_t loss_tokens = 0;  // tokens with mask 1 (all tokens without a mask)
};

// One document: its ids and, for masked datasets, its per-token loss mask (empty: all carry loss).
struct DocumentView {
  std::span<const uint32_t> ids;
  std::span<const uint8_t> mask;
};

// One split of an open dataset: its documents in written order, memory-mapped.
class DatasetSplit {
 public:
  const std::string& name() const { return name_; }
  int64_t num_documents() const { return total_docs_; }
  const SplitCounts& counts() const { return counts_; }
  uint32_t vocab_size() const { return vocab_size_; }
  // Document i in [0, num_documents()).
  DocumentView document(int64_t i) const;
  // Token count of document i (without touching its ids).
  int64_t document_length(int64_t i) const;

 private:
  friend class Dataset;
  struct Shard;
  std::string name_;
  SplitCounts counts_;
  uint32_t vocab_size_ = 0;
  std::vector<std::shared_ptr<const Shard>> shards_;
  std::vector<int64_t> first_doc_;  // per shard: global index of its first document
  int64_t total_docs_ = 0;
};

class Dataset {
 public:
  // Opens and validates DIR: the manifest (format, version, fields), every shard file present
  // with the size the manifest gives, document offsets well-formed, masks 0/1. Ids are checked
  // against vocab_size as rows are built (TokenRows), not here, so opening is O(documents).
  // Errors are moetp::Error naming the folder, the file and the values.
  static Dataset open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const nlohmann::json& manifest() const { return manifest_; }
  // sha256 of manifest.json's bytes: identifies the dataset (checkpoints record it).
  const std::string& manifest_sha256() const { return manifest_sha256_; }
  uint32_t vocab_size() const { return vocab_size_; }
  std::optional<uint32_t> eos_id() const { return eos_id_; }
  bool has_loss_mask() const { return loss_mask_; }
  bool has_split(const std::string& name) const { return splits_.count(name) != 0; }
  // moetp::Error naming the splits there are when `name` is not one.
  const DatasetSplit& split(const std::string& name) const;

 private:
  std::string dir_;
  nlohmann::json manifest_;
  std::string manifest_sha256_;
  uint32_t vocab_size_ = 0;
  std::optional<uint32_t> eos_id_;
  bool loss_mask_ = false;
  std::map<std::string, DatasetSplit> splits_;
};

// Writes a dataset folder (layout above). Documents are appended per split; shards roll over
// after shard_tokens tokens (a document never spans two shards). finish() completes the folder;
// destroying the writer without finish() removes the partial folder.
class DatasetWriter {
 public:
  struct Options {
    uint32_t vocab_size = 0;
    bool loss_mask = false;
    int64_t shard_tokens = int64_t{1} << 28;  // 1 GiB of ids per shard
    bool overwrite = false;                   // replace an existing dataset at DIR
  };
  // Errors before anything is written: DIR exists and overwrite is off (or it exists and is not a
  // dataset folder), its parent does not exist, shard_tokens < 1, vocab_size 0.
  DatasetWriter(std::string dir, Options options);
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;
  ~DatasetWriter();

  // Appends one document to `split` (kTrainSplit or kValidSplit). ids non-empty, each <
  // vocab_size; mask the same length with 0/1 values when the dataset has loss masks, else empty.
  void add(const std::string& split, std::span<const uint32_t> ids, std::span<const uint8_t> mask = {});
  SplitCounts counts(const std::string& split) const;

  // Closes the shards, writes manifest.json = `manifest` plus the format, version, vocab_size,
  // loss_mask and "splits" fields this writer owns, fsyncs, and renames the folder onto DIR.
  // A split without documents is left out; a dataset whose train split is empty is an error.
  void finish(nlohmann::json manifest);

  const std::string& dir() const { return dir_; }

 private:
  struct Impl;
  std::string dir_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetp::data
