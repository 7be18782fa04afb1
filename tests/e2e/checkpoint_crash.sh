#!/usr/bin/env bash
# End-to-end: a process killed in the middle of a checkpoint save leaves the previous checkpoint
# intact and loadable, and `--resume auto` picks it up. Usage: checkpoint_crash.sh MOETP REPO
set -euo pipefail
moetp=$1
repo=$2
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
cd "$repo"
common=(--set train.seq_len=32 --set checkpoint.every=2 --run-dir "$run/r")
"$moetp" train "${common[@]}" --set train.steps=2 >"$run/first.log" 2>&1 || { cat "$run/first.log"; exit 1; }
[ -f "$run/r/checkpoints/step-00000002/trainer_state.json" ] || { echo "FAIL: step-2 checkpoint missing"; exit 1; }
sum_before=$(cat "$run"/r/checkpoints/step-00000002/* | md5sum)
# Die inside the save of step 4, after its files are written but before the rename.
if MOETP_TEST_CRASH_IN_SAVE=1 "$moetp" train "${common[@]}" --set train.steps=4 --resume auto >"$run/crash.log" 2>&1; then
  echo "FAIL: the crash hook did not fire"; cat "$run/crash.log"; exit 1
fi
[ ! -e "$run/r/checkpoints/step-00000004" ] || { echo "FAIL: a half-written step-4 checkpoint took the place of a good one"; exit 1; }
[ "$(cat "$run"/r/checkpoints/step-00000002/* | md5sum)" = "$sum_before" ] || { echo "FAIL: step-2 checkpoint changed"; exit 1; }
out=$("$moetp" train "${common[@]}" --set train.steps=3 --resume auto 2>&1)
grep -q "resumed from .*step-00000002 at step 2" <<<"$out" || { echo "FAIL: did not resume from step 2"; echo "$out"; exit 1; }
grep -q "step     3/3" <<<"$out" || { echo "FAIL: step 3 did not run"; echo "$out"; exit 1; }
echo "e2e checkpoint crash: OK"
