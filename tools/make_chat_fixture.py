#!/usr/bin/env python3
"""Reference renderings of Qwen3's chat template for moetp's chat tests (run where the Python
`transformers` package is installed: pip install transformers jinja2).

  python3 tools/make_chat_fixture.py [TOKENIZER_DIR [OUT]]
      TOKENIZER_DIR holds tokenizer.json and tokenizer_config.json (default
      third_party/tokenizers/qwen3, which scripts/fetch-tokenizer.sh fills). For every conversation
      of tests/data/fixtures/chat_conversations.json it records
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=..., [enable_thinking=...])
        ids  = tokenizer(text, add_special_tokens=False)["input_ids"]
      (add_generation_prompt and enable_thinking from the conversation; False and unset when
      absent), and checks that apply_chat_template(..., tokenize=True) gives the same ids.
      Writes OUT (default tests/data/fixtures/qwen3_chat_reference.json):
        {"transformers_version", "tokenizers_version", "chat_template_sha256",
         "cases": [{"name", "messages", "add_generation_prompt", ["enable_thinking"], "text", "ids"}]}
      tests/data/chat_test.cpp (suite ChatQwen3Reference) checks every case.

The tokenizer is loaded with AutoTokenizer.from_pretrained(TOKENIZER_DIR); where that fails
(missing files, a transformers version that does not know the class), it is built as
PreTrainedTokenizerFast(tokenizer_file=tokenizer.json) with the special tokens and chat_template of
tokenizer_config.json. Either way the template used must be the one in tokenizer_config.json.
"""
import hashlib
import json
import os
import sys

import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, "third_party", "tokenizers", "qwen3")
CONVERSATIONS = os.path.join(REPO, "tests", "data", "fixtures", "chat_conversations.json")
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "fixtures", "qwen3_chat_reference.json")


def token_content(value):
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(folder, config):
    template = config["chat_template"]
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        how = f"AutoTokenizer ({type(tok).__name__})"
    except Exception as e:  # noqa: BLE001 - any failure falls back to the explicit construction
        print(f"AutoTokenizer.from_pretrained({folder!r}) failed ({type(e).__name__}: {e}); "
              "using PreTrainedTokenizerFast", file=sys.stderr)
        special = {k: token_content(config.get(k)) for k in ("eos_token", "pad_token", "bos_token", "unk_token")}
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(folder, "tokenizer.json"),
            **{k: v for k, v in special.items() if v is not None},
            additional_special_tokens=[token_content(t) for t in config.get("additional_special_tokens", [])],
            split_special_tokens=config.get("split_special_tokens", False),
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
        )
        how = "PreTrainedTokenizerFast"
    if tok.chat_template != template:
        tok.chat_template = template
    return tok, how


def ids_of(result):
    """apply_chat_template(tokenize=True) returns a list of ids, or a BatchEncoding in newer versions."""
    if hasattr(result, "keys") and "input_ids" in result.keys():
        result = result["input_ids"]
    result = list(result)
    if result and isinstance(result[0], (list, tuple)):
        assert len(result) == 1, "expected one conversation"
        result = list(result[0])
    return [int(i) for i in result]


def main():
    if len(sys.argv) > 3 or (len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help")):
        sys.exit(__doc__)
    folder = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR
    out_path = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    template = config["chat_template"]
    if not isinstance(template, str):
        sys.exit("tokenizer_config.json: chat_template is not a string")
    tok, how = load_tokenizer(folder, config)
    with open(CONVERSATIONS, encoding="utf-8") as f:
        conversations = json.load(f)["conversations"]

    cases = []
    for conv in conversations:
        kwargs = {"add_generation_prompt": bool(conv.get("add_generation_prompt", False))}
        if "enable_thinking" in conv:
            kwargs["enable_thinking"] = bool(conv["enable_thinking"])
        text = tok.apply_chat_template(conv["messages"], tokenize=False, **kwargs)
        ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
        direct = ids_of(tok.apply_chat_template(conv["messages"], tokenize=True, **kwargs))
        if direct != ids:
            sys.exit(f"{conv['name']}: apply_chat_template(tokenize=True) differs from tokenizing its text")
        case = {"name": conv["name"], "messages": conv["messages"],
                "add_generation_prompt": kwargs["add_generation_prompt"]}
        if "enable_thinking" in kwargs:
            case["enable_thinking"] = kwargs["enable_thinking"]
        case.update({"text": text, "ids": ids})
        cases.append(case)

    try:
        import tokenizers
        tokenizers_version = tokenizers.__version__
    except ImportError:
        tokenizers_version = None
    header = {"transformers_version": transformers.__version__, "tokenizers_version": tokenizers_version,
              "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()}
    # One case per line.
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    print(f"wrote {out_path}: {len(cases)} cases, {sum(len(c['ids']) for c in cases)} ids "
          f"(transformers {transformers.__version__}, tokenizer via {how})")


if __name__ == "__main__":
    main()
