// Qwen3 chat template and loss masks (data/chat.h). Suite Chat needs no files. ChatQwen3 needs
// Qwen3's tokenizer.json and the tokenizer_config.json beside it (MOETP_QWEN3_TOKENIZER, set by
// CTest to the copy scripts/fetch-tokenizer.sh downloads); its expected strings are what
// transformers' apply_chat_template(messages, tokenize=False) gives. ChatQwen3Reference also needs
// tests/data/fixtures/qwen3_chat_reference.json, made by tools/make_chat_fixture.py.
#include "data/chat.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "data_testing.h"

namespace moetp::data {
namespace {

using json = nlohmann::json;
using testing::contains_all;
using testing::error_of;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;
using Ids = std::vector<uint32_t>;
using Messages = std::vector<ChatMessage>;

ChatMessage sys(std::string c) { return {"system", std::move(c), std::nullopt}; }
ChatMessage user(std::string c) { return {"user", std::move(c), std::nullopt}; }
ChatMessage asst(std::string c, std::optional<std::string> reasoning = std::nullopt) {
  return {"assistant", std::move(c), std::move(reasoning)};
}

// ---- Parsing and template recognition (no files needed) ---------------------------------------

TEST(Chat, ParsesBareArrayAndMessagesObject) {
  const json arr = json::parse(R"([{"role": "system", "content": "S"},
                                   {"role": "user", "content": "U", "name": "ignored"},
                                   {"role": "assistant", "content": "A", "reasoning_content": "R"},
                                   {"role": "assistant", "content": "B", "reasoning_content": null}])");
  const Messages m = parse_messages(arr, "t");
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[0].role, "system");
  EXPECT_EQ(m[1].content, "U");
  EXPECT_EQ(m[2].reasoning_content, "R");
  EXPECT_FALSE(m[3].reasoning_content.has_value());
  const Messages again = parse_messages(json{{"messages", arr}}, "t");
  ASSERT_EQ(again.size(), 4u);
  EXPECT_EQ(again[3].content, "B");
}

TEST(Chat, RefusesBadMessages) {
  const auto err = [](const char* text) { return error_of([&] { parse_messages(json::parse(text), "conv.json:3"); }); };
  EXPECT_TRUE(contains_all(err(R"([{"role": "user", "content": "a"}, {"role": "moderator", "content": "b"}])"),
                           {"conv.json:3", "message 1", "\"moderator\"", "system, user, assistant"}));
  EXPECT_TRUE(contains_all(err(R"([{"role": "tool", "content": "42"}])"), {"conv.json:3", "message 0", "\"tool\""}));
  EXPECT_TRUE(contains_all(err(R"([{"role": "user"}])"), {"conv.json:3", "message 0", "\"content\""}));
  EXPECT_TRUE(contains_all(err(R"([{"role": "user", "content": [{"type": "text", "text": "a"}]}])"),
                           {"message 0", "\"content\"", "array"}));
  EXPECT_TRUE(contains_all(err(R"([{"role": "assistant", "content": "a", "reasoning_content": 3}])"),
                           {"message 0", "reasoning_content", "number"}));
  EXPECT_TRUE(contains_all(err(R"([{"role": "user", "content": "a", "reasoning_content": "r"}])"),
                           {"message 0", "reasoning_content", "only assistant"}));
  EXPECT_TRUE(contains_all(
      err(R"([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}])"),
      {"message 0", "tool_calls"}));
  EXPECT_TRUE(contains_all(err("[]"), {"conv.json:3", "no messages"}));
  EXPECT_TRUE(contains_all(err(R"({"conversation": []})"), {"conv.json:3", "\"messages\""}));
  EXPECT_TRUE(contains_all(err(R"({"messages": "hi"})"), {"conv.json:3", "array", "string"}));
}

