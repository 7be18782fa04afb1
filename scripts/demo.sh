#!/usr/bin/env bash
# Quick-start command 1: installs dependencies, builds, and runs the default training demo: the
# tiny Qwen3-MoE model (configs/tiny-moe.json) on the bundled King James corpus as a 4-rank MPI
# job with expert parallel 2 x expert tensor parallel 2: on the CPU, or on the GPUs when every rank
# has one (train.device=auto; the banner says which). Extra arguments go to
# `moetp train` (e.g. --set train.steps=50). Set NP=1 for a single-process run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/build.sh >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
np=${NP:-4}
layout=()
if [ "$np" = 4 ]; then layout=(--set parallel.ep=2 --set parallel.etp=2); fi
exec mpirun -np "$np" --oversubscribe --bind-to none --mca btl self,vader --mca btl_vader_single_copy_mechanism none \
  "${BUILD_DIR:-build}/moetp" train "${layout[@]}" "$@"
