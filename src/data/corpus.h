// Corpus -> dataset folder (dataset.h): what `moetp tokenize INPUT... --out DIR` runs.
//
// Inputs are files or folders (folders are walked recursively in sorted path order; hidden
// entries, names starting with '.', are skipped). A file whose name ends in ".jsonl" holds one
// record per line (blank lines are skipped); any other file is one plain-text document.
//   - pre-training (chat = false): a JSONL record's document is the string field `text_field`;
//     every document is encoded and followed by the end-of-text token (eos), no loss mask;
//   - chat (chat = true, JSONL only): a record is {"messages": [...]} (or a bare array), rendered
//     with the chat template and tokenized with its loss mask (chat.h); chat_samples picks one
//     sample per conversation or one per assistant turn.
// Validation split: a record goes to "valid" when its input is one of valid_inputs (an input
// exactly as given), or, with valid_fraction f > 0, when a counter-based draw for its record number
// (seed, record index in input order) is < f; every sample of a conversation goes to one split.
// Output is identical for any thread count.
//
// Bad input: invalid UTF-8 is refused (error naming file, line and byte offset), replaced by
// U+FFFD, or the record skipped (InvalidUtf8Policy); a JSONL line that does not parse, lacks the
// field, has an unknown role, or a conversation the template refuses, is an error naming file and
// line, or with skip_bad_records a counted skip. Empty documents are skipped and counted.
// Every skip is counted by reason in the report and the manifest.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "data/chat.h"

namespace moetp::data {

enum class InvalidUtf8Policy { kRefuse, kReplace, kSkip };

struct CorpusOptions {
  std::vector<std::string> inputs;  // files or folders
  std::string out_dir;
  std::string tokenizer;         // tokenizer.json; empty: the byte-level tokenizer (vocab 256, no eos)
  std::string tokenizer_config;  // chat: tokenizer_config.json; empty: the one beside `tokenizer`
  bool chat = false;
  ChatSamples chat_samples = ChatSamples::kWhole;
  std::string text_field = "text";
  std::string eos;  // end-of-text token; empty: "<|endoftext|>" (HF tokenizers; required there)
  bool split_special_tokens = false;  // pre-training text: special tokens in the text are plain text
  double valid_fraction = 0;
  std::vector<std::string> valid_inputs;
  uint64_t seed = 0;
  InvalidUtf8Policy invalid_utf8 = InvalidUtf8Policy::kRefuse;
  bool skip_bad_records = false;
  int threads = 0;                          // 0: one per hardware thread
  int64_t shard_tokens = int64_t{1} << 28;  // tokens per shard file
  bool overwrite = false;
};

struct CorpusReport {
  int64_t input_bytes = 0;
  int64_t records = 0;  // documents or conversations read (skipped ones included)
  std::map<std::string, int64_t> skipped;  // reason -> count
  int64_t train_documents = 0, train_tokens = 0, train_loss_tokens = 0;
  int64_t valid_documents = 0, valid_tokens = 0, valid_loss_tokens = 0;
  double seconds = 0;
};

// Progress: called about every 2 seconds and at the end with (bytes done, bytes total, records).
using CorpusProgress = std::function<void(int64_t, int64_t, int64_t)>;

// Tokenizes the inputs into opt.out_dir (atomically: see DatasetWriter). moetp::Error for bad
// options (no inputs, a missing input, valid_fraction outside [0, 1), chat without a tokenizer,
// a valid input that is not an input), bad input as above, and write failures.
CorpusReport tokenize_corpus(const CorpusOptions& opt, const CorpusProgress& progress = {});

}  // namespace moetp::data
