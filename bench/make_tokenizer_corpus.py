#!/usr/bin/env python3
"""Deterministic text corpus for bench/tokenizer_bench.cpp and bench/hf_tokenizer_baseline.py, built
offline from what every checkout of this repository holds (Python standard library only).

Sources (read in sorted path order; files that are not UTF-8 text, or hold NUL bytes, or exceed
1 MB, are skipped; the output folder is never read):
  prose   data/kjv.txt (King James Bible): runs of consecutive verses, or verses in random order
  code    src/, tests/, bench/, tools/, scripts/ (C++, CUDA, Python, shell, CMake, JSON): slices of
          consecutive lines, sometimes a whole file
  docs    docs/ and the top-level *.md: slices of Markdown
  intl    the texts of tests/data/fixtures/tokenizer_texts.json (CJK, Arabic, Cyrillic, emoji,
          decomposed accents, CRLF, ...) and synthetic paragraphs of pseudo-words in 11 scripts
          (Zipf-distributed per-script vocabularies; Latin with accents partly in NFD)
  data    CSV tables of numbers, one-line JSON records (lines up to tens of KB) and log lines

Output: --out DIR/dNNN/fNNNNN.txt, 100 files per folder, file sizes log-uniform in [2 KB, 256 KB],
each a random mix of segments (weights: prose 0.30, code 0.35, docs 0.08, intl 0.15, data 0.12), until
the total reaches --mb megabytes (1 MB = 1e6 bytes; files are cut at a line end, so the total may pass --mb by
less than one line). All
randomness comes from random.Random(--seed), so the same checkout and arguments give the same bytes.

  python3 bench/make_tokenizer_corpus.py --out /tmp/tok-corpus [--mb 100] [--seed 20]
"""
import argparse
import bisect
import json
import math
import os
import random
import sys
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_DIRS = ["src", "tests", "bench", "tools", "scripts"]
DOC_DIRS = ["docs"]
MAX_SOURCE_BYTES = 1 << 20


def read_text(path):
    """The file's text, or None when it is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SOURCE_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_SOURCE_BYTES or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def walk_sorted(root, skip):
    """Regular files below root, sorted by relative path (bytes)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".git")]
        for name in filenames:
            p = os.path.join(dirpath, name)
            if skip and os.path.abspath(p).startswith(skip):
                continue
            if os.path.isfile(p):
                out.append(p)
    return sorted(out, key=lambda p: os.fsencode(os.path.relpath(p, REPO)))


def load_sources(skip):
    kjv = read_text(os.path.join(REPO, "data", "kjv.txt"))
    if kjv is None:
        sys.exit("make_tokenizer_corpus: cannot read data/kjv.txt")
    verses = [line for line in kjv.splitlines(keepends=True) if line.strip()]
    code, docs = [], []
    for d in CODE_DIRS:
        root = os.path.join(REPO, d)
        if not os.path.isdir(root):
            continue
        for p in walk_sorted(root, skip):
            if p.endswith(".md"):
                continue
            text = read_text(p)
            if text and text.strip():
                code.append(text.splitlines(keepends=True))
    md = [os.path.join(REPO, n) for n in sorted(os.listdir(REPO)) if n.endswith(".md")]
    for d in DOC_DIRS:
        if os.path.isdir(os.path.join(REPO, d)):
            md += walk_sorted(os.path.join(REPO, d), skip)
    for d in CODE_DIRS:
        if os.path.isdir(os.path.join(REPO, d)):
            md += [p for p in walk_sorted(os.path.join(REPO, d), skip) if p.endswith(".md")]
    for p in md:
        text = read_text(p)
        if text and text.strip():
            docs.append(text.splitlines(keepends=True))
    fixture = []
    fpath = os.path.join(REPO, "tests", "data", "fixtures", "tokenizer_texts.json")
    if os.path.isfile(fpath):
        with open(fpath, encoding="utf-8") as f:
            fixture = [t for t in json.load(f).get("texts", []) if isinstance(t, str) and t]
    if not code:
        sys.exit("make_tokenizer_corpus: no source files found under " + ", ".join(CODE_DIRS))
    return verses, code, docs or code, fixture


