#!/usr/bin/env bash
# Builds a real Debian rootfs (debootstrap --variant=minbase) and packs it as an OCI-style layer tar
# (numeric owners, xattrs, sorted names), like a base image layer. Cached: a second run reuses the tar.
#
#   tools/make-rootfs-layer.sh [OUT_DIR [NAME [PACKAGES]]]
#     -> OUT_DIR/NAME.tar and OUT_DIR/NAME.tar.gz   (defaults: .cache, rootfs, no extra packages)
#   e.g. tools/make-rootfs-layer.sh .cache numpy python3-numpy
set -euo pipefail
out=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.cache"}
name=${2:-rootfs}
include=${3:-}
suite=${LAZYBLK_DEBIAN_SUITE:-bookworm}
mirror=${LAZYBLK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$out"
if [[ -s "$out/$name.tar" && -s "$out/$name.tar.gz" ]]; then
  echo "layer cached: $out/$name.tar" >&2
  exit 0
fi
root="$out/$name.root"
if [[ ! -x "$root/usr/bin/dpkg" ]]; then
  rm -rf "$root"
  echo "debootstrap --variant=minbase $suite ${include:+--include=$include }(a minute or two)..." >&2
  debootstrap --variant=minbase ${include:+--include="$include"} "$suite" "$root" "$mirror" \
    >"$out/$name.debootstrap.log" 2>&1 || { tail -20 "$out/$name.debootstrap.log" >&2; exit 1; }
fi
# Like the official Debian images: no downloaded packages or apt lists in the layer.
find "$root/var/cache/apt/archives" -name '*.deb' -delete
rm -rf "$root/var/lib/apt/lists/"*
tar --xattrs --xattrs-include='*' --numeric-owner --sort=name -C "$root" -cf "$out/$name.tar.tmp" .
mv "$out/$name.tar.tmp" "$out/$name.tar"
gzip -6 -c "$out/$name.tar" >"$out/$name.tar.gz.tmp"
mv "$out/$name.tar.gz.tmp" "$out/$name.tar.gz"
ls -l "$out/$name.tar" "$out/$name.tar.gz" >&2
