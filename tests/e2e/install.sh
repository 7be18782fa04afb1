#!/usr/bin/env bash
# End-to-end: `cmake --install` puts moetp, its configs, the demo corpus, the docs and the license
# under a prefix, and the installed binary trains the default demo from any directory; --version
# names the commit and backends. Usage: install.sh BUILD_DIR
set -euo pipefail
build=$1
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" > "$prefix/install.log"
for f in bin/moetp share/moetp/configs/tiny-moe.json share/moetp/data/kjv.tokens share/doc/moetp/LICENSE \
         share/doc/moetp/README.md share/doc/moetp/data.md; do
  [ -f "$prefix/$f" ] || { echo "FAIL: $f not installed"; cat "$prefix/install.log"; exit 1; }
done
"$prefix/bin/moetp" --version | grep -qE "^moetp [0-9]+\.[0-9]+\.[0-9]+ \(commit [0-9a-f]+" ||
  { echo "FAIL: --version: $("$prefix/bin/moetp" --version)"; exit 1; }
cd "$prefix"
out=$("$prefix/bin/moetp" train --set train.steps=2 --set train.seq_len=32 --set train.device=cpu --run-dir "$prefix/run" 2>&1)
grep -q "model $prefix/share/moetp/configs/tiny-moe.json, data $prefix/share/moetp/data/kjv.tokens" <<<"$out" ||
  { echo "FAIL: the installed defaults were not found"; echo "$out"; exit 1; }
grep -q "step     2/2" <<<"$out" || { echo "FAIL: no training"; echo "$out"; exit 1; }
echo "e2e install: OK"
