#!/usr/bin/env bash
# End-to-end: a process killed in the middle of a checkpoint save leaves the previous checkpoint
# intact and loadable, and `--resume auto` picks it up; a kill between the renames of a re-saved
# checkpoint is completed by `--resume auto` (the new version recovered, not an older step); a
# resume of a finished run says there is nothing to do. Usage: checkpoint_crash.sh MOETP REPO
set -euo pipefail
moetp=$1
repo=$2
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
cd "$repo"
ck="$run/r/checkpoints"
common=(--set train.seq_len=32 --set checkpoint.every=2 --run-dir "$run/r")
"$moetp" train "${common[@]}" --set train.steps=2 >"$run/first.log" 2>&1 || { cat "$run/first.log"; exit 1; }
[ -f "$ck/step-00000002/trainer_state.json" ] || { echo "FAIL: step-2 checkpoint missing"; exit 1; }
sum_before=$(cat "$ck"/step-00000002/* | md5sum)
# Die inside the save of step 4, with its files half-written (before trainer_state.json).
if MOETP_TEST_CRASH_IN_SAVE=1 "$moetp" train "${common[@]}" --set train.steps=4 --resume auto >"$run/crash.log" 2>&1; then
  echo "FAIL: the crash hook did not fire"; cat "$run/crash.log"; exit 1
fi
[ ! -e "$ck/step-00000004" ] || { echo "FAIL: a half-written step-4 checkpoint took the place of a good one"; exit 1; }
[ "$(cat "$ck"/step-00000002/* | md5sum)" = "$sum_before" ] || { echo "FAIL: step-2 checkpoint changed"; exit 1; }
out=$("$moetp" train "${common[@]}" --set train.steps=3 --resume auto 2>&1)
grep -q "resumed from .*step-00000002 at step 2" <<<"$out" || { echo "FAIL: did not resume from step 2"; echo "$out"; exit 1; }
grep -q "step     3/3" <<<"$out" || { echo "FAIL: step 3 did not run"; echo "$out"; exit 1; }
[ -f "$ck/step-00000003/trainer_state.json" ] || { echo "FAIL: step-3 checkpoint missing"; exit 1; }

# Re-save step 3 (a run resumed from step 2) and die between the renames: step-3 is then only in
# step-00000003.old (the previous save) and step-00000003.tmp (the new, complete one).
if MOETP_TEST_CRASH_IN_SAVE=2 "$moetp" train "${common[@]}" --set train.steps=3 --resume "$ck/step-00000002" \
    >"$run/crash2.log" 2>&1; then
  echo "FAIL: the second crash hook did not fire"; cat "$run/crash2.log"; exit 1
fi
[ ! -e "$ck/step-00000003" ] && [ -d "$ck/step-00000003.old" ] && [ -d "$ck/step-00000003.tmp" ] ||
  { echo "FAIL: the crash did not leave step-3 between its renames"; ls "$ck"; exit 1; }
sum_new=$(cat "$ck"/step-00000003.tmp/* | md5sum)
out=$("$moetp" train "${common[@]}" --set train.steps=4 --resume auto 2>&1)
grep -q "recovered .*step-00000003 from its completed save" <<<"$out" || { echo "FAIL: step-3 not recovered"; echo "$out"; exit 1; }
grep -q "resumed from .*step-00000003 at step 3" <<<"$out" || { echo "FAIL: did not resume from step 3"; echo "$out"; exit 1; }
[ ! -e "$ck/step-00000003.old" ] || { echo "FAIL: step-00000003.old left behind"; exit 1; }
[ "$(cat "$ck"/step-00000003/* | md5sum)" = "$sum_new" ] || { echo "FAIL: the recovered step-3 is not the new save"; exit 1; }

# Resuming a finished run says so and how to go on.
out=$("$moetp" train "${common[@]}" --set train.steps=4 --resume auto 2>&1)
grep -q "nothing to do: the checkpoint is at step 4 and train.steps = 4" <<<"$out" ||
  { echo "FAIL: no message for a finished run"; echo "$out"; exit 1; }
grep -q -- "--set train.steps=8" <<<"$out" || { echo "FAIL: the message does not say how to continue"; echo "$out"; exit 1; }
echo "e2e checkpoint crash: OK"
