// Corpus -> dataset folder (semantics in corpus.h).
#include "data/corpus.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>

#include "core/check.h"
#include "core/file_util.h"
#include "core/rng.h"
#include "core/sha256.h"
#include "data/dataset.h"
#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"

namespace moetp::data {
namespace fs = std::filesystem;

namespace {

struct InputFile {
  std::string path;
  bool valid = false;  // under one of valid_inputs
  bool jsonl = false;
};

bool hidden(const fs::path& relative) {
  for (const auto& part : relative) {
    const std::string s = part.string();
    if (!s.empty() && s[0] == '.' && s != "." && s != "..") return true;
  }
  return false;
}

std::vector<InputFile> list_inputs(const CorpusOptions& opt) {
  MOETP_CHECK(!opt.inputs.empty(), "tokenize: no inputs");
  for (const std::string& v : opt.valid_inputs) {
    MOETP_CHECK(std::find(opt.inputs.begin(), opt.inputs.end(), v) != opt.inputs.end(),
                "tokenize: validation input '{}' is not one of the inputs", v);
  }
  std::vector<InputFile> files;
  for (const std::string& in : opt.inputs) {
    const bool valid = std::find(opt.valid_inputs.begin(), opt.valid_inputs.end(), in) != opt.valid_inputs.end();
    std::vector<std::string> paths;
    if (fs::is_directory(in)) {
      for (const auto& e : fs::recursive_directory_iterator(in)) {
        if (e.is_regular_file() && !hidden(fs::relative(e.path(), in))) paths.push_back(e.path().string());
      }
      std::sort(paths.begin(), paths.end());
      MOETP_CHECK(!paths.empty(), "tokenize: folder '{}' holds no files", in);
    } else {
      MOETP_CHECK(fs::is_regular_file(in), "tokenize: input '{}' does not exist (or is not a file or folder)", in);
      paths.push_back(in);
    }
    for (std::string& p : paths) {
      const bool jsonl = p.size() >= 6 && p.compare(p.size() - 6, 6, ".jsonl") == 0;
      MOETP_CHECK(jsonl || !opt.chat, "tokenize --chat: '{}' is not a .jsonl file (chat data is JSONL)", p);
      files.push_back({std::move(p), valid, jsonl});
    }
  }
  return files;
}

// One record: a JSONL line or a whole text file.
struct Record {
  int file = 0;
  int64_t line = 0;  // 1-based for JSONL, 0 for a whole file
  std::string_view text;
  bool valid = false;
};

struct Sample {
  std::vector<uint32_t> ids;
  std::vector<uint8_t> mask;
};

enum class Outcome { kOk, kSkip, kInvalidUtf8, kBadRecord };

struct Result {
  Outcome outcome = Outcome::kOk;
  std::string message;  // kSkip: the reason key; errors: the message
  std::vector<Sample> samples;
};

struct Context {
  const CorpusOptions* opt = nullptr;
  const std::vector<InputFile>* files = nullptr;
  std::optional<HfTokenizer> hf;
  std::optional<ChatTemplate> chat;
  std::optional<uint32_t> eos;
};

Result process(const Context& cx, const Record& rec) {
  const CorpusOptions& opt = *cx.opt;
  const bool jsonl = (*cx.files)[static_cast<size_t>(rec.file)].jsonl;
  Result r;
  std::string_view text = rec.text;
  std::string fixed;
  if (cx.hf || jsonl) {
    const size_t bad = first_invalid_utf8(text);
    if (bad != std::string_view::npos) {
      switch (opt.invalid_utf8) {
        case InvalidUtf8Policy::kRefuse:
          r.outcome = Outcome::kInvalidUtf8;
          r.message = fmt::format("not valid UTF-8 at byte offset {} (byte 0x{:02x}) of the {}", bad,
                                  static_cast<unsigned char>(text[bad]), jsonl ? "line" : "file");
          return r;
        case InvalidUtf8Policy::kSkip:
          r.outcome = Outcome::kSkip;
          r.message = "invalid_utf8";
          return r;
        case InvalidUtf8Policy::kReplace:
          fixed = replace_invalid_utf8(text);
          text = fixed;
          break;
      }
    }
  }
  try {
    if (opt.chat) {
      nlohmann::json j = nlohmann::json::parse(text);
      const std::vector<ChatMessage> messages = parse_messages(j, "record");
      for (const RenderedChat& s : cx.chat->render_samples(messages, opt.chat_samples)) {
        if (s.assistant_spans.empty()) continue;
        TokenizedChat t = tokenize_chat(*cx.hf, s);
        r.samples.push_back({std::move(t.ids), std::move(t.loss_mask)});
      }
      if (r.samples.empty()) {
        r.outcome = Outcome::kSkip;
        r.message = "no_assistant_turn";
      }
      return r;
    }
    std::string field;
    std::string_view doc = text;
    if (jsonl) {
      const nlohmann::json j = nlohmann::json::parse(text);
      MOETP_CHECK(j.is_object() && j.contains(opt.text_field), "no field \"{}\"", opt.text_field);
      MOETP_CHECK(j.at(opt.text_field).is_string(), "field \"{}\" is not a string but {}", opt.text_field,
                  j.at(opt.text_field).type_name());
      field = j.at(opt.text_field).get<std::string>();
      doc = field;
    }
    if (doc.empty()) {
      r.outcome = Outcome::kSkip;
      r.message = "empty";
      return r;
    }
    Sample s;
    s.ids = cx.hf ? cx.hf->encode(doc, opt.split_special_tokens) : encode_bytes(doc);
    if (cx.eos) s.ids.push_back(*cx.eos);
    r.samples.push_back(std::move(s));
  } catch (const nlohmann::json::exception& e) {
    r.outcome = Outcome::kBadRecord;
    r.message = fmt::format("not valid JSON: {}", e.what());
  } catch (const std::exception& e) {
    r.outcome = Outcome::kBadRecord;
    r.message = e.what();
  }
  return r;
}

// Runs process() over the records on `threads` threads; results in record order.
std::vector<Result> process_all(const Context& cx, const std::vector<Record>& records, int threads) {
  std::vector<Result> results(records.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next.fetch_add(1); i < records.size(); i = next.fetch_add(1)) results[i] = process(cx, records[i]);
  };
  const int n = std::max(1, std::min<int>(threads, static_cast<int>(records.size())));
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  return results;
}

const char* policy_name(InvalidUtf8Policy p) {
  switch (p) {
    case InvalidUtf8Policy::kRefuse:
      return "refuse";
    case InvalidUtf8Policy::kReplace:
      return "replace";
    case InvalidUtf8Policy::kSkip:
      return "skip";
  }
  return "?";
}

}  // namespace

