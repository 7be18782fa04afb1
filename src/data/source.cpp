// Token files and dataset folders behind TrainData (source.h).
#include "data/source.h"

#include <filesystem>
#include <utility>

#include "core/check.h"
#include "data/loader.h"

namespace moetp::data {

namespace {

class TokenFileData final : public TrainData {
 public:
  TokenFileData(TokenFile file, const DataOptions& opt)
      : batches_(std::move(file), opt.seq_len, opt.global_batch_size, opt.seed) {}

  TokenRows micro_batch(int64_t step, int rank, int world, int micro, int num_micro) const override {
    const std::vector<int64_t> slice = batches_.rank_slice(step, rank, world);
    return batches_.rows(micro_slice(slice, micro, num_micro));
  }
  int64_t global_loss_tokens(int64_t) const override { return batches_.global_batch_size() * batches_.seq_len(); }
  int64_t global_padding(int64_t) const override { return 0; }
  int64_t epoch_of(int64_t step) const override { return batches_.epoch_of(step); }
  uint32_t vocab_size() const override { return batches_.file().vocab_size(); }
  nlohmann::json identity() const override {
    return {{"kind", "token_file"},
            {"path", batches_.file().path()},
            {"num_tokens", batches_.file().num_tokens()},
            {"vocab_size", batches_.file().vocab_size()}};
  }
  std::string describe() const override {
    return fmt::format("token file {}: {} tokens, vocab {}, {} sequences of {} ({} steps per epoch)",
                       batches_.file().path(), batches_.file().num_tokens(), batches_.file().vocab_size(),
                       batches_.num_sequences(), batches_.seq_len(), batches_.steps_per_epoch());
  }

 private:
  Batches batches_;
};

std::string packing_line(const PackingStats& s) {
  std::string out = fmt::format("{} documents -> {} samples", s.documents, s.samples);
  if (s.split > 0) out += fmt::format(", {} split", s.split);
  if (s.truncated > 0) out += fmt::format(", {} truncated", s.truncated);
  if (s.dropped > 0) out += fmt::format(", {} dropped as over-long", s.dropped);
  if (s.too_short > 0) out += fmt::format(", {} of one token left out", s.too_short);
  if (s.truncated_tokens > 0) out += fmt::format(" ({} tokens not trained on)", s.truncated_tokens);
  return out;
}

class DatasetData final : public TrainData {
 public:
  DatasetData(std::unique_ptr<Dataset> ds, const DataOptions& opt)
      : ds_(std::move(ds)),
        batches_(*ds_, kTrainSplit, opt.seq_len, opt.global_batch_size, opt.seed, opt.overlong) {}

  TokenRows micro_batch(int64_t step, int rank, int world, int micro, int num_micro) const override {
    return batches_.micro_batch(step, rank, world, micro, num_micro);
  }
  int64_t global_loss_tokens(int64_t step) const override { return batches_.global_loss_tokens(step); }
  int64_t global_padding(int64_t step) const override { return batches_.global_padding(step); }
  int64_t epoch_of(int64_t step) const override { return batches_.epoch_of(step); }
  uint32_t vocab_size() const override { return ds_->vocab_size(); }
  nlohmann::json identity() const override {
    return {{"kind", "dataset"}, {"path", ds_->dir()}, {"manifest_sha256", ds_->manifest_sha256()}};
  }
  std::vector<std::string> tokenizer_files() const override {
    namespace fs = std::filesystem;
    const nlohmann::json& m = ds_->manifest();
    std::vector<std::string> out;
    const nlohmann::json tok = m.value("tokenizer", nlohmann::json::object());
    const std::string path = tok.value("path", "");
    if (path.empty() || !fs::is_regular_file(path)) return out;
    out.push_back(path);
    std::string config = (fs::path(path).parent_path() / "tokenizer_config.json").string();
    if (m.contains("chat")) config = m.at("chat").value("tokenizer_config", config);
    if (fs::is_regular_file(config)) out.push_back(config);
    return out;
  }
  std::string describe() const override {
    const SplitCounts& c = ds_->split(kTrainSplit).counts();
    return fmt::format("dataset {} (train split): {} tokens, {} with loss, vocab {}; packing: {}; {} rows, {} steps "
                       "in the first epoch",
                       ds_->dir(), c.tokens, c.loss_tokens, ds_->vocab_size(), packing_line(batches_.stats()),
                       batches_.rows_in_epoch(0), batches_.steps_in_epoch(0));
  }

 private:
  std::unique_ptr<Dataset> ds_;
  PackedBatches batches_;
};

}  // namespace

std::unique_ptr<TrainData> open_train_data(const DataOptions& opt) {
  if (std::filesystem::is_directory(opt.path)) {
    return std::make_unique<DatasetData>(std::make_unique<Dataset>(Dataset::open(opt.path)), opt);
  }
  return std::make_unique<TokenFileData>(TokenFile::open(opt.path), opt);
}

std::unique_ptr<TrainData> token_file_data(TokenFile file, const DataOptions& opt) {
  return std::make_unique<TokenFileData>(std::move(file), opt);
}

EvalData::EvalData(const std::string& dir, int64_t seq_len, int64_t global_batch_size, OverlongChoice overlong)
    : dataset_(std::make_unique<Dataset>(Dataset::open(dir))),
      split_(dataset_->has_split(kValidSplit) ? kValidSplit : kTrainSplit),
      rows_(std::make_unique<EvalRows>(*dataset_, split_, seq_len, global_batch_size, overlong)) {}

std::string EvalData::describe() const {
  return fmt::format("dataset {} ({} split): {} rows of {} in {} batches, {} targets with loss; packing: {}",
                     dataset_->dir(), split_, rows_->num_rows(), rows_->seq_len(),
                     rows_->num_batches(), rows_->loss_tokens(), packing_line(rows_->stats()));
}

}  // namespace moetp::data
