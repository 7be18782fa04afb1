#!/usr/bin/env python3
"""Baseline of bench/tokenizer_bench.cpp: the Hugging Face `tokenizers` library (Rust, through its
Python binding) encoding the same corpus with the same tokenizer.json, at several thread counts.

Corpus -> documents (exactly as tokenizer_bench.cpp; see its header):
  files: --corpus itself when it is a file; for a folder every regular file below it (os.walk,
    symbolic links to files followed, to folders not), ordered by the '/'-separated path relative
    to the folder, compared as bytes. Every file must be valid UTF-8.
  documents: --doc-kb 0: each non-empty file is one document. --doc-kb K > 0: lines (bytes up to and
    including b'\\n'; the last line may lack it) are appended to the current document, which is
    closed right after the line that brings it to >= K*1024 bytes, and at the end of the file.
    Documents never span files and are never empty.

Timing: one subprocess per thread count (RAYON_NUM_THREADS=N and TOKENIZERS_PARALLELISM=true, or
false for N = 1, set before `tokenizers` is imported); in it --repeat runs of
Tokenizer.encode_batch(docs, add_special_tokens=False), time.perf_counter around the call, best run;
MB/s = input bytes / 1e6 / seconds. Where the library has encode_batch_fast (no offsets), it is
timed the same way (fast_* fields; the C++ table shows it as hf_fast_MB/s).

Id hash (the same in tokenizer_bench.cpp), FNV-1a 64 per word, h0 = 0xcbf29ce484222325,
h = (h ^ w) * 0x100000001b3 mod 2**64:
  doc_hash(d) = FNV over the uint32 words [n, id_0, ..., id_{n-1}]
  id_hash     = FNV over the uint64 words [D, doc_hash(0), ..., doc_hash(D-1)]

JSON (--json FILE, read by tokenizer_bench --baseline FILE): tokenizers_version, corpus, doc_kb,
files, documents, bytes, repeat, id_hash, threads_consistent, doc_hashes (per document, hex) and
results: [{threads, seconds, runs_s, mb_s, tokens, id_hash, fast_seconds, fast_mb_s}].

  python3 bench/hf_tokenizer_baseline.py --corpus DIR [--tokenizer third_party/tokenizers/qwen3/tokenizer.json]
      [--doc-kb 4] [--threads 1,4,16] [--repeat 3] [--json hf.json] [--show-doc I]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

FNV_BASIS = 0xcbf29ce484222325
FNV_PRIME = 0x100000001b3
MASK64 = (1 << 64) - 1


def doc_hash(ids):
    h = ((FNV_BASIS ^ (len(ids) & 0xFFFFFFFF)) * FNV_PRIME) & MASK64
    for w in ids:
        h = ((h ^ w) * FNV_PRIME) & MASK64
    return h


def corpus_hash(doc_hashes):
    h = ((FNV_BASIS ^ len(doc_hashes)) * FNV_PRIME) & MASK64
    for d in doc_hashes:
        h = ((h ^ d) * FNV_PRIME) & MASK64
    return h


def list_files(root):
    """(relative or given path, full path) of the corpus files, in corpus order."""
    if not os.path.isdir(root):
        if not os.path.isfile(root):
            sys.exit("hf_tokenizer_baseline: --corpus %s does not exist" % root)
        return [(root, root)]
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                found.append((rel, full))
    found.sort(key=lambda x: os.fsencode(x[0]))
    if not found:
        sys.exit("hf_tokenizer_baseline: --corpus %s holds no files" % root)
    return found


def read_corpus(root, doc_kb):
    """files, documents (str), (file index, byte offset) per document, total bytes."""
    files = list_files(root)
    target = doc_kb * 1024
    docs, where, total = [], [], 0
    for f, (_rel, full) in enumerate(files):
        with open(full, "rb") as fh:
            data = fh.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            sys.exit("hf_tokenizer_baseline: corpus file '%s' is not valid UTF-8 (byte offset %d)" % (full, e.start))
        total += len(data)
        if not data:
            continue
        if target == 0:
            docs.append(data.decode("utf-8"))
            where.append((f, 0))
            continue
        start = pos = 0
        n = len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            pos = n if nl < 0 else nl + 1
            if pos - start >= target or pos == n:
                docs.append(data[start:pos].decode("utf-8"))
                where.append((f, start))
                start = pos
    return [rel for rel, _ in files], docs, where, total


def worker(args):
    """One thread count (this process's RAYON_NUM_THREADS): prints one JSON line."""
    import tokenizers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    _files, docs, _where, total = read_corpus(args.corpus, args.doc_kb)
    runs, encs = [], None
    for _ in range(args.repeat):
        encs = None
        t0 = time.perf_counter()
        encs = tok.encode_batch(docs, add_special_tokens=False)
        runs.append(time.perf_counter() - t0)
    ids = [e.ids for e in encs]
    encs = None
    fast_runs = []
    if hasattr(tok, "encode_batch_fast"):
        for _ in range(args.repeat):
            out = None
            t0 = time.perf_counter()
            out = tok.encode_batch_fast(docs, add_special_tokens=False)
            fast_runs.append(time.perf_counter() - t0)
        fast_ids = [e.ids for e in out]
        if fast_ids != ids:
            sys.exit("hf_tokenizer_baseline: encode_batch_fast gives other ids than encode_batch")
        out = fast_ids = None
    hashes = [doc_hash(d) for d in ids]
    best = min(runs)
    res = {"threads": args.worker, "seconds": best, "runs_s": runs, "mb_s": total / 1e6 / best,
           "tokens": sum(len(d) for d in ids), "id_hash": "%016x" % corpus_hash(hashes),
           "doc_hashes": ["%016x" % h for h in hashes], "tokenizers_version": tokenizers.__version__,
           "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"),
           "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}
    if fast_runs:
        res["fast_seconds"] = min(fast_runs)
        res["fast_runs_s"] = fast_runs
        res["fast_mb_s"] = total / 1e6 / min(fast_runs)
    sys.stdout.write("RESULT " + json.dumps(res) + "\n")


def show_doc(args):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(args.tokenizer)
    files, docs, where, _total = read_corpus(args.corpus, args.doc_kb)
    i = args.show_doc
    if i >= len(docs):
        sys.exit("hf_tokenizer_baseline: --show-doc %d: only %d documents" % (i, len(docs)))
    f, off = where[i]
    print(json.dumps({"document": i, "file": files[f], "offset": off, "bytes": len(docs[i].encode("utf-8")),
                      "ids": tok.encode(docs[i], add_special_tokens=False).ids}, separators=(",", ":")))


def main():
    ap = argparse.ArgumentParser(description="HF tokenizers baseline of bench/tokenizer_bench.cpp")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", default="third_party/tokenizers/qwen3/tokenizer.json")
    ap.add_argument("--doc-kb", type=int, default=4)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--show-doc", type=int, default=-1)
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.doc_kb < 0 or args.repeat < 1:
        sys.exit("hf_tokenizer_baseline: --doc-kb must be >= 0 and --repeat >= 1")
    if args.worker:
        return worker(args)
    if args.show_doc >= 0:
        return show_doc(args)
    try:
        threads = [int(t) for t in args.threads.split(",")]
        assert threads and all(t >= 1 for t in threads)
    except (ValueError, AssertionError):
        sys.exit("hf_tokenizer_baseline: --threads must be a list of counts >= 1, e.g. 1,4,16")

    files, docs, _where, total = read_corpus(args.corpus, args.doc_kb)
    print("hf_tokenizer_baseline: corpus %s: %d files, %d documents (doc-kb %d), %d bytes (%.1f MB); "
          "%d CPUs; best of %d runs" % (args.corpus, len(files), len(docs), args.doc_kb, total, total / 1e6,
                                        os.cpu_count() or 0, args.repeat), flush=True)
    docs = None
    fast_header = ""
    print("%7s %9s %9s %12s  %-16s %s" % ("threads", "seconds", "MB/s", "tokens", "id_hash", "fast_s    fast_MB/s"),
          flush=True)
    results, doc_hashes, version = [], None, None
    for t in threads:
        env = dict(os.environ)
        env["RAYON_NUM_THREADS"] = str(t)
        env["TOKENIZERS_PARALLELISM"] = "false" if t == 1 else "true"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(t), "--corpus", args.corpus,
               "--tokenizer", args.tokenizer, "--doc-kb", str(args.doc_kb), "--repeat", str(args.repeat)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit("hf_tokenizer_baseline: the worker for %d threads failed (exit %d)" % (t, proc.returncode))
        r = json.loads(line[-1][len("RESULT "):])
        hashes = r.pop("doc_hashes")
        if doc_hashes is None:
            doc_hashes = hashes
        version = r.pop("tokenizers_version")
        fast = ("%9.3f %9.2f" % (r["fast_seconds"], r["fast_mb_s"])) if "fast_mb_s" in r else fast_header
        print("%7d %9.3f %9.2f %12d  %-16s %s" % (t, r["seconds"], r["mb_s"], r["tokens"], r["id_hash"], fast),
              flush=True)
        results.append(r)
    consistent = all(r["id_hash"] == results[0]["id_hash"] for r in results)
    print("ids: %s (hash %s)" % ("identical at every thread count" if consistent else "DIFFER between thread counts",
                                 results[0]["id_hash"]))
    if args.json:
        out = {"tool": "hf tokenizers", "tokenizers_version": version, "python": platform.python_version(),
               "corpus": args.corpus, "tokenizer": args.tokenizer, "doc_kb": args.doc_kb, "files": len(files),
               "documents": len(doc_hashes), "bytes": total, "repeat": args.repeat, "cpus": os.cpu_count(),
               "id_hash": results[0]["id_hash"], "threads_consistent": consistent, "results": results,
               "doc_hashes": doc_hashes}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0 if consistent else 1


if __name__ == "__main__":
    sys.exit(main() or 0)
