// CPU benchmark of the Hugging Face tokenizer.json tokenizer (data/hf_tokenizer.h): throughput of
// HfTokenizer::encode_batch over a text corpus at several thread counts, side by side with the
// Python `tokenizers` library (bench/hf_tokenizer_baseline.py), whose ids must be identical.
//
//   python3 bench/make_tokenizer_corpus.py --out /tmp/corpus --mb 100
//   python3 bench/hf_tokenizer_baseline.py --corpus /tmp/corpus --json hf.json
//   build/bench/tokenizer_bench --corpus /tmp/corpus --baseline hf.json [--json moetp.json]
// (scripts/tokenizer-bench.sh runs the three.)
//
// Options: --corpus FILE|DIR (required), --tokenizer FILE (default
// third_party/tokenizers/qwen3/tokenizer.json), --doc-kb K (default 4), --threads LIST (default
// 1,4,16), --repeat N (default 3), --json FILE, --baseline FILE, --show-doc I (print document I's
// ids as JSON and exit; bench/hf_tokenizer_baseline.py --show-doc I prints HF's).
//
// Corpus -> documents (the same rule in bench/hf_tokenizer_baseline.py):
//   files: --corpus itself when it is a file; for a folder every regular file below it (recursive;
//     symbolic links to files followed, to folders not), ordered by the path relative to the folder,
//     '/'-separated, compared as bytes. Every file must be valid UTF-8 (else an error names it).
//   documents: --doc-kb 0: each non-empty file is one document. --doc-kb K > 0: each file is cut at
//     line ends: a line is the bytes up to and including a '\n' (the file's last line may lack it);
//     lines are appended to the current document, and the document is closed right after the line
//     that brings it to >= K·1024 bytes, and at the end of the file. Documents never span files and
//     are never empty; a line longer than K KB is not cut.
// Encoding: encode(text, add_special_tokens=False) semantics (HfTokenizer::encode_batch; the
// library's encode_batch(docs, add_special_tokens=False)).
//
// Timing: per thread count, --repeat runs of encode_batch over all documents (the result vector
// built, as the library builds its Encodings), wall clock (steady_clock) of the best run; MB/s =
// input bytes / 1e6 / seconds. Thread counts above the machine's hardware threads are run anyway
// (marked in the banner).
//
// Id hash (the same in bench/hf_tokenizer_baseline.py), FNV-1a 64 applied per 32- or 64-bit word
// (h = (h XOR w) · 0x100000001b3 mod 2^64, h0 = 0xcbf29ce484222325):
//   doc_hash(d)   = FNV over the uint32 words [n, id_0, ..., id_{n-1}] (n = number of ids of d);
//   corpus hash   = FNV over the uint64 words [D, doc_hash(0), ..., doc_hash(D-1)] (D documents).
// Every thread count must give the same corpus hash. With --baseline, the library's corpus hash is
// compared: MATCH, or MISMATCH and the first document whose doc_hash differs (index, file, byte
// offset in the file). Exit status 1 when the thread counts disagree or the ids mismatch.
//
// Columns: threads, best seconds, MB/s, tokens, the corpus hash; with --baseline: hf_s and hf_MB/s
// (Tokenizer.encode_batch), ratio = MB/s / hf_MB/s (> 1: moetp faster), and where the library has
// encode_batch_fast (no offsets; tokenizers >= 0.21) hf_fast_MB/s and ratio_fast.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"
#include "data/hf_tokenizer.h"

