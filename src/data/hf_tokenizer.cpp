// Hugging Face tokenizer.json tokenizer, byte-level BPE family (hf_tokenizer.h).
#include "data/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <utility>

#include "core/check.h"

namespace moetp::data {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// UTF-8

// Length of the well-formed UTF-8 sequence at s[i] (Unicode table 3-7), or 0 when there is none;
// then *bad is the length of the maximal subpart to replace by one U+FFFD (at least 1).
size_t utf8_sequence(const unsigned char* s, size_t n, size_t i, size_t* bad) {
  const unsigned char c = s[i];
  if (c < 0x80) return 1;
  size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
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
    *bad = 1;
    return 0;
  }
  size_t k = 1;
  for (; k < len && i + k < n; ++k) {
    const unsigned char b = s[i + k];
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) break;
  }
  if (k == len) return len;
  *bad = k;
  return 0;
}

// Appends `bytes` to `out` with each maximal ill-formed subpart replaced by U+FFFD. When `from` is
// given, from->push_back(source offset of each output byte's sequence) is recorded as well.
void append_lossy(std::string& out, std::string_view bytes, std::vector<size_t>* begin = nullptr,
                  std::vector<size_t>* end = nullptr) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    size_t bad = 0;
    size_t len = utf8_sequence(s, bytes.size(), i, &bad);
    const size_t before = out.size();
    if (len > 0) {
      out.append(bytes.substr(i, len));
    } else {
      out.append("\xEF\xBF\xBD");
      len = bad;
    }
    if (begin != nullptr) {
      for (size_t k = before; k < out.size(); ++k) {
        begin->push_back(i);
        end->push_back(i + len);
      }
    }
    i += len;
  }
}

// Decodes the (valid) UTF-8 character at s[i]; *len gets its byte length.
char32_t decode_utf8(std::string_view s, size_t i, size_t* len) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    *len = 1;
    return c;
  }
  const size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
  char32_t cp = c & (n == 2 ? 0x1F : n == 3 ? 0x0F : 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *len = n;
  return cp;
}

