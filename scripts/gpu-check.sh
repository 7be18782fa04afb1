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
for t in cuda_cast_test cuda_ops_test cuda_attention_test cuda_gemm_test; do
  start=$SECONDS
  "$run" "$t" >"$out/$t.log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  summary=$(grep -E "^\[  (PASSED|FAILED)  \]|tests ran" "$out/$t.log" | tr '\n' ' ')
  rows+=("$(printf '%-22s rc=%d %4ds  %s' "$t" "$rc" "$secs" "$summary")")
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
