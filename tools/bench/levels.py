#!/usr/bin/env python3
"""zstd level study: blob size, conversion time and decode speed per level, on real layers.

For each layer and level (runs interleaved level by level, medians): `lazyblk layer convert --level N`
wall and CPU seconds, the blob's size against the original .tar.gz and against level 3, and
`lazyblk layer inspect --verify` (SHA-256 + decode of every chunk, one thread) in MB/s of disk image.

  tools/bench/levels.py [--levels 3,9,14,19] [--chunk-size 256K] [--runs 3] [--bin PATH] LAYER.tar.gz...
"""
import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def convert(binary, layer, out, level, chunk_size):
    """(wall s, CPU s of the child) of one conversion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    subprocess.run([binary, "layer", "convert", layer, "-o", out, "--level", str(level),
                    "--chunk-size", chunk_size], check=True, capture_output=True)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def decode_mb_s(binary, blob):
    out = subprocess.run([binary, "layer", "inspect", blob, "--verify"], check=True, capture_output=True,
                         text=True).stdout
    m = re.search(r"\((\d+) MB/s decoded", out)
    if not m:
        sys.exit(f"no decode speed in `lazyblk layer inspect --verify` output:\n{out}")
    return int(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("layers", nargs="+")
    ap.add_argument("--levels", default="3,6,9,12,14,15,19")
    ap.add_argument("--chunk-size", default="256K")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/lazyblk"))
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    lines = ["| layer | level | blob MB | blob / .tar.gz | blob / level 3 | convert wall s | convert CPU s | verify+decode MB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for layer in a.layers:
        gz = os.path.getsize(layer)
        walls = {lv: [] for lv in levels}
        cpus = {lv: [] for lv in levels}
        sizes, speeds = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(a.runs):
                for lv in levels:
                    blob = os.path.join(tmp, f"{lv}.blob")
                    w, c = convert(a.bin, layer, blob, lv, a.chunk_size)
                    walls[lv].append(w)
                    cpus[lv].append(c)
                    sizes[lv] = os.path.getsize(blob)
                    speeds.setdefault(lv, decode_mb_s(a.bin, blob))
        ref = sizes.get(3)
        for lv in levels:
            vs3 = f"{sizes[lv] / ref:.3f}" if ref else "–"
            lines.append(f"| {os.path.basename(layer)} | {lv} | {sizes[lv] / 1e6:.1f} | {sizes[lv] / gz:.3f} | {vs3} "
                         f"| {statistics.median(walls[lv]):.2f} | {statistics.median(cpus[lv]):.2f} | {speeds[lv]} |")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
