#!/usr/bin/env bash
# End-to-end: `moetp train` on 2 ranks (ep=2) for a few steps, from the repository root as a user
# would run it; checks the progress output and the run directory. Usage: train_smoke.sh MOETP REPO
set -euo pipefail
moetp=$1
repo=$2
run_dir=$(mktemp -d)
trap 'rm -rf "$run_dir"' EXIT
cd "$repo"
out=$(mpirun -np 2 --oversubscribe --bind-to none --mca btl self,vader --mca btl_vader_single_copy_mechanism none \
  "$moetp" train --set parallel.ep=2 --set train.steps=4 --set train.seq_len=32 --run-dir "$run_dir/run" 2>&1)
echo "$out"
grep -q "step     4/4 | loss" <<<"$out" || { echo "FAIL: no progress line for step 4"; exit 1; }
grep -q "dispatcher resolved to 'all2all'" <<<"$out" || { echo "FAIL: dispatcher not reported"; exit 1; }
for f in config.json metrics.jsonl loss.svg expert_load.svg; do
  [ -s "$run_dir/run/$f" ] || { echo "FAIL: $f missing in the run directory"; exit 1; }
done
[ "$(wc -l <"$run_dir/run/metrics.jsonl")" -eq 4 ] || { echo "FAIL: metrics.jsonl should have 4 lines"; exit 1; }
grep -q '"grad_norm"' "$run_dir/run/metrics.jsonl" || { echo "FAIL: metrics lack grad_norm"; exit 1; }
grep -qE '"model_tflops_per_rank":[0-9.e-]*[1-9]' "$run_dir/run/metrics.jsonl" || { echo "FAIL: metrics lack a positive model_tflops_per_rank"; exit 1; }
# A mistyped key is an error that suggests the right one.
if err=$("$moetp" train --set train.stepz=3 2>&1); then echo "FAIL: unknown key accepted"; exit 1; fi
grep -q "did you mean 'train.steps'" <<<"$err" || { echo "FAIL: no suggestion in: $err"; exit 1; }
# A world size the mesh cannot use stops every rank with the values named, no hang.
if err=$(mpirun -np 2 --oversubscribe --bind-to none --mca btl self,vader --mca btl_vader_single_copy_mechanism none \
    "$moetp" train --set parallel.ep=4 --run-dir "$run_dir/bad" 2>&1); then echo "FAIL: ep=4 on 2 ranks accepted"; exit 1; fi
grep -q "ep (4)" <<<"$err" || { echo "FAIL: error does not name ep: $err"; exit 1; }
echo "e2e train smoke: OK"