TEST(Chat, RefusesOtherTemplates) {
  ScratchDir dir;
  const std::string path = dir.path("tokenizer_config.json");
  // A ChatML template that renders these conversations much like Qwen3's, but is not it.
  write_bytes(path, json{{"chat_template",
                          "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"}}
                        .dump());
  EXPECT_TRUE(contains_all(error_of([&] { ChatTemplate t(path); }),
                           {path, "not Qwen3's template", "0x2bfdb7aa9754484e", "FNV-1a"}));
  write_bytes(path, R"({"eos_token": "<|im_end|>"})");
  EXPECT_TRUE(contains_all(error_of([&] { ChatTemplate t(path); }), {path, "no chat_template"}));
  write_bytes(path, R"({"chat_template": [{"name": "tool_use", "template": "x"}]})");
  EXPECT_TRUE(contains_all(error_of([&] { ChatTemplate t(path); }), {path, "\"default\""}));
  write_bytes(path, "{");
  EXPECT_TRUE(contains_all(error_of([&] { ChatTemplate t(path); }), {path, "not valid JSON"}));
  EXPECT_TRUE(contains_all(error_of([&] { ChatTemplate t(dir.path("missing.json")); }), {"missing.json", "cannot open"}));
}

// ---- Qwen3 ------------------------------------------------------------------------------------

struct Qwen3Files {
  HfTokenizer tokenizer;
  ChatTemplate chat;
  std::string config_path;
};

const Qwen3Files* qwen3() {
  static const std::optional<Qwen3Files> files = []() -> std::optional<Qwen3Files> {
    const char* path = std::getenv("MOETP_QWEN3_TOKENIZER");
    if (path == nullptr || !std::filesystem::exists(path)) return std::nullopt;
    const std::string config = (std::filesystem::path(path).parent_path() / "tokenizer_config.json").string();
    if (!std::filesystem::exists(config)) return std::nullopt;
    return Qwen3Files{HfTokenizer::load(path), ChatTemplate(config), config};
  }();
  return files ? &*files : nullptr;
}

#define REQUIRE_QWEN3()                                                                                        \
  if (qwen3() == nullptr) {                                                                                    \
    GTEST_SKIP() << "MOETP_QWEN3_TOKENIZER is unset or names no file, or no tokenizer_config.json is beside " \
                    "it: run scripts/fetch-tokenizer.sh (CTest then sets it) or export "                       \
                    "MOETP_QWEN3_TOKENIZER=/path/to/tokenizer.json";                                          \
  }

std::string render(const Messages& m) { return qwen3()->chat.render(m); }

// The masked tokens, decoded run by run (a run: consecutive tokens with mask 1).
std::vector<std::string> masked_runs(const TokenizedChat& t) {
  std::vector<std::string> runs;
  Ids run;
  for (size_t i = 0; i <= t.ids.size(); ++i) {
    if (i < t.ids.size() && t.loss_mask[i] != 0) {
      run.push_back(t.ids[i]);
    } else if (!run.empty()) {
      runs.push_back(qwen3()->tokenizer.decode(run));
      run.clear();
    }
  }
  return runs;
}

std::vector<std::string> span_texts(const RenderedChat& r) {
  std::vector<std::string> out;
  for (const auto& [b, e] : r.assistant_spans) out.push_back(r.text.substr(b, e - b));
  return out;
}

