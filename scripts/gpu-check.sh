#!/usr/bin/env bash
# One command to check a GPU host: unpacks the bundle made by scripts/device-bundle.sh (binaries
# built on the development machine), runs every GPU test, then the Hugging Face parity fixture
# (tools/make_hf_fixture.py, needs PyTorch + transformers) and moetp's round trip of it, and prints
# a short table. Output files go to ${OUT:-/tmp/moetp-out}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/moetp-out}
mkdir -p "$out" /tmp/moetp-bundle
tar -xJf .device-bundle/bundle.tar.xz -C /tmp/moetp-bundle
run=/tmp/moetp-bundle/run.sh
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
declare -a rows
gpus=$(nvidia-smi -L | wc -l)
tests=$(cd /tmp/moetp-bundle/bin && ls | grep -E '^cuda_.*_test$|_cuda_test$' | sort)
for t in $tests comm_nccl_collectives_test; do
  start=$SECONDS
  if [ "$t" = comm_nccl_collectives_test ]; then
    [ "$gpus" -ge 2 ] || continue
    np=$(( gpus >= 4 ? 4 : 2 ))
    "$run" orterun -np "$np" --oversubscribe --bind-to none --mca btl self,vader \
      --mca btl_vader_single_copy_mechanism none "$run" "$t" >"$out/$t.log" 2>&1
    t="$t (np $np)"
  else
    "$run" "$t" >"$out/$t.log" 2>&1
  fi
  rc=$?
  secs=$((SECONDS - start))
  log="$out/${t%% *}.log"
  summary=$(grep -E "PASSED|FAILED  \]" "$log" | sed 's/\x1b\[[0-9;]*m//g' | sort -u | tr '\n' ' ')
  rows+=("$(printf '%-36s rc=%d %4ds  %s' "$t" "$rc" "$secs" "$summary")")
done
if [ "${SKIP_FIXTURE:-0}" != 1 ]; then
  fx=/tmp/moetp-fixture
  rm -rf "$fx"
  python3 tools/make_hf_fixture.py "$fx" >"$out/fixture.log" 2>&1; rc=$?
  rows+=("$(printf '%-22s rc=%d  %s' make_hf_fixture "$rc" "$(tail -1 "$out/fixture.log")")")
  if [ $rc = 0 ]; then
    "$run" moetp convert --from hf --to hf "$fx/model" "$fx/moetp_saved" >"$out/convert.log" 2>&1; rc=$?
    rows+=("$(printf '%-22s rc=%d  %s' moetp_convert "$rc" "$(tail -1 "$out/convert.log")")")
    python3 tools/make_hf_fixture.py --check "$fx" "$fx/moetp_saved" >"$out/check.log" 2>&1; rc=$?
    rows+=("$(printf '%-22s rc=%d  %s' hf_reload_check "$rc" "$(tail -1 "$out/check.log")")")
    tar -C "$fx" -czf "$out/fixture.tgz" model fixture.safetensors
  fi
fi
echo "==== moetp gpu-check ===="
printf '%s\n' "${rows[@]}"
