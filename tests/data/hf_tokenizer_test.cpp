// Hugging Face tokenizer.json tokenizer (data/hf_tokenizer.h). A small byte-level BPE built here
// (ids 0..255 = bytes, seven merges, six added tokens) gives ids derived by hand; the same
// fixture carries the Qwen pre-tokenizer regex, whose splits on whitespace and case-folding edge
// cases are checked against what the tokenizers library (Oniguruma, \s = Unicode White_Space)
// produces. Suites Qwen3* need the real Qwen3 tokenizer.json (MOETP_QWEN3_TOKENIZER, set by CTest
// to the copy scripts/fetch-tokenizer.sh downloads); Qwen3Reference also needs the ids made by the
// Python library (tools/make_tokenizer_fixture.py).
#include "data/hf_tokenizer.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "data_testing.h"

namespace moetp::data {

// gtest prints spans as [begin, end).
void PrintTo(const TokenSpan& s, std::ostream* os) { *os << "[" << s.begin << ", " << s.end << ")"; }

namespace {

using json = nlohmann::json;
using testing::contains_all;
using testing::error_of;
using testing::read_bytes;

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
// take U+0100, U+0101, ... in byte order.
std::string byte_symbol(int b) {
  const auto printable = [](int x) {
    return (x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
  };
  int cp = b;
  if (!printable(b)) {
    cp = 256;
    for (int x = 0; x < b; ++x) cp += printable(x) ? 0 : 1;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

constexpr const char* kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

json byte_level(bool add_prefix_space = false) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}, {"trim_offsets", false}, {"use_regex", false}};
}

json split(json pattern, const std::string& behavior, bool invert = false) {
  return {{"type", "Split"}, {"pattern", std::move(pattern)}, {"behavior", behavior}, {"invert", invert}};
}

json added(uint32_t id, const std::string& content, bool special, bool normalized = false) {
  return {{"id", id},        {"content", content},       {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", normalized}, {"special", special}};
}

// Vocabulary: id b = byte b; 256 "Ġt", 257 "he", 258 "Ġthe", 259 "the", 260 "ll", 261 "ell",
// 262 "ĠĠ", 263 "hello" (reachable only with ignore_merges). Merge ranks in list order.
// Added: 300 <|end|> (special), 301 <tool>, 302 <mask> (special, lstrip), 303 [R] (rstrip),
// 304 é (normalized), 305 <|end|>! (special).
json tiny_tokenizer() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_symbol(b)] = b;
  const std::string G = byte_symbol(' ');  // "Ġ"
  vocab[G + "t"] = 256;
  vocab["he"] = 257;
  vocab[G + "the"] = 258;
  vocab["the"] = 259;
  vocab["ll"] = 260;
  vocab["ell"] = 261;
  vocab[G + G] = 262;
  vocab["hello"] = 263;
  json merges = {G + " t", "h e", G + "t he", "t he", "l l", "e ll", G + " " + G};
  json mask = added(302, "<mask>", true);
  mask["lstrip"] = true;
  json r = added(303, "[R]", false);
  r["rstrip"] = true;
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       {added(300, "<|end|>", true), added(301, "<tool>", false), mask, r, added(304, "\xC3\xA9", false, true),
        added(305, "<|end|>!", true)}},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"}, {"pretokenizers", {split({{"Regex", kQwenPattern}}, "Isolated"), byte_level()}}}},
      {"post_processor", byte_level()},
      {"decoder", byte_level()},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", ""},
        {"end_of_word_suffix", ""},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", merges}}},
  };
}

HfTokenizer make(const json& j, InvalidUtf8 mode = InvalidUtf8::kRefuse) {
  return HfTokenizer::from_json(j.dump(), "tiny.json", mode);
}

using Ids = std::vector<uint32_t>;

std::vector<std::string> piece_texts(const HfTokenizer& tok, std::string_view text) {
  std::vector<std::string> out;
  for (const PreToken& p : tok.pre_tokenize(text)) out.push_back(p.text);
  return out;
}

std::vector<std::string> texts_fixture() {
  const json j = json::parse(read_bytes(std::string(MOETP_REPO_DIR) + "/tests/data/fixtures/tokenizer_texts.json"));
  return j.at("texts").get<std::vector<std::string>>();
}