# Scripts for synthetic text: (name, alphabet as code point ranges, word length range, word separator).
SCRIPTS = [
    ("cyrillic", [(0x430, 0x44F), (0x451, 0x451)], (2, 10), " "),
    ("greek", [(0x3B1, 0x3C9), (0x3AC, 0x3AF)], (2, 9), " "),
    ("latin-accents", [(0x61, 0x7A), (0xE0, 0xFF)], (2, 10), " "),
    ("hebrew", [(0x5D0, 0x5EA)], (2, 7), " "),
    ("arabic", [(0x627, 0x64A)], (2, 8), " "),
    ("devanagari", [(0x915, 0x939), (0x93E, 0x94C)], (2, 8), " "),
    ("thai", [(0xE01, 0xE2E), (0xE30, 0xE39)], (3, 10), ""),
    ("hiragana", [(0x3041, 0x3093)], (1, 5), ""),
    ("cjk", [(0x4E00, 0x4E00 + 2999)], (1, 3), ""),
    ("hangul", [(0xAC00, 0xAC00 + 2999)], (1, 4), " "),
    ("emoji", [(0x1F600, 0x1F64F), (0x1F300, 0x1F3FF)], (1, 2), " "),
]
SENTENCE_END = {"cjk": "。", "hiragana": "。", "thai": " ", "arabic": "؟", "devanagari": "।"}


class Synth:
    """Pseudo-word vocabularies per script (fixed seed) and Zipf sampling from them."""

    def __init__(self, rng, words_per_script=3000):
        self.vocab = {}
        weights = [1.0 / (k + 1) for k in range(words_per_script)]
        self.cum = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)
        for name, ranges, (lo, hi), _ in SCRIPTS:
            alphabet = [chr(c) for a, b in ranges for c in range(a, b + 1)]
            words = []
            for _ in range(words_per_script):
                n = rng.randint(lo, hi)
                words.append("".join(rng.choice(alphabet) for _ in range(n)))
            self.vocab[name] = words

    def word(self, rng, script):
        k = bisect.bisect_left(self.cum, rng.random() * self.cum[-1])
        return self.vocab[script][min(k, len(self.vocab[script]) - 1)]

    def paragraph(self, rng):
        name, _, _, sep = SCRIPTS[rng.randrange(len(SCRIPTS))]
        sentences = []
        for _ in range(rng.randint(1, 6)):
            words = [self.word(rng, name) for _ in range(rng.randint(4, 16))]
            if sep:
                words[0] = words[0][:1].upper() + words[0][1:]
            s = sep.join(words)
            if rng.random() < 0.3:  # a number or an ASCII term inside the sentence
                s += sep + rng.choice([str(rng.randint(0, 99999)), "GPU", "API v2", "(2024)", "e-mail", "3.5%"])
            sentences.append(s + SENTENCE_END.get(name, "."))
        text = (" " if sep else "").join(sentences)
        if name == "latin-accents" and rng.random() < 0.5:
            text = unicodedata.normalize("NFD", text)  # exercises the NFC normalizer
        return text + "\n"


def lines_slice(rng, lines, lo, hi):
    if len(lines) <= lo or rng.random() < 0.1:
        return "".join(lines)
    n = rng.randint(lo, min(hi, len(lines)))
    start = rng.randrange(len(lines) - n + 1)
    return "".join(lines[start:start + n])


