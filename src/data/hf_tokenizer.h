// Hugging Face `tokenizer.json` tokenizer for the byte-level BPE family (GPT-2, Llama 3, Qwen2/3).
// encode(text) gives the ids of the Python `tokenizers` call
// `Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids`.
//
// Pipeline (as in the tokenizers library):
//   1. added tokens with normalized=false are matched in the raw text (leftmost, then longest);
//   2. the text between them is normalized (NFC), then added tokens with normalized=true are matched
//      in the normalized text;
//   3. each remaining piece is pre-tokenized: Split steps (regex or literal), then ByteLevel
//      (optional prefix space, optional GPT-2 regex split);
//   4. each pre-token's bytes are merged by BPE, lowest merge rank first (leftmost on ties).
//
// Supported tokenizer.json fields; any other key or value is a moetp::Error naming the JSON path
// and the value, so nothing that would change the ids is ignored:
//   truncation, padding       null
//   normalizer                null | NFC | Sequence of NFC
//   pre_tokenizer             ByteLevel, or a Sequence of Split steps ending in one ByteLevel.
//                             Split: pattern {"Regex": ...} or {"String": ...}; behavior Removed |
//                             Isolated | MergedWithPrevious | MergedWithNext | Contiguous; invert.
//                             ByteLevel: add_prefix_space, use_regex (the GPT-2 pattern),
//                             trim_offsets (no effect in a pre-tokenizer).
//   model                     BPE: vocab, merges ("a b" strings or [a, b] pairs), ignore_merges;
//                             dropout null or 0; byte_fallback false; continuing_subword_prefix and
//                             end_of_word_suffix null or ""; unk_token and fuse_unk are accepted
//                             because every byte has a token (checked), so unk never occurs.
//   decoder                   ByteLevel
//   post_processor            null | ByteLevel | TemplateProcessing | Sequence of those.
//                             TemplateProcessing is NOT applied: encode() never adds BOS/EOS
//                             (add_special_tokens=False). ByteLevel trim_offsets=true trims the
//                             spaces at the ends of each token's offsets, as the library does.
//   added_tokens              id, content, special, single_word, lstrip, rstrip, normalized.
//
// Regexes are the tokenizers library's Oniguruma patterns run on PCRE2 (UTF, UCP, JIT) after a
// translation that keeps Oniguruma's meaning: \s and \S are exactly Unicode White_Space (PCRE2's
// \s also takes U+180E), \w is letters, marks, decimal digits and connector punctuation, \h is a
// hex digit, \v is U+000B, \uHHHH is a code point, ^ and $ are line anchors. Constructs whose
// meaning differs between the engines and that no supported tokenizer uses (\b, \B, \X, \g,
// nested classes or POSIX brackets, && in classes, inline options other than i) are refused.
// Unsupported difference: Oniguruma's (?i) also folds one character onto several (ß ~ ss);
// PCRE2 folds one to one. None of the GPT-2, Llama 3 or Qwen patterns has such a sequence.
//
// Offsets (encode_with_offsets) are byte offsets into the input string: a token covers exactly
// the input bytes it encodes, except where NFC changed the text (the token then covers the whole
// changed stretch, usually one character with its combining marks), for the prefix space that
// ByteLevel add_prefix_space inserts (empty range), and for an added token with lstrip / rstrip
// (the stripped whitespace is included). Unlike the Python library, a token that holds only part
// of a multi-byte character gets only those bytes, not the whole character.
//
// Thread safety: a loaded HfTokenizer is immutable; encode*, decode and the lookups may be called
// from any number of threads at once. Copies share the loaded tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moetp::data {

// What encode does with input that is not valid UTF-8.
enum class InvalidUtf8 {
  kRefuse,   // moetp::Error naming the byte offset of the first invalid sequence
  kReplace,  // each maximal invalid subsequence becomes U+FFFD (offsets still point into the input)
};

// [begin, end) byte offsets of one token in the input string.
struct TokenSpan {
  size_t begin = 0;
  size_t end = 0;
  bool operator==(const TokenSpan&) const = default;
};

struct EncodingWithOffsets {
  std::vector<uint32_t> ids;
  std::vector<TokenSpan> offsets;  // offsets[i] belongs to ids[i]
};

// One pre-tokenization piece (pre_tokenize): its text before the byte-level mapping and offsets.
struct PreToken {
  std::string text;
  TokenSpan span;
};

class HfTokenizer {
 public:
  // Reads and validates a tokenizer.json file. moetp::Error for unreadable or malformed JSON,
  // unsupported fields (named by JSON path), merges or bytes missing from the vocabulary,
  // duplicate ids, and regexes PCRE2 cannot compile.
  static HfTokenizer load(const std::string& path, InvalidUtf8 invalid_utf8 = InvalidUtf8::kRefuse);
  // The same from the file's contents; `name` stands in for the path in error messages.
  static HfTokenizer from_json(std::string_view json_text, std::string name = "<memory>",
                               InvalidUtf8 invalid_utf8 = InvalidUtf8::kRefuse);

  // Token ids of `text`. split_special_tokens: added tokens marked special are not matched and are
  // tokenized as ordinary text (non-special added tokens still match).
  std::vector<uint32_t> encode(std::string_view text, bool split_special_tokens = false) const;
  EncodingWithOffsets encode_with_offsets(std::string_view text, bool split_special_tokens = false) const;
  // encode() of every text on `threads` threads (0: one per hardware thread). The result does not
  // depend on the thread count; the first failing text (lowest index) rethrows its error.
  std::vector<std::vector<uint32_t>> encode_batch(const std::vector<std::string>& texts, int threads,
                                                  bool split_special_tokens = false) const;

  // Text of `ids`: byte-level tokens are mapped back to bytes, added tokens give their content,
  // and bytes that are not valid UTF-8 become U+FFFD (as the library's ByteLevel decoder does).
  // moetp::Error naming the position for an id that no token has (the library skips those).
  std::string decode(std::span<const uint32_t> ids, bool skip_special_tokens = false) const;

  // The pieces BPE sees, in order, before the byte-level mapping (added tokens excluded; the
  // inserted prefix space of ByteLevel add_prefix_space included). For tests and inspection.
  std::vector<PreToken> pre_tokenize(std::string_view text, bool split_special_tokens = false) const;

  // Largest id of the vocabulary and the added tokens, plus one.
  uint32_t vocab_size() const;
  // Added tokens first, then the vocabulary (byte-level form, e.g. "Ġthe").
  std::optional<uint32_t> token_to_id(std::string_view token) const;
  // The token's string (byte-level form for vocabulary tokens); moetp::Error for an unknown id.
  std::string id_to_token(uint32_t id) const;
  bool is_special(uint32_t id) const;

  struct Impl;

 private:
  explicit HfTokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Byte offset of the first ill-formed UTF-8 sequence of `text`, or std::string_view::npos.
size_t first_invalid_utf8(std::string_view text);
// `text` with each maximal ill-formed subsequence replaced by U+FFFD (what InvalidUtf8::kReplace does).
std::string replace_invalid_utf8(std::string_view text);

// NFC of valid UTF-8 text (utf8proc); moetp::Error for invalid UTF-8.
std::string normalize_nfc(std::string_view text);

}  // namespace moetp::data
