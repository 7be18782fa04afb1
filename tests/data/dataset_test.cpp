// Dataset folders (src/data/dataset.h) and `moetp tokenize`'s pipeline (src/data/corpus.h):
// documents and masks round-trip through shards, an interrupted or refused write leaves no
// dataset, corruption is named, bad input is refused or counted as configured, the output does
// not depend on the thread count, and chat records carry the masks of tokenize_chat.
#include "data/dataset.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "core/sha256.h"
#include "data/chat.h"
#include "data/corpus.h"
#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"
#include "data_testing.h"

namespace moetp::data {
namespace {

namespace fs = std::filesystem;
using testing::contains_all;
using testing::error_of;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

std::vector<uint32_t> ids_of(const DocumentView& d) { return {d.ids.begin(), d.ids.end()}; }
std::vector<uint8_t> mask_of(const DocumentView& d) { return {d.mask.begin(), d.mask.end()}; }

// Document k: length 1 + (k * 7) % 23, ids (k * 131 + i) % vocab, mask alternating from k % 2.
std::vector<uint32_t> doc_ids(int k, uint32_t vocab) {
  std::vector<uint32_t> ids(static_cast<size_t>(1 + (k * 7) % 23));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint32_t>((k * 131 + static_cast<int>(i)) % vocab);
  return ids;
}
std::vector<uint8_t> doc_mask(int k, size_t n) {
  std::vector<uint8_t> m(n);
  for (size_t i = 0; i < n; ++i) m[i] = static_cast<uint8_t>((i + static_cast<size_t>(k)) % 2);
  return m;
}

TEST(Dataset, RoundTripsDocumentsAndMasksOverShards) {
  ScratchDir scratch;
  const std::string dir = scratch.path("ds");
  DatasetWriter::Options opt;
  opt.vocab_size = 1000;
  opt.loss_mask = true;
  opt.shard_tokens = 40;  // several shards
  {
    DatasetWriter w(dir, opt);
    for (int k = 0; k < 30; ++k) {
      const auto ids = doc_ids(k, 1000);
      w.add(k % 5 == 4 ? kValidSplit : kTrainSplit, ids, doc_mask(k, ids.size()));
    }
    w.finish({{"note", "test"}});
  }
  EXPECT_FALSE(fs::exists(scratch.path("ds.partial-" + std::to_string(::getpid()))));
  const Dataset ds = Dataset::open(dir);
  EXPECT_EQ(ds.vocab_size(), 1000u);
  EXPECT_TRUE(ds.has_loss_mask());
  EXPECT_EQ(ds.manifest().at("note"), "test");
  EXPECT_EQ(ds.manifest_sha256(), sha256_hex(read_bytes(dir + "/manifest.json")));
  const DatasetSplit& train = ds.split(kTrainSplit);
  const DatasetSplit& valid = ds.split(kValidSplit);
  ASSERT_EQ(train.num_documents(), 24);
  ASSERT_EQ(valid.num_documents(), 6);
  EXPECT_GT(ds.manifest().at("splits").at("train").at("shards").size(), 2u);
  int64_t t = 0, v = 0, loss = 0;
  for (int k = 0; k < 30; ++k) {
    const auto ids = doc_ids(k, 1000);
    const DocumentView d = k % 5 == 4 ? valid.document(v++) : train.document(t++);
    EXPECT_EQ(ids_of(d), ids) << "document " << k;
    EXPECT_EQ(mask_of(d), doc_mask(k, ids.size())) << "document " << k;
    if (k % 5 != 4) {
      for (uint8_t m : doc_mask(k, ids.size())) loss += m;
    }
  }
  EXPECT_EQ(train.counts().loss_tokens, loss);
  EXPECT_TRUE(contains_all(error_of([&] { ds.split("test"); }), {"no split 'test'", "train, valid"}));
  // Every shard file's hash is in the manifest.
  const auto& shard = ds.manifest().at("splits").at("train").at("shards").at(0);
  EXPECT_EQ(shard.at("sha256").at("ids"), sha256_hex(read_bytes(dir + "/train-00000.ids")));
  EXPECT_EQ(shard.at("sha256").at("mask"), sha256_hex(read_bytes(dir + "/train-00000.mask")));
}

TEST(Dataset, AnUnfinishedWriteLeavesNoDataset) {
  ScratchDir scratch;
  const std::string dir = scratch.path("ds");
  {
    DatasetWriter w(dir, {.vocab_size = 10});
    w.add(kTrainSplit, std::vector<uint32_t>{1, 2, 3});
  }  // destroyed without finish(), e.g. by an exception
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_TRUE(fs::is_empty(scratch.dir()));
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {dir, "not a folder"}));
  // A folder with shards but no manifest (a killed process's .partial renamed by hand) is refused.
  fs::create_directories(dir);
  write_bytes(dir + "/train-00000.ids", std::string(12, '\0'));
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {dir, "no manifest.json"}));
}

