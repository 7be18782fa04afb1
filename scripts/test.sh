#!/usr/bin/env bash
# Quick-start command 2: installs dependencies, builds, and runs the whole test suite
# (labels unit, dist, e2e; cuda tests run where a GPU is visible and report "skipped" elsewhere).
# Exits non-zero if any test fails. Extra arguments go to ctest (e.g. -L dist, -R mesh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure -j "${JOBS:-$(nproc)}" "$@"