namespace moetp {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct Args {
  std::string corpus, tokenizer = "third_party/tokenizers/qwen3/tokenizer.json", json_out, baseline;
  int doc_kb = 4, repeat = 3;
  std::vector<int> threads = {1, 4, 16};
  long show_doc = -1;
};

std::string option_value(int argc, char** argv, int& i) {
  MOETP_CHECK(i + 1 < argc, "{} needs a value", argv[i]);
  return argv[++i];
}

std::vector<int> parse_threads(const std::string& list) {
  std::vector<int> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    int n = 0;
    try {
      n = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MOETP_CHECK(used == item.size() && n >= 1, "--threads: '{}' is not a thread count >= 1", item);
    out.push_back(n);
  }
  MOETP_CHECK(!out.empty(), "--threads: empty list");
  return out;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&] { return option_value(argc, argv, i); };
    if (arg == "--corpus") {
      a.corpus = value();
    } else if (arg == "--tokenizer") {
      a.tokenizer = value();
    } else if (arg == "--doc-kb") {
      a.doc_kb = std::stoi(value());
    } else if (arg == "--threads") {
      a.threads = parse_threads(value());
    } else if (arg == "--repeat") {
      a.repeat = std::stoi(value());
    } else if (arg == "--json") {
      a.json_out = value();
    } else if (arg == "--baseline") {
      a.baseline = value();
    } else if (arg == "--show-doc") {
      a.show_doc = std::stol(value());
    } else {
      MOETP_FAIL(
          "unknown argument '{}' (valid: --corpus FILE|DIR, --tokenizer FILE, --doc-kb K, --threads 1,4,16, "
          "--repeat N, --json FILE, --baseline FILE, --show-doc I)",
          arg);
    }
  }
  MOETP_CHECK(!a.corpus.empty(), "--corpus FILE|DIR is required");
  MOETP_CHECK(a.doc_kb >= 0, "--doc-kb must be >= 0, got {}", a.doc_kb);
  MOETP_CHECK(a.repeat >= 1, "--repeat must be >= 1, got {}", a.repeat);
  return a;
}

// ---- corpus ----------------------------------------------------------------------------------

// Strict UTF-8 (Unicode table 3-7, as Python's bytes.decode('utf-8')): offset of the first
// ill-formed sequence, or npos.
size_t first_invalid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return std::string::npos;
}

struct Corpus {
  std::vector<std::string> files;  // relative paths (or the file itself)
  std::vector<std::string> docs;
  std::vector<size_t> doc_file, doc_offset;  // per document: index into files, byte offset in it
  size_t bytes = 0;
};

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  MOETP_CHECK(in.is_open(), "cannot open corpus file '{}'", path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  MOETP_CHECK(!in.bad(), "reading corpus file '{}' failed", path.string());
  return ss.str();
}

