// What the trainer reads, behind one interface: a token file (loader.h: one token stream cut into
// rows of seq_len + 1 tokens) or a dataset folder (dataset.h, packed by packing.h). Both give the
// rows of a step as TokenRows and the loss-carrying target count of the global batch that
// normalises the loss.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/options.h"
#include "data/packing.h"
#include "data/token_file.h"

namespace moetp::data {

class TrainData {
 public:
  virtual ~TrainData() = default;
  // Rank `rank` of `world`, micro-batch `micro` of `num_micro`, of step `step` (0-based).
  virtual TokenRows micro_batch(int64_t step, int rank, int world, int micro, int num_micro) const = 0;
  virtual int64_t global_loss_tokens(int64_t step) const = 0;
  virtual int64_t global_padding(int64_t step) const = 0;
  virtual int64_t epoch_of(int64_t step) const = 0;
  virtual uint32_t vocab_size() const = 0;
  // What a checkpoint records to refuse resuming on other data: {"kind", "path", ...}; for a
  // dataset the sha256 of its manifest.
  virtual nlohmann::json identity() const = 0;
  // One line for the run's banner: path, kind, sizes, packing counts.
  virtual std::string describe() const = 0;
  // The tokenizer files the data was made with, where they still exist: a dataset's tokenizer.json
  // and the tokenizer_config.json beside it (or the chat's). None for token files.
  virtual std::vector<std::string> tokenizer_files() const { return {}; }
};

struct DataOptions {
  std::string path;  // token file or dataset folder
  int64_t seq_len = 0;
  int64_t global_batch_size = 0;
  uint64_t seed = 0;
  OverlongChoice overlong = OverlongChoice::kAuto;
};

// A folder is opened as a dataset (its train split), a file as a token file.
std::unique_ptr<TrainData> open_train_data(const DataOptions& opt);
// A token file already open (opt.path unused).
std::unique_ptr<TrainData> token_file_data(TokenFile file, const DataOptions& opt);

// Validation rows of a dataset folder: its "valid" split when it has one, else its "train" split.
class EvalData {
 public:
  EvalData(const std::string& dir, int64_t seq_len, int64_t global_batch_size, OverlongChoice overlong);
  const EvalRows& rows() const { return *rows_; }
  const Dataset& dataset() const { return *dataset_; }
  const std::string& split() const { return split_; }
  std::string describe() const;

 private:
  std::unique_ptr<Dataset> dataset_;
  std::string split_;
  std::unique_ptr<EvalRows> rows_;
};

}  // namespace moetp::data
