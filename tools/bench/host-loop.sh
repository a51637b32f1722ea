#!/usr/bin/env bash
# Host block-device benchmark (no nbd/ublk here): the loop backend (loop over lazyblk's one-file FUSE
# export) against a loop device on the raw image, with `lazyblk bench device` (O_DIRECT). "cold" = the
# first pass (every chunk verified and decompressed from the blob file); "warm" = after it.
#   sudo tools/bench/host-loop.sh [TREE_TO_PACK (default /usr/lib/gcc)]
set -euo pipefail
cd "$(dirname "$0")/../.."
tree=${1:-/usr/lib/gcc}
cargo build --release -q
bin=$PWD/target/release/lazyblk
work=$(mktemp -d)
cleanup() {
  "$bin" detach all --run-dir "$work/run" >/dev/null 2>&1 || true
  [[ -n "${lo:-}" ]] && losetup -d "$lo" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
tar -C "$(dirname "$tree")" -cf "$work/layer.tar" "$(basename "$tree")"
"$bin" layer convert "$work/layer.tar" --output "$work/layer.blob" >/dev/null 2>&1
"$bin" layer export "$work/layer.blob" --output "$work/raw.img" >/dev/null
out=.cache/bench
mkdir -p "$out"
: >"$out/host-loop.jsonl"
lo=$(losetup -r -f --show "$work/raw.img")
"$bin" bench device "$lo" --random 2000 --label raw-loop/warm >>"$out/host-loop.jsonl"
losetup -d "$lo"; lo=
for phase in seq rand; do
  "$bin" attach "$work/layer.blob" --backend loop --run-dir "$work/run" --daemon >"$work/dev"
  dev=$(cat "$work/dev")
  if [[ $phase == seq ]]; then
    "$bin" bench device "$dev" --random 0 --label loop/cold-seq >>"$out/host-loop.jsonl"
    "$bin" bench device "$dev" --random 2000 --label loop/warm >>"$out/host-loop.jsonl"
  else
    "$bin" bench device "$dev" --random 300 --seq-mib 1 --seed 7 --label loop/cold-rand >>"$out/host-loop.jsonl"
  fi
  "$bin" detach all --run-dir "$work/run" >/dev/null
done
python3 - "$out/host-loop.jsonl" <<'PY'
import json, sys
by = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
b, w, cs, cr = by["raw-loop/warm"], by["loop/warm"], by["loop/cold-seq"], by["loop/cold-rand"]
print(f"image {b['size']/1e6:.0f} MB\n")
print("| device | 4K p50 ms | 4K p99 ms | seq MB/s |")
print("|---|---|---|---|")
print(f"| loop on the raw file | {b['lat_ms_p50']:.3f} | {b['lat_ms_p99']:.3f} | {b['seq_mb_s']:.0f} |")
print(f"| lazyblk loop backend, cold (first read of each chunk) | {cr['lat_ms_p50']:.3f} | {cr['lat_ms_p99']:.3f} | {cs['seq_mb_s']:.0f} |")
print(f"| lazyblk loop backend, warm | {w['lat_ms_p50']:.3f} | {w['lat_ms_p99']:.3f} | {w['seq_mb_s']:.0f} |")
PY
