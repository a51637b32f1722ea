#!/usr/bin/env bash
# The test command from the README: installs what the tests need (Debian packages; containerd 2.x
# unpacked from Debian sid), builds a Debian rootfs layer once (cached in .cache/), then runs every test
# of the workspace — loop mounts, real registries, containerd 1.6 and 2.x, the real-kernel VM — as root.
#   tools/test.sh [cargo test args...]      (as root; re-runs itself with sudo if you are not)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "run as root (loop mounts, block devices, containerd)" >&2; exit 1; }
  exec sudo -E PATH="$PATH" "$0" "$@"
fi
tools/install-deps.sh
# tests/registries.rs installs a test CA into the system store and removes it when done; should a test
# die before that, nothing of it survives this script.
cleanup_test_cas() {
  if compgen -G "/usr/local/share/ca-certificates/lazyblk-test-*.crt" >/dev/null; then
    rm -f /usr/local/share/ca-certificates/lazyblk-test-*.crt
    update-ca-certificates --fresh >/dev/null 2>&1 || true
  fi
}
trap cleanup_test_cas EXIT
if [[ -z "${LAZYBLK_CONTAINERD2_DIR:-}" ]]; then
  LAZYBLK_CONTAINERD2_DIR=$(tools/get-containerd2.sh)
  export LAZYBLK_CONTAINERD2_DIR
fi
if [[ -z "${LAZYBLK_ROOTFS_TAR:-}" ]]; then
  tools/make-rootfs-layer.sh .cache
  export LAZYBLK_ROOTFS_TAR="$PWD/.cache/rootfs.tar"
fi
# Every tool is installed now: a test that still cannot find one fails instead of skipping.
export LAZYBLK_REQUIRE_ALL=1
cargo test --workspace "$@"