def data_segment(rng):
    kind = rng.randrange(3)
    if kind == 0:  # CSV
        cols = rng.randint(3, 9)
        rows = ["id," + ",".join("col_%d" % c for c in range(cols)) + "\n"]
        for r in range(rng.randint(10, 200)):
            vals = []
            for _ in range(cols):
                t = rng.randrange(4)
                vals.append(str(rng.randint(-10**6, 10**6)) if t == 0 else
                            "%.6g" % rng.gauss(0, 1000) if t == 1 else
                            "%.3e" % rng.expovariate(1e-3) if t == 2 else
                            "0x%08x" % rng.getrandbits(32))
            rows.append("%d,%s\n" % (r, ",".join(vals)))
        return "".join(rows)
    if kind == 1:  # one-line JSON
        recs = []
        for _ in range(rng.randint(5, 300)):
            recs.append({"id": rng.getrandbits(40), "name": "item_%d" % rng.randrange(10**5),
                         "score": round(rng.random(), 6), "tags": ["t%d" % rng.randrange(50) for _ in range(rng.randrange(4))],
                         "ok": rng.random() < 0.5, "ratio": rng.randint(1, 9) / rng.randint(1, 9)})
        return json.dumps(recs, separators=(",", ":") if rng.random() < 0.5 else (", ", ": ")) + "\n"
    out = []  # log lines
    for _ in range(rng.randint(10, 150)):
        out.append("2024-%02d-%02dT%02d:%02d:%02d.%03dZ %s worker-%d req=%016x path=/api/v%d/items/%d took %.1fms\n" % (
            rng.randint(1, 12), rng.randint(1, 28), rng.randrange(24), rng.randrange(60), rng.randrange(60),
            rng.randrange(1000), rng.choice(["INFO", "WARN", "DEBUG", "ERROR"]), rng.randrange(64),
            rng.getrandbits(64), rng.randint(1, 3), rng.randrange(10**6), rng.expovariate(0.05)))
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created; must be empty or absent)")
    ap.add_argument("--mb", type=float, default=100.0, help="total size in MB (1e6 bytes), default 100")
    ap.add_argument("--seed", type=int, default=20)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        sys.exit("make_tokenizer_corpus: --out %s is not empty" % out)
    os.makedirs(out, exist_ok=True)

    rng = random.Random(args.seed)
    verses, code, docs, fixture = load_sources(out + os.sep)
    synth = Synth(random.Random(args.seed + 1))
    kinds = [("prose", 0.30), ("code", 0.35), ("docs", 0.08), ("intl", 0.15), ("data", 0.12)]
    cum, total = [], 0.0
    for _, w in kinds:
        total += w
        cum.append(total)

    def segment():
        kind = kinds[bisect.bisect_left(cum, rng.random() * total)][0]
        if kind == "prose":
            if rng.random() < 0.3:
                return "".join(rng.choice(verses) for _ in range(rng.randint(3, 40)))
            n = rng.randint(5, 80)
            start = rng.randrange(max(1, len(verses) - n))
            return "".join(verses[start:start + n])
        if kind == "code":
            return lines_slice(rng, rng.choice(code), 20, 400)
        if kind == "docs":
            return lines_slice(rng, rng.choice(docs), 10, 200)
        if kind == "intl":
            parts = []
            for _ in range(rng.randint(1, 8)):
                if fixture and rng.random() < 0.35:
                    parts.append(rng.choice(fixture) + "\n")
                else:
                    parts.append(synth.paragraph(rng))
            return "".join(parts)
        return data_segment(rng)

    budget = int(args.mb * 1e6)
    written, nfiles = 0, 0
    lo, hi = math.log(2 * 1024), math.log(256 * 1024)
    while written < budget:
        size = min(int(math.exp(rng.uniform(lo, hi))), budget - written)
        parts, n = [], 0
        while n < size:
            s = segment().encode("utf-8")
            if s and not s.endswith(b"\n"):
                s += b"\n"
            parts.append(s)
            n += len(s)
        data = b"".join(parts)
        if len(data) > size:
            cut = data.rfind(b"\n", 0, size)
            if cut < 0:  # the first line is longer than the file: keep that line whole
                cut = data.find(b"\n")
            data = data[:cut + 1]
        sub = os.path.join(out, "d%03d" % (nfiles // 100))
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, "f%05d.txt" % nfiles), "wb") as f:
            f.write(data)
        written += len(data)
        nfiles += 1
    print("make_tokenizer_corpus: %s: %d files, %d bytes (%.1f MB), seed %d" % (out, nfiles, written, written / 1e6,
                                                                               args.seed))


if __name__ == "__main__":
    main()
