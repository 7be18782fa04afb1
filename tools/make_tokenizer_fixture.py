#!/usr/bin/env python3
"""Reference ids of the Qwen3 tokenizer for moetp's tokenizer tests (run where the Python
`tokenizers` package is installed: pip install tokenizers).

  python3 tools/make_tokenizer_fixture.py TOKENIZER_JSON [OUT]
      TOKENIZER_JSON is the file scripts/fetch-tokenizer.sh prints
      (third_party/tokenizers/qwen3/tokenizer.json). Encodes, with
      Tokenizer.from_file(TOKENIZER_JSON).encode(text, add_special_tokens=False):
        - every text of tests/data/fixtures/tokenizer_texts.json;
        - the texts that contain an added token again with encode_special_tokens = True (the
          split_special_tokens option), where the installed version has it;
        - one long document (about 20 KB) built from those texts and data/kjv.txt by a fixed
          32-bit LCG, so it is the same on every machine and Python version.
      Writes OUT (default tests/data/fixtures/qwen3_reference_ids.json):
        {"tokenizers_version": ..., "tokenizer_sha256": ...,
         "cases": [{"text", "split_special_tokens", "ids", "offsets"}]}
      offsets are [begin, end) byte offsets into the UTF-8 text (the library reports code points).
      tests/data/hf_tokenizer_test.cpp (suite Qwen3Reference) checks every case.
"""
import hashlib
import json
import os
import sys

import tokenizers
from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = os.path.join(REPO, "tests", "data", "fixtures", "tokenizer_texts.json")
KJV = os.path.join(REPO, "data", "kjv.txt")
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "fixtures", "qwen3_reference_ids.json")


def long_document(texts, kjv, target_bytes=20000):
    """Fixture texts and KJV slices in an order drawn from a 32-bit LCG (seed 12345)."""
    state = 12345

    def draw():
        nonlocal state
        state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
        return state >> 8

    separators = ["\n", "\n\n", " ", "\t", "\r\n", "  "]
    parts = []
    size = 0
    while size < target_bytes:
        if draw() % 2 == 0:
            start = draw() % (len(kjv) - 1000)
            piece = kjv[start:start + 200 + draw() % 800]
        else:
            piece = texts[draw() % len(texts)]
        piece += separators[draw() % len(separators)]
        parts.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(parts)


def byte_offsets(text, char_offsets):
    """Code-point offsets -> UTF-8 byte offsets."""
    at = [0]
    for ch in text:
        at.append(at[-1] + len(ch.encode("utf-8")))
    return [[at[b], at[e]] for b, e in char_offsets]


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    tokenizer_path = sys.argv[1]
    out_path = sys.argv[2] if len(sys.argv) == 3 else DEFAULT_OUT
    with open(tokenizer_path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    with open(tokenizer_path, encoding="utf-8") as f:
        added = [t["content"] for t in json.load(f)["added_tokens"]]
    tok = Tokenizer.from_file(tokenizer_path)
    with open(TEXTS, encoding="utf-8") as f:
        texts = json.load(f)["texts"]
    with open(KJV, encoding="utf-8") as f:
        kjv = f.read()

    def encode(text, split_special):
        if split_special:
            tok.encode_special_tokens = True
        try:
            enc = tok.encode(text, add_special_tokens=False)
        finally:
            if split_special:
                tok.encode_special_tokens = False
        return {"text": text, "split_special_tokens": split_special, "ids": list(enc.ids),
                "offsets": byte_offsets(text, enc.offsets)}

    cases = [encode(t, False) for t in texts]
    if hasattr(tok, "encode_special_tokens"):
        cases += [encode(t, True) for t in texts if any(a in t for a in added)]
    else:
        print(f"tokenizers {tokenizers.__version__} has no encode_special_tokens: "
              "no split_special_tokens cases", file=sys.stderr)
    cases.append(encode(long_document(texts, kjv), False))

    # One case per line.
    with open(out_path, "w", encoding="utf-8") as f:
        f.write('{"tokenizers_version": %s, "tokenizer_sha256": "%s", "cases": [\n'
                % (json.dumps(tokenizers.__version__), sha256))
        f.write(",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    print(f"wrote {out_path}: {len(cases)} cases, {sum(len(c['ids']) for c in cases)} ids "
          f"(tokenizers {tokenizers.__version__})")


if __name__ == "__main__":
    main()
