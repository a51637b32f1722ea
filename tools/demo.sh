#!/usr/bin/env bash
# The main job, end to end (run as root): installs what it needs, builds lazyblk, builds a real Debian
# rootfs layer, converts it to a lazyblk blob, verifies it, exposes it as a block device with the best
# backend available today (loop on the exported image: the lazy ublk/NBD/FUSE-loop backends are not
# built yet), mounts it read-only and reads from it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  echo "run as root (it mounts a filesystem): sudo $0" >&2
  exit 1
fi
need=()
for t in debootstrap:debootstrap e2fsck:e2fsprogs mount:mount zstd:zstd; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
bin=target/release/lazyblk
tools/make-rootfs-layer.sh .cache rootfs
work=.cache/demo
mkdir -p "$work"
echo "== convert: Debian rootfs layer (tar.gz) -> lazyblk blob"
$bin layer convert .cache/rootfs.tar.gz -o "$work/rootfs.blob"
echo "== inspect + verify every chunk"
$bin layer inspect --verify "$work/rootfs.blob"
echo "== export (verified) and attach with loop"
$bin layer export "$work/rootfs.blob" -o "$work/rootfs.img"
mnt="$work/mnt"
mkdir -p "$mnt"
mountpoint -q "$mnt" && umount "$mnt"
mount -t ext4 -o loop,ro "$work/rootfs.img" "$mnt"
trap 'umount "$mnt"' EXIT
echo "device: $(findmnt -no SOURCE "$mnt")  mounted at $mnt"
echo "== read from it"
cat "$mnt/etc/os-release"
ls "$mnt"
du -sh --apparent-size "$mnt/usr" 2>/dev/null
echo "demo OK"
