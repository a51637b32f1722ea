#!/usr/bin/env bash
# The test command from the README: every test of the workspace, including the ones that loop-mount
# images (run as root) and the real Debian rootfs comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in e2fsck mount tar debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || missing+=("libclang (for libublk's bindgen)")
command -v protoc >/dev/null || missing+=("protoc (containerd's API)")
if ((${#missing[@]})); then
  echo "missing: ${missing[*]} (apt-get install e2fsprogs mount tar debootstrap libclang-dev protobuf-compiler)" >&2
  exit 1
fi
if [[ -z "${LAZYBLK_ROOTFS_TAR:-}" ]]; then
  tools/make-rootfs-layer.sh .cache
  export LAZYBLK_ROOTFS_TAR="$PWD/.cache/rootfs.tar"
fi
cargo test --workspace "$@"
