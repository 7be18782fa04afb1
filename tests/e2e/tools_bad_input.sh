#!/usr/bin/env bash
# End-to-end: `moetp convert` and `moetp eval` refuse weights holding NaN or Inf (naming the tensor)
# unless --allow-nonfinite, and eval names the token file whose vocabulary the model lacks.
# Usage: tools_bad_input.sh MOETP REPO
set -euo pipefail
moetp=$(realpath "$1")
repo=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$repo"
"$moetp" train --set train.steps=1 --set train.seq_len=32 --set checkpoint.every=1 --set train.device=cpu \
  --run-dir "$work/r" > "$work/train.log" 2>&1 || { cat "$work/train.log"; exit 1; }
"$moetp" convert --from native --to hf "$work/r/checkpoints/step-00000001" "$work/hf" > /dev/null
"$moetp" eval --model "$work/hf" --data data/kjv.tokens --seq-len 32 --num-sequences 2 | grep -q "loss" ||
  { echo "FAIL: eval of the clean export"; exit 1; }

# Poison one element of model.norm.weight with NaN (the safetensors header gives its offset).
cp -r "$work/hf" "$work/nan"
python3 - "$work/nan" <<'PY'
import json, os, struct, sys
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    if not name.endswith(".safetensors"):
        continue
    path = os.path.join(d, name)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        if "model.norm.weight" not in header:
            continue
        t = header["model.norm.weight"]
        size = 4 if t["dtype"] == "F32" else 2
        f.seek(8 + n + t["data_offsets"][0] + 2 * size)
        f.write(struct.pack("<I", 0x7FC00000) if size == 4 else struct.pack("<H", 0x7FC0))
        sys.exit(0)
sys.exit("model.norm.weight not found")
PY
if err=$("$moetp" convert --from hf --to hf "$work/nan" "$work/out" 2>&1); then echo "FAIL: NaN weights converted"; exit 1; fi
grep -q "parameter 'model.norm.weight' holds nan at element 2" <<<"$err" || { echo "FAIL: convert error: $err"; exit 1; }
grep -q -- "--allow-nonfinite" <<<"$err" || { echo "FAIL: convert error lacks the option: $err"; exit 1; }
[ ! -e "$work/out" ] || { echo "FAIL: a refused convert wrote output"; exit 1; }
"$moetp" convert --from hf --to hf --allow-nonfinite "$work/nan" "$work/out" > /dev/null
if err=$("$moetp" eval --model "$work/nan" --data data/kjv.tokens --seq-len 32 --num-sequences 2 2>&1); then
  echo "FAIL: NaN weights evaluated"; exit 1
fi
grep -q "model.norm.weight" <<<"$err" || { echo "FAIL: eval error: $err"; exit 1; }

# A model whose vocabulary is smaller than the token file's.
cp -r "$work/hf" "$work/small"
sed -i 's/"vocab_size": 256/"vocab_size": 64/' "$work/small/config.json"
if err=$("$moetp" eval --model "$work/small" --data data/kjv.tokens 2>&1); then echo "FAIL: vocab mismatch accepted"; exit 1; fi
grep -q "token file 'data/kjv.tokens' has vocabulary size 256 but the model .* has vocab_size 64" <<<"$err" ||
  { echo "FAIL: eval vocab error: $err"; exit 1; }
echo "e2e tools bad input: OK"
