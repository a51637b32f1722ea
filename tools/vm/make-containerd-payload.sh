#!/usr/bin/env bash
# Payload for the snapshotter test in the VM (tools/vm/guest-containerd.sh): containerd 1.6, its runc
# shim, ctr, runc and docker-registry from the host's Debian packages, and a registry storage holding
# a small converted image (static busybox, an index.html, 40 data files with their SHA256SUMS).
#   LAZYBLK_BIN=... tools/vm/make-containerd-payload.sh PAYLOAD_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1
bin=${LAZYBLK_BIN:-target/release/lazyblk}
work=$(mktemp -d)
cleanup() { [[ -n "${reg:-}" ]] && kill "$reg" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$out/bin"
for b in /usr/bin/containerd /usr/bin/containerd-shim-runc-v2 /usr/bin/ctr /usr/sbin/runc /usr/bin/docker-registry; do
  cp "$b" "$out/bin/"
done
# The image.
umoci init --layout "$work/layout" >/dev/null
umoci new --image "$work/layout:tiny" >/dev/null
umoci unpack --image "$work/layout:tiny" "$work/b" >/dev/null
r=$work/b/rootfs
mkdir -p "$r/bin" "$r/srv/app" "$r/data" "$r/tmp" "$r/etc"
cp /bin/busybox "$r/bin/busybox"
for a in sh cat sha256sum ls httpd sleep md5sum wc; do ln -s busybox "$r/bin/$a"; done
echo '<h1>lazyblk in a VM</h1>' >"$r/srv/app/index.html"
for i in $(seq 0 39); do head -c $((40000 + i * 1500)) /dev/urandom >"$r/data/f$i"; done
(cd "$r" && sha256sum data/* >data/SHA256SUMS)
cp "$r/data/SHA256SUMS" "$out/SHA256SUMS"
umoci config --image "$work/layout:tiny" --config.cmd /bin/sh --architecture amd64 --os linux >/dev/null
umoci repack --image "$work/layout:tiny" "$work/b" >/dev/null
# A registry on the host to convert into; its storage becomes the guest's registry storage.
mkdir -p "$out/registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
  "$PWD/$out/registry" "$port" >"$work/reg.yml"
[[ "$out" = /* ]] && sed -i "s|rootdirectory: .*|rootdirectory: $out/registry|" "$work/reg.yml"
docker-registry serve "$work/reg.yml" >/dev/null 2>&1 &
reg=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:tiny" "docker://127.0.0.1:$port/test/tiny:v1"
"$bin" convert "127.0.0.1:$port/test/tiny:v1" "127.0.0.1:$port/test/tiny:lazyblk" --plain-http >/dev/null
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /payload/registry\nhttp:\n  addr: 127.0.0.1:5000\n' >"$out/registry.yml"
cp tools/vm/containerd.toml "$out/containerd.toml"
du -sh "$out" >&2
