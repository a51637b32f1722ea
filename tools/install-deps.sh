#!/usr/bin/env bash
# Installs the Debian packages lazyblk's build, tests, demo and benchmarks need (idempotent; as root).
# Called by tools/test.sh, tools/demo.sh and .ci/run, so a fresh machine needs nothing else.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(e2fsprogs mount tar gzip zstd xz-utils debootstrap ca-certificates openssl attr
  docker-registry libnbd-bin nbdkit curl umoci skopeo prometheus
  qemu-system-x86 busybox-static cpio libclang-dev protobuf-compiler containerd runc)
missing=()
for p in "${pkgs[@]}" qemu-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "installing: ${missing[*]}" >&2
apt-get update -qq
# Some machine images carry a backported qemu-utils that Breaks bookworm's qemu-system-common: install
# the system emulator first (apt replaces that qemu-utils), then the matching qemu-utils.
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
