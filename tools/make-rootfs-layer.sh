#!/usr/bin/env bash
# Builds a real Debian rootfs (debootstrap --variant=minbase) and packs it as an OCI-style layer tar
# (numeric owners, xattrs, as containerd's differ would). Cached: a second run reuses the tar.
#
#   tools/make-rootfs-layer.sh [OUT_DIR]      -> OUT_DIR/rootfs.tar, OUT_DIR/rootfs.tar.gz
set -euo pipefail
out=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.cache"}
suite=${LAZYBLK_DEBIAN_SUITE:-bookworm}
mirror=${LAZYBLK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$out"
if [[ -s "$out/rootfs.tar" && -s "$out/rootfs.tar.gz" ]]; then
  echo "rootfs layer cached: $out/rootfs.tar" >&2
  exit 0
fi
if [[ ! -x "$out/rootfs/usr/bin/dpkg" ]]; then
  rm -rf "$out/rootfs"
  echo "debootstrap --variant=minbase $suite (a minute or two)..." >&2
  debootstrap --variant=minbase "$suite" "$out/rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
fi
# Like the official Debian images: no downloaded packages or apt lists in the layer.
find "$out/rootfs/var/cache/apt/archives" -name '*.deb' -delete
rm -rf "$out/rootfs/var/lib/apt/lists/"*
tar --xattrs --xattrs-include='*' --numeric-owner --sort=name -C "$out/rootfs" -cf "$out/rootfs.tar.tmp" .
mv "$out/rootfs.tar.tmp" "$out/rootfs.tar"
gzip -6 -c "$out/rootfs.tar" >"$out/rootfs.tar.gz.tmp"
mv "$out/rootfs.tar.gz.tmp" "$out/rootfs.tar.gz"
ls -l "$out/rootfs.tar" "$out/rootfs.tar.gz" >&2
