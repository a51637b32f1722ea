#!/usr/bin/env bash
# Block-device benchmark in the real-kernel VM (QEMU TCG): ublk vs kernel NBD vs loop-over-FUSE vs a
# loop device on the raw image, warm and cold (in-guest docker-registry), with `lazyblk bench device`.
# Prints a Markdown table; raw lines go to .cache/bench/vm-blockdev.jsonl.
#   sudo tools/bench/vm-blockdev.sh [TREE_TO_PACK (default /usr/lib/gcc)]
set -euo pipefail
cd "$(dirname "$0")/../.."
tree=${1:-/usr/lib/gcc}
cargo build --release -q
bin=target/release/lazyblk
out=.cache/bench
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
p=$work/payload
mkdir -p "$p"
tar -C "$(dirname "$tree")" -cf "$work/layer.tar" "$(basename "$tree")"
"$bin" layer convert "$work/layer.tar" --output "$p/layer.blob" >/dev/null 2>&1
hex=$(sha256sum "$p/layer.blob" | cut -d' ' -f1)
echo "sha256:$hex" >"$p/digest"
# The registry's own storage layout: the blob plus the repository's link to it.
reg=$p/registry/docker/registry/v2
mkdir -p "$reg/blobs/sha256/${hex:0:2}/$hex" "$reg/repositories/bench/layer/_layers/sha256/$hex"
mv "$p/layer.blob" "$reg/blobs/sha256/${hex:0:2}/$hex/data"
ln -s "registry/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data" "$p/layer.blob"
printf 'sha256:%s' "$hex" >"$reg/repositories/bench/layer/_layers/sha256/$hex/link"
# Chain the index to the digest the annotations would carry.
"$bin" layer inspect "$p/layer.blob" --json >"$work/inspect.json"
python3 - "$work/inspect.json" >"$p/index-args" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print(f"--index-offset {j['index_offset']} --index-length {j['index_length']} --index-digest {j['index_digest']}")
PY
cp /usr/bin/docker-registry "$p/docker-registry"
LAZYBLK_BIN=$bin tools/vm/prepare.sh "$p" tools/vm/guest-bench.sh
tools/vm/run.sh 1800 >/dev/null || { tail -30 .cache/vm/console.log; exit 1; }
grep -a '^BENCH ' .cache/vm/console.log | sed 's/^BENCH //' | tr -d '\r' >"$out/vm-blockdev.jsonl"
python3 - "$out/vm-blockdev.jsonl" "$(du -b "$work/layer.tar" | cut -f1)" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {r["label"]: r for r in rows}
base = by["raw-loop/warm"]
print(f"Layer tar {int(sys.argv[2])/1e6:.0f} MB, image {base['size']/1e6:.0f} MB. QEMU TCG: absolute numbers are slow; compare ratios.\n")
print("| device | warm 4K p50 ms | warm 4K p99 ms | warm seq MB/s | cold 4K p50 ms | cold 4K p99 ms | cold seq MB/s |")
print("|---|---|---|---|---|---|---|")
print(f"| loop on raw image (baseline) | {base['lat_ms_p50']:.3f} | {base['lat_ms_p99']:.3f} | {base['seq_mb_s']:.0f} | – | – | – |")
for b in ["ublk", "nbd", "loop"]:
    w, cs, cr = by.get(f"{b}/warm"), by.get(f"{b}/cold-seq"), by.get(f"{b}/cold-rand")
    if not w:
        continue
    print(f"| {b} | {w['lat_ms_p50']:.3f} | {w['lat_ms_p99']:.3f} | {w['seq_mb_s']:.0f} | {cr['lat_ms_p50']:.2f} | {cr['lat_ms_p99']:.2f} | {cs['seq_mb_s']:.0f} |")
print()
for b in ["ublk", "nbd", "loop"]:
    w = by.get(f"{b}/warm")
    if w:
        print(f"- {b}: warm 4K p50 {w['lat_ms_p50']/base['lat_ms_p50']:.1f}x the raw loop device, warm sequential {w['seq_mb_s']/base['seq_mb_s']:.2f}x")
PY