TEST(Dataset, ReplacesAnExistingDatasetOnlyWhenAsked) {
  ScratchDir scratch;
  const std::string dir = scratch.path("ds");
  auto write = [&](uint32_t first, bool overwrite) {
    DatasetWriter w(dir, {.vocab_size = 10, .overwrite = overwrite});
    w.add(kTrainSplit, std::vector<uint32_t>{first, 2});
    w.finish({});
  };
  write(1, false);
  EXPECT_TRUE(contains_all(error_of([&] { write(3, false); }), {dir, "already exists", "--overwrite"}));
  EXPECT_EQ(Dataset::open(dir).split(kTrainSplit).document(0).ids[0], 1u);
  write(3, true);
  EXPECT_EQ(Dataset::open(dir).split(kTrainSplit).document(0).ids[0], 3u);
  EXPECT_EQ(std::distance(fs::directory_iterator(scratch.dir()), fs::directory_iterator()), 1);
  // A folder that is not a dataset is never replaced.
  const std::string other = scratch.path("notes");
  fs::create_directories(other);
  write_bytes(other + "/keep.txt", "mine");
  EXPECT_TRUE(contains_all(error_of([&] { DatasetWriter(other, {.vocab_size = 10, .overwrite = true}); }),
                           {other, "not a dataset folder"}));
  EXPECT_EQ(read_bytes(other + "/keep.txt"), "mine");
}

TEST(Dataset, RefusesBadDocuments) {
  ScratchDir scratch;
  DatasetWriter w(scratch.path("ds"), {.vocab_size = 10, .loss_mask = true});
  EXPECT_TRUE(contains_all(error_of([&] { w.add(kTrainSplit, std::vector<uint32_t>{1, 10}, std::vector<uint8_t>{1, 1}); }),
                           {"token 1", "id 10", "vocabulary (10)"}));
  EXPECT_TRUE(contains_all(error_of([&] { w.add(kTrainSplit, std::vector<uint32_t>{1, 2}, std::vector<uint8_t>{1}); }),
                           {"mask has 1 entries for 2 tokens"}));
  EXPECT_TRUE(contains_all(error_of([&] { w.add(kTrainSplit, std::vector<uint32_t>{1}, std::vector<uint8_t>{2}); }),
                           {"mask value 2"}));
  EXPECT_TRUE(contains_all(error_of([&] { w.add("test", std::vector<uint32_t>{1}, std::vector<uint8_t>{1}); }),
                           {"unknown split 'test'"}));
  EXPECT_TRUE(contains_all(error_of([&] { w.finish({}); }), {"no training documents"}));
}

