#!/usr/bin/env bash
# Builds real test images in an OCI layout with umoci (run as root):
#   LAYOUT:base   one layer: the Debian rootfs from tools/make-rootfs-layer.sh
#   LAYOUT:v2     base + a layer that deletes files and replaces a directory
#   LAYOUT:multi  an image index: v2 for linux/amd64 and the same rootfs declared linux/arm64
#
#   tools/make-test-image.sh ROOTFS_TAR LAYOUT
set -euo pipefail
rootfs_tar=$1
layout=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:base"
umoci unpack --image "$layout:base" "$work/b"
tar --xattrs --xattrs-include='*' --numeric-owner -xpf "$rootfs_tar" -C "$work/b/rootfs"
umoci config --image "$layout:base" --config.cmd /bin/sh --architecture amd64 --os linux
umoci repack --image "$layout:base" "$work/b"
rm -rf "$work/b"
# Second layer, on top of base: deletions (whiteouts) and a replaced directory.
umoci unpack --image "$layout:base" "$work/b2"
r="$work/b2/rootfs"
rm -rf "$r/usr/share/doc" "$r/etc/motd" "$r/usr/bin/perl"*
rm -rf "$r/etc/apt"
mkdir -p "$r/etc/apt"
echo "replaced by layer 2" >"$r/etc/apt/NEW"
mkdir -p "$r/srv/app"
echo '<h1>lazyblk</h1>' >"$r/srv/app/index.html"
umoci repack --image "$layout:v2" "$work/b2"
# A second platform: same layers, a config that says arm64.
umoci config --image "$layout:v2" --architecture arm64 --tag v2-arm64
python3 - "$layout" <<'PY'
import hashlib, json, os, sys
layout = sys.argv[1]
idx = json.load(open(os.path.join(layout, "index.json")))
by = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in idx["manifests"]}
entries = []
for tag, arch in (("v2", "amd64"), ("v2-arm64", "arm64")):
    d = dict(by[tag]); d.pop("annotations", None)
    d["platform"] = {"architecture": arch, "os": "linux"}
    entries.append(d)
body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}).encode()
dg = hashlib.sha256(body).hexdigest()
open(os.path.join(layout, "blobs/sha256", dg), "wb").write(body)
idx["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + dg, "size": len(body),
                         "annotations": {"org.opencontainers.image.ref.name": "multi"}})
json.dump(idx, open(os.path.join(layout, "index.json"), "w"))
PY
echo "built $layout: base, v2, v2-arm64, multi" >&2
