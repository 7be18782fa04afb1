// Dataset folders (layout and guarantees in dataset.h).
#include "data/dataset.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <utility>

#include "core/check.h"
#include "core/file_util.h"
#include "core/sha256.h"

namespace moetp::data {
namespace fs = std::filesystem;

namespace {

bool valid_split_name(const std::string& s) { return s == kTrainSplit || s == kValidSplit; }

std::string shard_name(const std::string& split, int index) { return fmt::format("{}-{:05d}", split, index); }

// Shard names are <split>-NNNNN: nothing in a manifest can point outside the folder.
bool valid_shard_name(const std::string& split, const std::string& name) {
  if (name.size() != split.size() + 6 || name.compare(0, split.size(), split) != 0 || name[split.size()] != '-') {
    return false;
  }
  return std::all_of(name.begin() + static_cast<std::ptrdiff_t>(split.size()) + 1, name.end(),
                     [](char c) { return c >= '0' && c <= '9'; });
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

}  // namespace

// ---------------------------------------------------------------- reading

struct DatasetSplit::Shard {
  std::string name;
  MappedFile ids_file, docs_file, mask_file;
  std::span<const uint32_t> ids;
  std::span<const uint64_t> docs;  // D + 1 offsets
  std::span<const uint8_t> mask;
};

DocumentView DatasetSplit::document(int64_t i) const {
  MOETP_CHECK(i >= 0 && i < total_docs_, "dataset split '{}': document {} outside [0, {})", name_, i, total_docs_);
  const auto it = std::upper_bound(first_doc_.begin(), first_doc_.end(), i);
  const auto s = static_cast<size_t>(it - first_doc_.begin() - 1);
  const Shard& sh = *shards_[s];
  const auto d = static_cast<size_t>(i - first_doc_[s]);
  const uint64_t b = sh.docs[d], e = sh.docs[d + 1];
  DocumentView v;
  v.ids = sh.ids.subspan(b, e - b);
  if (!sh.mask.empty()) v.mask = sh.mask.subspan(b, e - b);
  return v;
}

int64_t DatasetSplit::document_length(int64_t i) const {
  MOETP_CHECK(i >= 0 && i < total_docs_, "dataset split '{}': document {} outside [0, {})", name_, i, total_docs_);
  const auto it = std::upper_bound(first_doc_.begin(), first_doc_.end(), i);
  const auto s = static_cast<size_t>(it - first_doc_.begin() - 1);
  const auto d = static_cast<size_t>(i - first_doc_[s]);
  return static_cast<int64_t>(shards_[s]->docs[d + 1] - shards_[s]->docs[d]);
}

namespace {

template <class T>
T json_get(const nlohmann::json& j, const char* key, const std::string& where) {
  MOETP_CHECK(j.is_object() && j.contains(key), "{}: missing \"{}\"", where, key);
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception& e) {
    MOETP_FAIL("{}: \"{}\" has the wrong type ({}): {}", where, key, j.at(key).dump(), e.what());
  }
}

template <class T>
std::span<const T> typed_span(const MappedFile& f) {
  return {reinterpret_cast<const T*>(f.bytes().data()), static_cast<size_t>(f.size() / sizeof(T))};
}

}  // namespace

Dataset Dataset::open(const std::string& dir) {
  Dataset ds;
  ds.dir_ = dir;
  const std::string manifest_path = (fs::path(dir) / "manifest.json").string();
  MOETP_CHECK(fs::is_directory(dir), "dataset '{}': not a folder", dir);
  MOETP_CHECK(fs::is_regular_file(manifest_path),
              "dataset '{}': no manifest.json (not a dataset folder, or `moetp tokenize` did not finish)", dir);
  const std::string text = read_text_file(manifest_path);
  ds.manifest_sha256_ = sha256_hex(text);
  try {
    ds.manifest_ = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    MOETP_FAIL("dataset '{}': manifest.json is not valid JSON: {}", dir, e.what());
  }
  const nlohmann::json& m = ds.manifest_;
  const std::string where = fmt::format("dataset '{}': manifest.json", dir);
  MOETP_CHECK(json_get<std::string>(m, "format", where) == kDatasetFormat, "{}: format is {}, expected \"{}\"", where,
              m.at("format").dump(), kDatasetFormat);
  const int version = json_get<int>(m, "version", where);
  MOETP_CHECK(version == kDatasetVersion, "{}: version {} is not supported (this build reads version {})", where,
              version, kDatasetVersion);
  const auto vocab = json_get<int64_t>(m, "vocab_size", where);
  MOETP_CHECK(vocab > 0 && vocab <= std::numeric_limits<int32_t>::max(), "{}: vocab_size {} outside [1, 2^31)", where,
              vocab);
  ds.vocab_size_ = static_cast<uint32_t>(vocab);
  const nlohmann::json& tok = m.contains("tokenizer") ? m.at("tokenizer") : nlohmann::json();
  if (tok.is_object() && tok.contains("eos_id") && !tok.at("eos_id").is_null()) {
    ds.eos_id_ = json_get<uint32_t>(tok, "eos_id", where + " tokenizer");
  }
  ds.loss_mask_ = json_get<bool>(m, "loss_mask", where);
  const auto& splits = m.contains("splits") ? m.at("splits") : nlohmann::json();
  MOETP_CHECK(splits.is_object() && splits.contains(kTrainSplit), "{}: no \"splits\".\"train\"", where);

  for (const auto& [split_name, sj] : splits.items()) {
    MOETP_CHECK(valid_split_name(split_name), "{}: unknown split \"{}\" (expected train or valid)", where, split_name);
    const std::string swhere = fmt::format("{} splits.{}", where, split_name);
    DatasetSplit split;
    split.name_ = split_name;
    split.vocab_size_ = ds.vocab_size_;
    split.counts_.documents = json_get<int64_t>(sj, "documents", swhere);
    split.counts_.tokens = json_get<int64_t>(sj, "tokens", swhere);
    split.counts_.loss_tokens = json_get<int64_t>(sj, "loss_tokens", swhere);
    MOETP_CHECK(sj.contains("shards") && sj.at("shards").is_array() && !sj.at("shards").empty(),
                "{}: \"shards\" must be a non-empty list", swhere);
    SplitCounts sum;
    for (const auto& shj : sj.at("shards")) {
      auto sh = std::make_shared<DatasetSplit::Shard>();
      sh->name = json_get<std::string>(shj, "name", swhere + " shard");
      MOETP_CHECK(valid_shard_name(split_name, sh->name), "{}: shard name \"{}\" is not {}-NNNNN", swhere, sh->name,
                  split_name);
      const std::string shwhere = fmt::format("dataset '{}': shard {}", dir, sh->name);
      const auto docs = json_get<int64_t>(shj, "documents", shwhere);
      const auto tokens = json_get<int64_t>(shj, "tokens", shwhere);
      MOETP_CHECK(docs > 0 && tokens >= docs, "{}: {} documents of {} tokens (needs documents >= 1, tokens >= documents)",
                  shwhere, docs, tokens);
      const std::string base = (fs::path(dir) / sh->name).string();
      auto open_sized = [&](const std::string& ext, uint64_t expected) {
        const std::string path = base + ext;
        MOETP_CHECK(fs::is_regular_file(path), "{}: missing file {}", shwhere, path);
        MappedFile f = MappedFile::open(path);
        MOETP_CHECK(f.size() == expected, "{}: {} has {} bytes, the manifest implies {}", shwhere, path, f.size(),
                    expected);
        return f;
      };
      sh->ids_file = open_sized(".ids", static_cast<uint64_t>(tokens) * 4);
      sh->docs_file = open_sized(".docs", static_cast<uint64_t>(docs + 1) * 8);
      sh->ids = typed_span<uint32_t>(sh->ids_file);
      sh->docs = typed_span<uint64_t>(sh->docs_file);
      if (ds.loss_mask_) {
        sh->mask_file = open_sized(".mask", static_cast<uint64_t>(tokens));
        sh->mask = typed_span<uint8_t>(sh->mask_file);
      }
      MOETP_CHECK(sh->docs.front() == 0 && sh->docs.back() == static_cast<uint64_t>(tokens),
                  "{}: document offsets run from {} to {}, expected 0 to {}", shwhere, sh->docs.front(),
                  sh->docs.back(), tokens);
      for (size_t d = 0; d + 1 < sh->docs.size(); ++d) {
        MOETP_CHECK(sh->docs[d] < sh->docs[d + 1], "{}: document {} is empty or reversed (offsets {} then {})",
                    shwhere, d, sh->docs[d], sh->docs[d + 1]);
      }
      split.first_doc_.push_back(sum.documents);
      sum.documents += docs;
      sum.tokens += tokens;
      sum.loss_tokens += json_get<int64_t>(shj, "loss_tokens", shwhere);
      split.shards_.push_back(std::move(sh));
    }
    MOETP_CHECK(sum.documents == split.counts_.documents && sum.tokens == split.counts_.tokens &&
                    sum.loss_tokens == split.counts_.loss_tokens,
                "{}: totals ({} documents, {} tokens, {} loss tokens) differ from the sum over shards ({}, {}, {})",
                swhere, split.counts_.documents, split.counts_.tokens, split.counts_.loss_tokens, sum.documents,
                sum.tokens, sum.loss_tokens);
    split.total_docs_ = sum.documents;
    ds.splits_.emplace(split_name, std::move(split));
  }
  return ds;
}

const DatasetSplit& Dataset::split(const std::string& name) const {
  const auto it = splits_.find(name);
  if (it == splits_.end()) {
    std::string have;
    for (const auto& [n, s] : splits_) have += (have.empty() ? "" : ", ") + n;
    MOETP_FAIL("dataset '{}' has no split '{}' (it has: {})", dir_, name, have);
  }
  return it->second;
}

// ---------------------------------------------------------------- writing

namespace {

// One output file of a shard, buffered, hashed as it is written.
class HashedFile {
 public:
  explicit HashedFile(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
    MOETP_CHECK(f_ != nullptr, "cannot create '{}': {}", path, std::strerror(errno));
    std::setvbuf(f_, nullptr, _IOFBF, size_t{4} << 20);
  }
  ~HashedFile() {
    if (f_ != nullptr) std::fclose(f_);
  }
  HashedFile(const HashedFile&) = delete;
  HashedFile& operator=(const HashedFile&) = delete;