TEST(ChatQwen3, SystemUserAssistant) {
  REQUIRE_QWEN3();
  EXPECT_EQ(render({sys("You are a helpful assistant."), user("What is 2+2?"), asst("2+2 = 4.")}),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n2+2 = 4.<|im_end|>\n");
}

TEST(ChatQwen3, NoSystem) {
  REQUIRE_QWEN3();
  EXPECT_EQ(render({user("Hello!"), asst("Hi! How can I help you today?")}),
            "<|im_start|>user\nHello!<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\nHi! How can I help you today?<|im_end|>\n");
  // Ends on a user turn: no assistant header (no generation prompt).
  EXPECT_EQ(render({user("a"), asst("b"), user("c")}),
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n");
}

TEST(ChatQwen3, ReasoningKeptOnlyAfterTheLastUserMessage) {
  REQUIRE_QWEN3();
  EXPECT_EQ(render({sys("Be brief."), user("Name a prime."), asst("7", "Small primes: 2, 3, 5, 7."),
                    user("And an even one?"), asst("2", "The only even prime is 2.")}),
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nName a prime.<|im_end|>\n"
            "<|im_start|>assistant\n7<|im_end|>\n"
            "<|im_start|>user\nAnd an even one?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nThe only even prime is 2.\n</think>\n\n2<|im_end|>\n");
  // After the last user message, an assistant turn that is not the last keeps a non-empty
  // reasoning and gets no think block for an empty one.
  EXPECT_EQ(render({user("Count."), asst("One.", ""), asst("Two.", "r")}),
            "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\nOne.<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nr\n</think>\n\nTwo.<|im_end|>\n");
  EXPECT_EQ(render({user("Count."), asst("One.", "r1"), asst("Two.")}),
            "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\nOne.<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\nTwo.<|im_end|>\n");
  // A user message that is a wrapped tool response is not a query: both turns keep reasoning.
  EXPECT_EQ(render({user("q"), asst("a1", "r1"), user("<tool_response>\n42\n</tool_response>"), asst("a2", "r2")}),
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\na1<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n");
  // A system message after the first is rendered in place.
  EXPECT_EQ(render({user("Hi"), asst("Hello."), sys("French."), user("Bonjour ?"), asst("Bonjour !")}),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
            "<|im_start|>system\nFrench.<|im_end|>\n<|im_start|>user\nBonjour ?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\nBonjour !<|im_end|>\n");
}

TEST(ChatQwen3, InlineThinkIsSplitOut) {
  REQUIRE_QWEN3();
  EXPECT_EQ(render({user("Capital of France?"), asst("<think>\nThe user asks about France.\n</think>\n\nParis.")}),
            "<|im_start|>user\nCapital of France?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nThe user asks about France.\n</think>\n\nParis.<|im_end|>\n");
  // No opening tag: everything before </think> is the reasoning.
  EXPECT_EQ(render({user("Why?"), asst("First step.\n\n</think>\n\nDone.")}),
            "<|im_start|>user\nWhy?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nFirst step.\n</think>\n\nDone.<|im_end|>\n");
  // Earlier turns lose the block; several tags: reasoning = after the last <think> before the
  // first </think>, content = after the last </think>.
  EXPECT_EQ(render({user("a"), asst("<think>old</think>x"), user("b"), asst("<think>a</think><think>b</think>\n\nc</think>d")}),
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nx<|im_end|>\n<|im_start|>user\nb<|im_end|>\n"
            "<|im_start|>assistant\n<think>\na\n</think>\n\nd<|im_end|>\n");
  // reasoning_content set (even empty): the content is kept as it is.
  EXPECT_EQ(render({user("T"), asst("<think>\nin content\n</think>\n\nVisible.", "Given.")}),
            "<|im_start|>user\nT<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nGiven.\n</think>\n\n<think>\nin content\n</think>\n\nVisible.<|im_end|>\n");
  EXPECT_EQ(render({user("T"), asst("<think>x</think>y", "")}),
            "<|im_start|>user\nT<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<think>x</think>y<|im_end|>\n");
}

TEST(ChatQwen3, StripsOnlyNewlinesWhereTheTemplateDoes) {
  REQUIRE_QWEN3();
  EXPECT_EQ(render({sys("  spaced system  \n"), user("\n  padded question \n\n"),
                    asst("\n\n  answer with spaces  \n", "\n\n  reasoning keeps inner spaces  \n\n\n")}),
            "<|im_start|>system\n  spaced system  \n<|im_end|>\n"
            "<|im_start|>user\n\n  padded question \n\n<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n  reasoning keeps inner spaces  \n</think>\n\n  answer with spaces  \n<|im_end|>\n");
  // Before the last query the content is not stripped at all.
  EXPECT_EQ(render({user("a"), asst(" b \n"), user("c")}),
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n b \n<|im_end|>\n<|im_start|>user\nc<|im_end|>\n");
}

TEST(ChatQwen3, GenerationPrompt) {
  REQUIRE_QWEN3();
  const Messages m = {user("Hello"), asst("Hi."), user("Bye")};
  EXPECT_EQ(qwen3()->chat.render_with_generation_prompt(m, /*enable_thinking=*/false),
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>\n"
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  EXPECT_EQ(qwen3()->chat.render_with_generation_prompt({user("Hello")}, true),
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatQwen3, RenderRefusesUnknownRoles) {
  REQUIRE_QWEN3();
  EXPECT_TRUE(contains_all(error_of([] { render({user("a"), {"bot", "b", std::nullopt}}); }),
                           {"message 1", "\"bot\"", qwen3()->config_path}));
  EXPECT_TRUE(contains_all(error_of([] { render({user("a"), {"tool", "42", std::nullopt}}); }), {"message 1", "\"tool\""}));
  EXPECT_TRUE(contains_all(error_of([] { render({}); }), {"no messages"}));
}

TEST(ChatQwen3, AssistantSpans) {
  REQUIRE_QWEN3();
  const RenderedChat r = qwen3()->chat.render_chat(
      {sys("S"), user("Name a prime."), asst("7", "small"), user("Even?"), asst("2", "only 2")});
  EXPECT_EQ(span_texts(r), (std::vector<std::string>{"7<|im_end|>", "<think>\nonly 2\n</think>\n\n2<|im_end|>"}));
  for (const auto& [b, e] : r.assistant_spans) {
    EXPECT_TRUE(r.text.substr(0, b).ends_with("<|im_start|>assistant\n"));
    EXPECT_EQ(r.text[e], '\n');  // the newline after <|im_end|> carries no loss
  }
  EXPECT_TRUE(qwen3()->chat.render_chat({sys("S"), user("U")}).assistant_spans.empty());
}

TEST(ChatQwen3, LossMaskCoversExactlyTheAssistantTurns) {
  REQUIRE_QWEN3();
  const HfTokenizer& tok = qwen3()->tokenizer;
  const RenderedChat r = qwen3()->chat.render_chat({sys("You are a helpful assistant."), user("Name a prime."),
                                                    asst("7", "Small primes."), user("And an even one? 🚀"),
                                                    asst("Ça va : 2.\n\n```\nx = 2\n```", "The only even prime.")});
  const TokenizedChat t = tokenize_chat(tok, r);
  ASSERT_EQ(t.ids.size(), t.loss_mask.size());
  EXPECT_EQ(t.ids, tok.encode(r.text));  // the whole string in one call
  EXPECT_EQ(masked_runs(t), (std::vector<std::string>{
                                "7<|im_end|>",
                                "<think>\nThe only even prime.\n</think>\n\nÇa va : 2.\n\n```\nx = 2\n```<|im_end|>"}));
  EXPECT_EQ(masked_runs(t), span_texts(r));
  // Each run ends on the <|im_end|> token and follows the "\n" that ends the role header.
  const uint32_t im_end = *tok.token_to_id("<|im_end|>");
  for (size_t i = 0; i < t.ids.size(); ++i) {
    if (t.loss_mask[i] == 0) continue;
    if (i + 1 == t.ids.size() || t.loss_mask[i + 1] == 0) {
      EXPECT_EQ(t.ids[i], im_end);
    }
    ASSERT_GT(i, 0u);
    if (t.loss_mask[i - 1] == 0) {
      EXPECT_EQ(tok.decode(Ids{t.ids[i - 1]}), "\n");
    }
  }
  // Not every <|im_end|> is trained on: the system and user ones are not.
  size_t im_ends = 0, masked_im_ends = 0;
  for (size_t i = 0; i < t.ids.size(); ++i) {
    im_ends += t.ids[i] == im_end;
    masked_im_ends += t.ids[i] == im_end && t.loss_mask[i] != 0;
  }
  EXPECT_EQ(im_ends, 5u);
  EXPECT_EQ(masked_im_ends, 2u);
}

TEST(ChatQwen3, LossMaskRefusesATokenAcrossASpanStart) {
  REQUIRE_QWEN3();
  // "assistant\n" + "\nb": the two newlines are one token, half header and half content.
  const RenderedChat r = qwen3()->chat.render_chat({user("a"), asst("\nb"), user("c"), asst("d")});
  EXPECT_TRUE(contains_all(error_of([&] { tokenize_chat(qwen3()->tokenizer, r); }),
                           {"token 8", "id 271", "straddles loss span 0"}));
  // Rendered with a think block the content's leading newlines are stripped: no straddling.
  const TokenizedChat t = tokenize_chat(qwen3()->tokenizer, qwen3()->chat.render_chat({user("a"), asst("\nb")}));
  EXPECT_EQ(masked_runs(t), (std::vector<std::string>{"<think>\n\n</think>\n\nb<|im_end|>"}));
}

TEST(ChatQwen3, SamplesPerAssistantTurn) {
  REQUIRE_QWEN3();
  const Messages m = {sys("Be brief."), user("Name a prime."), asst("7", "Small primes."), user("Even?"),
                      asst("2", "Only 2.")};
  const std::vector<RenderedChat> whole = qwen3()->chat.render_samples(m, ChatSamples::kWhole);
  ASSERT_EQ(whole.size(), 1u);
  EXPECT_EQ(whole[0].text, render(m));
  EXPECT_EQ(whole[0].assistant_spans.size(), 2u);

  const std::vector<RenderedChat> turns = qwen3()->chat.render_samples(m, ChatSamples::kPerAssistantTurn);
  ASSERT_EQ(turns.size(), 2u);
  // The first turn, rendered as the last, keeps its reasoning; only it carries loss.
  EXPECT_EQ(turns[0].text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nSmall primes.\n</think>\n\n7<|im_end|>\n");
  EXPECT_EQ(span_texts(turns[0]), (std::vector<std::string>{"<think>\nSmall primes.\n</think>\n\n7<|im_end|>"}));
  EXPECT_EQ(turns[1].text, render(m));
  EXPECT_EQ(span_texts(turns[1]), (std::vector<std::string>{"<think>\nOnly 2.\n</think>\n\n2<|im_end|>"}));
  for (const RenderedChat& r : turns) {
    EXPECT_EQ(masked_runs(tokenize_chat(qwen3()->tokenizer, r)), span_texts(r));
  }
  EXPECT_TRUE(qwen3()->chat.render_samples({sys("S"), user("U")}, ChatSamples::kPerAssistantTurn).empty());
}

// The conversations of tests/data/fixtures/chat_conversations.json: every loss mask decodes to the
// assistant spans.
TEST(ChatQwen3, FixtureConversationsMask) {
  REQUIRE_QWEN3();
  const std::string path = std::string(MOETP_REPO_DIR) + "/tests/data/fixtures/chat_conversations.json";
  const json fixture = json::parse(read_bytes(path));
  ASSERT_GE(fixture.at("conversations").size(), 10u);
  for (const json& c : fixture["conversations"]) {
    const std::string name = c.at("name").get<std::string>();
    const Messages m = parse_messages(c.at("messages"), name);
    for (const ChatSamples s : {ChatSamples::kWhole, ChatSamples::kPerAssistantTurn}) {
      for (const RenderedChat& r : qwen3()->chat.render_samples(m, s)) {
        EXPECT_EQ(masked_runs(tokenize_chat(qwen3()->tokenizer, r)), span_texts(r)) << name;
      }
    }
  }
}

// Text and ids of transformers' apply_chat_template (tools/make_chat_fixture.py).
TEST(ChatQwen3Reference, MatchesTransformers) {
  REQUIRE_QWEN3();
  const std::string path = std::string(MOETP_REPO_DIR) + "/tests/data/fixtures/qwen3_chat_reference.json";
  if (!std::filesystem::exists(path)) {
    GTEST_SKIP() << path << " does not exist yet: generate it with tools/make_chat_fixture.py where the "
                 << "Python transformers package is installed";
  }
  const json fixture = json::parse(read_bytes(path));
  ASSERT_GE(fixture.at("cases").size(), 10u);
  for (const json& c : fixture["cases"]) {
    const std::string name = c.at("name").get<std::string>();
    const Messages m = parse_messages(c.at("messages"), name);
    const std::string text = c.value("add_generation_prompt", false)
                                 ? qwen3()->chat.render_with_generation_prompt(m, c.value("enable_thinking", true))
                                 : qwen3()->chat.render(m);
    EXPECT_EQ(json(text).dump(), c.at("text").dump()) << name;
    EXPECT_EQ(qwen3()->tokenizer.encode(text), c.at("ids").get<Ids>()) << name;
    if (!c.value("add_generation_prompt", false)) {
      EXPECT_EQ(tokenize_chat(qwen3()->tokenizer, qwen3()->chat.render_chat(m)).ids, c["ids"].get<Ids>()) << name;
    }
  }
}

}  // namespace
}  // namespace moetp::data