Corpus read_corpus(const std::string& root, int doc_kb) {
  Corpus c;
  std::vector<fs::path> paths;
  const fs::path base(root);
  MOETP_CHECK(fs::exists(base), "--corpus '{}' does not exist", root);
  if (fs::is_directory(base)) {
    std::vector<std::pair<std::string, fs::path>> found;
    for (const auto& e : fs::recursive_directory_iterator(base)) {
      if (!e.is_regular_file()) continue;
      found.emplace_back(e.path().lexically_relative(base).generic_string(), e.path());
    }
    // std::string's < compares as unsigned bytes (char_traits<char>), as Python compares bytes.
    std::sort(found.begin(), found.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    for (auto& [rel, p] : found) {
      c.files.push_back(rel);
      paths.push_back(p);
    }
  } else {
    c.files.push_back(root);
    paths.push_back(base);
  }
  MOETP_CHECK(!paths.empty(), "--corpus '{}' holds no files", root);
  const size_t target = static_cast<size_t>(doc_kb) * 1024;
  for (size_t f = 0; f < paths.size(); ++f) {
    std::string text = read_file(paths[f]);
    const size_t bad = first_invalid_utf8(text);
    MOETP_CHECK(bad == std::string::npos, "corpus file '{}' is not valid UTF-8 (byte offset {})", paths[f].string(),
                bad);
    c.bytes += text.size();
    auto add = [&](size_t begin, size_t end) {
      c.docs.push_back(text.substr(begin, end - begin));
      c.doc_file.push_back(f);
      c.doc_offset.push_back(begin);
    };
    if (text.empty()) continue;
    if (target == 0) {
      add(0, text.size());
      continue;
    }
    size_t start = 0, pos = 0;
    while (pos < text.size()) {
      const size_t nl = text.find('\n', pos);
      pos = nl == std::string::npos ? text.size() : nl + 1;
      if (pos - start >= target || pos == text.size()) {
        add(start, pos);
        start = pos;
      }
    }
  }
  return c;
}

// ---- id hash ---------------------------------------------------------------------------------

constexpr uint64_t kFnvBasis = 0xcbf29ce484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001b3ull;

uint64_t doc_hash(const std::vector<uint32_t>& ids) {
  uint64_t h = (kFnvBasis ^ static_cast<uint64_t>(static_cast<uint32_t>(ids.size()))) * kFnvPrime;
  for (const uint32_t id : ids) h = (h ^ id) * kFnvPrime;
  return h;
}

uint64_t corpus_hash(const std::vector<uint64_t>& doc_hashes) {
  uint64_t h = (kFnvBasis ^ static_cast<uint64_t>(doc_hashes.size())) * kFnvPrime;
  for (const uint64_t d : doc_hashes) h = (h ^ d) * kFnvPrime;
  return h;
}

std::string hex(uint64_t h) { return fmt::format("{:016x}", h); }

// ---- benchmark -------------------------------------------------------------------------------

struct Row {
  int threads = 0;
  double best_s = 0;
  std::vector<double> runs_s;
  size_t tokens = 0;
  uint64_t hash = 0;
  std::vector<uint64_t> doc_hashes;
};

Row run_threads(const data::HfTokenizer& tok, const Corpus& c, int threads, int repeat) {
  Row r;
  r.threads = threads;
  std::vector<std::vector<uint32_t>> ids;
  for (int k = 0; k < repeat; ++k) {
    ids.clear();
    ids.shrink_to_fit();  // every run allocates its results, as the library does
    const auto t0 = std::chrono::steady_clock::now();
    ids = tok.encode_batch(c.docs, threads);
    const auto t1 = std::chrono::steady_clock::now();
    r.runs_s.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  r.best_s = *std::min_element(r.runs_s.begin(), r.runs_s.end());
  r.doc_hashes.reserve(ids.size());
  for (const auto& d : ids) {
    r.tokens += d.size();
    r.doc_hashes.push_back(doc_hash(d));
  }
  r.hash = corpus_hash(r.doc_hashes);
  return r;
}

uint64_t parse_hex(const json& j, const std::string& what) {
  MOETP_CHECK(j.is_string(), "baseline: {} is not a hex string", what);
  return std::stoull(j.get<std::string>(), nullptr, 16);
}

std::string fmt_or_dash(const json& row, const char* key, const char* spec) {
  if (!row.is_object() || !row.contains(key) || !row[key].is_number()) return "-";
  return fmt::format(fmt::runtime(spec), row[key].get<double>());
}

int run(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  const data::HfTokenizer tok = data::HfTokenizer::load(args.tokenizer);
  const auto load_t0 = std::chrono::steady_clock::now();
  const Corpus corpus = read_corpus(args.corpus, args.doc_kb);
  const double read_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_t0).count();

  if (args.show_doc >= 0) {
    MOETP_CHECK(static_cast<size_t>(args.show_doc) < corpus.docs.size(), "--show-doc {}: only {} documents",
                args.show_doc, corpus.docs.size());
    const size_t i = static_cast<size_t>(args.show_doc);
    json j = {{"document", i},
              {"file", corpus.files[corpus.doc_file[i]]},
              {"offset", corpus.doc_offset[i]},
              {"bytes", corpus.docs[i].size()},
              {"ids", tok.encode(corpus.docs[i])}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }

  const unsigned hw = std::thread::hardware_concurrency();
  std::printf("tokenizer_bench: corpus %s: %zu files, %zu documents (doc-kb %d), %zu bytes (%.1f MB, read in %.2f s)\n",
              args.corpus.c_str(), corpus.files.size(), corpus.docs.size(), args.doc_kb, corpus.bytes,
              static_cast<double>(corpus.bytes) / 1e6, read_s);
  std::printf("tokenizer %s (vocab %u); %u hardware threads; best of %d runs of encode_batch per thread count\n",
              args.tokenizer.c_str(), tok.vocab_size(), hw, args.repeat);
  for (const int t : args.threads) {
    if (hw != 0 && static_cast<unsigned>(t) > hw) {
      std::printf("note: %d threads > %u hardware threads (oversubscribed)\n", t, hw);
    }
  }

  json baseline;
  if (!args.baseline.empty()) {
    std::ifstream in(args.baseline);
    MOETP_CHECK(in.is_open(), "cannot open --baseline '{}'", args.baseline);
    try {
      baseline = json::parse(in);
    } catch (const json::exception& e) {
      MOETP_FAIL("--baseline '{}': not valid JSON: {}", args.baseline, e.what());
    }
    MOETP_CHECK(baseline.contains("results") && baseline["results"].is_array(), "--baseline '{}': no results array",
                args.baseline);
    std::printf("baseline %s: tokenizers %s, %s documents, %s bytes, doc-kb %s\n", args.baseline.c_str(),
                baseline.value("tokenizers_version", std::string("?")).c_str(),
                baseline.contains("documents") ? baseline["documents"].dump().c_str() : "?",
                baseline.contains("bytes") ? baseline["bytes"].dump().c_str() : "?",
                baseline.contains("doc_kb") ? baseline["doc_kb"].dump().c_str() : "?");
  }
  auto baseline_row = [&](int threads) -> json {
    if (baseline.is_null()) return json();
    for (const auto& r : baseline["results"]) {
      if (r.value("threads", -1) == threads) return r;
    }
    return json();
  };
  const bool has_fast = [&] {
    if (baseline.is_null()) return false;
    for (const auto& r : baseline["results"]) {
      if (r.contains("fast_mb_s") && r["fast_mb_s"].is_number()) return true;
    }
    return false;
  }();

  std::string header = fmt::format("{:>7} {:>9} {:>9} {:>12}  {:<16}", "threads", "seconds", "MB/s", "tokens", "id_hash");
  if (!baseline.is_null()) {
    header += fmt::format(" {:>9} {:>9} {:>7}", "hf_s", "hf_MB/s", "ratio");
    if (has_fast) header += fmt::format(" {:>12} {:>10}", "hf_fast_MB/s", "ratio_fast");
  }
  std::printf("%s\n", header.c_str());

  std::vector<Row> rows;
  for (const int t : args.threads) {
    Row r = run_threads(tok, corpus, t, args.repeat);
    const double mbs = static_cast<double>(corpus.bytes) / 1e6 / r.best_s;
    std::string line =
        fmt::format("{:>7} {:>9.3f} {:>9.2f} {:>12}  {:<16}", t, r.best_s, mbs, r.tokens, hex(r.hash));
    if (!baseline.is_null()) {
      const json b = baseline_row(t);
      std::string ratio = "-", ratio_fast = "-";
      if (b.is_object() && b.contains("mb_s") && b["mb_s"].is_number() && b["mb_s"].get<double>() > 0) {
        ratio = fmt::format("{:.2f}", mbs / b["mb_s"].get<double>());
      }
      if (b.is_object() && b.contains("fast_mb_s") && b["fast_mb_s"].is_number() && b["fast_mb_s"].get<double>() > 0) {
        ratio_fast = fmt::format("{:.2f}", mbs / b["fast_mb_s"].get<double>());
      }
      line += fmt::format(" {:>9} {:>9} {:>7}", fmt_or_dash(b, "seconds", "{:.3f}"), fmt_or_dash(b, "mb_s", "{:.2f}"),
                          ratio);
      if (has_fast) line += fmt::format(" {:>12} {:>10}", fmt_or_dash(b, "fast_mb_s", "{:.2f}"), ratio_fast);
    }
    std::printf("%s\n", line.c_str());
    if (!rows.empty()) r.doc_hashes.clear();  // the first row's are kept for the comparisons
    rows.push_back(std::move(r));
  }

  int status = 0;
  bool threads_agree = true;
  for (const Row& r : rows) threads_agree = threads_agree && r.hash == rows[0].hash;
  if (threads_agree) {
    std::printf("ids: identical at every thread count (hash %s, %zu tokens)\n", hex(rows[0].hash).c_str(),
                rows[0].tokens);
  } else {
    status = 1;
    std::printf("ids: DIFFER between thread counts:");
    for (const Row& r : rows) std::printf(" %d:%s", r.threads, hex(r.hash).c_str());
    std::printf("\n");
  }

  json compare;
  if (!baseline.is_null()) {
    const json& b0 = baseline["results"].empty() ? json() : baseline["results"][0];
    const bool hf_agree = baseline.value("threads_consistent", true);
    if (!hf_agree) std::printf("baseline: the library's ids DIFFER between its thread counts\n");
    const uint64_t hf_hash = baseline.contains("id_hash") ? parse_hex(baseline["id_hash"], "id_hash")
                             : b0.contains("id_hash")    ? parse_hex(b0["id_hash"], "results[0].id_hash")
                                                         : 0;
    const bool match = hf_agree && hf_hash == rows[0].hash;
    compare["match"] = match;
    compare["hf_id_hash"] = hex(hf_hash);
    if (match) {
      std::printf("vs HF tokenizers: MATCH (hash %s, %zu documents)\n", hex(hf_hash).c_str(), corpus.docs.size());
    } else {
      status = 1;
      std::printf("vs HF tokenizers: MISMATCH (moetp %s, HF %s)\n", hex(rows[0].hash).c_str(), hex(hf_hash).c_str());
      const size_t hf_docs = baseline.value("documents", static_cast<size_t>(0));
      if (hf_docs != corpus.docs.size() || baseline.value("bytes", static_cast<size_t>(0)) != corpus.bytes) {
        std::printf("  different corpus split: HF %zu documents / %zu bytes, moetp %zu / %zu\n", hf_docs,
                    baseline.value("bytes", static_cast<size_t>(0)), corpus.docs.size(), corpus.bytes);
      }
      if (baseline.contains("doc_hashes") && baseline["doc_hashes"].is_array()) {
        const json& hd = baseline["doc_hashes"];
        const size_t n = std::min(hd.size(), rows[0].doc_hashes.size());
        size_t first = n;
        size_t count = 0;
        for (size_t i = 0; i < n; ++i) {
          if (parse_hex(hd[i], "doc_hashes[i]") != rows[0].doc_hashes[i]) {
            if (first == n) first = i;
            ++count;
          }
        }
        if (first < n) {
          std::printf(
              "  first differing document %zu (file %s, byte offset %zu, %zu bytes); %zu of %zu documents differ\n"
              "  compare: tokenizer_bench --show-doc %zu ... vs hf_tokenizer_baseline.py --show-doc %zu ...\n",
              first, corpus.files[corpus.doc_file[first]].c_str(), corpus.doc_offset[first], corpus.docs[first].size(),
              count, n, first, first);
          compare["first_differing_document"] = first;
          compare["differing_documents"] = count;
        } else if (hd.size() != rows[0].doc_hashes.size()) {
          std::printf("  the first %zu documents agree; the document counts differ\n", n);
          compare["first_differing_document"] = n;
        }
      }
    }
  }

  if (!args.json_out.empty()) {
    json out;
    out["tool"] = "moetp tokenizer_bench";
    out["corpus"] = args.corpus;
    out["tokenizer"] = args.tokenizer;
    out["doc_kb"] = args.doc_kb;
    out["files"] = corpus.files.size();
    out["documents"] = corpus.docs.size();
    out["bytes"] = corpus.bytes;
    out["repeat"] = args.repeat;
    out["hardware_threads"] = hw;
    out["id_hash"] = hex(rows[0].hash);
    out["threads_consistent"] = threads_agree;
    json results = json::array();
    for (const Row& r : rows) {
      json jr = {{"threads", r.threads},
                 {"seconds", r.best_s},
                 {"runs_s", r.runs_s},
                 {"mb_s", static_cast<double>(corpus.bytes) / 1e6 / r.best_s},
                 {"tokens", r.tokens},
                 {"id_hash", hex(r.hash)}};
      const json b = baseline_row(r.threads);
      if (b.is_object() && b.contains("mb_s") && b["mb_s"].is_number()) {
        jr["hf_mb_s"] = b["mb_s"];
        jr["ratio"] = jr["mb_s"].get<double>() / b["mb_s"].get<double>();
      }
      if (b.is_object() && b.contains("fast_mb_s") && b["fast_mb_s"].is_number()) {
        jr["hf_fast_mb_s"] = b["fast_mb_s"];
        jr["ratio_fast"] = jr["mb_s"].get<double>() / b["fast_mb_s"].get<double>();
      }
      results.push_back(std::move(jr));
    }
    out["results"] = std::move(results);
    json dh = json::array();
    for (const uint64_t h : rows[0].doc_hashes) dh.push_back(hex(h));
    out["doc_hashes"] = std::move(dh);
    if (!compare.is_null()) out["baseline"] = compare;
    std::ofstream f(args.json_out);
    MOETP_CHECK(f.good(), "cannot write --json file '{}'", args.json_out);
    f << out.dump(1) << "\n";
  }
  return status;
}

}  // namespace
}  // namespace moetp

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  try {
    return moetp::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenizer_bench: %s\n", e.what());
    return 2;
  }
}
