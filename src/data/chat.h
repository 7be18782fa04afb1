// Chat conversations for supervised fine-tuning: Qwen3's chat template rendered natively, and the
// per-token loss mask of the rendered text (loss on the assistant turns only).
//
// ChatTemplate::render gives the string of transformers'
// `tokenizer.apply_chat_template(messages, tokenize=False)` for Qwen3's template, for
// conversations without tools:
//   - every system message: "<|im_start|>system\n" + content + "<|im_end|>\n" (the template's
//     header for a leading system message and its loop case for a later one give the same text);
//   - every user message:   "<|im_start|>user\n" + content + "<|im_end|>\n";
//   - an assistant message: its reasoning is reasoning_content when that is set (null counts as
//     unset), else, when the content holds "</think>", the text before the first "</think>" and
//     after the last "<think>" before it (newlines stripped at both ends), and the content becomes
//     the text after the last "</think>" with leading newlines stripped. After the last "query"
//     (the last user message whose content is not wrapped in <tool_response>...</tool_response>),
//     the final message, and any assistant message with non-empty reasoning, is rendered as
//       "<|im_start|>assistant\n<think>\n" + strip_nl(reasoning) + "\n</think>\n\n" + lstrip_nl(content)
//     and every other assistant message (so all of those up to the last query: their reasoning
//     is dropped) as "<|im_start|>assistant\n" + content; each ends "<|im_end|>\n".
//   Contents are not otherwise trimmed: only newlines ("\n") are stripped, and only where named.
// Not supported (refused): tools, role "tool", tool_calls, non-string content (multimodal lists).
//
// Only Qwen3's template is accepted: the `chat_template` string of tokenizer_config.json must have
// FNV-1a 64 hash kQwen3ChatTemplateFnv1a (the template of the Qwen3 release, 4116 bytes, as in
// third_party/tokenizers/qwen3/tokenizer_config.json). Any other template, including later Qwen3
// revisions, is refused with its hash, since its semantics may differ from what is implemented here.
//
// Loss spans: for each assistant message, the bytes from just after "<|im_start|>assistant\n"
// through the end of its "<|im_end|>" (the newline after <|im_end|> is excluded): the think block,
// the content and the end-of-turn token carry loss, the role header and the other roles do not.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data/hf_tokenizer.h"

namespace moetp::data {

struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
  std::optional<std::string> reasoning_content;  // assistant only; unset = JSON null or absent
};

// Messages of {"messages": [...]} or of a bare array. Each message is an object with "role"
// (system | user | assistant), "content" (a string) and optionally "reasoning_content" (a string
// or null, assistant only). Other keys are ignored, as the template ignores them, except
// "tool_calls" (non-null), which is refused. moetp::Error naming `where`, the message index and
// the offending value. An empty list is refused.
std::vector<ChatMessage> parse_messages(const nlohmann::json& j, std::string_view where);

// A rendered conversation and the [begin, end) byte ranges of `text` that carry loss, in order.
struct RenderedChat {
  std::string text;
  std::vector<std::pair<size_t, size_t>> assistant_spans;
};

// What render_samples makes of one conversation.
enum class ChatSamples {
  kWhole,             // one sample: the whole conversation, loss on every assistant turn
  kPerAssistantTurn,  // one sample per assistant message: the conversation up to and including it,
                      // rendered as if it were the last (so it keeps its reasoning); loss on that
                      // message only
};

inline constexpr uint64_t kQwen3ChatTemplateFnv1a = 0x2bfdb7aa9754484eull;

struct ChatTemplate {
  // Reads the "chat_template" string of a tokenizer_config.json (or the entry named "default" of a
  // list of {name, template}); moetp::Error when the file is unreadable, has no template, or its
  // template is not Qwen3's (see above; the error gives the hash found and the one expected).
  explicit ChatTemplate(const std::string& tokenizer_config_path);

  // apply_chat_template(messages, tokenize=False), no generation prompt: the training form.
  std::string render(const std::vector<ChatMessage>& messages) const;
  // The same with add_generation_prompt=True: "<|im_start|>assistant\n" appended, and with
  // enable_thinking=false also the empty think block "<think>\n\n</think>\n\n". For inference
  // and the reference checks.
  std::string render_with_generation_prompt(const std::vector<ChatMessage>& messages, bool enable_thinking) const;
  // render() with the loss span of every assistant message.
  RenderedChat render_chat(const std::vector<ChatMessage>& messages) const;
  // Training samples of one conversation (ChatSamples). kPerAssistantTurn gives one sample per
  // assistant message, each with one span, and none for a conversation without assistant turns.
  std::vector<RenderedChat> render_samples(const std::vector<ChatMessage>& messages, ChatSamples samples) const;

  std::string path;  // the tokenizer_config.json, for messages
};

// Token ids of a rendered conversation and their loss mask (1: the token is trained on).
struct TokenizedChat {
  std::vector<uint32_t> ids;
  std::vector<uint8_t> loss_mask;  // loss_mask[i] belongs to ids[i]
};

// Tokenizes chat.text in one call to encode_with_offsets (special tokens matched, never the pieces
// separately, so the ids are those of tokenizing the rendered string) and marks a token 1 iff its
// byte range [b, e) lies inside a loss span (s.begin <= b and e <= s.end; an empty range at b
// counts as inside when s.begin <= b < s.end). A token that overlaps a span without lying inside
// it is a moetp::Error naming the token, its range and the span: with Qwen3 the span starts after
// a newline that ends the role header and ends on <|im_end|>, so this happens only when merging
// crosses the start, e.g. an assistant content that begins with a newline and is rendered without
// a think block ("assistant\n" + "\n..." is one pre-token).
TokenizedChat tokenize_chat(const HfTokenizer& tokenizer, const RenderedChat& chat);

}  // namespace moetp::data
