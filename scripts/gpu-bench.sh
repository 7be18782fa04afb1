#!/usr/bin/env bash
# One command to benchmark a GPU host against PyTorch in the same run: unpacks the bundle made by
# scripts/device-bundle.sh, then for 1 GPU and for every GPU of the host (one rank per GPU):
#   attention fwd+bwd      bench/torch_attention.py                                 vs  attention_cuda_bench
#   MoE layer fwd+bwd      bench/torch_moe_layer.py, bench/torch_moe_layer_dist.py  vs  moe_layer_cuda_bench
#   training step          bench/torch_train_step.py (HF), bench/torch_train_step_dist.py  vs  train_step_cuda_bench
# and prints the tables (each moetp table carries the torch time and the ratio torch/moetp).
# Needs PyTorch (2.11 here) and transformers on the host. Output files go to ${OUT:-/tmp/moetp-bench}.
#   LAYOUTS="2x1,1x2"  the multi-GPU layouts (default: by GPU count, Gx1, 1xG and 2x2 at 4 GPUs)
#   STEPS=N            timed steps of the training-step benchmarks (default 6)
#   ALLOC=direct       the training-step benchmarks with cudaMalloc/cudaFree per tensor (default caching, as moetp train);
#                      ALLOC="direct caching" runs each training-step case with both (an A/B)
#   GEMMS="grouped cublas"  the expert GEMMs to measure (moe.expert_gemm; default both: grouped is
#                      the default, cublas the per-expert cuBLAS loop it replaced)
#   VEXPERT=0          skip the vexpert rows (layer and step at the layouts with etp > 1; default on)
#   SKIP_ATTN=1        skip the attention benchmark
#   PACK=1             pack every output file into one $OUT/gpu-bench.tgz at the end (the device
#                      tool brings back 8 files)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/moetp-bench}
mkdir -p "$out" /tmp/moetp-bundle
[ -x /tmp/moetp-bundle/run.sh ] || tar -xJf .device-bundle/bundle.tar.xz -C /tmp/moetp-bundle
run=/tmp/moetp-bundle/run.sh
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4
gpus=$(nvidia-smi -L | wc -l)
steps=${STEPS:-6}
alloc=${ALLOC:-caching}
gemms=${GEMMS:-grouped cublas}
gemm_list=$(echo $gemms | tr ' ' ',')
mpi=("$run" orterun --oversubscribe --bind-to none --mca btl self,vader --mca btl_vader_single_copy_mechanism none)
trun=(python3 -m torch.distributed.run --nproc-per-node "$gpus")
if [ -z "${LAYOUTS:-}" ]; then
  LAYOUTS="${gpus}x1,1x${gpus}"
  [ "$gpus" -ge 4 ] && LAYOUTS="${gpus}x1,2x2,1x${gpus}"
fi
l4=configs/qwen3-30b-a3b-l4.json
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
if [ "${SKIP_ATTN:-0}" != 1 ]; then
  echo "[${SECONDS}s] == attention fwd+bwd, 1 GPU =="
  python3 bench/torch_attention.py --json "$out/torch_attention.json" >"$out/torch_attention.log" 2>&1 ||
    tail -5 "$out/torch_attention.log"
  "$run" attention_cuda_bench --torch-results "$out/torch_attention.json"
fi
echo "[${SECONDS}s] == MoE layer, 1 GPU (N=8192, H=2048, E=128, K=8) =="
python3 bench/torch_moe_layer.py --skip-check --json "$out/torch_layer.json" >"$out/torch_layer.log" 2>&1 ||
  tail -5 "$out/torch_layer.log"
"$run" moe_layer_cuda_bench --expert-gemm "$gemm_list" --expert-streams 1,4 --torch-results "$out/torch_layer.json" --json "$out/layer.json"
if [ "$gpus" -ge 2 ]; then
  echo "[${SECONDS}s] == MoE layer, $gpus GPUs, layouts $LAYOUTS (N=8192 per GPU, I=768) =="
  "${trun[@]}" bench/torch_moe_layer_dist.py --layouts "$LAYOUTS" --json "$out/torch_layer_dist.json" \
    >"$out/torch_layer_dist.log" 2>&1 || tail -5 "$out/torch_layer_dist.log"
  dispatchers=all2all
  [ "${VEXPERT:-1}" != 0 ] && dispatchers=all2all,vexpert
  "${mpi[@]}" -np "$gpus" "$run" moe_layer_cuda_bench --expert-gemm "$gemm_list" --expert-streams 1 \
    --layouts "$LAYOUTS" --dispatchers "$dispatchers" \
    --torch-results "$out/torch_layer_dist.json" --json "$out/layer_dist.json"
fi
echo "[${SECONDS}s] == training step, 1 GPU =="
python3 bench/torch_train_step.py --steps "$steps" --json "$out/torch_step_hf.json" >"$out/torch_step_hf.log" 2>&1 ||
  tail -5 "$out/torch_step_hf.log"
python3 -m torch.distributed.run --nproc-per-node 1 bench/torch_train_step_dist.py --config $l4 --layouts 1x1 \
  --routing both --steps "$steps" --json "$out/torch_step_1.json" >"$out/torch_step_1.log" 2>&1 || tail -5 "$out/torch_step_1.log"
for g in $gemms; do
  for a in $alloc; do
    "$run" train_step_cuda_bench --expert-gemm "$g" --alloc "$a" --phases --steps "$steps" --layouts 1x1 \
      --torch-results "$out/torch_step_hf.json" --torch-results "$out/torch_step_1.json" --json "$out/step_${g}_$a.json"
  done
done
if [ "$gpus" -ge 2 ]; then
  echo "[${SECONDS}s] == training step, $gpus GPUs, layouts $LAYOUTS =="
  "${trun[@]}" bench/torch_train_step_dist.py --config $l4 --layouts "$LAYOUTS" --routing both --steps "$steps" \
    --json "$out/torch_step_dist.json" >"$out/torch_step_dist.log" 2>&1 || tail -5 "$out/torch_step_dist.log"
  for g in $gemms; do
    for a in $alloc; do
      "${mpi[@]}" -np "$gpus" "$run" train_step_cuda_bench --expert-gemm "$g" --alloc "$a" --phases --config $l4 \
        --steps "$steps" --layouts "$LAYOUTS" --torch-results "$out/torch_step_dist.json" \
        --json "$out/step_dist_${g}_$a.json"
    done
  done
  # vexpert at the layouts that split experts (etp > 1), the default expert GEMM.
  tp_layouts=$(echo "$LAYOUTS" | tr ',' '\n' | grep -v 'x1$' | paste -sd, -)
  if [ "${VEXPERT:-1}" != 0 ] && [ -n "$tp_layouts" ]; then
    "${mpi[@]}" -np "$gpus" "$run" train_step_cuda_bench --dispatcher vexpert --alloc "${alloc%% *}" --phases --config $l4 \
      --steps "$steps" --layouts "$tp_layouts" --torch-results "$out/torch_step_dist.json" --json "$out/step_dist_vexpert.json"
  fi
fi
# PACK=1: everything under $out into one $out/gpu-bench.tgz (the device tool returns only 8 files).
if [ "${PACK:-0}" = 1 ]; then
  tar -C "$out" -czf /tmp/gpu-bench.tgz . && rm -rf "${out:?}"/* && mv /tmp/gpu-bench.tgz "$out/"
fi
