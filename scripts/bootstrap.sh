#!/usr/bin/env bash
# Installs everything moetp needs to build and test from Debian's packages, then fetches the Qwen3
# tokenizer the tokenizer tests use (scripts/fetch-tokenizer.sh; a failed fetch only warns, and
# those tests then report "skipped"). Idempotent: packages already present are not reinstalled, a
# verified tokenizer is not fetched again, and nothing is downloaded at configure or build time.
set -euo pipefail

pkgs=(
  build-essential cmake ninja-build git pkg-config
  openmpi-bin libopenmpi-dev
  libopenblas-dev
  nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  libpcre2-dev libutf8proc-dev libssl-dev
)

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "bootstrap: all ${#pkgs[@]} packages present"
else
  echo "bootstrap: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  echo "bootstrap: done"
fi

if tokenizer=$("$(dirname "$0")/fetch-tokenizer.sh"); then
  echo "bootstrap: Qwen3 tokenizer at $tokenizer"
else
  echo "bootstrap: warning: could not fetch the Qwen3 tokenizer; its tests will be skipped" >&2
fi