  void write(const void* data, size_t n) {
    if (n == 0) return;
    MOETP_CHECK(std::fwrite(data, 1, n, f_) == n, "cannot write '{}': {}", path_, std::strerror(errno));
    hash_.update(data, n);
  }
  // Flushes, fsyncs and closes; returns the sha256.
  std::string close() {
    MOETP_CHECK(std::fflush(f_) == 0 && ::fsync(fileno(f_)) == 0, "cannot write '{}': {}", path_,
                std::strerror(errno));
    const int rc = std::fclose(f_);
    f_ = nullptr;
    MOETP_CHECK(rc == 0, "cannot close '{}': {}", path_, std::strerror(errno));
    return hash_.hex();
  }

 private:
  std::string path_;
  std::FILE* f_;
  Sha256 hash_;
};

}  // namespace

struct DatasetWriter::Impl {
  struct SplitState {
    int next_shard = 0;
    std::string shard;  // open shard's name; empty when none is open
    std::unique_ptr<HashedFile> ids, docs, mask;
    SplitCounts shard_counts, total;
    nlohmann::json shards = nlohmann::json::array();
  };
  Options opt;
  std::string partial;
  std::map<std::string, SplitState> splits;
  bool finished = false;

  void open_shard(const std::string& split, SplitState& s) {
    s.shard = shard_name(split, s.next_shard++);
    const std::string base = (fs::path(partial) / s.shard).string();
    s.ids = std::make_unique<HashedFile>(base + ".ids");
    s.docs = std::make_unique<HashedFile>(base + ".docs");
    if (opt.loss_mask) s.mask = std::make_unique<HashedFile>(base + ".mask");
    const uint64_t zero = 0;
    s.docs->write(&zero, 8);
    s.shard_counts = {};
  }

