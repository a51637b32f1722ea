#!/usr/bin/env bash
# Readiness in the real-kernel VM (TCG), on the ublk backend (the best one the guest kernel has) and
# on NBD, beside the AWS SOCI snapshotter (a FUSE peer, Debian sid's soci-snapshotter package):
# containerd 1.6 + runc, docker-registry and the snapshotters all in the guest; the Debian nginx image
# of tools/bench/readiness.py. Modes as there: overlayfs (full pull), lazyblk, lazyblk+trace
# (recorded once in the guest by `lazyblk trace record`, pushed to a second repository holding the
# same converted image), lazyblk+relayout (`lazyblk trace relayout` with that trace) and soci (`soci
# create` + `soci push` in the guest, defaults). Every mode pulls over HTTPS from the guest's
# registry under a host name with a throwaway CA (SOCI reads its index over HTTPS only), as in the
# host benchmark. TCG runs everything ~10x slower than hardware: compare modes within this table only.
#   sudo tools/bench/vm-readiness.sh [RUNS (default 3)]  -> .cache/bench/vm-readiness/results.md
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
cargo build --release -q
bin=$PWD/target/release/lazyblk
out=.cache/bench/vm-readiness
mkdir -p "$out"
work=$(mktemp -d)
cleanup() { [[ -n "${reg:-}" ]] && kill "$reg" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
payload=$work/payload
mkdir -p "$payload/bin"
for b in /usr/bin/containerd /usr/bin/containerd-shim-runc-v2 /usr/bin/ctr /usr/sbin/runc /usr/bin/docker-registry; do
  cp "$b" "$payload/bin/"
done
# The peer: soci + soci-snapshotter-grpc (static Go binaries), and fusermount3 in case its FUSE
# library does not mount directly.
soci_bin=$(tools/get-sid-package.sh "$PWD/.cache/peers/soci" soci-snapshotter)
cp "$soci_bin/soci" "$soci_bin/soci-snapshotter-grpc" "$payload/bin/"
(cd "$work" && apt-get download fuse3 >/dev/null 2>&1 && dpkg-deb -x fuse3_*.deb "$work/fuse3")
cp "$work/fuse3/bin/fusermount3" "$payload/bin/" && ln -s fusermount3 "$payload/bin/fusermount"
: >"$payload/soci.toml"
# TLS for the guest's registry: the host benchmark's throwaway CA and certificate for its host name
# (peers.make_tls), trusted only by the guest's processes (SSL_CERT_FILE).
PYTHONPATH=tools/bench python3 -c 'import peers, sys; peers.make_tls(sys.argv[1])' "$work"
mkdir -p "$payload/tls"
cp "$work/tls/ca.pem" "$work/tls/server.pem" "$work/tls/server.key" "$payload/tls/"
tools/make-rootfs-layer.sh "$PWD/.cache" nginx nginx-light >/dev/null
umoci init --layout "$work/layout" >/dev/null
umoci new --image "$work/layout:v1" >/dev/null
umoci unpack --image "$work/layout:v1" "$work/b" >/dev/null
tar --xattrs --xattrs-include='*' --numeric-owner -xpf .cache/nginx.tar -C "$work/b/rootfs"
umoci repack --image "$work/layout:v1" "$work/b" >/dev/null
rm -rf "$work/b"
umoci config --image "$work/layout:v1" --architecture amd64 --os linux >/dev/null
mkdir -p "$payload/registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
  "$payload/registry" "$port" >"$work/reg.yml"
docker-registry serve "$work/reg.yml" >/dev/null 2>&1 &
reg=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
r=127.0.0.1:$port
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:v1" "docker://$r/bench/nginx:v1"
# Conversion is deterministic: the second repository gets the same manifest and blobs.
for repo in nginx nginx-traced; do
  "$bin" convert "$r/bench/nginx:v1" "$r/bench/$repo:v1-lazyblk" --plain-http >/dev/null
done
# SOCI's index goes beside its own copy of the image (built in the guest).
skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false "docker://$r/bench/nginx:v1" "docker://$r/bench/nginx-soci:v1"
# Overlayfs fetches every layer of the original image (+ manifest and config).
skopeo inspect --raw --tls-verify=false "docker://$r/bench/nginx:v1" >"$work/m.json"
python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(sum(l["size"] for l in m["layers"]) + m["config"]["size"])' "$work/m.json" >"$payload/overlay_bytes"
kill "$reg"; reg=
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /payload/registry\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:5000\n' >"$payload/registry.yml"
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /payload/registry\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:5443\n  tls:\n    certificate: /payload/tls/server.pem\n    key: /payload/tls/server.key\n' >"$payload/registry-tls.yml"
cp tools/vm/containerd.toml "$payload/containerd.toml"
printf '[proxy_plugins.soci]\n  type = "snapshot"\n  address = "/run/soci/soci.sock"\n' >>"$payload/containerd.toml"
echo "$runs" >"$payload/runs"
LAZYBLK_BIN=$bin tools/vm/prepare.sh "$payload" tools/vm/guest-readiness.sh
VM_MEM=4096 tools/vm/run.sh 5400 || { tail -30 .cache/vm/console.log; exit 1; }
grep -a "^RESULT " .cache/vm/console.log | tr -d '\r' >"$out/results.txt"
python3 - "$out" <<'PY'
import statistics, sys
out = sys.argv[1]
rows = []
for line in open(f"{out}/results.txt"):
    _, image, mode, run, pull, start, ready, fetched = line.split()
    # A peer's registry traffic is not counted ("-").
    rows.append(dict(image=image, mode=mode, pull=float(pull), start=float(start), ready=float(ready),
                     total=float(pull) + float(start) + float(ready),
                     fetched=None if fetched == "-" else int(fetched)))
modes = list(dict.fromkeys(r["mode"] for r in rows))
base = statistics.median(r["total"] for r in rows if r["mode"] == "overlayfs")
lines = ["| image | mode | pull s | start s | ready s | total s | MB fetched by ready | total vs overlayfs |",
         "|---|---|---|---|---|---|---|---|"]
for m in modes:
    g = [r for r in rows if r["mode"] == m]
    if not g:
        continue
    def st(k, scale=1.0, f="{:.2f}"):
        if any(r[k] is None for r in g):
            return "–"
        v = [r[k] * scale for r in g]
        return f.format(statistics.median(v)) + " (" + f.format(min(v)) + "–" + f.format(max(v)) + ")"
    tot = statistics.median(r["total"] for r in g)
    lines.append(f"| {g[0]['image']} | {m} | {st('pull')} | {st('start')} | {st('ready')} | {st('total')} | "
                 f"{st('fetched', 1e-6, '{:.1f}')} | {tot / base:.2f}x |")
md = "\n".join(lines)
open(f"{out}/results.md", "w").write(md + "\n")
print(md)
PY
