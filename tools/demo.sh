#!/usr/bin/env bash
# The small example (run as root; tools/main-job.sh is the main job): installs what it needs, builds lazyblk, builds a real Debian
# rootfs layer, converts it to a lazyblk blob, verifies it, attaches it lazily as a block device with the
# best backend this kernel has (ublk, else kernel NBD, else loop over a one-file FUSE export), mounts it
# read-only, reads from it and detaches.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "run as root (it mounts a filesystem)" >&2; exit 1; }
  exec sudo -E PATH="$PATH" "$0" "$@"
fi
tools/install-deps.sh
cargo build --release --quiet
bin=target/release/lazyblk
tools/make-rootfs-layer.sh .cache rootfs
work=.cache/demo
mkdir -p "$work"
echo "== convert: Debian rootfs layer (tar.gz) -> lazyblk blob"
$bin layer convert --json .cache/rootfs.tar.gz -o "$work/rootfs.blob" >"$work/convert.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("  layer %s (%d bytes) -> blob %s (%d bytes) in %.2fs" % (d["input"]["digest"], d["input"]["bytes"], d["blob"]["digest"], d["blob"]["size"], d["seconds"]))' "$work/convert.json"
# What an OCI descriptor would carry: the index location and digest, chaining every chunk to the manifest.
index_args=$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["annotations"]; p="containerd.io/snapshot/lazyblk/"; print("--index-offset %s --index-length %s --index-digest %s" % (a[p+"index-offset"], a[p+"index-length"], a[p+"index-digest"]))' "$work/convert.json")
echo "== inspect + verify every chunk"
$bin layer inspect --verify "$work/rootfs.blob"
echo "== attach lazily as a block device (best backend this kernel has) and mount read-only"
mnt="$work/mnt"
run="$work/run"
mkdir -p "$mnt"
mountpoint -q "$mnt" && umount "$mnt"
$bin attach "$work/rootfs.blob" $index_args --backend auto --mount "$mnt" --run-dir "$run" >"$work/attach.out" &
attach_pid=$!
trap '$bin detach all --run-dir "$run" >/dev/null 2>&1 || kill $attach_pid 2>/dev/null' EXIT
for _ in $(seq 1 100); do [[ -s "$work/attach.out" ]] && break; sleep 0.1; done
echo "device: $(cat "$work/attach.out")  mounted at $mnt"
$bin ls --run-dir "$run"
echo "== read from it"
cat "$mnt/etc/os-release"
ls "$mnt"
du -sh --apparent-size "$mnt/usr" 2>/dev/null
$bin detach all --run-dir "$run"
wait $attach_pid
trap - EXIT
echo "demo OK"
