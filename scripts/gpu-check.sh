#!/usr/bin/env bash
# One command to check a GPU host: unpacks the bundle made by scripts/device-bundle.sh (binaries
# built on the development machine), runs every GPU test, then the Hugging Face parity fixture
# (tools/make_hf_fixture.py, needs PyTorch + transformers) and moetp's round trip of it, and prints
# a short table. Output files go to ${OUT:-/tmp/moetp-out}. One-GPU tests run side by side, one per
# GPU; the multi-rank tests at np 2 in pairs of GPUs side by side, then at np 4.
# Env: SKIP_TRAIN=1, SKIP_FIXTURE=1, TEST_TIMEOUT (seconds per test run, default 420), PACK=1 (pack
# every output file into one $OUT/gpu-check.tgz at the end: the device tool brings back 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/moetp-out}
mkdir -p "$out" /tmp/moetp-bundle
tar -xJf .device-bundle/bundle.tar.xz -C /tmp/moetp-bundle
run=/tmp/moetp-bundle/run.sh
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 MOETP_CONFIGS_DIR=$PWD/configs  # tests that read configs/ (bundle built elsewhere)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
declare -a rows
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
mpi=("$run" orterun --oversubscribe --bind-to none --mca btl self,vader --mca btl_vader_single_copy_mechanism none)
limit=${TEST_TIMEOUT:-420}  # seconds per test run: a hung kernel or collective fails its row, not the script
rowdir="$out/rows"
rm -rf "$rowdir" && mkdir -p "$rowdir"
# One test run: one_test NAME NP GPU_LIST (CUDA_VISIBLE_DEVICES); its row goes to $rowdir.
one_test() {
  local t=$1 np=$2 devs=$3 start=$SECONDS log="$out/$1.np$2.log" rc
  if [ "$np" = 1 ]; then
    CUDA_VISIBLE_DEVICES=$devs timeout "$limit" "$run" "$t" >"$log" 2>&1
  else
    CUDA_VISIBLE_DEVICES=$devs timeout "$limit" "${mpi[@]}" -np "$np" "$run" "$t" >"$log" 2>&1
  fi
  rc=$?
  local summary
  summary=$(grep -E "PASSED|FAILED  \]|SKIPPED" "$log" | sed 's/\x1b\[[0-9;]*m//g' | sort -u | tr '\n' ' ')
  printf '%-36s rc=%d %4ds  %s\n' "$t (np $np)" "$rc" "$((SECONDS - start))" "$summary" >"$rowdir/np$np.$t"
}
# Tests that also run on several ranks (one GPU per rank): np 2 and 4 where the GPUs allow.
multi="comm_nccl_collectives_test cuda_moe_test model_cuda_test"
single=$(cd /tmp/moetp-bundle/bin && ls | grep -E '^cuda_.*_test$|_cuda_test$|^backend_parity_test$' | sort)
# Runs the tests of a list in lanes of `width` GPUs each, side by side (every GPU busy), lane by lane
# sequential: lanes NP WIDTH TEST...
lanes() {
  local np=$1 width=$2; shift 2
  local n=$(( gpus / width )) i=0 t
  [ "$n" -ge 1 ] || return 0
  declare -a lane_tests
  for t in "$@"; do lane_tests[$(( i % n ))]+="$t "; i=$((i + 1)); done
  for ((l = 0; l < n; l++)); do
    local devs
    devs=$(seq -s, $(( l * width )) $(( l * width + width - 1 )))
    ( for t in ${lane_tests[$l]:-}; do one_test "$t" "$np" "$devs"; done ) &
  done
  wait
}
one_gpu=()
for t in $single; do [ "$t" = comm_nccl_collectives_test ] || one_gpu+=("$t"); done
lanes 1 1 "${one_gpu[@]}"
[ "$gpus" -ge 2 ] && lanes 2 2 $multi
[ "$gpus" -ge 4 ] && lanes 4 4 $multi
for f in "$rowdir"/*; do [ -e "$f" ] && rows+=("$(cat "$f")"); done
# Training end to end: `moetp train` on the GPUs (train.device=cuda) and on the CPU, same config.
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  np=$(( gpus >= 4 ? 4 : (gpus >= 2 ? 2 : 1) ))
  layout=(--set parallel.ep=$(( np >= 2 ? 2 : 1 )) --set parallel.etp=$(( np >= 4 ? 2 : 1 )))
  for dev in cuda cpu; do
    start=$SECONDS
    "${mpi[@]}" -np "$np" "$run" moetp train "${layout[@]}" --set train.device=$dev --set train.steps=20 \
      --set train.log_every=19 --run-dir "/tmp/moetp-train-$dev" >"$out/train_$dev.log" 2>&1
    rc=$?
    rows+=("$(printf '%-36s rc=%d %4ds  %s' "moetp train $dev (np $np)" "$rc" "$((SECONDS - start))" \
      "$(grep -E '^step|^done' "$out/train_$dev.log" | tr '\n' ' ' | cut -c1-200)")")
  done
fi
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
printf '%s\n' "${rows[@]}" | tee "$out/summary.txt"
# PACK=1: everything under $out into one $out/gpu-check.tgz (the device tool returns only 8 files).
if [ "${PACK:-0}" = 1 ]; then
  tar -C "$out" -czf /tmp/gpu-check.tgz . && rm -rf "${out:?}"/* && mv /tmp/gpu-check.tgz "$out/"
fi
