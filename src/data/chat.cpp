// Qwen3 chat template and loss masks (chat.h).
#include "data/chat.h"

#include <fstream>
#include <iterator>

#include "core/check.h"

namespace moetp::data {
namespace {

using json = nlohmann::json;

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";
constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

// Python's str.lstrip('\n'), rstrip('\n'), strip('\n').
std::string_view lstrip_nl(std::string_view s) {
  const size_t b = s.find_first_not_of('\n');
  return b == std::string_view::npos ? std::string_view{} : s.substr(b);
}
std::string_view rstrip_nl(std::string_view s) {
  const size_t e = s.find_last_not_of('\n');
  return e == std::string_view::npos ? std::string_view{} : s.substr(0, e + 1);
}
std::string_view strip_nl(std::string_view s) { return rstrip_nl(lstrip_nl(s)); }

std::string preview(std::string_view s) {
  constexpr size_t kMax = 60;
  return json(std::string(s.substr(0, kMax)) + (s.size() > kMax ? "..." : "")).dump();
}

void check_role(const ChatMessage& m, size_t index, std::string_view where) {
  MOETP_CHECK(m.role != "tool",
              "{}: message {} has role \"tool\": tool calls and tool responses are not supported "
              "(roles: system, user, assistant)",
              where, index);
  MOETP_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant",
              "{}: message {} has role {}; supported roles: system, user, assistant", where, index,
              json(m.role).dump());
  MOETP_CHECK(!m.reasoning_content || m.role == "assistant",
              "{}: message {} (role {}) has reasoning_content; only assistant messages may", where, index, m.role);
}

// The template's ns.last_query_index: the last user message that is not a tool response wrapped in
// <tool_response>...</tool_response>; the last message when there is none.
size_t last_query_index(const std::vector<ChatMessage>& messages) {
  for (size_t i = messages.size(); i-- > 0;) {
    const ChatMessage& m = messages[i];
    if (m.role != "user") continue;
    const std::string_view c = m.content;
    if (!(c.starts_with("<tool_response>") && c.ends_with("</tool_response>"))) return i;
  }
  return messages.size() - 1;
}

}  // namespace

std::vector<ChatMessage> parse_messages(const json& j, std::string_view where) {
  const json* list = &j;
  if (j.is_object()) {
    MOETP_CHECK(j.contains("messages"), "{}: expected an array of messages or an object with \"messages\"", where);
    list = &j["messages"];
  }
  MOETP_CHECK(list->is_array(), "{}: messages must be an array, got {}", where, list->type_name());
  MOETP_CHECK(!list->empty(), "{}: the conversation has no messages", where);
  std::vector<ChatMessage> out;
  out.reserve(list->size());
  for (size_t i = 0; i < list->size(); ++i) {
    const json& m = (*list)[i];
    MOETP_CHECK(m.is_object(), "{}: message {} must be an object, got {}", where, i, m.type_name());
    MOETP_CHECK(m.contains("role") && m["role"].is_string(), "{}: message {} needs a string \"role\"", where, i);
    MOETP_CHECK(m.contains("content") && m["content"].is_string(),
                "{}: message {} needs a string \"content\" (got {}; lists of parts are not supported)", where, i,
                m.contains("content") ? m["content"].type_name() : "nothing");
    ChatMessage msg{m["role"].get<std::string>(), m["content"].get<std::string>(), std::nullopt};
    if (m.contains("reasoning_content") && !m["reasoning_content"].is_null()) {
      MOETP_CHECK(m["reasoning_content"].is_string(),
                  "{}: message {}: reasoning_content must be a string or null, got {}", where, i,
                  m["reasoning_content"].type_name());
      msg.reasoning_content = m["reasoning_content"].get<std::string>();
    }
    MOETP_CHECK(!m.contains("tool_calls") || m["tool_calls"].is_null() || m["tool_calls"].empty(),
                "{}: message {} has tool_calls: tool calls are not supported", where, i);
    check_role(msg, i, where);
    out.push_back(std::move(msg));
  }
  return out;
}

ChatTemplate::ChatTemplate(const std::string& tokenizer_config_path) : path(tokenizer_config_path) {
  std::ifstream in(path, std::ios::binary);
  MOETP_CHECK(in.is_open(), "cannot open tokenizer config '{}'", path);
  const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  json config;
  try {
    config = json::parse(text);
  } catch (const json::exception& e) {
    MOETP_FAIL("tokenizer config '{}': not valid JSON: {}", path, e.what());
  }
  MOETP_CHECK(config.is_object() && config.contains("chat_template"), "tokenizer config '{}' has no chat_template",
              path);
  const json& t = config["chat_template"];
  std::string tmpl;
  if (t.is_string()) {
    tmpl = t.get<std::string>();
  } else if (t.is_array()) {  // [{"name": ..., "template": ...}]: transformers uses "default"
    for (const json& e : t) {
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string()) {
        tmpl = e["template"].get<std::string>();
      }
    }
    MOETP_CHECK(!tmpl.empty(), "tokenizer config '{}': chat_template is a list without a \"default\" template", path);
  } else {
    MOETP_FAIL("tokenizer config '{}': chat_template must be a string, got {}", path, t.type_name());
  }
  const uint64_t h = fnv1a(tmpl);
  MOETP_CHECK(h == kQwen3ChatTemplateFnv1a,
              "tokenizer config '{}': chat_template ({} bytes, FNV-1a 64 {:#018x}) is not Qwen3's template "
              "(FNV-1a 64 {:#018x}); only that template is implemented (data/chat.h)",
              path, tmpl.size(), h, kQwen3ChatTemplateFnv1a);
}