CorpusReport tokenize_corpus(const CorpusOptions& opt, const CorpusProgress& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  MOETP_CHECK(opt.valid_fraction >= 0 && opt.valid_fraction < 1, "tokenize: valid fraction {} outside [0, 1)",
              opt.valid_fraction);
  MOETP_CHECK(!opt.out_dir.empty(), "tokenize: no output folder");
  const std::vector<InputFile> files = list_inputs(opt);

  Context cx;
  cx.opt = &opt;
  cx.files = &files;
  nlohmann::json tokenizer_json;
  uint32_t vocab_size = kByteVocabSize;
  if (!opt.tokenizer.empty()) {
    cx.hf = HfTokenizer::load(opt.tokenizer);
    vocab_size = cx.hf->vocab_size();
    tokenizer_json = {{"kind", "huggingface"}, {"path", opt.tokenizer}, {"sha256", sha256_file(opt.tokenizer)}};
  } else {
    MOETP_CHECK(!opt.chat, "tokenize --chat needs --tokenizer (a tokenizer.json with the chat template's tokens)");
    MOETP_CHECK(opt.eos.empty(), "tokenize: --eos needs --tokenizer (the byte-level tokenizer has no end-of-text token)");
    tokenizer_json = {{"kind", "bytes"}};
  }
  tokenizer_json["vocab_size"] = vocab_size;
  nlohmann::json chat_json;
  if (opt.chat) {
    const std::string config = !opt.tokenizer_config.empty()
                                   ? opt.tokenizer_config
                                   : (fs::path(opt.tokenizer).parent_path() / "tokenizer_config.json").string();
    cx.chat.emplace(config);
    chat_json = {{"template", "qwen3"},
                 {"tokenizer_config", config},
                 {"tokenizer_config_sha256", sha256_file(config)},
                 {"samples", opt.chat_samples == ChatSamples::kWhole ? "whole" : "per_assistant_turn"}};
    tokenizer_json["eos_id"] = nullptr;
  } else if (cx.hf) {
    const std::string eos = opt.eos.empty() ? "<|endoftext|>" : opt.eos;
    cx.eos = cx.hf->token_to_id(eos);
    MOETP_CHECK(cx.eos.has_value(), "tokenize: tokenizer '{}' has no token '{}' to end documents with (name one with --eos)",
                opt.tokenizer, eos);
    tokenizer_json["eos_id"] = *cx.eos;
    tokenizer_json["eos_token"] = eos;
  } else {
    tokenizer_json["eos_id"] = nullptr;
  }

  DatasetWriter::Options wopt;
  wopt.vocab_size = vocab_size;
  wopt.loss_mask = opt.chat;
  wopt.shard_tokens = opt.shard_tokens;
  wopt.overwrite = opt.overwrite;
  DatasetWriter writer(opt.out_dir, wopt);

  int64_t total_bytes = 0;
  for (const InputFile& f : files) total_bytes += static_cast<int64_t>(fs::file_size(f.path));
  const int threads = opt.threads > 0 ? opt.threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const size_t batch_bytes = std::max<size_t>(size_t{16} << 20, (size_t{4} << 20) * static_cast<size_t>(threads));
  const CounterRng valid_rng(opt.seed, stream_id("moetp.tokenize.valid"));

  CorpusReport rep;
  rep.input_bytes = total_bytes;
  nlohmann::json sources = nlohmann::json::array();
  std::vector<nlohmann::json> source_stats(files.size());
  for (auto& s : source_stats) s = {{"records", 0}, {"train_documents", 0}, {"valid_documents", 0}, {"skipped", 0}};

  std::vector<std::shared_ptr<MappedFile>> mapped;  // the files the pending records point into
  std::vector<Record> pending;
  size_t pending_bytes = 0;
  int64_t done_bytes = 0;
  auto last_report = std::chrono::steady_clock::now();

  auto where = [&](const Record& rec) {
    const std::string& path = files[static_cast<size_t>(rec.file)].path;
    return rec.line > 0 ? fmt::format("{}:{}", path, rec.line) : path;
  };
  auto flush = [&] {
    if (pending.empty()) return;
    std::vector<Result> results = process_all(cx, pending, threads);
    for (size_t i = 0; i < pending.size(); ++i) {
      const Record& rec = pending[i];
      Result& res = results[i];
      nlohmann::json& st = source_stats[static_cast<size_t>(rec.file)];
      if (res.outcome == Outcome::kInvalidUtf8) {
        MOETP_FAIL("tokenize: {}: {} (--invalid-utf8 replace or skip to go on)", where(rec), res.message);
      }
      if (res.outcome == Outcome::kBadRecord) {
        MOETP_CHECK(opt.skip_bad_records, "tokenize: {}: {} (--skip-bad-records to count and skip such records)",
                    where(rec), res.message);
        res.outcome = Outcome::kSkip;
        res.message = "bad_record";
      }
      if (res.outcome == Outcome::kSkip) {
        rep.skipped[res.message] += 1;
        st["skipped"] = st["skipped"].get<int64_t>() + 1;
        continue;
      }
      const char* split = rec.valid ? kValidSplit : kTrainSplit;
      for (const Sample& s : res.samples) writer.add(split, s.ids, s.mask);
      const char* key = rec.valid ? "valid_documents" : "train_documents";
      st[key] = st[key].get<int64_t>() + static_cast<int64_t>(res.samples.size());
    }
    pending.clear();
    mapped.clear();
    pending_bytes = 0;
    const auto now = std::chrono::steady_clock::now();
    if (progress && now - last_report >= std::chrono::seconds(2)) {
      progress(done_bytes, total_bytes, rep.records);
      last_report = now;
    }
  };

  for (size_t fi = 0; fi < files.size(); ++fi) {
    const InputFile& f = files[fi];
    // Shared with `mapped` so that the mapping outlives the batch its records are in.
    auto m = std::make_shared<MappedFile>(MappedFile::open(f.path));
    mapped.push_back(m);
    const std::string_view all(reinterpret_cast<const char*>(m->bytes().data()), m->size());
    sources.push_back({{"path", f.path}, {"sha256", sha256_hex(all)}, {"bytes", m->size()},
                       {"split", f.valid ? kValidSplit : kTrainSplit}});
    const int64_t file_start = done_bytes;
    auto push = [&](std::string_view text, int64_t line) {
      const bool valid = f.valid || (opt.valid_fraction > 0 &&
                                     valid_rng.uniform(static_cast<uint64_t>(rep.records)) < opt.valid_fraction);
      pending.push_back({static_cast<int>(fi), line, text, valid});
      pending_bytes += text.size();
      rep.records += 1;
      source_stats[fi]["records"] = source_stats[fi]["records"].get<int64_t>() + 1;
    };
    if (f.jsonl) {
      size_t pos = 0;
      int64_t line = 0;
      while (pos < all.size()) {
        size_t end = all.find('\n', pos);
        if (end == std::string_view::npos) end = all.size();
        ++line;
        std::string_view text = all.substr(pos, end - pos);
        if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
        if (text.find_first_not_of(" \t") != std::string_view::npos) push(text, line);
        pos = end + 1;
        if (pending_bytes >= batch_bytes || pending.size() >= 65536) {
          done_bytes = file_start + static_cast<int64_t>(std::min(pos, all.size()));
          flush();
          mapped.push_back(m);
        }
      }
    } else {
      push(all, 0);
    }
    done_bytes = file_start + static_cast<int64_t>(all.size());
    if (pending_bytes >= batch_bytes || pending.size() >= 65536) flush();
  }
  flush();
  if (progress) progress(done_bytes, total_bytes, rep.records);

  for (size_t fi = 0; fi < files.size(); ++fi) sources[fi].update(source_stats[fi]);
  nlohmann::json skipped = nlohmann::json::object();
  for (const auto& [k, v] : rep.skipped) skipped[k] = v;
  nlohmann::json manifest;
  manifest["created_by"] = "moetp tokenize";
  manifest["kind"] = opt.chat ? "chat" : "text";
  manifest["tokenizer"] = tokenizer_json;
  if (opt.chat) manifest["chat"] = chat_json;
  manifest["options"] = {{"text_field", opt.text_field},
                         {"split_special_tokens", opt.split_special_tokens},
                         {"valid_fraction", opt.valid_fraction},
                         {"valid_inputs", opt.valid_inputs},
                         {"seed", opt.seed},
                         {"invalid_utf8", policy_name(opt.invalid_utf8)},
                         {"skip_bad_records", opt.skip_bad_records}};
  manifest["sources"] = sources;
  manifest["records"] = rep.records;
  manifest["skipped"] = skipped;
  const SplitCounts tr = writer.counts(kTrainSplit), va = writer.counts(kValidSplit);
  rep.train_documents = tr.documents;
  rep.train_tokens = tr.tokens;
  rep.train_loss_tokens = tr.loss_tokens;
  rep.valid_documents = va.documents;
  rep.valid_tokens = va.tokens;
  rep.valid_loss_tokens = va.loss_tokens;
  writer.finish(std::move(manifest));
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace moetp::data
