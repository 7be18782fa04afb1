#!/usr/bin/env bash
# Packs what a GPU host needs to run moetp's GPU tests and tools without building there: the
# executables of a CUDA build (default build-gpu/) and the shared libraries they need that a bare
# CUDA image lacks (OpenBLAS, OpenMPI, spdlog, fmt, ...; not glibc, not the CUDA libraries, which
# the host has). Output: .device-bundle/bundle.tar.xz (git-ignored). On the host:
#   tar -xJf .device-bundle/bundle.tar.xz -C /tmp/moetp && /tmp/moetp/run.sh <command>
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build-gpu}
out=.device-bundle
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/lib" "$out"
bins=("$build/moetp")
while IFS= read -r f; do bins+=("$f"); done < <(find "$build/tests" "$build/bench" -type f -perm -u+x \( -name '*cuda_*' -o -name '*_bench' -o -name 'comm_nccl_*' -o -name 'backend_parity_test' \) 2>/dev/null)
for b in "${bins[@]}"; do
  cp "$b" "$stage/bin/"
  strip --strip-unneeded "$stage/bin/$(basename "$b")" 2>/dev/null || true
done
# Shared libraries outside glibc and CUDA, resolved on this machine.
for b in "${bins[@]}"; do
  ldd "$b" | awk '/=> \// {print $3}'
done | sort -u | grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux|libgcc_s|libstdc\+\+)[.-]|/libcuda|/libcublas|/libcudart|/libnccl|/libnvidia' |
  while IFS= read -r lib; do cp -L "$lib" "$stage/lib/"; done
# libstdc++ and libgcc_s from this machine (the host's may be older or newer; ours matches the build).
for l in libstdc++.so.6 libgcc_s.so.1; do cp -L "$(ldconfig -p | awk -v l=$l '$1==l {print $NF; exit}')" "$stage/lib/"; done
# OpenMPI's plugins, needed by mpirun-launched binaries.
if [ -d /usr/lib/x86_64-linux-gnu/openmpi ]; then cp -a /usr/lib/x86_64-linux-gnu/openmpi "$stage/lib/openmpi"; fi
if [ -d /usr/lib/x86_64-linux-gnu/pmix2 ]; then cp -a /usr/lib/x86_64-linux-gnu/pmix2 "$stage/lib/pmix2"; fi
# Open MPI's launcher (single node: it forks the ranks itself) and its help texts.
for b in orterun orted; do [ -x /usr/bin/$b ] && cp -L /usr/bin/$b "$stage/bin/"; done
[ -d /usr/share/openmpi ] && cp -a /usr/share/openmpi "$stage/share-openmpi"
cat > "$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs a bundled command with the bundled libraries: run.sh cuda_ops_test [args]
# Multi-rank: run.sh orterun -np 4 --oversubscribe "$here/run.sh" comm_nccl_collectives_test
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$here/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
# A single process initialises MPI as a singleton; point Open MPI and PMIx at the bundled plugins.
export OMPI_MCA_mca_base_component_path="$here/lib/openmpi/lib/openmpi3"
export PMIX_MCA_mca_base_component_path="$here/lib/pmix2/lib/pmix"
export OMPI_MCA_mca_base_component_show_load_errors=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPAL_PKGDATADIR="$here/share-openmpi" PATH="$here/bin:$PATH"
cmd=$1; shift
exec "$here/bin/$cmd" "$@"
RUN
chmod +x "$stage/run.sh"
tar -C "$stage" -cJf "$out/bundle.tar.xz" .
rm -rf "$stage"
ls -la "$out/bundle.tar.xz"