// ---- (a) ids derived by hand ----------------------------------------------------------------

TEST(HfTokenizer, EncodesTheHandBuiltFixture) {
  const HfTokenizer tok = make(tiny_tokenizer());
  EXPECT_EQ(tok.vocab_size(), 306u);
  EXPECT_EQ(tok.encode("the"), (Ids{259}));                // t h e -> t he (rank 1) -> the (rank 3)
  EXPECT_EQ(tok.encode(" the"), (Ids{258}));               // Ġt (0), he (1), Ġt he (2)
  EXPECT_EQ(tok.encode("the the"), (Ids{259, 258}));       // pre-tokens "the", " the"
  EXPECT_EQ(tok.encode("hello"), (Ids{257, 260, 111}));    // he (1) first eats the e of "e ll"
  EXPECT_EQ(tok.encode("ell"), (Ids{261}));                // l l (4), then e ll (5)
  EXPECT_EQ(tok.encode("a   b"), (Ids{97, 262, 32, 98}));  // "a", "  " (\s+(?!\S)), " b"
  EXPECT_EQ(tok.encode("\xC3\xB1"), (Ids{0xC3, 0xB1}));    // ñ: two byte tokens
  EXPECT_EQ(tok.encode(""), (Ids{}));
  EXPECT_EQ(tok.id_to_token(258), byte_symbol(' ') + "the");
  EXPECT_EQ(tok.token_to_id(byte_symbol(' ') + "t"), 256u);
  EXPECT_EQ(tok.token_to_id("<tool>"), 301u);
  EXPECT_FALSE(tok.token_to_id("nope").has_value());
  EXPECT_TRUE(tok.is_special(300));
  EXPECT_FALSE(tok.is_special(301));
  EXPECT_FALSE(tok.is_special(259));
}

TEST(HfTokenizer, MergesAsPairsGiveTheSameIds) {
  json j = tiny_tokenizer();
  json pairs = json::array();
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const size_t sp = s.find(' ');
    pairs.push_back({s.substr(0, sp), s.substr(sp + 1)});
  }
  j["model"]["merges"] = pairs;
  const HfTokenizer tok = make(j);
  EXPECT_EQ(tok.encode("the the hello ell a   b"), make(tiny_tokenizer()).encode("the the hello ell a   b"));
  EXPECT_EQ(tok.encode(" the"), (Ids{258}));
}

TEST(HfTokenizer, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  json j = tiny_tokenizer();
  j["model"]["ignore_merges"] = true;
  const HfTokenizer tok = make(j);
  EXPECT_EQ(tok.encode("hello"), (Ids{263}));
  EXPECT_EQ(tok.encode(" hello"), (Ids{32, 257, 260, 111}));  // "Ġhello" is not a token: merges
  EXPECT_EQ(make(tiny_tokenizer()).encode("hello"), (Ids{257, 260, 111}));
}

TEST(HfTokenizer, ByteLevelPrefixSpaceAndGpt2Regex) {
  json j = tiny_tokenizer();
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  const HfTokenizer tok = make(j);
  EXPECT_EQ(tok.encode("the"), (Ids{258}));  // " the" after the inserted space
  EXPECT_EQ(piece_texts(tok, "the cat's  1"), (std::vector<std::string>{" the", " cat", "'s", " ", " 1"}));
  const EncodingWithOffsets e = tok.encode_with_offsets("the");
  EXPECT_EQ(e.offsets, (std::vector<TokenSpan>{{0, 3}}));
}

TEST(HfTokenizer, PostProcessorTrimOffsetsDropsSpaces) {
  json j = tiny_tokenizer();
  j["post_processor"]["trim_offsets"] = true;
  const EncodingWithOffsets e = make(j).encode_with_offsets("the the  ");
  EXPECT_EQ(e.ids, (Ids{259, 258, 262}));
  EXPECT_EQ(e.offsets, (std::vector<TokenSpan>{{0, 3}, {4, 7}, {9, 9}}));
}

// ---- (b) refused fields name the JSON path and value ------------------------------------------

