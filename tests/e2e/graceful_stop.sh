#!/usr/bin/env bash
# End-to-end: SIGUSR1 on one rank of a 2-rank training job (raised by that rank after step 5, through
# the MOETP_TEST_SIGNAL_AT_STEP hook, so the test does not race the job) stops every rank after that
# step with a checkpoint and exit status 75; `--resume auto` then finishes the run with the same
# losses, bit for bit, as a run that was never stopped (CPU). Usage: graceful_stop.sh MOETP REPO
set -euo pipefail
moetp=$(realpath "$1")
repo=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$repo"
mpi=(mpirun -np 2 --oversubscribe --bind-to none)
common=(train --set parallel.ep=2 --set train.steps=12 --set train.seq_len=32 --set train.device=cpu)
"${mpi[@]}" "$moetp" "${common[@]}" --run-dir "$work/straight" > "$work/straight.log" 2>&1 ||
  { cat "$work/straight.log"; exit 1; }

rc=0
MOETP_TEST_SIGNAL_AT_STEP=5 "${mpi[@]}" "$moetp" "${common[@]}" --run-dir "$work/stopped" > "$work/stopped.log" 2>&1 ||
  rc=$?
cat "$work/stopped.log"
[ "$rc" -eq 75 ] || { echo "FAIL: exit status $rc, expected 75"; exit 1; }
grep -q "stopped by signal 10" "$work/stopped.log" || { echo "FAIL: no stop message"; exit 1; }
stop_step=$(wc -l < "$work/stopped/metrics.jsonl")
[ "$stop_step" -eq 5 ] || { echo "FAIL: stopped after step $stop_step, expected 5"; exit 1; }
[ -f "$work/stopped/checkpoints/step-$(printf %08d "$stop_step")/trainer_state.json" ] ||
  { echo "FAIL: no checkpoint at step $stop_step"; ls "$work/stopped/checkpoints"; exit 1; }

"${mpi[@]}" "$moetp" "${common[@]}" --run-dir "$work/stopped" --resume auto > "$work/resumed.log" 2>&1 ||
  { cat "$work/resumed.log"; exit 1; }
grep -q "resumed from .*step-$(printf %08d "$stop_step") at step $stop_step" "$work/resumed.log" ||
  { echo "FAIL: did not resume at step $stop_step"; cat "$work/resumed.log"; exit 1; }
# Every step's loss, as metrics.jsonl records it (full precision), equals the uninterrupted run's.
python3 - "$work/straight/metrics.jsonl" "$work/stopped/metrics.jsonl" <<'PY'
import json, sys
def losses(path):
    out = {}
    for line in open(path):
        j = json.loads(line)
        if "loss" in j:
            out[j["step"]] = j["loss"]
    return out
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert sorted(a) == list(range(1, 13)), "straight run steps"
assert sorted(b) == list(range(1, 13)), f"stopped + resumed steps: {sorted(b)[:5]}... ({len(b)})"
diff = [s for s in a if a[s] != b[s]]
assert not diff, f"losses differ at steps {diff[:5]}: {a[diff[0]]} vs {b[diff[0]]}"
print("losses identical over 12 steps")
PY
echo "e2e graceful stop: OK"