RenderedChat ChatTemplate::render_chat(const std::vector<ChatMessage>& messages) const {
  const std::string where = "chat (template '" + path + "')";
  MOETP_CHECK(!messages.empty(), "{}: the conversation has no messages", where);
  for (size_t i = 0; i < messages.size(); ++i) check_role(messages[i], i, where);
  const size_t last_query = last_query_index(messages);
  RenderedChat out;
  std::string& s = out.text;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role != "assistant") {
      s.append(kImStart).append(m.role).append("\n").append(m.content).append(kImEnd).append("\n");
      continue;
    }
    std::string_view content = m.content;
    std::string_view reasoning;
    if (m.reasoning_content) {
      reasoning = *m.reasoning_content;
    } else if (const size_t first_close = content.find(kThinkClose); first_close != std::string_view::npos) {
      // content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n')
      const std::string_view before = rstrip_nl(content.substr(0, first_close));
      const size_t open = before.rfind(kThinkOpen);
      reasoning = lstrip_nl(open == std::string_view::npos ? before : before.substr(open + kThinkOpen.size()));
      // content.split('</think>')[-1].lstrip('\n')
      content = lstrip_nl(content.substr(content.rfind(kThinkClose) + kThinkClose.size()));
    }
    s.append(kImStart).append("assistant\n");
    const size_t span_begin = s.size();
    if (i > last_query && (i + 1 == messages.size() || !reasoning.empty())) {
      s.append("<think>\n").append(strip_nl(reasoning)).append("\n</think>\n\n").append(lstrip_nl(content));
    } else {
      s.append(content);
    }
    s.append(kImEnd);
    out.assistant_spans.emplace_back(span_begin, s.size());
    s.append("\n");
  }
  return out;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages) const { return render_chat(messages).text; }

std::string ChatTemplate::render_with_generation_prompt(const std::vector<ChatMessage>& messages,
                                                        bool enable_thinking) const {
  std::string s = render(messages);
  s.append(kImStart).append("assistant\n");
  if (!enable_thinking) s.append("<think>\n\n</think>\n\n");
  return s;
}

std::vector<RenderedChat> ChatTemplate::render_samples(const std::vector<ChatMessage>& messages,
                                                       ChatSamples samples) const {
  if (samples == ChatSamples::kWhole) return {render_chat(messages)};
  std::vector<RenderedChat> out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].role != "assistant") continue;
    const std::vector<ChatMessage> prefix(messages.begin(), messages.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    RenderedChat r = render_chat(prefix);
    r.assistant_spans = {r.assistant_spans.back()};
    out.push_back(std::move(r));
  }
  return out;
}

TokenizedChat tokenize_chat(const HfTokenizer& tokenizer, const RenderedChat& chat) {
  for (size_t k = 0; k < chat.assistant_spans.size(); ++k) {
    const auto [b, e] = chat.assistant_spans[k];
    const size_t prev_end = k == 0 ? 0 : chat.assistant_spans[k - 1].second;
    MOETP_CHECK(prev_end <= b && b <= e && e <= chat.text.size(),
                "chat: loss span {} [{}, {}) is not ordered after the previous one (ending at {}) or exceeds the "
                "text ({} bytes)",
                k, b, e, prev_end, chat.text.size());
  }
  EncodingWithOffsets enc = tokenizer.encode_with_offsets(chat.text);
  TokenizedChat out;
  out.loss_mask.assign(enc.ids.size(), 0);
  // Tokens and spans are both in text order: one pass.
  size_t k = 0;
  for (size_t t = 0; t < enc.ids.size(); ++t) {
    const TokenSpan& o = enc.offsets[t];
    while (k < chat.assistant_spans.size() && chat.assistant_spans[k].second <= o.begin) ++k;
    if (k == chat.assistant_spans.size()) continue;
    const auto [sb, se] = chat.assistant_spans[k];
    if (o.begin == o.end) {
      out.loss_mask[t] = (sb <= o.begin && o.begin < se) ? 1 : 0;
      continue;
    }
    const bool inside = sb <= o.begin && o.end <= se;
    const bool overlaps = o.begin < se && sb < o.end;
    MOETP_CHECK(inside || !overlaps,
                "chat: token {} (id {}, bytes [{}, {}) = {}) straddles loss span {} [{}, {}) "
                "(e.g. an assistant content that starts with a newline and is rendered without a think block: "
                "that newline merges with the one ending \"<|im_start|>assistant\\n\")",
                t, enc.ids[t], o.begin, o.end, preview(std::string_view(chat.text).substr(o.begin, o.end - o.begin)),
                k, sb, se);
    out.loss_mask[t] = inside ? 1 : 0;
  }
  out.ids = std::move(enc.ids);
  return out;
}

}  // namespace moetp::data