TEST(HfTokenizer, RefusesWhatItDoesNotImplement) {
  struct Case {
    std::function<void(json&)> edit;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {[](json& j) {
         j["normalizer"] = {{"type", "NFKC"}};
       },
       {"tiny.json", "normalizer.type", "NFKC"}},
      {[](json& j) {
         j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "Lowercase"}}}}};
       },
       {"normalizer.normalizers[0].type", "Lowercase"}},
      {[](json& j) {
         j["truncation"] = {{"max_length", 8}};
       },
       {"truncation", "max_length"}},
      {[](json& j) {
         j["padding"] = {{"length", 8}};
       },
       {"padding", "length"}},
      {[](json& j) { j["model"]["byte_fallback"] = true; }, {"model.byte_fallback", "true"}},
      {[](json& j) { j["model"]["dropout"] = 0.1; }, {"model.dropout", "0.1"}},
      {[](json& j) { j["model"]["continuing_subword_prefix"] = "##"; }, {"model.continuing_subword_prefix", "##"}},
      {[](json& j) { j["model"]["end_of_word_suffix"] = "</w>"; }, {"model.end_of_word_suffix", "</w>"}},
      {[](json& j) { j["model"]["type"] = "WordPiece"; }, {"model.type", "WordPiece"}},
      {[](json& j) { j["model"]["foo"] = 1; }, {"model.foo", "unsupported key"}},
      {[](json& j) { j["model"]["merges"][2] = "x y"; }, {"model.merges[2]", "\"xy\"", "not in model.vocab"}},
      {[](json& j) { j["model"]["merges"][1] = "h e l"; }, {"model.merges[1]", "h e l"}},
      {[](json& j) { j["model"]["vocab"].erase("A"); }, {"model.vocab", "byte 0x41"}},
      {[](json& j) { j["model"]["vocab"]["dup"] = 259; }, {"model.vocab", "share id 259"}},
      {[](json& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       },
       {"decoder.type", "WordPiece"}},
      {[](json& j) { j["decoder"] = nullptr; }, {"decoder", "null"}},
      {[](json& j) {
         j["post_processor"] = {{"type", "RobertaProcessing"}};
       },
       {"post_processor.type", "RobertaProcessing"}},
      {[](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Weird"; },
       {"pre_tokenizer.pretokenizers[0].behavior", "Weird"}},
      {[](json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", R"(\bx)"}};
       },
       {"pre_tokenizer.pretokenizers[0].pattern.Regex", R"(\\bx)", "\\b"}},
      {[](json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(?m)x"}};
       },
       {"pre_tokenizer.pretokenizers[0].pattern.Regex", "(?m"}},
      {[](json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "[a[b]]"}};
       },
       {"pattern.Regex", "nested"}},
      {[](json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(x"}};
       },
       {"pattern.Regex", "does not compile"}},
      {[](json& j) {
         j["pre_tokenizer"]["pretokenizers"] = {byte_level(), split({{"String", "-"}}, "Isolated")};
       },
       {"pre_tokenizer.pretokenizers[1]", "after ByteLevel"}},
      {[](json& j) {
         j["pre_tokenizer"]["pretokenizers"] = {split({{"String", "-"}}, "Isolated")};
       },
       {"pre_tokenizer", "no ByteLevel"}},
      {[](json& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       {"pre_tokenizer.type", "Whitespace"}},
      {[](json& j) { j["added_tokens"][0]["extra"] = true; }, {"added_tokens[0].extra"}},
      {[](json& j) { j["added_tokens"][1]["id"] = 300; }, {"added_tokens[1].id", "300"}},
      {[](json& j) { j["added_tokens"][0]["content"] = ""; }, {"added_tokens[0].content", "empty"}},
  };
  for (size_t k = 0; k < cases.size(); ++k) {
    json j = tiny_tokenizer();
    cases[k].edit(j);
    const std::string msg = error_of([&] { make(j); });
    EXPECT_FALSE(msg.empty()) << "case " << k << " was accepted";
    for (const std::string& part : cases[k].parts) EXPECT_TRUE(contains_all(msg, {part})) << "case " << k;
  }
  EXPECT_TRUE(contains_all(error_of([] { HfTokenizer::from_json("{", "bad.json"); }), {"bad.json", "not valid JSON"}));
  EXPECT_TRUE(contains_all(error_of([] { HfTokenizer::load("/nonexistent/tokenizer.json"); }),
                           {"/nonexistent/tokenizer.json"}));
}