TEST(Dataset, NamesCorruption) {
  ScratchDir scratch;
  const std::string dir = scratch.path("ds");
  {
    DatasetWriter w(dir, {.vocab_size = 50});
    w.add(kTrainSplit, std::vector<uint32_t>{1, 2, 3});
    w.add(kTrainSplit, std::vector<uint32_t>{4, 5});
    w.finish({});
  }
  const std::string manifest = read_bytes(dir + "/manifest.json");
  const std::string ids = read_bytes(dir + "/train-00000.ids");
  const std::string docs = read_bytes(dir + "/train-00000.docs");
  write_bytes(dir + "/train-00000.ids", ids.substr(0, 16));
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {"train-00000.ids", "16 bytes", "implies 20"}));
  write_bytes(dir + "/train-00000.ids", ids);
  std::string bad_docs = docs;
  bad_docs[8] = 5;  // document 0 ends at 5, after document 1's end (3 + 2 = 5 is the total): reversed
  write_bytes(dir + "/train-00000.docs", bad_docs);
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {"train-00000", "document 1 is empty or reversed"}));
  write_bytes(dir + "/train-00000.docs", docs);
  nlohmann::json m = nlohmann::json::parse(manifest);
  m["version"] = 7;
  write_bytes(dir + "/manifest.json", m.dump());
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {"version 7 is not supported"}));
  m = nlohmann::json::parse(manifest);
  m["splits"]["train"]["shards"][0]["name"] = "../train-00000";
  write_bytes(dir + "/manifest.json", m.dump());
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {"shard name", "../train-00000"}));
  m = nlohmann::json::parse(manifest);
  m["splits"]["train"]["tokens"] = 6;
  write_bytes(dir + "/manifest.json", m.dump());
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {"totals", "differ from the sum over shards"}));
  write_bytes(dir + "/manifest.json", "{\"format\": ");
  EXPECT_TRUE(contains_all(error_of([&] { Dataset::open(dir); }), {"manifest.json is not valid JSON"}));
}

// ---------------------------------------------------------------- moetp tokenize

std::string write_file(const ScratchDir& s, const std::string& name, const std::string& text) {
  const std::string path = s.path(name);
  fs::create_directories(fs::path(path).parent_path());
  write_bytes(path, text);
  return path;
}

std::vector<std::vector<uint32_t>> all_documents(const DatasetSplit& split) {
  std::vector<std::vector<uint32_t>> out;
  for (int64_t i = 0; i < split.num_documents(); ++i) out.push_back(ids_of(split.document(i)));
  return out;
}

TEST(Corpus, TextFilesFoldersAndJsonl) {
  ScratchDir s;
  const std::string a = write_file(s, "a.txt", "first file");
  write_file(s, "dir/z.txt", "zed");
  write_file(s, "dir/b/y.md", "why");
  write_file(s, "dir/.hidden/x.txt", "hidden");
  write_file(s, "dir/.x.txt", "hidden too");
  const std::string j = write_file(s, "c.jsonl", "{\"text\": \"one\"}\n\n{\"text\": \"\", \"id\": 2}\r\n{\"text\": \"two\"}");
  CorpusOptions opt;
  opt.inputs = {a, s.path("dir"), j};
  opt.out_dir = s.path("ds");
  const CorpusReport r = tokenize_corpus(opt);
  EXPECT_EQ(r.records, 6);
  EXPECT_EQ(r.skipped.at("empty"), 1);
  const Dataset ds = Dataset::open(opt.out_dir);
  EXPECT_EQ(ds.vocab_size(), kByteVocabSize);
  EXPECT_FALSE(ds.eos_id().has_value());
  EXPECT_FALSE(ds.has_loss_mask());
  // Inputs in the given order, folders sorted by path, hidden entries skipped, no end token.
  const std::vector<std::vector<uint32_t>> expect = {encode_bytes("first file"), encode_bytes("why"),
                                                     encode_bytes("zed"), encode_bytes("one"), encode_bytes("two")};
  EXPECT_EQ(all_documents(ds.split(kTrainSplit)), expect);
  EXPECT_EQ(ds.manifest().at("sources").size(), 4u);
  EXPECT_EQ(ds.manifest().at("sources").at(3).at("sha256"), sha256_hex(read_bytes(j)));
  EXPECT_EQ(ds.manifest().at("skipped").at("empty"), 1);
}

TEST(Corpus, BadRecordsStopOrAreCounted) {
  ScratchDir s;
  const std::string j = write_file(s, "c.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"broken\n{\"body\": \"x\"}\n{\"text\": 5}\n");
  CorpusOptions opt;
  opt.inputs = {j};
  opt.out_dir = s.path("ds");
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(opt); }), {j + ":2", "not valid JSON", "--skip-bad-records"}));
  EXPECT_FALSE(fs::exists(opt.out_dir));
  opt.inputs = {write_file(s, "d.jsonl", "{\"body\": \"x\"}\n")};
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(opt); }), {"d.jsonl:1", "no field \"text\""}));
  opt.inputs = {j};
  opt.skip_bad_records = true;
  const CorpusReport r = tokenize_corpus(opt);
  EXPECT_EQ(r.skipped.at("bad_record"), 3);
  EXPECT_EQ(all_documents(Dataset::open(opt.out_dir).split(kTrainSplit)),
            std::vector<std::vector<uint32_t>>{encode_bytes("ok")});
  opt.inputs = {s.path("missing.txt")};
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(opt); }), {"missing.txt", "does not exist"}));
}

