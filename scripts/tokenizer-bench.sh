#!/usr/bin/env bash
# Tokenizer throughput, moetp vs the Hugging Face `tokenizers` library, in one run on one machine:
#   1. bench/make_tokenizer_corpus.py   a deterministic corpus (code, prose, non-ASCII, data) in a temp folder
#   2. bench/hf_tokenizer_baseline.py   the library's encode_batch per thread count -> $OUT/hf.json
#   3. tokenizer_bench --baseline       moetp's encode_batch per thread count, the table with the
#                                       ratio moetp/HF, and the id check (MATCH / MISMATCH)
# Needs python3 with `tokenizers` (no network) and a built tokenizer_bench (CPU-only builds have it).
# Environment:
#   TOKENIZER_BENCH  the benchmark command (default build/bench/tokenizer_bench); may hold arguments,
#                    e.g. TOKENIZER_BENCH="/tmp/moetp-bundle/run.sh tokenizer_bench" for the device bundle
#   TOKENIZER        tokenizer.json (default third_party/tokenizers/qwen3/tokenizer.json, from
#                    scripts/fetch-tokenizer.sh)
#   MB=100 THREADS=1,4,16 DOC_KB=4 REPEAT=3 SEED=20   corpus size, thread counts, document size, runs
#   OUT              output folder for hf.json, moetp.json, moetp.txt (default a new /tmp/tokenizer-bench.*)
#   PYTHON=python3   KEEP_CORPUS=1 keeps the corpus folder (printed)
# Exit status: non-zero when a step fails or the ids mismatch (tokenizer_bench exits 1).
set -euo pipefail
cd "$(dirname "$0")/.."
read -ra bench <<< "${TOKENIZER_BENCH:-build/bench/tokenizer_bench}"
tokenizer=${TOKENIZER:-third_party/tokenizers/qwen3/tokenizer.json}
python=${PYTHON:-python3}
mb=${MB:-100} threads=${THREADS:-1,4,16} doc_kb=${DOC_KB:-4} repeat=${REPEAT:-3} seed=${SEED:-20}
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/tokenizer-bench.XXXXXX")}
mkdir -p "$out"

[ -f "$tokenizer" ] || { echo "tokenizer-bench: no $tokenizer (scripts/fetch-tokenizer.sh, or set TOKENIZER)" >&2; exit 2; }
command -v "${bench[0]}" > /dev/null || [ -x "${bench[0]}" ] ||
  { echo "tokenizer-bench: no benchmark at ${bench[0]} (build the tokenizer_bench target, or set TOKENIZER_BENCH)" >&2; exit 2; }
"$python" -c 'import tokenizers' 2> /dev/null ||
  { echo "tokenizer-bench: $python cannot import tokenizers (pip install tokenizers)" >&2; exit 2; }

corpus=$(mktemp -d "${TMPDIR:-/tmp}/tokenizer-corpus.XXXXXX")
if [ "${KEEP_CORPUS:-0}" = 1 ]; then echo "corpus kept in $corpus"; else trap 'rm -rf "$corpus"' EXIT; fi

echo "== $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo 2> /dev/null | cut -d: -f2- | sed 's/^ *//')"
echo "== python $("$python" -c 'import platform, tokenizers; print(platform.python_version(), "tokenizers", tokenizers.__version__)')"
echo "[${SECONDS}s] == corpus (${mb} MB, seed ${seed})"
"$python" bench/make_tokenizer_corpus.py --out "$corpus" --mb "$mb" --seed "$seed"
echo "[${SECONDS}s] == HF tokenizers baseline"
"$python" bench/hf_tokenizer_baseline.py --corpus "$corpus" --tokenizer "$tokenizer" --doc-kb "$doc_kb" \
  --threads "$threads" --repeat "$repeat" --json "$out/hf.json"
echo "[${SECONDS}s] == moetp tokenizer_bench"
status=0
"${bench[@]}" --corpus "$corpus" --tokenizer "$tokenizer" --doc-kb "$doc_kb" --threads "$threads" \
  --repeat "$repeat" --baseline "$out/hf.json" --json "$out/moetp.json" | tee "$out/moetp.txt" || status=$?
echo "[${SECONDS}s] results in $out (hf.json, moetp.json, moetp.txt)"
exit "$status"
