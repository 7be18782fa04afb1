#!/usr/bin/env bash
# Configures and builds moetp into ${BUILD_DIR:-build} (Release; CUDA backend when nvcc is found).
# Extra arguments go to CMake's configure step, e.g. scripts/build.sh -DMOETP_WITH_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} "$@" >"$build_dir.configure.log" 2>&1 \
  || { cat "$build_dir.configure.log"; exit 1; }
grep -E "moetp:" "$build_dir.configure.log" || true
cmake --build "$build_dir" -j "$jobs"