TEST(Corpus, InvalidUtf8IsRefusedReplacedOrSkipped) {
  ScratchDir s;
  const std::string j = write_file(s, "c.jsonl", "{\"text\": \"good\"}\n{\"text\": \"ba\xff" "d\"}\n");
  CorpusOptions opt;
  opt.inputs = {j};
  opt.out_dir = s.path("ds");
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(opt); }),
                           {j + ":2", "not valid UTF-8 at byte offset 12", "0xff", "--invalid-utf8"}));
  opt.invalid_utf8 = InvalidUtf8Policy::kReplace;
  tokenize_corpus(opt);
  EXPECT_EQ(all_documents(Dataset::open(opt.out_dir).split(kTrainSplit)).at(1), encode_bytes("ba\xEF\xBF\xBD" "d"));
  opt.invalid_utf8 = InvalidUtf8Policy::kSkip;
  opt.overwrite = true;
  const CorpusReport r = tokenize_corpus(opt);
  EXPECT_EQ(r.skipped.at("invalid_utf8"), 1);
  EXPECT_EQ(Dataset::open(opt.out_dir).split(kTrainSplit).num_documents(), 1);
  // Plain text through the byte-level tokenizer is bytes: no UTF-8 rule applies.
  opt.inputs = {write_file(s, "raw.txt", "\xff\xfe")};
  opt.invalid_utf8 = InvalidUtf8Policy::kRefuse;
  tokenize_corpus(opt);
  EXPECT_EQ(all_documents(Dataset::open(opt.out_dir).split(kTrainSplit)).at(0), encode_bytes("\xff\xfe"));
}

TEST(Corpus, SameOutputAtAnyThreadCountAndSeededValidationSplit) {
  ScratchDir s;
  std::string lines;
  for (int i = 0; i < 400; ++i) lines += "{\"text\": \"record " + std::to_string(i * 7919) + " of the corpus\"}\n";
  const std::string j = write_file(s, "c.jsonl", lines);
  const std::string held = write_file(s, "held.txt", "held out");
  auto run = [&](int threads, uint64_t seed, const std::string& out) {
    CorpusOptions opt;
    opt.inputs = {j, held};
    opt.valid_inputs = {held};
    opt.out_dir = s.path(out);
    opt.threads = threads;
    opt.valid_fraction = 0.1;
    opt.seed = seed;
    opt.shard_tokens = 2000;
    tokenize_corpus(opt);
    return Dataset::open(opt.out_dir);
  };
  const Dataset one = run(1, 5, "t1"), four = run(4, 5, "t4"), other = run(4, 6, "t4s6");
  EXPECT_EQ(one.manifest().at("splits"), four.manifest().at("splits"));
  const int64_t nv = one.split(kValidSplit).num_documents();
  EXPECT_GT(nv, 20);
  EXPECT_LT(nv, 70);
  EXPECT_EQ(one.split(kTrainSplit).num_documents() + nv, 401);
  // The whole held-out input is validation, and the last one (input order).
  EXPECT_EQ(ids_of(one.split(kValidSplit).document(nv - 1)), encode_bytes("held out"));
  EXPECT_NE(all_documents(one.split(kValidSplit)), all_documents(other.split(kValidSplit)));
  CorpusOptions bad;
  bad.inputs = {j};
  bad.valid_inputs = {held};
  bad.out_dir = s.path("x");
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(bad); }), {held, "is not one of the inputs"}));
}

const char* qwen3_tokenizer() {
  const char* p = std::getenv("MOETP_QWEN3_TOKENIZER");
  return p != nullptr && fs::exists(p) ? p : nullptr;
}