// The character that ends at s[i) (valid UTF-8, i > 0).
char32_t decode_utf8_before(std::string_view s, size_t i) {
  size_t j = i - 1;
  while (j > 0 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
  size_t len = 0;
  return decode_utf8(s, j, &len);
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool all_ascii(std::string_view s) {
  for (const char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

// Unicode White_Space: Rust's char::is_whitespace, Oniguruma's \s.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// The `\w` of Rust's regex crate (single_word added tokens): Alphabetic, marks, decimal digits,
// connector punctuation, joiners. Alphabetic is taken as letters, letter numbers and the
// Other_Alphabetic symbols (circled and squared Latin letters).
bool is_word_char(char32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  if (c == 0x200C || c == 0x200D) return true;
  if ((c >= 0x24B6 && c <= 0x24E9) || (c >= 0x1F130 && c <= 0x1F149) || (c >= 0x1F150 && c <= 0x1F169) ||
      (c >= 0x1F170 && c <= 0x1F189)) {
    return true;
  }
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// NFC (utf8proc)

std::string nfc_of(std::string_view text) {
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()), static_cast<utf8proc_ssize_t>(text.size()),
                   &out, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  MOETP_CHECK(n >= 0, "NFC normalization failed: {}", utf8proc_errmsg(n));
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

// Code points that can be the second of a canonical composition pair: the non-first elements of
// every canonical decomposition, and the Hangul vowel and trailing jamo.
const std::vector<bool>& composition_seconds() {
  static const std::vector<bool> table = [] {
    std::vector<bool> t(0x110000, false);
    for (char32_t c = 0x1161; c <= 0x1175; ++c) t[c] = true;
    for (char32_t c = 0x11A8; c <= 0x11C2; ++c) t[c] = true;
    for (utf8proc_int32_t c = 0; c < 0x110000; ++c) {
      if (c >= 0xD800 && c <= 0xDFFF) continue;
      const utf8proc_property_t* p = utf8proc_get_property(c);
      if (p->decomp_seqindex == UINT16_MAX || p->decomp_type != 0) continue;
      utf8proc_int32_t buf[8];
      const utf8proc_ssize_t n = utf8proc_decompose_char(c, buf, 8, UTF8PROC_DECOMPOSE, nullptr);
      for (utf8proc_ssize_t k = 1; k < n && k < 8; ++k) t[static_cast<size_t>(buf[k])] = true;
    }
    return t;
  }();
  return table;
}

// True when NFC never combines `c` with what precedes it: a starter without a canonical
// decomposition that is never the second of a composition (a conservative NFC boundary).
bool nfc_boundary_before(char32_t c) {
  if (c < 0x80) return true;
  const utf8proc_property_t* p = utf8proc_get_property(static_cast<utf8proc_int32_t>(c));
  if (p->combining_class != 0) return false;
  if (p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0) return false;
  return !composition_seconds()[c];
}

// True when NFC leaves `text` (valid UTF-8) unchanged because every character passes
// nfc_boundary_before: each is then its own NFC form and none combines with its neighbours, so the
// text is already NFC. False means "maybe not": the caller normalizes. ASCII is skipped 8 bytes at
// a time.
bool nfc_quick_stable(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    if (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, s + i, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    if (s[i] < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    const char32_t cp = decode_utf8(text, i, &len);
    if (!nfc_boundary_before(cp)) return false;
    i += len;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Offset maps: position in a derived string -> [begin, end) in its source string.

struct OffsetMap {
  size_t base = 0;           // identity map: position p -> base + p
  std::vector<size_t> b, e;  // explicit map when non-empty
  bool identity() const { return b.empty(); }
  // Source range of derived bytes [s, t), s < t.
  TokenSpan span(size_t s, size_t t) const {
    if (identity()) return {base + s, base + t};
    return {b[s], e[t - 1]};
  }
  // Source position of derived position p (for empty ranges).
  size_t pos(size_t p) const {
    if (identity()) return base + p;
    if (p < b.size()) return b[p];
    return e.empty() ? base : e.back();
  }
};

// ---------------------------------------------------------------------------------------------
// Byte-level alphabet (GPT-2 bytes_to_unicode): printable Latin-1 bytes stand for themselves, the
// other 68 bytes take U+0100 onwards in byte order.

struct ByteAlphabet {
  std::array<char32_t, 256> to_cp{};
  std::array<int16_t, 324> to_byte{};  // code point -> byte, -1 when the code point is not used
  ByteAlphabet() {
    to_byte.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? static_cast<char32_t>(b) : next++;
      to_byte[to_cp[b]] = static_cast<int16_t>(b);
    }
  }
  std::string mapped(uint8_t b) const {
    std::string s;
    append_utf8(s, to_cp[b]);
    return s;
  }
  // The bytes a byte-level token string stands for; nullopt when a character is not in the alphabet.
  std::optional<std::string> unmap(std::string_view token) const {
    std::string raw;
    for (size_t i = 0; i < token.size();) {
      size_t len = 0;
      const char32_t cp = decode_utf8(token, i, &len);
      if (cp >= to_byte.size() || to_byte[cp] < 0) return std::nullopt;
      raw.push_back(static_cast<char>(to_byte[cp]));
      i += len;
    }
    return raw;
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// ---------------------------------------------------------------------------------------------
// Regexes: Oniguruma patterns (as the tokenizers library compiles them) translated to PCRE2.

// Unicode White_Space and its complement, as class members.
constexpr const char* kSpaceMembers =
    "\\x{09}-\\x{0D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
constexpr const char* kNonSpaceMembers =
    "\\x{00}-\\x{08}\\x{0E}-\\x{1F}\\x{21}-\\x{84}\\x{86}-\\x{9F}\\x{A1}-\\x{167F}\\x{1681}-\\x{1FFF}"
    "\\x{200B}-\\x{2027}\\x{202A}-\\x{202E}\\x{2030}-\\x{205E}\\x{2060}-\\x{2FFF}\\x{3001}-\\x{10FFFF}";
constexpr const char* kWordMembers = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";
constexpr const char* kHexMembers = "0-9A-Fa-f";

bool is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

// Rewrites an Oniguruma pattern so that PCRE2 (UTF | UCP | MULTILINE) matches the same strings;
// `fail(message)` reports constructs that are refused (see hf_tokenizer.h).
std::string translate_pattern(std::string_view p, const std::function<void(const std::string&)>& fail) {
  std::string out;
  bool in_class = false;
  size_t class_body = 0;               // position of the first member of the current class
  auto copy_braced = [&](size_t& i) {  // copies \p{...}, \x{...}, \pL or \xHH, starting at p[i] == backslash
    const char kind = p[i + 1];
    out.append(p.substr(i, 2));
    i += 2;
    if (i < p.size() && p[i] == '{') {
      const size_t close = p.find('}', i);
      if (close == std::string_view::npos) fail("unterminated '{' in an escape");
      out.append(p.substr(i, close + 1 - i));
      i = close + 1;
    } else if (kind == 'x') {
      for (int k = 0; k < 2 && i < p.size() && is_hex(p[i]); ++k) out += p[i++];
    } else if (i < p.size()) {
      out += p[i++];
    }
  };
  size_t i = 0;
  while (i < p.size()) {
    const char c = p[i];
    if (c == '\\') {
      if (i + 1 >= p.size()) fail("pattern ends with a backslash");
      const char e = p[i + 1];
      switch (e) {
        case 's':
          out += in_class ? std::string(kSpaceMembers) : fmt::format("[{}]", kSpaceMembers);
          i += 2;
          continue;
        case 'S':
          out += in_class ? std::string(kNonSpaceMembers) : fmt::format("[^{}]", kSpaceMembers);
          i += 2;
          continue;
        case 'w':
          out += in_class ? std::string(kWordMembers) : fmt::format("[{}]", kWordMembers);
          i += 2;
          continue;
        case 'h':
          out += in_class ? std::string(kHexMembers) : fmt::format("[{}]", kHexMembers);
          i += 2;
          continue;
        case 'W':
        case 'H':
          if (in_class) fail(fmt::format("\\{} inside a character class", e));
          out += fmt::format("[^{}]", e == 'W' ? kWordMembers : kHexMembers);
          i += 2;
          continue;
        case 'v':
          out += "\\x{0B}";
          i += 2;
          continue;
        case 'u': {
          if (i + 6 > p.size() || !is_hex(p[i + 2]) || !is_hex(p[i + 3]) || !is_hex(p[i + 4]) || !is_hex(p[i + 5])) {
            fail("\\u must be followed by four hex digits");
          }
          out += fmt::format("\\x{{{}}}", p.substr(i + 2, 4));
          i += 6;
          continue;
        }
        case 'p':
        case 'P':
        case 'x':
          copy_braced(i);
          continue;
        case 'b':
          if (in_class) break;  // backspace in both engines
          [[fallthrough]];
        case 'B':
        case 'X':
        case 'g':
        case 'y':
        case 'Y':
        case 'O':
          fail(fmt::format("\\{} (its meaning differs between Oniguruma and PCRE2)", e));
          break;
        default:
          break;
      }
      out += c;
      out += e;
      i += 2;
      continue;
    }
    if (in_class) {
      if (c == '[') fail("'[' inside a character class (nested classes and POSIX brackets)");
      if (c == '&' && i + 1 < p.size() && p[i + 1] == '&') fail("'&&' inside a character class");
      if (c == ']' && i > class_body) in_class = false;
      out += c;
      ++i;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      ++i;
      if (i < p.size() && p[i] == '^') out += p[i++];
      class_body = i;
      continue;
    }
    if (c == '(' && i + 1 < p.size() && p[i + 1] == '?') {
      const std::string_view rest = p.substr(i + 2);
      static const char* const kGroups[] = {":", "=", "!", "<=", "<!", ">", "#", "P<"};
      bool ok = false;
      for (const char* g : kGroups) ok = ok || rest.starts_with(g);
      // Named group (?<name>...).
      if (!ok && rest.size() > 1 && rest[0] == '<' && rest[1] != '=' && rest[1] != '!') ok = true;
      if (!ok) {
        // Inline options: only i (case-insensitive), same meaning in both engines.
        size_t k = 0;
        while (k < rest.size() && (rest[k] == 'i' || rest[k] == '-')) ++k;
        if (k == 0 || k >= rest.size() || (rest[k] != ':' && rest[k] != ')')) {
          fail(fmt::format("group '(?{}' (only (?:, lookarounds, (?>, named groups and the option i are supported)",
                           rest.substr(0, std::min<size_t>(rest.size(), 3))));
        }
      }
      out += "(?";
      i += 2;
      continue;
    }
    out += c;
    ++i;
  }
  if (in_class) fail("unterminated character class");
  return out;
}

struct PcreCodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};

// Per-thread JIT stack (the default 32 KiB machine stack is small for long runs of one class).
struct JitResources {
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  JitResources() {
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (context != nullptr && stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~JitResources() {
    if (stack != nullptr) pcre2_jit_stack_free(stack);
    if (context != nullptr) pcre2_match_context_free(context);
  }
  JitResources(const JitResources&) = delete;
  JitResources& operator=(const JitResources&) = delete;
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

class Regex {
 public:
  Regex() = default;
  // `where` names the pattern in errors (JSON path).
  Regex(std::string_view pattern, const std::string& where) : pattern_(pattern) {
    const std::string translated = translate_pattern(pattern, [&](const std::string& why) {
      MOETP_FAIL("{}: regex {} is not supported: {}", where, json(std::string(pattern)).dump(), why);
    });
    pcre2_compile_context* cctx = pcre2_compile_context_create(nullptr);
    pcre2_set_newline(cctx, PCRE2_NEWLINE_LF);
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &err, &err_offset, cctx);
    pcre2_compile_context_free(cctx);
    MOETP_CHECK(code != nullptr, "{}: regex {} does not compile (PCRE2, as {}): {} at offset {}", where,
                json(std::string(pattern)).dump(), json(translated).dump(), pcre2_message(err), err_offset);
    // Falls back to the interpreter where JIT is unavailable; with JIT code, find_all calls
    // pcre2_jit_match directly (the same matches without pcre2_match's per-call checks).
    size_t jit_size = 0;
    jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0 &&
           pcre2_pattern_info(code, PCRE2_INFO_JITSIZE, &jit_size) == 0 && jit_size > 0;
    code_.reset(code, PcreCodeDeleter());
  }

  // Every match in `text` (valid UTF-8) with the tokenizers library's find_iter rule: an empty
  // match right where the previous match ended is skipped by advancing one character.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
    thread_local JitResources jit;
    std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
    MOETP_CHECK(md != nullptr, "pcre2_match_data_create failed");
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t start = 0;
    size_t last_match_end = std::string_view::npos;
    while (start <= text.size()) {
      const int rc =
          jit_ ? pcre2_jit_match(code_.get(), subject, text.size(), start, 0, md.get(), jit.context)
               : pcre2_match(code_.get(), subject, text.size(), start, PCRE2_NO_UTF_CHECK, md.get(), jit.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      MOETP_CHECK(rc >= 0, "regex {} failed at byte {} of a {}-byte piece: {}", json(pattern_).dump(), start,
                  text.size(), pcre2_message(rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      const size_t s = ov[0], e = ov[1];
      if (s == e && last_match_end == e) {
        if (start >= text.size()) break;
        size_t len = 0;
        decode_utf8(text, start, &len);
        start += len;
        continue;
      }
      out.emplace_back(s, e);
      start = e;
      last_match_end = e;
    }
  }

 private:
  std::string pattern_;
  std::shared_ptr<pcre2_code> code_;
  bool jit_ = false;
};

// The regex of ByteLevel with use_regex = true.
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// tokenizer.json reading

std::string short_dump(const json& j) {
  std::string s = j.dump();
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

class JsonReader {
 public:
  explicit JsonReader(std::string name) : name_(std::move(name)) {}

  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    MOETP_FAIL("tokenizer '{}': {}: {}", name_, path, what);
  }
  void expect_object(const json& j, const std::string& path) const {
    if (!j.is_object()) fail(path, fmt::format("expected an object, got {}", short_dump(j)));
  }
  // Every key of `j` must be in `known`.
  void check_keys(const json& j, const std::string& path, std::initializer_list<const char*> known) const {
    for (const auto& [key, value] : j.items()) {
      bool found = false;
      for (const char* k : known) found = found || key == k;
      if (!found) {
        std::string list;
        for (const char* k : known) list += (list.empty() ? "" : ", ") + std::string(k);
        fail(path + "." + key, fmt::format("unsupported key (value {}); supported keys: {}", short_dump(value), list));
      }
    }
  }
  bool get_bool(const json& j, const std::string& path, const char* key, bool fallback) const {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    if (!j[key].is_boolean()) fail(path + "." + key, fmt::format("expected true or false, got {}", short_dump(j[key])));
    return j[key].get<bool>();
  }
  std::string get_string(const json& j, const std::string& path, const char* key) const {
    if (!j.contains(key) || !j[key].is_string()) {
      fail(path + "." + key,
           fmt::format("expected a string, got {}", j.contains(key) ? short_dump(j[key]) : "nothing"));
    }
    return j[key].get<std::string>();
  }
  std::string type_of(const json& j, const std::string& path) const {
    expect_object(j, path);
    return get_string(j, path, "type");
  }
  uint32_t get_id(const json& j, const std::string& path) const {
    if (!j.is_number_unsigned() || j.get<uint64_t>() >= 0xFFFFFFFFull) {
      fail(path, fmt::format("expected a token id (integer in [0, 2^32 - 1)), got {}", short_dump(j)));
    }
    return static_cast<uint32_t>(j.get<uint64_t>());
  }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitStep {
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool is_regex = false;
  Regex regex;
  std::string literal;
};

struct AddedToken {
  uint32_t id = 0;
  std::string content;  // matched text (NFC form for normalized tokens)
  std::string raw_content;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

// Leftmost-longest matching of a set of added tokens (the aho-corasick LeftmostLongest automaton
// of the library): candidates are bucketed by first byte, longest first.
struct AddedMatcher {
  std::array<std::vector<uint32_t>, 256> by_first;  // indices into the added token list
  bool empty = true;
  int only_first = -1;  // the one first byte of all the tokens, or -1 (several or none)

  void build(const std::vector<AddedToken>& tokens, bool normalized) {
    for (uint32_t k = 0; k < tokens.size(); ++k) {
      if (tokens[k].normalized != normalized) continue;
      by_first[static_cast<unsigned char>(tokens[k].content[0])].push_back(k);
      empty = false;
    }
    int firsts = 0;
    for (int b = 0; b < 256; ++b) {
      if (!by_first[b].empty()) {
        ++firsts;
        only_first = b;
      }
    }
    if (firsts != 1) only_first = -1;
    for (auto& bucket : by_first) {
      std::stable_sort(bucket.begin(), bucket.end(),
                       [&](uint32_t a, uint32_t b) { return tokens[a].content.size() > tokens[b].content.size(); });
    }
  }

  struct Match {
    uint32_t token;  // index into the added token list
    size_t begin, end;
  };

  // Non-overlapping leftmost-longest matches, then the library's per-token rules (find_matches in
  // added_vocabulary.rs): special tokens skipped under split_special_tokens, single_word, lstrip,
  // rstrip. A match that a rule drops still hides the text it covered from other tokens.
  void find(std::string_view s, bool split_special, const std::vector<AddedToken>& tokens,
            std::vector<Match>& out) const {
    if (empty) return;
    size_t start_offset = 0;
    size_t i = 0;
    while (i < s.size()) {
      // Skip to the next byte that starts some token (the bytes skipped would each just advance i).
      if (only_first >= 0) {
        const void* p = std::memchr(s.data() + i, only_first, s.size() - i);
        if (p == nullptr) break;
        i = static_cast<size_t>(static_cast<const char*>(p) - s.data());
      } else {
        while (i < s.size() && by_first[static_cast<unsigned char>(s[i])].empty()) ++i;
        if (i == s.size()) break;
      }
      const auto& bucket = by_first[static_cast<unsigned char>(s[i])];
      const AddedToken* hit = nullptr;
      uint32_t hit_index = 0;
      for (const uint32_t k : bucket) {
        const std::string& c = tokens[k].content;
        if (s.size() - i >= c.size() && std::memcmp(s.data() + i, c.data(), c.size()) == 0) {
          hit = &tokens[k];
          hit_index = k;
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      size_t begin = i;
      size_t end = i + hit->content.size();
      i = end;
      if (split_special && hit->special) continue;
      if (hit->single_word) {
        const bool space_before = begin == 0 || !is_word_char(decode_utf8_before(s, begin));
        size_t len = 0;
        const bool space_after = end == s.size() || !is_word_char(decode_utf8(s, end, &len));
        if (!space_before || !space_after) continue;
      }
      if (hit->lstrip) {
        size_t b = begin;
        while (b > 0) {
          size_t pb = b - 1;
          while (pb > 0 && (static_cast<unsigned char>(s[pb]) & 0xC0) == 0x80) --pb;
          size_t len = 0;
          if (!is_white_space(decode_utf8(s, pb, &len))) break;
          b = pb;
        }
        begin = std::max(b, start_offset);
      }
      if (hit->rstrip) {
        while (end < s.size()) {
          size_t len = 0;
          if (!is_white_space(decode_utf8(s, end, &len))) break;
          end += len;
        }
      }
      out.push_back({hit_index, begin, end});
      start_offset = end;
    }
  }
};

struct MergeInfo {
  uint32_t rank;
  uint32_t new_id;
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringMap = std::unordered_map<std::string, uint32_t, StringHash, std::equal_to<>>;

uint64_t pair_key(uint32_t a, uint32_t b) { return (static_cast<uint64_t>(a) << 32) | b; }

std::atomic<uint64_t> g_next_instance{1};

constexpr size_t kCacheMaxEntries = 1 << 16;
constexpr size_t kCacheMaxWordBytes = 128;

// Per-thread cache of pre-token bytes -> ids, for one tokenizer at a time (owner): open addressing
// (linear probing, power-of-two table at most half full), keys and ids in two arenas; emptied when
// full. BPE is deterministic, so what the cache holds never changes the ids.
struct WordCache {
  struct Slot {
    uint64_t hash = 0;  // 0: empty
    uint32_t key_at = 0, ids_at = 0;
    uint16_t key_len = 0, n_ids = 0;
  };
  static constexpr size_t kSlots = 2 * kCacheMaxEntries;
  uint64_t owner = 0;
  size_t used = 0;
  std::vector<Slot> slots;
  std::string keys;
  std::vector<uint32_t> ids;

  void reset(uint64_t new_owner) {
    owner = new_owner;
    used = 0;
    slots.assign(kSlots, Slot{});
    keys.clear();
    ids.clear();
  }
  // Non-zero hash of a word of at most kCacheMaxWordBytes bytes (8 bytes per step).
  static uint64_t hash_of(std::string_view w) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (w.size() * 0xff51afd7ed558ccdull);
    size_t i = 0;
    for (; i + 8 <= w.size(); i += 8) {
      uint64_t x;
      std::memcpy(&x, w.data() + i, 8);
      h = (h ^ x) * 0xbf58476d1ce4e5b9ull;
      h ^= h >> 31;
    }
    uint64_t x = 0;
    std::memcpy(&x, w.data() + i, w.size() - i);
    h = (h ^ x) * 0x94d049bb133111ebull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h | 1;
  }
  // The slot of `w` (h = hash_of(w)): its entry, or the empty slot where it would go.
  Slot& find(std::string_view w, uint64_t h) {
    const size_t mask = kSlots - 1;
    for (size_t k = h & mask;; k = (k + 1) & mask) {
      Slot& slot = slots[k];
      if (slot.hash == 0) return slot;
      if (slot.hash == h && slot.key_len == w.size() && std::memcmp(keys.data() + slot.key_at, w.data(), w.size()) == 0) {
        return slot;
      }
    }
  }
};

}  // namespace

size_t first_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  size_t i = 0;
  while (i < text.size()) {
    if (i + 8 <= text.size()) {
      uint64_t w;
      std::memcpy(&w, s + i, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    if (s[i] < 0x80) {
      ++i;
      continue;
    }
    size_t bad = 0;
    const size_t len = utf8_sequence(s, text.size(), i, &bad);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string replace_invalid_utf8(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  append_lossy(out, text);
  return out;
}


// ---------------------------------------------------------------------------------------------

struct HfTokenizer::Impl {
  std::string name;
  InvalidUtf8 invalid_utf8 = InvalidUtf8::kRefuse;
  uint64_t instance = 0;

  bool nfc = false;
  std::vector<SplitStep> splits;
  bool add_prefix_space = false;
  bool byte_level_regex = false;
  Regex gpt2;
  bool trim_offsets = false;           // post_processor ByteLevel
  bool trim_add_prefix_space = false;  // its add_prefix_space

  StringMap vocab;      // byte-level token string -> id
  StringMap raw_vocab;  // token bytes -> id
  std::unordered_map<uint64_t, MergeInfo> merges;
  std::array<uint32_t, 256> byte_id{};
  bool ignore_merges = false;

  std::vector<AddedToken> added;
  std::unordered_map<uint32_t, uint32_t> added_by_id;  // id -> index into added
  StringMap added_by_content;
  AddedMatcher raw_matcher, normalized_matcher;

  // Per id: 0 = no token, 1 = vocabulary token, 2 = added token.
  std::vector<uint8_t> kind;
  std::vector<std::string> token_string;  // id_to_token
  std::vector<std::string> token_bytes;   // bytes decode() emits for a vocabulary token
  uint32_t size = 0;

  // ---- encoding ----

  // Receives pre-tokens (bytes, and where each byte came from) or tokens.
  struct Sink {
    bool want_offsets = false;
    bool pre_tokens_only = false;
    std::vector<uint32_t>* ids = nullptr;
    std::vector<TokenSpan>* offsets = nullptr;
    std::vector<PreToken>* pre_tokens = nullptr;
  };

  void bpe(std::string_view word, std::vector<uint32_t>& out) const;
  void bpe_cached(std::string_view word, std::vector<uint32_t>& out) const;
  void run(std::string_view input, bool split_special, Sink& sink) const;
  void emit_piece(std::string_view norm, size_t ps, size_t pe, const OffsetMap& norm_map, const OffsetMap& input_map,
                  Sink& sink) const;
  void emit_word(std::string_view word, bool virtual_space, size_t norm_pos, const OffsetMap& norm_map,
                 const OffsetMap& input_map, Sink& sink) const;
  void trim(std::vector<uint32_t>& ids, std::vector<TokenSpan>& offsets) const;
};

void HfTokenizer::Impl::bpe(std::string_view word, std::vector<uint32_t>& out) const {
  if (word.size() == 1) {
    out.push_back(byte_id[static_cast<unsigned char>(word[0])]);
    return;
  }
  if (ignore_merges) {
    const auto it = raw_vocab.find(word);
    if (it != raw_vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    uint32_t id;
    int32_t prev, next;
    bool alive;
  };
  struct Candidate {
    uint32_t rank, pos, left, right, new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const size_t n = word.size();
  std::vector<Symbol> sym(n);
  for (size_t i = 0; i < n; ++i) {
    sym[i] = {byte_id[static_cast<unsigned char>(word[i])], static_cast<int32_t>(i) - 1,
              i + 1 < n ? static_cast<int32_t>(i + 1) : -1, true};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = sym[left].next;
    if (right < 0) return;
    const auto it = merges.find(pair_key(sym[left].id, sym[right].id));
    if (it == merges.end()) return;
    heap.push({it->second.rank, static_cast<uint32_t>(left), sym[left].id, sym[right].id, it->second.new_id});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = sym[c.pos];
    if (!left.alive || left.next < 0 || left.id != c.left) continue;
    Symbol& right = sym[left.next];
    if (right.id != c.right) continue;
    left.id = c.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = static_cast<int32_t>(c.pos);
    push(left.prev);
    push(static_cast<int32_t>(c.pos));
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
}

void HfTokenizer::Impl::bpe_cached(std::string_view word, std::vector<uint32_t>& out) const {
  if (word.size() > kCacheMaxWordBytes || word.size() == 1) {
    bpe(word, out);
    return;
  }
  thread_local WordCache cache;
  if (cache.owner != instance) cache.reset(instance);
  const uint64_t h = WordCache::hash_of(word);
  WordCache::Slot* slot = &cache.find(word, h);
  if (slot->hash != 0) {
    const uint32_t* p = cache.ids.data() + slot->ids_at;
    out.insert(out.end(), p, p + slot->n_ids);
    return;
  }
  const size_t before = out.size();
  bpe(word, out);
  if (cache.used >= kCacheMaxEntries) {
    cache.reset(instance);
    slot = &cache.find(word, h);
  }
  // A word of at most 128 bytes has at most 128 ids; the arenas stay far below 2^32 entries
  // (at most kCacheMaxEntries words of at most kCacheMaxWordBytes bytes).
  slot->hash = h;
  slot->key_at = static_cast<uint32_t>(cache.keys.size());
  slot->key_len = static_cast<uint16_t>(word.size());
  slot->ids_at = static_cast<uint32_t>(cache.ids.size());
  slot->n_ids = static_cast<uint16_t>(out.size() - before);
  cache.keys.append(word);
  cache.ids.insert(cache.ids.end(), out.begin() + static_cast<ptrdiff_t>(before), out.end());
  ++cache.used;
}

void HfTokenizer::Impl::emit_word(std::string_view word, bool virtual_space, size_t norm_pos, const OffsetMap& norm_map,
                                  const OffsetMap& input_map, Sink& sink) const {
  if (word.empty()) return;
  const size_t skip = virtual_space ? 1 : 0;
  // Input range of word bytes [a, b): the inserted space maps to an empty range at norm_pos.
  auto input_span = [&](size_t a, size_t b) -> TokenSpan {
    const size_t ra = a > skip ? a - skip : 0, rb = b > skip ? b - skip : 0;
    if (ra >= rb) {
      const size_t p = input_map.pos(norm_map.pos(norm_pos));
      return {p, p};
    }
    const TokenSpan t = norm_map.span(norm_pos + ra, norm_pos + rb);
    return input_map.span(t.begin, t.end);
  };
  if (sink.pre_tokens_only) {
    sink.pre_tokens->push_back({std::string(word), input_span(0, word.size())});
    return;
  }
  const size_t first = sink.ids->size();
  bpe_cached(word, *sink.ids);
  if (!sink.want_offsets) return;
  size_t at = 0;
  for (size_t k = first; k < sink.ids->size(); ++k) {
    const size_t len = token_bytes[(*sink.ids)[k]].size();
    sink.offsets->push_back(input_span(at, at + len));
    at += len;
  }
}

void HfTokenizer::Impl::emit_piece(std::string_view norm, size_t ps, size_t pe, const OffsetMap& norm_map,
                                   const OffsetMap& input_map, Sink& sink) const {
  std::vector<std::pair<size_t, size_t>> found;
  // ByteLevel on the piece [s, e) of `norm` (non-empty): optional prefix space, optional GPT-2
  // split, then BPE on the bytes.
  std::string with_space;
  std::vector<std::pair<size_t, size_t>> words;
  auto byte_level = [&](size_t s, size_t e) {
    std::string_view text = norm.substr(s, e - s);
    bool virtual_space = false;
    if (add_prefix_space && text[0] != ' ') {
      with_space.assign(" ");
      with_space.append(text);
      text = with_space;
      virtual_space = true;
    }
    if (!byte_level_regex) {
      emit_word(text, virtual_space, s, norm_map, input_map, sink);
      return;
    }
    words.clear();
    gpt2.find_all(text, words);
    size_t prev = 0;
    auto emit_range = [&](size_t a, size_t b) {
      if (a >= b) return;
      const bool has_virtual = virtual_space && a == 0;
      const size_t norm_pos = virtual_space ? s + (a == 0 ? 0 : a - 1) : s + a;
      emit_word(text.substr(a, b - a), has_virtual, norm_pos, norm_map, input_map, sink);
    };
    for (const auto& [ms, me] : words) {
      emit_range(prev, ms);
      emit_range(ms, me);
      prev = me;
    }
    emit_range(prev, text.size());
  };
  // The common case (GPT-4o, Llama 3, Qwen2/3: one non-inverted Isolated regex Split before
  // ByteLevel): the gaps and the matches go straight to ByteLevel, in order, empty ones dropped —
  // what the general loop below gives for this step.
  if (splits.size() == 1 && splits[0].is_regex && splits[0].behavior == SplitBehavior::kIsolated &&
      !splits[0].invert) {
    splits[0].regex.find_all(norm.substr(ps, pe - ps), found);
    size_t prev = ps;
    for (const auto& [ms, me] : found) {
      if (prev < ps + ms) byte_level(prev, ps + ms);
      if (ms < me) byte_level(ps + ms, ps + me);
      prev = ps + me;
    }
    if (prev < pe) byte_level(prev, pe);
    return;
  }
  // Split steps, each applied to every piece of the previous one; pieces are ranges of `norm`.
  std::vector<std::pair<size_t, size_t>> pieces{{ps, pe}}, next;
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> parts;  // (range, is_match)
  for (const SplitStep& step : splits) {
    next.clear();
    for (const auto& [s, e] : pieces) {
      const std::string_view text = norm.substr(s, e - s);
      found.clear();
      if (step.is_regex) {
        step.regex.find_all(text, found);
      } else if (!step.literal.empty()) {
        for (size_t at = text.find(step.literal); at != std::string_view::npos;
             at = text.find(step.literal, at + step.literal.size())) {
          found.emplace_back(at, at + step.literal.size());
        }
      }
      // Cover the piece with alternating (range, is_match) parts, as find_matches does.
      parts.clear();
      size_t prev = 0;
      for (const auto& [ms, me] : found) {
        if (prev != ms) parts.push_back({{prev, ms}, false});
        parts.push_back({{ms, me}, true});
        prev = me;
      }
      if (prev != text.size()) parts.push_back({{prev, text.size()}, false});
      if (step.invert) {
        for (auto& part : parts) part.second = !part.second;
      }
      // Apply the behavior (NormalizedString::split).
      std::vector<std::pair<size_t, size_t>> out;
      switch (step.behavior) {
        case SplitBehavior::kIsolated:
          for (const auto& part : parts) out.push_back(part.first);
          break;
        case SplitBehavior::kRemoved:
          for (const auto& part : parts) {
            if (!part.second) out.push_back(part.first);
          }
          break;
        case SplitBehavior::kContiguous: {
          bool previous_match = false;
          for (const auto& part : parts) {
            if (part.second == previous_match && !out.empty()) {
              out.back().second = part.first.second;
            } else {
              out.push_back(part.first);
            }
            previous_match = part.second;
          }
          break;
        }
        case SplitBehavior::kMergedWithPrevious: {
          bool previous_match = false;
          for (const auto& part : parts) {
            if (part.second && !previous_match && !out.empty()) {
              out.back().second = part.first.second;
            } else {
              out.push_back(part.first);
            }
            previous_match = part.second;
          }
          break;
        }
        case SplitBehavior::kMergedWithNext: {
          bool previous_match = false;
          for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
            if (it->second && !previous_match && !out.empty()) {
              out.back().first = it->first.first;
            } else {
              out.push_back(it->first);
            }
            previous_match = it->second;
          }
          std::reverse(out.begin(), out.end());
          break;
        }
      }
      for (const auto& [a, b] : out) {
        if (a < b) next.emplace_back(s + a, s + b);  // empty pieces are dropped
      }
    }
    pieces.swap(next);
  }
  for (const auto& [s, e] : pieces) byte_level(s, e);
}

void HfTokenizer::Impl::run(std::string_view input, bool split_special, Sink& sink) const {
  // Invalid UTF-8: refuse, or replace and keep a map back to the input bytes.
  std::string sanitized;
  OffsetMap input_map;
  std::string_view text = input;
  const size_t bad = first_invalid_utf8(input);
  if (bad != std::string_view::npos) {
    if (invalid_utf8 == InvalidUtf8::kRefuse) {
      MOETP_FAIL(
          "tokenizer '{}': input is not valid UTF-8 at byte offset {} (byte 0x{:02x}); load the tokenizer "
          "with InvalidUtf8::kReplace to replace invalid bytes by U+FFFD",
          name, bad, static_cast<unsigned char>(input[bad]));
    }
    append_lossy(sanitized, input, &input_map.b, &input_map.e);
    text = sanitized;
  }

  std::vector<AddedMatcher::Match> matches;
  raw_matcher.find(text, split_special, added, matches);
  auto emit_added = [&](uint32_t index, TokenSpan span) {
    if (sink.pre_tokens_only) return;
    sink.ids->push_back(added[index].id);
    if (sink.want_offsets) sink.offsets->push_back(span);
  };
  std::vector<AddedMatcher::Match> norm_matches;
  auto do_segment = [&](size_t b, size_t e) {
    if (b >= e) return;
    const std::string_view seg = text.substr(b, e - b);
    // Normalize (NFC), keeping a map to `text` when offsets are wanted.
    std::string owned;
    std::string_view norm = seg;
    OffsetMap norm_map;
    norm_map.base = b;
    if (nfc && !nfc_quick_stable(seg)) {
      std::string whole = nfc_of(seg);
      if (whole != seg) {
        if (sink.want_offsets || sink.pre_tokens_only) {
          // Per NFC-stable stretch: unchanged stretches keep byte offsets, changed ones map to
          // their whole source range.
          size_t stretch = 0;
          auto flush = [&](size_t to) {
            const std::string_view part = seg.substr(stretch, to - stretch);
            const std::string normalized = all_ascii(part) ? std::string(part) : nfc_of(part);
            const bool same = normalized == part;
            for (size_t k = 0; k < normalized.size(); ++k) {
              norm_map.b.push_back(same ? b + stretch + k : b + stretch);
              norm_map.e.push_back(same ? b + stretch + k + 1 : b + to);
            }
            owned += normalized;
            stretch = to;
          };
          for (size_t i = 0; i < seg.size();) {
            size_t len = 0;
            const char32_t cp = decode_utf8(seg, i, &len);
            if (i > stretch && nfc_boundary_before(cp)) flush(i);
            i += len;
          }
          flush(seg.size());
          if (owned != whole) {  // the boundary rule missed an interaction: coarse map
            owned = whole;
            norm_map.b.assign(owned.size(), b);
            norm_map.e.assign(owned.size(), e);
          }
        } else {
          owned = std::move(whole);
        }
        norm = owned;
      }
    }
    norm_matches.clear();
    normalized_matcher.find(norm, split_special, added, norm_matches);
    size_t at = 0;
    for (const auto& m : norm_matches) {
      emit_piece(norm, at, m.begin, norm_map, input_map, sink);
      if (sink.want_offsets) {
        const TokenSpan t = norm_map.span(m.begin, m.end);
        emit_added(m.token, input_map.span(t.begin, t.end));
      } else {
        emit_added(m.token, {});
      }
      at = m.end;
    }
    if (at < norm.size()) emit_piece(norm, at, norm.size(), norm_map, input_map, sink);
  };
  size_t at = 0;
  for (const auto& m : matches) {
    if (at < m.begin) do_segment(at, m.begin);
    emit_added(m.token, input_map.span(m.begin, m.end));
    at = m.end;
  }
  do_segment(at, text.size());
}

// ByteLevel post-processor with trim_offsets (process_offsets in byte_level.rs): the leading and
// trailing spaces of each token leave its offsets.
void HfTokenizer::Impl::trim(std::vector<uint32_t>& ids, std::vector<TokenSpan>& offsets) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    const uint32_t id = ids[i];
    size_t leading = 0, trailing = 0;
    if (kind[id] == 2) {
      const std::string& c = added[added_by_id.at(id)].content;
      std::vector<char32_t> cps;
      for (size_t k = 0; k < c.size();) {
        size_t len = 0;
        cps.push_back(decode_utf8(c, k, &len));
        k += len;
      }
      while (leading < cps.size() && is_white_space(cps[leading])) ++leading;
      while (trailing < cps.size() && is_white_space(cps[cps.size() - 1 - trailing])) ++trailing;
    } else {
      const std::string& bytes = token_bytes[id];
      while (leading < bytes.size() && bytes[leading] == ' ') ++leading;
      while (trailing < bytes.size() && bytes[bytes.size() - 1 - trailing] == ' ') ++trailing;
    }
    TokenSpan& o = offsets[i];
    if (leading > 0) {
      const bool is_first = i == 0 || o.begin == 0;
      if (!(is_first && trim_add_prefix_space && leading == 1)) o.begin = std::min(o.begin + leading, o.end);
    }
    if (trailing > 0 && o.end >= trailing) o.end = std::max(o.end - trailing, o.begin);
  }
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

void parse_normalizer(HfTokenizer::Impl& t, const JsonReader& r, const json& j, const std::string& path) {
  if (j.is_null()) return;
  const std::string type = r.type_of(j, path);
  if (type == "NFC") {
    r.check_keys(j, path, {"type"});
    t.nfc = true;
  } else if (type == "Sequence") {
    r.check_keys(j, path, {"type", "normalizers"});
    if (!j.contains("normalizers") || !j["normalizers"].is_array()) r.fail(path + ".normalizers", "expected an array");
    for (size_t k = 0; k < j["normalizers"].size(); ++k) {
      parse_normalizer(t, r, j["normalizers"][k], fmt::format("{}.normalizers[{}]", path, k));
    }
  } else {
    r.fail(path + ".type", fmt::format("normalizer \"{}\" is not supported (supported: NFC, Sequence)", type));
  }
}

void parse_byte_level_fields(const JsonReader& r, const json& j, const std::string& path, bool* add_prefix_space,
                             bool* trim_offsets, bool* use_regex) {
  r.check_keys(j, path, {"type", "add_prefix_space", "trim_offsets", "use_regex"});
  *add_prefix_space = r.get_bool(j, path, "add_prefix_space", true);
  *trim_offsets = r.get_bool(j, path, "trim_offsets", true);
  *use_regex = r.get_bool(j, path, "use_regex", true);
}

void parse_pre_tokenizer(HfTokenizer::Impl& t, const JsonReader& r, const json& j, const std::string& path,
                         bool* seen_byte_level) {
  const std::string type = r.type_of(j, path);
  if (*seen_byte_level) {
    r.fail(path, fmt::format("pre-tokenizer \"{}\" after ByteLevel (ByteLevel must be the last step)", type));
  }
  if (type == "Sequence") {
    r.check_keys(j, path, {"type", "pretokenizers"});
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array())
      r.fail(path + ".pretokenizers", "expected an array");
    for (size_t k = 0; k < j["pretokenizers"].size(); ++k) {
      parse_pre_tokenizer(t, r, j["pretokenizers"][k], fmt::format("{}.pretokenizers[{}]", path, k), seen_byte_level);
    }
  } else if (type == "Split") {
    r.check_keys(j, path, {"type", "pattern", "behavior", "invert"});
    SplitStep step;
    const std::string behavior = r.get_string(j, path, "behavior");
    if (behavior == "Removed")
      step.behavior = SplitBehavior::kRemoved;
    else if (behavior == "Isolated")
      step.behavior = SplitBehavior::kIsolated;
    else if (behavior == "MergedWithPrevious")
      step.behavior = SplitBehavior::kMergedWithPrevious;
    else if (behavior == "MergedWithNext")
      step.behavior = SplitBehavior::kMergedWithNext;
    else if (behavior == "Contiguous")
      step.behavior = SplitBehavior::kContiguous;
    else
      r.fail(path + ".behavior", fmt::format("unknown behavior \"{}\"", behavior));
    step.invert = r.get_bool(j, path, "invert", false);
    if (!j.contains("pattern") || !j["pattern"].is_object() || j["pattern"].size() != 1) {
      r.fail(path + ".pattern", fmt::format("expected {{\"Regex\": ...}} or {{\"String\": ...}}, got {}",
                                            j.contains("pattern") ? short_dump(j["pattern"]) : "nothing"));
    }
    const json& pattern = j["pattern"];
    if (pattern.contains("Regex") && pattern["Regex"].is_string()) {
      step.is_regex = true;
      step.regex =
          Regex(pattern["Regex"].get<std::string>(), fmt::format("tokenizer '{}': {}.pattern.Regex", r.name(), path));
    } else if (pattern.contains("String") && pattern["String"].is_string()) {
      step.literal = pattern["String"].get<std::string>();
    } else {
      r.fail(path + ".pattern",
             fmt::format("expected {{\"Regex\": ...}} or {{\"String\": ...}}, got {}", short_dump(pattern)));
    }
    t.splits.push_back(std::move(step));
  } else if (type == "ByteLevel") {
    bool trim_offsets = false;
    parse_byte_level_fields(r, j, path, &t.add_prefix_space, &trim_offsets, &t.byte_level_regex);
    if (t.byte_level_regex) t.gpt2 = Regex(kGpt2Pattern, "ByteLevel GPT-2 pattern");
    *seen_byte_level = true;
  } else {
    r.fail(path + ".type",
           fmt::format("pre-tokenizer \"{}\" is not supported (supported: Sequence, Split, ByteLevel)", type));
  }
}

void parse_post_processor(HfTokenizer::Impl& t, const JsonReader& r, const json& j, const std::string& path) {
  if (j.is_null()) return;
  const std::string type = r.type_of(j, path);
  if (type == "ByteLevel") {
    bool use_regex = false;
    parse_byte_level_fields(r, j, path, &t.trim_add_prefix_space, &t.trim_offsets, &use_regex);
  } else if (type == "TemplateProcessing") {
    // Adds tokens only with add_special_tokens=True, which encode() does not do (hf_tokenizer.h).
    r.check_keys(j, path, {"type", "single", "pair", "special_tokens"});
  } else if (type == "Sequence") {
    r.check_keys(j, path, {"type", "processors"});
    if (!j.contains("processors") || !j["processors"].is_array()) r.fail(path + ".processors", "expected an array");
    for (size_t k = 0; k < j["processors"].size(); ++k) {
      parse_post_processor(t, r, j["processors"][k], fmt::format("{}.processors[{}]", path, k));
    }
  } else {
    r.fail(path + ".type",
           fmt::format("post-processor \"{}\" is not supported (supported: ByteLevel, TemplateProcessing, Sequence)",
                       type));
  }
}

void parse_model(HfTokenizer::Impl& t, const JsonReader& r, const json& j) {
  const std::string path = "model";
  r.expect_object(j, path);
  if (j.contains("type")) {
    const std::string type = r.get_string(j, path, "type");
    if (type != "BPE") r.fail("model.type", fmt::format("model \"{}\" is not supported (only BPE)", type));
  } else if (!j.contains("merges")) {
    r.fail(path, "model has no type and no merges (only BPE is supported)");
  }
  r.check_keys(j, path,
               {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                "byte_fallback", "ignore_merges", "vocab", "merges"});
  if (j.contains("dropout") && !j["dropout"].is_null() &&
      !(j["dropout"].is_number() && j["dropout"].get<double>() == 0.0)) {
    r.fail("model.dropout",
           fmt::format("{} is not supported (only null: BPE dropout is random)", short_dump(j["dropout"])));
  }
  if (r.get_bool(j, path, "byte_fallback", false)) r.fail("model.byte_fallback", "true is not supported (only false)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (j.contains(key) && !j[key].is_null() && !(j[key].is_string() && j[key].get<std::string>().empty())) {
      r.fail(std::string("model.") + key, fmt::format("{} is not supported (only null or \"\")", short_dump(j[key])));
    }
  }
  if (j.contains("unk_token") && !j["unk_token"].is_null() && !j["unk_token"].is_string()) {
    r.fail("model.unk_token", fmt::format("expected null or a string, got {}", short_dump(j["unk_token"])));
  }
  r.get_bool(j, path, "fuse_unk", false);
  t.ignore_merges = r.get_bool(j, path, "ignore_merges", false);

  if (!j.contains("vocab") || !j["vocab"].is_object()) r.fail("model.vocab", "expected an object of token -> id");
  const json& vocab = j["vocab"];
  uint32_t max_id = 0;
  for (const auto& [token, id_json] : vocab.items())
    max_id = std::max(max_id, r.get_id(id_json, "model.vocab." + token));
  t.token_string.assign(vocab.empty() ? 0 : size_t{max_id} + 1, std::string());
  t.kind.assign(t.token_string.size(), 0);
  t.vocab.reserve(vocab.size());
  for (const auto& [token, id_json] : vocab.items()) {
    const uint32_t id = id_json.get<uint32_t>();
    if (t.kind[id] != 0) {
      r.fail("model.vocab",
             fmt::format("tokens {} and {} share id {}", json(t.token_string[id]).dump(), json(token).dump(), id));
    }
    t.kind[id] = 1;
    t.token_string[id] = token;
    t.vocab.emplace(token, id);
  }
  const ByteAlphabet& alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    const auto it = t.vocab.find(alphabet.mapped(static_cast<uint8_t>(b)));
    if (it == t.vocab.end()) {
      r.fail("model.vocab", fmt::format("no token for byte 0x{:02x} (byte-level symbol {}); every byte needs one", b,
                                        json(alphabet.mapped(static_cast<uint8_t>(b))).dump()));
    }
    t.byte_id[b] = it->second;
  }
  t.token_bytes.assign(t.token_string.size(), std::string());
  for (size_t id = 0; id < t.token_string.size(); ++id) {
    if (t.kind[id] == 0) continue;
    const std::string& token = t.token_string[id];
    if (auto raw = alphabet.unmap(token)) {
      t.raw_vocab.emplace(*raw, static_cast<uint32_t>(id));
      t.token_bytes[id] = std::move(*raw);
    } else {
      t.token_bytes[id] = token;  // the ByteLevel decoder's fallback: the token's own bytes
    }
  }

  if (!j.contains("merges") || j["merges"].is_null()) return;
  if (!j["merges"].is_array()) r.fail("model.merges", "expected an array");
  const json& merges = j["merges"];
  t.merges.reserve(merges.size());
  std::string a, b;
  for (size_t k = 0; k < merges.size(); ++k) {
    const json& m = merges[k];
    const std::string mpath = fmt::format("model.merges[{}]", k);
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        r.fail(mpath, fmt::format("{} is not two tokens separated by one space", json(s).dump()));
      }
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      r.fail(mpath, fmt::format("expected \"a b\" or [\"a\", \"b\"], got {}", short_dump(m)));
    }
    const auto ia = t.vocab.find(a), ib = t.vocab.find(b), iab = t.vocab.find(a + b);
    if (ia == t.vocab.end()) r.fail(mpath, fmt::format("token {} is not in model.vocab", json(a).dump()));
    if (ib == t.vocab.end()) r.fail(mpath, fmt::format("token {} is not in model.vocab", json(b).dump()));
    if (iab == t.vocab.end()) r.fail(mpath, fmt::format("merged token {} is not in model.vocab", json(a + b).dump()));
    // A repeated pair keeps its last rank, as the library's map does.
    t.merges.insert_or_assign(pair_key(ia->second, ib->second), MergeInfo{static_cast<uint32_t>(k), iab->second});
  }
}

void parse_added_tokens(HfTokenizer::Impl& t, const JsonReader& r, const json& j) {
  if (j.is_null()) return;
  if (!j.is_array()) r.fail("added_tokens", "expected an array");
  for (size_t k = 0; k < j.size(); ++k) {
    const json& a = j[k];
    const std::string path = fmt::format("added_tokens[{}]", k);
    r.expect_object(a, path);
    r.check_keys(a, path, {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"});
    AddedToken tok;
    if (!a.contains("id")) r.fail(path + ".id", "missing");
    tok.id = r.get_id(a["id"], path + ".id");
    tok.raw_content = r.get_string(a, path, "content");
    if (tok.raw_content.empty()) r.fail(path + ".content", "empty");
    if (first_invalid_utf8(tok.raw_content) != std::string::npos) r.fail(path + ".content", "not valid UTF-8");
    tok.special = r.get_bool(a, path, "special", false);
    tok.single_word = r.get_bool(a, path, "single_word", false);
    tok.lstrip = r.get_bool(a, path, "lstrip", false);
    tok.rstrip = r.get_bool(a, path, "rstrip", false);
    tok.normalized = r.get_bool(a, path, "normalized", !tok.special);
    tok.content = tok.normalized && t.nfc ? nfc_of(tok.raw_content) : tok.raw_content;
    if (t.added_by_id.contains(tok.id))
      r.fail(path + ".id", fmt::format("id {} is used by an earlier added token", tok.id));
    if (t.added_by_content.contains(tok.raw_content)) {
      r.fail(path + ".content", fmt::format("{} is an earlier added token's content", json(tok.raw_content).dump()));
    }
    const auto index = static_cast<uint32_t>(t.added.size());
    t.added_by_id.emplace(tok.id, index);
    t.added_by_content.emplace(tok.raw_content, index);
    if (tok.id >= t.kind.size()) {
      t.kind.resize(size_t{tok.id} + 1, 0);
      t.token_string.resize(size_t{tok.id} + 1);
      t.token_bytes.resize(size_t{tok.id} + 1);
    }
    t.kind[tok.id] = 2;
    t.token_string[tok.id] = tok.raw_content;
    t.token_bytes[tok.id] = tok.raw_content;
    t.added.push_back(std::move(tok));
  }
}

}  // namespace

HfTokenizer HfTokenizer::from_json(std::string_view json_text, std::string name, InvalidUtf8 invalid_utf8) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    MOETP_FAIL("tokenizer '{}': not valid JSON: {}", name, e.what());
  }
  auto t = std::make_shared<Impl>();
  t->name = name;
  t->invalid_utf8 = invalid_utf8;
  t->instance = g_next_instance.fetch_add(1);
  const JsonReader r(name);
  r.expect_object(j, "(top level)");
  r.check_keys(j, "(top level)",
               {"version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "post_processor",
                "decoder", "model"});
  for (const char* key : {"truncation", "padding"}) {
    if (j.contains(key) && !j[key].is_null()) {
      r.fail(key, fmt::format("{} is not supported (only null: encode returns every token)", short_dump(j[key])));
    }
  }
  parse_normalizer(*t, r, j.value("normalizer", json()), "normalizer");
  if (!j.contains("pre_tokenizer") || j["pre_tokenizer"].is_null()) {
    r.fail("pre_tokenizer", "null is not supported (a ByteLevel pre-tokenizer is required)");
  }
  bool seen_byte_level = false;
  parse_pre_tokenizer(*t, r, j["pre_tokenizer"], "pre_tokenizer", &seen_byte_level);
  if (!seen_byte_level) r.fail("pre_tokenizer", "no ByteLevel step (only byte-level BPE tokenizers are supported)");
  if (!j.contains("model")) r.fail("model", "missing");
  parse_model(*t, r, j["model"]);
  if (!j.contains("decoder") || j["decoder"].is_null()) r.fail("decoder", "null is not supported (only ByteLevel)");
  {
    const std::string type = r.type_of(j["decoder"], "decoder");
    if (type != "ByteLevel")
      r.fail("decoder.type", fmt::format("decoder \"{}\" is not supported (only ByteLevel)", type));
    bool a = false, b = false, c = false;
    parse_byte_level_fields(r, j["decoder"], "decoder", &a, &b, &c);
  }
  parse_post_processor(*t, r, j.value("post_processor", json()), "post_processor");
  parse_added_tokens(*t, r, j.value("added_tokens", json()));
  t->raw_matcher.build(t->added, false);
  t->normalized_matcher.build(t->added, true);
  t->size = static_cast<uint32_t>(t->kind.size());
  return HfTokenizer(std::move(t));
}

HfTokenizer HfTokenizer::load(const std::string& path, InvalidUtf8 invalid_utf8) {
  std::ifstream in(path, std::ios::binary);
  MOETP_CHECK(in.is_open(), "cannot open tokenizer file '{}': {}", path, std::strerror(errno));
  std::ostringstream contents;
  contents << in.rdbuf();
  MOETP_CHECK(!in.bad(), "reading tokenizer file '{}' failed", path);
  return from_json(contents.str(), path, invalid_utf8);
}

// ---------------------------------------------------------------------------------------------
// Public API

std::vector<uint32_t> HfTokenizer::encode(std::string_view text, bool split_special_tokens) const {
  std::vector<uint32_t> ids;
  Impl::Sink sink;
  sink.ids = &ids;
  impl_->run(text, split_special_tokens, sink);
  return ids;
}

EncodingWithOffsets HfTokenizer::encode_with_offsets(std::string_view text, bool split_special_tokens) const {
  EncodingWithOffsets result;
  Impl::Sink sink;
  sink.want_offsets = true;
  sink.ids = &result.ids;
  sink.offsets = &result.offsets;
  impl_->run(text, split_special_tokens, sink);
  if (impl_->trim_offsets) impl_->trim(result.ids, result.offsets);
  return result;
}

std::vector<PreToken> HfTokenizer::pre_tokenize(std::string_view text, bool split_special_tokens) const {
  std::vector<PreToken> result;
  Impl::Sink sink;
  sink.pre_tokens_only = true;
  sink.pre_tokens = &result;
  impl_->run(text, split_special_tokens, sink);
  return result;
}

std::vector<std::vector<uint32_t>> HfTokenizer::encode_batch(const std::vector<std::string>& texts, int threads,
                                                             bool split_special_tokens) const {
  MOETP_CHECK(threads >= 0, "encode_batch: threads must be >= 0 (0 = one per hardware thread), got {}", threads);
  size_t workers = threads == 0 ? std::max(1u, std::thread::hardware_concurrency()) : static_cast<size_t>(threads);
  workers = std::min(workers, std::max<size_t>(texts.size(), 1));
  std::vector<std::vector<uint32_t>> out(texts.size());
  std::vector<std::exception_ptr> errors(texts.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next.fetch_add(1); i < texts.size(); i = next.fetch_add(1)) {
      try {
        out[i] = encode(texts[i], split_special_tokens);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  if (workers <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(workers);
    for (size_t w = 0; w < workers; ++w) pool.emplace_back(work);
    for (auto& th : pool) th.join();
  }
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return out;
}

std::string HfTokenizer::decode(std::span<const uint32_t> ids, bool skip_special_tokens) const {
  const Impl& t = *impl_;
  std::string out, chunk;
  for (size_t i = 0; i < ids.size(); ++i) {
    const uint32_t id = ids[i];
    MOETP_CHECK(id < t.size && t.kind[id] != 0,
                "tokenizer '{}': decode: id {} at position {} is not a token (vocab_size {})", t.name, id, i, t.size);
    if (t.kind[id] == 2) {
      if (skip_special_tokens && t.added[t.added_by_id.at(id)].special) continue;
      append_lossy(out, chunk);
      chunk.clear();
      out += t.token_bytes[id];
    } else {
      chunk += t.token_bytes[id];
    }
  }
  append_lossy(out, chunk);
  return out;
}

uint32_t HfTokenizer::vocab_size() const { return impl_->size; }

std::optional<uint32_t> HfTokenizer::token_to_id(std::string_view token) const {
  if (const auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) {
    return impl_->added[it->second].id;
  }
  if (const auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::string HfTokenizer::id_to_token(uint32_t id) const {
  MOETP_CHECK(id < impl_->size && impl_->kind[id] != 0, "tokenizer '{}': id {} is not a token (vocab_size {})",
              impl_->name, id, impl_->size);
  return impl_->token_string[id];
}

bool HfTokenizer::is_special(uint32_t id) const {
  const auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

std::string normalize_nfc(std::string_view text) {
  const size_t bad = first_invalid_utf8(text);
  MOETP_CHECK(bad == std::string_view::npos, "normalize_nfc: input is not valid UTF-8 at byte offset {}", bad);
  return all_ascii(text) ? std::string(text) : nfc_of(text);
}

}  // namespace moetp::data