TEST(HfTokenizer, AcceptsTemplateProcessingWithoutApplyingIt) {
  json j = tiny_tokenizer();
  j["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       {byte_level(),
        {{"type", "TemplateProcessing"},
         {"single",
          {{{"SpecialToken", {{"id", "<|end|>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
         {"pair", json::array()},
         {"special_tokens", json::object()}}}}};
  EXPECT_EQ(make(j).encode("the"), (Ids{259}));
}

// ---- (c) added tokens ----------------------------------------------------------------------

TEST(HfTokenizer, AddedTokensMatchBeforePreTokenization) {
  const HfTokenizer tok = make(tiny_tokenizer());
  EXPECT_EQ(tok.encode("<|end|>the"), (Ids{300, 259}));
  EXPECT_EQ(tok.encode("a<|end|>!b"), (Ids{97, 305, 98}));  // longest match: <|end|>!
  EXPECT_EQ(tok.encode("<tool>x"), (Ids{301, 120}));
  EXPECT_EQ(tok.encode("the<|end|><|end|>the"), (Ids{259, 300, 300, 259}));
  // split_special_tokens: special tokens are text ("<|", "end", "|>"), non-special ones still match.
  EXPECT_EQ(tok.encode("<|end|>", true), (Ids{60, 124, 101, 110, 100, 124, 62}));
  EXPECT_EQ(tok.encode("<|end|>!", true), (Ids{60, 124, 101, 110, 100, 124, 62, 33}));
  EXPECT_EQ(tok.encode("<tool>x", true), (Ids{301, 120}));
  // lstrip takes the whitespace before, rstrip the whitespace after.
  const EncodingWithOffsets m = tok.encode_with_offsets("a <mask>b");
  EXPECT_EQ(m.ids, (Ids{97, 302, 98}));
  EXPECT_EQ(m.offsets, (std::vector<TokenSpan>{{0, 1}, {1, 8}, {8, 9}}));
  const EncodingWithOffsets r = tok.encode_with_offsets("[R]  x");
  EXPECT_EQ(r.ids, (Ids{303, 120}));
  EXPECT_EQ(r.offsets, (std::vector<TokenSpan>{{0, 5}, {5, 6}}));
  // normalized=true: matched after NFC, so the decomposed form matches too.
  EXPECT_EQ(tok.encode("\xC3\xA9"), (Ids{304}));
  EXPECT_EQ(tok.encode("e\xCC\x81"), (Ids{304}));
}

TEST(HfTokenizer, SingleWordAddedTokenNeedsWordBoundaries) {
  json j = tiny_tokenizer();
  json w = added(306, "ab", false);
  w["single_word"] = true;
  j["added_tokens"].push_back(w);
  const HfTokenizer tok = make(j);
  EXPECT_EQ(tok.encode("ab"), (Ids{306}));
  EXPECT_EQ(tok.encode("x ab."), (Ids{120, 32, 306, 46}));
  EXPECT_EQ(tok.encode("xab"), (Ids{120, 97, 98}));
  EXPECT_EQ(tok.encode("ab\xC3\xA9"), (Ids{97, 98, 304}));  // é is a word character
}

// ---- offsets ---------------------------------------------------------------------------------

TEST(HfTokenizer, OffsetsPointIntoTheInput) {
  const HfTokenizer tok = make(tiny_tokenizer());
  // "hi e\u0301 the<|end|>": NFC turns e + U+0301 (bytes 3..6) into é, the added token 304.
  const EncodingWithOffsets e = tok.encode_with_offsets("hi e\xCC\x81 the<|end|>");
  EXPECT_EQ(e.ids, (Ids{104, 105, 32, 304, 258, 300}));
  EXPECT_EQ(e.offsets, (std::vector<TokenSpan>{{0, 1}, {1, 2}, {2, 3}, {3, 6}, {6, 10}, {10, 17}}));
  EXPECT_EQ(tok.encode("hi e\xCC\x81 the<|end|>"), e.ids);
  // A multi-byte character split over byte tokens: each token keeps its own byte.
  const EncodingWithOffsets n = tok.encode_with_offsets("x\xC3\xB1");
  EXPECT_EQ(n.ids, (Ids{120, 0xC3, 0xB1}));
  EXPECT_EQ(n.offsets, (std::vector<TokenSpan>{{0, 1}, {1, 2}, {2, 3}}));
  // Decomposed accent inside a word: the composed character covers its source bytes.
  const EncodingWithOffsets c = tok.encode_with_offsets("cafe\xCC\x81!");
  EXPECT_EQ(c.ids, (Ids{99, 97, 102, 304, 33}));
  EXPECT_EQ(c.offsets, (std::vector<TokenSpan>{{0, 1}, {1, 2}, {2, 3}, {3, 6}, {6, 7}}));
  // Without the added token, é's two bytes both cover e + U+0301.
  json j = tiny_tokenizer();
  j["added_tokens"].erase(4);
  const EncodingWithOffsets d = make(j).encode_with_offsets("cafe\xCC\x81!");
  EXPECT_EQ(d.ids, (Ids{99, 97, 102, 0xC3, 0xA9, 33}));
  EXPECT_EQ(d.offsets, (std::vector<TokenSpan>{{0, 1}, {1, 2}, {2, 3}, {3, 6}, {3, 6}, {6, 7}}));
}

// ---- Split behaviors -------------------------------------------------------------------------

TEST(HfTokenizer, SplitBehaviorsMatchTheLibraryDocumentation) {
  const auto pieces = [](const std::string& behavior, bool invert, json pattern) {
    json j = tiny_tokenizer();
    j["pre_tokenizer"]["pretokenizers"] = {split(std::move(pattern), behavior, invert), byte_level()};
    return piece_texts(make(j), "the-final--countdown");
  };
  using V = std::vector<std::string>;
  const json dash = {{"String", "-"}};
  EXPECT_EQ(pieces("Removed", false, dash), (V{"the", "final", "countdown"}));
  EXPECT_EQ(pieces("Isolated", false, dash), (V{"the", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(pieces("MergedWithPrevious", false, dash), (V{"the-", "final-", "-", "countdown"}));
  EXPECT_EQ(pieces("MergedWithNext", false, dash), (V{"the", "-final", "-", "-countdown"}));
  EXPECT_EQ(pieces("Contiguous", false, dash), (V{"the", "-", "final", "--", "countdown"}));
  const json letters = {{"Regex", "\\p{L}+"}};
  EXPECT_EQ(pieces("Removed", false, letters), (V{"-", "--"}));
  EXPECT_EQ(pieces("Removed", true, letters), (V{"the", "final", "countdown"}));
}

// ---- (e) regex edge cases --------------------------------------------------------------------
// Expected splits of the Qwen pattern under the tokenizers library (Oniguruma, UTF-8): \s is
// Unicode White_Space (U+0009..D, U+0020, U+0085, U+00A0, U+1680, U+2000..200A, U+2028, U+2029,
// U+202F, U+205F, U+3000); U+200B and U+180E are format characters (not \s, not \p{L}/\p{N}), so
// runs of them go to " ?[^\s\p{L}\p{N}]+". A whitespace run before a letter leaves its last
// character to prefix the word ("\s+(?!\S)" backtracks by one). (?i) folds U+017F (long s) to s
// and U+212A (Kelvin sign) to k.

TEST(HfTokenizer, QwenRegexWhitespaceEdgeCases) {
  const HfTokenizer tok = make(tiny_tokenizer());
  using V = std::vector<std::string>;
  EXPECT_EQ(piece_texts(tok, "a\u00A0b"), (V{"a", "\u00A0b"}));
  EXPECT_EQ(piece_texts(tok, "a\u00A0\u00A0b"), (V{"a", "\u00A0", "\u00A0b"}));
  EXPECT_EQ(piece_texts(tok, "a\u2028\u2028b"), (V{"a", "\u2028", "\u2028b"}));
  EXPECT_EQ(piece_texts(tok, "a\u2029\u2029b"), (V{"a", "\u2029", "\u2029b"}));
  EXPECT_EQ(piece_texts(tok, "a\u3000\u3000b"), (V{"a", "\u3000", "\u3000b"}));
  EXPECT_EQ(piece_texts(tok, "a\u0085\u0085b"), (V{"a", "\u0085", "\u0085b"}));
  EXPECT_EQ(piece_texts(tok, "a\u200B\u200Bb"), (V{"a", "\u200B\u200B", "b"}));
  EXPECT_EQ(piece_texts(tok, "a\u180E\u180Eb"), (V{"a", "\u180E\u180E", "b"}));  // PCRE2's own \s takes U+180E
  EXPECT_EQ(piece_texts(tok, "x\u00A0\u00A0"), (V{"x", "\u00A0\u00A0"}));
  EXPECT_EQ(piece_texts(tok, "a\n\n b x  "), (V{"a", "\n\n", " b", " x", "  "}));
  EXPECT_EQ(piece_texts(tok, "a \r\n\tb"), (V{"a", " \r\n", "\tb"}));
  EXPECT_EQ(piece_texts(tok, "hello!!!\n\nworld 12345"),
            (V{"hello", "!!!\n\n", "world", " ", "1", "2", "3", "4", "5"}));
}

TEST(HfTokenizer, QwenRegexCaseFolding) {
  const HfTokenizer tok = make(tiny_tokenizer());
  using V = std::vector<std::string>;
  EXPECT_EQ(piece_texts(tok, "it'sx IT'SX"), (V{"it", "'s", "x", " IT", "'S", "X"}));
  EXPECT_EQ(piece_texts(tok, "it'\u017Fx"), (V{"it", "'\u017F", "x"}));  // long s folds to s
  EXPECT_EQ(piece_texts(tok, "WE'LL we'Ll"), (V{"WE", "'LL", " we", "'Ll"}));
  EXPECT_EQ(piece_texts(tok, "5\u212A"), (V{"5", "K"}));  // NFC maps the Kelvin sign to K
  json j = tiny_tokenizer();
  j["normalizer"] = nullptr;
  EXPECT_EQ(piece_texts(make(j), "'\u212Ax'\u017F"), (V{"'\u212Ax", "'\u017F"}));  // no (?i:'k)
  j["pre_tokenizer"]["pretokenizers"] = {split({{"Regex", "(?i:k)"}}, "Isolated"), byte_level()};
  EXPECT_EQ(piece_texts(make(j), "\u212Ax"), (V{"\u212A", "x"}));
  EXPECT_EQ(piece_texts(make(j), "akKb"), (V{"a", "k", "K", "b"}));
}

TEST(HfTokenizer, EmptyMatchesFollowTheLibrary) {
  json j = tiny_tokenizer();
  j["pre_tokenizer"]["pretokenizers"] = {split({{"Regex", "x*"}}, "Isolated"), byte_level()};
  EXPECT_EQ(piece_texts(make(j), "axxb"), (std::vector<std::string>{"a", "xx", "b"}));
  j["pre_tokenizer"]["pretokenizers"] = {split({{"Regex", "\\uFF0C|\\h+"}}, "Isolated"), byte_level()};
  EXPECT_EQ(piece_texts(make(j),
                        "g\xEF\xBC\x8C"
                        "0fz"),
            (std::vector<std::string>{"g", "\xEF\xBC\x8C", "0f", "z"}));
}

// ---- (d) round trips -----------------------------------------------------------------------

TEST(HfTokenizer, DecodeInvertsEncodeUpToNfc) {
  const HfTokenizer tok = make(tiny_tokenizer());
  for (const std::string& text : texts_fixture()) {
    EXPECT_EQ(tok.decode(tok.encode(text)), normalize_nfc(text)) << json(text).dump();
  }
  EXPECT_EQ(normalize_nfc("cafe\xCC\x81"), "caf\xC3\xA9");
  EXPECT_EQ(tok.decode(tok.encode("A\xCC\x8Angstro\xCC\x88m")), "\xC3\x85ngstr\xC3\xB6m");
}

TEST(HfTokenizer, DecodeRulesForAddedAndInvalidBytes) {
  const HfTokenizer tok = make(tiny_tokenizer());
  EXPECT_EQ(tok.decode(Ids{259, 300, 301, 258}), "the<|end|><tool> the");
  EXPECT_EQ(tok.decode(Ids{259, 300, 301, 258}, /*skip_special_tokens=*/true), "the<tool> the");
  EXPECT_EQ(tok.decode(Ids{0xC3, 0xB1}), "\xC3\xB1");
  EXPECT_EQ(tok.decode(Ids{0xC3}), "\xEF\xBF\xBD");                    // truncated sequence
  EXPECT_EQ(tok.decode(Ids{0xC0, 0x80}), "\xEF\xBF\xBD\xEF\xBF\xBD");  // C0 never starts one
  EXPECT_EQ(tok.decode(Ids{0xE2, 0x82, 300}), "\xEF\xBF\xBD<|end|>");
  EXPECT_TRUE(contains_all(error_of([&] { tok.decode(Ids{259, 270}); }), {"id 270", "position 1", "306"}));
  EXPECT_TRUE(contains_all(error_of([&] { tok.decode(Ids{9999}); }), {"id 9999", "position 0"}));
  EXPECT_TRUE(contains_all(error_of([&] { tok.id_to_token(280); }), {"id 280"}));
}

// ---- (f) threads -----------------------------------------------------------------------------

TEST(HfTokenizer, BatchOutputDoesNotDependOnThreads) {
  const HfTokenizer tok = make(tiny_tokenizer());
  std::vector<std::string> texts = texts_fixture();
  const std::string kjv = read_bytes(std::string(MOETP_REPO_DIR) + "/data/kjv.txt");
  for (size_t k = 0; k < 150; ++k) texts.push_back(kjv.substr(k * 977, 300 + k * 13));
  std::vector<std::vector<uint32_t>> expected;
  for (const auto& t : texts) expected.push_back(tok.encode(t));
  for (const int threads : {1, 2, 3, 8, 0}) EXPECT_EQ(tok.encode_batch(texts, threads), expected) << threads;
  EXPECT_TRUE(tok.encode_batch({}, 4).empty());
  std::vector<std::string> bad = {"ok", "bad\xFF", "also\xFE"};
  EXPECT_TRUE(contains_all(error_of([&] { tok.encode_batch(bad, 2); }), {"byte offset 3", "0xff"}));
  EXPECT_TRUE(contains_all(error_of([&] { tok.encode_batch(bad, -1); }), {"threads", "-1"}));
}

// ---- (g) invalid UTF-8 -----------------------------------------------------------------------

TEST(HfTokenizer, InvalidUtf8IsRefusedOrReplaced) {
  const HfTokenizer strict = make(tiny_tokenizer());
  EXPECT_TRUE(contains_all(error_of([&] { strict.encode("ab\xC3("); }), {"tiny.json", "byte offset 2", "0xc3"}));
  EXPECT_TRUE(contains_all(error_of([&] { strict.encode("\xED\xA0\x80"); }), {"byte offset 0"}));  // surrogate
  const HfTokenizer lenient = make(tiny_tokenizer(), InvalidUtf8::kReplace);
  EXPECT_EQ(lenient.encode("ab\xC3("), strict.encode("ab\xEF\xBF\xBD("));
  const EncodingWithOffsets e = lenient.encode_with_offsets("ab\xC3(");
  EXPECT_EQ(e.ids, (Ids{97, 98, 0xEF, 0xBF, 0xBD, 40}));
  EXPECT_EQ(e.offsets, (std::vector<TokenSpan>{{0, 1}, {1, 2}, {2, 3}, {2, 3}, {2, 3}, {3, 4}}));
  EXPECT_EQ(lenient.decode(lenient.encode("x\xE2\x82y")), "x\xEF\xBF\xBDy");  // maximal subpart: one U+FFFD
}

// ---- The real Qwen3 tokenizer ----------------------------------------------------------------

const HfTokenizer* qwen3() {
  static const std::optional<HfTokenizer> tok = []() -> std::optional<HfTokenizer> {
    const char* path = std::getenv("MOETP_QWEN3_TOKENIZER");
    if (path == nullptr || !std::filesystem::exists(path)) return std::nullopt;
    return HfTokenizer::load(path);
  }();
  return tok ? &*tok : nullptr;
}

#define REQUIRE_QWEN3()                                                                                \
  if (qwen3() == nullptr) {                                                                            \
    GTEST_SKIP() << "MOETP_QWEN3_TOKENIZER is unset or names no file: run scripts/fetch-tokenizer.sh " \
                    "(CTest then sets it) or export MOETP_QWEN3_TOKENIZER=/path/to/tokenizer.json";    \
  }

TEST(Qwen3, KnownIds) {
  REQUIRE_QWEN3();
  const HfTokenizer& tok = *qwen3();
  EXPECT_EQ(tok.vocab_size(), 151669u);
  EXPECT_EQ(tok.encode("Hello, world!"), (Ids{9707, 11, 1879, 0}));
  EXPECT_EQ(tok.encode("<|im_start|>assistant\n"), (Ids{151644, 77091, 198}));
  EXPECT_EQ(tok.encode("<|im_start|>user\n"), (Ids{151644, 872, 198}));
  EXPECT_EQ(tok.token_to_id("<|im_end|>"), 151645u);
  EXPECT_EQ(tok.token_to_id("<think>"), 151667u);
  EXPECT_TRUE(tok.is_special(151645));
  EXPECT_FALSE(tok.is_special(151667));
  EXPECT_NE(tok.encode("<|im_end|>", true), (Ids{151645}));
  EXPECT_EQ(tok.encode("<think>", true), (Ids{151667}));
}

TEST(Qwen3, RoundTrips) {
  REQUIRE_QWEN3();
  const HfTokenizer& tok = *qwen3();
  for (const std::string& text : texts_fixture()) {
    EXPECT_EQ(tok.decode(tok.encode(text)), normalize_nfc(text)) << json(text).dump();
  }
  const std::string kjv = read_bytes(std::string(MOETP_REPO_DIR) + "/data/kjv.txt");
  EXPECT_EQ(tok.decode(tok.encode(kjv)), kjv);
  EXPECT_EQ(tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>"), true), "user\nhi");
}

// The ids the Python tokenizers library gives (tools/make_tokenizer_fixture.py). Offsets are
// compared where the text is already NFC, after widening ours to whole characters (the library
// gives a token that holds part of a character that whole character).
TEST(Qwen3Reference, MatchesThePythonLibrary) {
  REQUIRE_QWEN3();
  const std::string path = std::string(MOETP_REPO_DIR) + "/tests/data/fixtures/qwen3_reference_ids.json";
  if (!std::filesystem::exists(path)) {
    GTEST_SKIP() << path << " does not exist yet: generate it with tools/make_tokenizer_fixture.py where the "
                 << "Python tokenizers package is installed";
  }
  const HfTokenizer& tok = *qwen3();
  const json fixture = json::parse(read_bytes(path));
  ASSERT_GT(fixture.at("cases").size(), 0u);
  for (size_t k = 0; k < fixture["cases"].size(); ++k) {
    const json& c = fixture["cases"][k];
    const std::string text = c.at("text").get<std::string>();
    const bool split_special = c.value("split_special_tokens", false);
    const EncodingWithOffsets got = tok.encode_with_offsets(text, split_special);
    const Ids want = c.at("ids").get<Ids>();
    ASSERT_EQ(got.ids, want) << "case " << k << " " << json(text.substr(0, 200)).dump();
    if (!c.contains("offsets") || normalize_nfc(text) != text) continue;
    const auto cont = [&](size_t i) { return i < text.size() && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80; };
    for (size_t t = 0; t < got.ids.size(); ++t) {
      size_t b = got.offsets[t].begin, e = got.offsets[t].end;
      while (b > 0 && cont(b)) --b;
      while (cont(e)) ++e;
      const auto w = c["offsets"][t].get<std::vector<size_t>>();
      ASSERT_EQ((TokenSpan{b, e}), (TokenSpan{w.at(0), w.at(1)})) << "case " << k << " token " << t;
    }
  }
}

}  // namespace
}  // namespace moetp::data