TEST(Corpus, Qwen3DocumentsEndWithEndOfText) {
  const char* tok_path = qwen3_tokenizer();
  if (tok_path == nullptr) GTEST_SKIP() << "no Qwen3 tokenizer.json (scripts/fetch-tokenizer.sh)";
  ScratchDir s;
  const HfTokenizer tok = HfTokenizer::load(tok_path);
  const std::string text = "Hello <|im_start|> world\n";
  CorpusOptions opt;
  opt.inputs = {write_file(s, "a.txt", text)};
  opt.out_dir = s.path("ds");
  opt.tokenizer = tok_path;
  tokenize_corpus(opt);
  const Dataset ds = Dataset::open(opt.out_dir);
  const uint32_t eos = *tok.token_to_id("<|endoftext|>");
  EXPECT_EQ(ds.eos_id(), eos);
  EXPECT_EQ(ds.vocab_size(), tok.vocab_size());
  std::vector<uint32_t> expect = tok.encode(text);
  expect.push_back(eos);
  EXPECT_EQ(ids_of(ds.split(kTrainSplit).document(0)), expect);
  opt.split_special_tokens = true;
  opt.overwrite = true;
  tokenize_corpus(opt);
  expect = tok.encode(text, true);
  expect.push_back(eos);
  EXPECT_EQ(ids_of(Dataset::open(opt.out_dir).split(kTrainSplit).document(0)), expect);
  opt.eos = "<nope>";
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(opt); }), {"no token '<nope>'", "--eos"}));
}

TEST(Corpus, Qwen3ChatRecordsCarryTheirLossMasks) {
  const char* tok_path = qwen3_tokenizer();
  if (tok_path == nullptr) GTEST_SKIP() << "no Qwen3 tokenizer.json (scripts/fetch-tokenizer.sh)";
  ScratchDir s;
  const HfTokenizer tok = HfTokenizer::load(tok_path);
  const ChatTemplate tmpl((fs::path(tok_path).parent_path() / "tokenizer_config.json").string());
  const std::string c1 = R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},)"
                         R"( {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4",)"
                         R"( "reasoning_content": "add"}]})";
  const std::string c2 = R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bye"}])";
  const std::string c3 = R"([{"role": "robot", "content": "x"}])";
  CorpusOptions opt;
  opt.inputs = {write_file(s, "chat.jsonl", c1 + "\n" + c2 + "\n")};
  opt.out_dir = s.path("ds");
  opt.tokenizer = tok_path;
  opt.chat = true;
  const CorpusReport r = tokenize_corpus(opt);
  EXPECT_EQ(r.skipped.at("no_assistant_turn"), 1);
  const Dataset ds = Dataset::open(opt.out_dir);
  ASSERT_TRUE(ds.has_loss_mask());
  EXPECT_FALSE(ds.eos_id().has_value());
  const DatasetSplit& train = ds.split(kTrainSplit);
  ASSERT_EQ(train.num_documents(), 1);
  const TokenizedChat expect = tokenize_chat(tok, tmpl.render_chat(parse_messages(nlohmann::json::parse(c1), "c1")));
  EXPECT_EQ(ids_of(train.document(0)), expect.ids);
  EXPECT_EQ(mask_of(train.document(0)), expect.loss_mask);
  // One sample per assistant turn: two samples, each with its own turn's loss only.
  opt.chat_samples = ChatSamples::kPerAssistantTurn;
  opt.overwrite = true;
  tokenize_corpus(opt);
  const Dataset per_turn = Dataset::open(opt.out_dir);
  const auto samples = tmpl.render_samples(parse_messages(nlohmann::json::parse(c1), "c1"), ChatSamples::kPerAssistantTurn);
  ASSERT_EQ(per_turn.split(kTrainSplit).num_documents(), 2);
  for (int i = 0; i < 2; ++i) {
    const TokenizedChat t = tokenize_chat(tok, samples[static_cast<size_t>(i)]);
    EXPECT_EQ(ids_of(per_turn.split(kTrainSplit).document(i)), t.ids);
    EXPECT_EQ(mask_of(per_turn.split(kTrainSplit).document(i)), t.loss_mask);
  }
  // An unknown role is a bad record with its line.
  opt.inputs = {write_file(s, "bad.jsonl", c1 + "\n" + c3 + "\n")};
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(opt); }), {"bad.jsonl:2", "robot"}));
  // Chat data is JSONL.
  opt.inputs = {write_file(s, "chat.txt", c1)};
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_corpus(opt); }), {"chat.txt", "not a .jsonl file"}));
}

}  // namespace
}  // namespace moetp::data
