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
mpi=("$run" orterun --oversubscribe --bind-to none --mca btl self,vader --mca btl_vader_single_copy_mechanism none)
# Tests that also run on several ranks (one GPU per rank): np 2 and 4 where the GPUs allow.
multi=" comm_nccl_collectives_test cuda_moe_test model_cuda_test "
tests=$(cd /tmp/moetp-bundle/bin && ls | grep -E '^cuda_.*_test$|_cuda_test$' | sort)
for t in $tests comm_nccl_collectives_test; do
  nps=(1)
  [ "$t" = comm_nccl_collectives_test ] && nps=()
  if [[ "$multi" == *" $t "* ]]; then
    for np in 2 4; do [ "$gpus" -ge "$np" ] && nps+=("$np"); done
  fi
  for np in "${nps[@]}"; do
    start=$SECONDS
    log="$out/$t.np$np.log"
    if [ "$np" = 1 ]; then
      "$run" "$t" >"$log" 2>&1
    else
      "${mpi[@]}" -np "$np" "$run" "$t" >"$log" 2>&1
    fi
    rc=$?
    secs=$((SECONDS - start))
    summary=$(grep -E "PASSED|FAILED  \]|SKIPPED" "$log" | sed 's/\x1b\[[0-9;]*m//g' | sort -u | tr '\n' ' ')
    rows+=("$(printf '%-36s rc=%d %4ds  %s' "$t (np $np)" "$rc" "$secs" "$summary")")
  done
done
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
printf '%s\n' "${rows[@]}"
