#!/usr/bin/env bash
# Trains one configuration at several expert layouts and prints the losses side by side: the
# comparison of issue 8 (ep x etp with the vexpert and all2all dispatchers against an ep-only
# baseline, same global batch and seed), on the CPU or the GPUs (pass --set train.device=...).
#
#   NP=8 scripts/layout-compare.sh 2x4:vexpert 2x4:all2all 8x1:all2all -- --set train.steps=21
#
# Each layout PxT:DISPATCHER runs `mpirun -np $NP moetp train --set parallel.ep=P --set
# parallel.etp=T --set moe.dispatcher=DISPATCHER <args after -->` into its own run directory
# under ${OUT_DIR:-runs/layout-compare}; then a table of the loss per step, one column per layout,
# the step-1 difference of each layout to the first, tokens/s and model TFLOP/s per rank (medians
# over steps >= 2) and, on GPUs, the peak memory per GPU (largest over ranks and steps).
set -euo pipefail
cd "$(dirname "$0")/.."
layouts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do layouts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#layouts[@]} -ge 1 ] || { echo "usage: NP=8 $0 PxT:DISPATCHER ... [-- moetp train args]" >&2; exit 2; }
np=${NP:-8}
out=${OUT_DIR:-runs/layout-compare}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
moetp=${MOETP:-${BUILD_DIR:-build}/moetp}
dirs=()
for l in "${layouts[@]}"; do
  pt=${l%%:*}; disp=${l#*:}; p=${pt%%x*}; t=${pt#*x}
  [[ "$l" == *:* && "$pt" == *x* ]] || { echo "layout '$l' is not PxT:DISPATCHER (e.g. 2x4:vexpert)" >&2; exit 2; }
  dir="$out/ep${p}_etp${t}_${disp}"
  rm -rf "$dir"
  echo "== $l: mpirun -np $np moetp train --set parallel.ep=$p --set parallel.etp=$t --set moe.dispatcher=$disp $*"
  ${MPIRUN:-mpirun} -np "$np" --oversubscribe --bind-to none --mca btl self,vader \
    --mca btl_vader_single_copy_mechanism none "$moetp" train --set parallel.ep="$p" --set parallel.etp="$t" \
    --set moe.dispatcher="$disp" --run-dir "$dir" "$@" | grep -E '^device|^done|error' || true
  [ -s "$dir/metrics.jsonl" ] || { echo "no metrics from $l (see the output above)" >&2; exit 1; }
  dirs+=("$dir")
done
python3 - "$np" "${dirs[@]}" <<'PY'
import json, statistics, sys
np_ = int(sys.argv[1]); dirs = sys.argv[2:]
runs = [[json.loads(l) for l in open(d + "/metrics.jsonl")] for d in dirs]
names = [d.rsplit("/", 1)[-1] for d in dirs]
w = max(12, max(len(n) for n in names) + 1)
print("step  " + "".join(f"{n:>{w}}" for n in names))
for i in range(max(len(r) for r in runs)):
    cells = [f"{r[i]['loss']:>{w}.6f}" if i < len(r) else " " * w for r in runs]
    print(f"{i + 1:>4}  " + "".join(cells))
first = runs[0][0]["loss"]
for n, r in zip(names, runs):
    timed = r[1:] or r[:1]  # step 1 includes warm-up work
    tps = statistics.median(m["tokens_per_s"] for m in timed) / np_
    tflops = statistics.median(m.get("model_tflops_per_rank", 0.0) for m in timed)
    mem = max((m["peak_mem_gb"] for m in r if "peak_mem_gb" in m), default=None)
    mem_s = f", peak memory {mem:.2f} GB per GPU" if mem is not None else ""
    print(f"{n}: step-1 loss {r[0]['loss']:.6f} (vs {names[0]}: {r[0]['loss'] - first:+.2e}), "
          f"tokens/s per rank {tps:.4g}, model TFLOP/s per rank {tflops:.4g}{mem_s} (medians over steps >= 2)")
PY