  void close_shard(SplitState& s) {
    if (s.shard.empty()) return;
    nlohmann::json j;
    j["name"] = s.shard;
    j["documents"] = s.shard_counts.documents;
    j["tokens"] = s.shard_counts.tokens;
    j["loss_tokens"] = s.shard_counts.loss_tokens;
    j["sha256"]["ids"] = s.ids->close();
    j["sha256"]["docs"] = s.docs->close();
    if (s.mask) j["sha256"]["mask"] = s.mask->close();
    s.ids.reset();
    s.docs.reset();
    s.mask.reset();
    s.shards.push_back(std::move(j));
    s.shard.clear();
  }
};

DatasetWriter::DatasetWriter(std::string dir, Options options) : dir_(std::move(dir)), impl_(std::make_unique<Impl>()) {
  impl_->opt = options;
  MOETP_CHECK(options.vocab_size > 0, "dataset '{}': vocab_size must be > 0", dir_);
  MOETP_CHECK(options.shard_tokens >= 1, "dataset '{}': shard_tokens ({}) must be >= 1", dir_, options.shard_tokens);
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
  const fs::path target(dir_);
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  MOETP_CHECK(fs::is_directory(parent), "dataset '{}': parent folder '{}' does not exist", dir_, parent.string());
  if (fs::exists(target)) {
    MOETP_CHECK(options.overwrite, "dataset '{}' already exists (pass --overwrite to replace it)", dir_);
    MOETP_CHECK(fs::is_directory(target) &&
                    (fs::exists(target / "manifest.json") || fs::is_empty(target)),
                "dataset '{}' exists and is not a dataset folder (no manifest.json): refusing to replace it", dir_);
  }
  impl_->partial = fmt::format("{}.partial-{}", dir_, ::getpid());
  std::error_code ec;
  fs::remove_all(impl_->partial, ec);
  MOETP_CHECK(fs::create_directory(impl_->partial, ec), "cannot create '{}': {}", impl_->partial, ec.message());
}

DatasetWriter::~DatasetWriter() {
  if (!impl_->finished) {
    for (auto& [name, s] : impl_->splits) {
      s.ids.reset();
      s.docs.reset();
      s.mask.reset();
    }
    std::error_code ec;
    fs::remove_all(impl_->partial, ec);
  }
}

void DatasetWriter::add(const std::string& split, std::span<const uint32_t> ids, std::span<const uint8_t> mask) {
  MOETP_CHECK(!impl_->finished, "dataset '{}': add() after finish()", dir_);
  MOETP_CHECK(valid_split_name(split), "dataset '{}': unknown split '{}' (train or valid)", dir_, split);
  MOETP_CHECK(!ids.empty(), "dataset '{}': empty document", dir_);
  if (impl_->opt.loss_mask) {
    MOETP_CHECK(mask.size() == ids.size(), "dataset '{}': mask has {} entries for {} tokens", dir_, mask.size(),
                ids.size());
  } else {
    MOETP_CHECK(mask.empty(), "dataset '{}' has no loss masks but a document came with one", dir_);
  }
  int64_t loss = static_cast<int64_t>(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    MOETP_CHECK(ids[i] < impl_->opt.vocab_size, "dataset '{}': token {} of a document is id {}, outside the vocabulary ({})",
                dir_, i, ids[i], impl_->opt.vocab_size);
  }
  if (!mask.empty()) {
    loss = 0;
    for (size_t i = 0; i < mask.size(); ++i) {
      MOETP_CHECK(mask[i] <= 1, "dataset '{}': mask value {} at token {} (0 or 1)", dir_, mask[i], i);
      loss += mask[i];
    }
  }
  Impl::SplitState& s = impl_->splits[split];
  if (!s.shard.empty() && s.shard_counts.tokens > 0 &&
      s.shard_counts.tokens + static_cast<int64_t>(ids.size()) > impl_->opt.shard_tokens) {
    impl_->close_shard(s);
  }
  if (s.shard.empty()) impl_->open_shard(split, s);
  s.ids->write(ids.data(), ids.size() * sizeof(uint32_t));
  if (s.mask) s.mask->write(mask.data(), mask.size());
  s.shard_counts.documents += 1;
  s.shard_counts.tokens += static_cast<int64_t>(ids.size());
  s.shard_counts.loss_tokens += loss;
  const auto end = static_cast<uint64_t>(s.shard_counts.tokens);
  s.docs->write(&end, 8);
  s.total.documents += 1;
  s.total.tokens += static_cast<int64_t>(ids.size());
  s.total.loss_tokens += loss;
}

SplitCounts DatasetWriter::counts(const std::string& split) const {
  const auto it = impl_->splits.find(split);
  return it == impl_->splits.end() ? SplitCounts{} : it->second.total;
}

void DatasetWriter::finish(nlohmann::json manifest) {
  MOETP_CHECK(!impl_->finished, "dataset '{}': finish() called twice", dir_);
  MOETP_CHECK(counts(kTrainSplit).documents > 0, "dataset '{}': no training documents (nothing to write)", dir_);
  nlohmann::json splits = nlohmann::json::object();
  for (auto& [name, s] : impl_->splits) {
    impl_->close_shard(s);
    if (s.total.documents == 0) continue;
    splits[name] = {{"documents", s.total.documents},
                    {"tokens", s.total.tokens},
                    {"loss_tokens", s.total.loss_tokens},
                    {"shards", s.shards}};
  }
  manifest["format"] = kDatasetFormat;
  manifest["version"] = kDatasetVersion;
  manifest["vocab_size"] = impl_->opt.vocab_size;
  manifest["loss_mask"] = impl_->opt.loss_mask;
  manifest["splits"] = std::move(splits);
  {
    AtomicFileWriter w((fs::path(impl_->partial) / "manifest.json").string());
    const std::string text = manifest.dump(2) + "\n";
    w.write(text.data(), text.size());
    w.commit();
  }
  fsync_path(impl_->partial, true);
  std::error_code ec;
  std::string old;
  if (fs::exists(dir_)) {
    old = fmt::format("{}.old-{}", dir_, ::getpid());
    fs::remove_all(old, ec);
    fs::rename(dir_, old, ec);
    MOETP_CHECK(!ec, "cannot move the old dataset '{}' aside to '{}': {}", dir_, old, ec.message());
  }
  fs::rename(impl_->partial, dir_, ec);
  MOETP_CHECK(!ec, "cannot rename '{}' onto '{}': {}", impl_->partial, dir_, ec.message());
  impl_->finished = true;
  const fs::path target(dir_);
  fsync_path(target.has_parent_path() ? target.parent_path().string() : ".", true);
  if (!old.empty()) fs::remove_all(old, ec);
}

}  // namespace moetp::data
