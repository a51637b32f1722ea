#!/usr/bin/env python3
"""Conversion benchmark (run as root): lazyblk vs the reference pipeline, on the same layers, same run.

For each layer (.tar.gz):
  * lazyblk:   `lazyblk layer convert LAYER -o BLOB` (tar.gz -> ext4 -> chunked zstd blob, one pass)
  * reference: `tar -xpzf` into a scratch dir + OCI whiteout fix-up (find .wh.*, mknod/setfattr)
               + `mke2fs -t ext4 -d DIR` (uncompressed image; the reference does no chunking or
               compression at all)
  * sizes:     original .tar.gz vs lazyblk blob
  * reader:    `lazyblk layer inspect --verify` (verify + zstd decode of every chunk, one thread)
Median of N runs (default 3), page cache warm for both (the input is read from memory either way).

  tools/bench/convert.py [--runs N] [--out results/convert.md] LAYER.tar.gz...
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZYBLK = os.path.join(ROOT, "target", "release", "lazyblk")


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sh(*args, **kw):
    subprocess.run(args, check=True, **kw)


def reference(layer, scratch):
    tree = os.path.join(scratch, "tree")
    img = os.path.join(scratch, "ref.img")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    sh("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpzf", layer, "-C", tree)
    # OCI whiteouts -> overlayfs: .wh..wh..opq -> opaque xattr, .wh.NAME -> 0:0 char device.
    for d, _dirs, files in os.walk(tree):
        for f in files:
            if f == ".wh..wh..opq":
                os.unlink(os.path.join(d, f))
                sh("setfattr", "-n", "trusted.overlay.opaque", "-v", "y", d)
            elif f.startswith(".wh."):
                os.unlink(os.path.join(d, f))
                os.mknod(os.path.join(d, f[4:]), 0o020000, os.makedev(0, 0))
    size = int(subprocess.run(["du", "-sb", tree], capture_output=True, text=True, check=True).stdout.split()[0])
    blocks = (size * 13 // 10 + (64 << 20)) // 4096
    if os.path.exists(img):
        os.unlink(img)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, img, str(blocks))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("layers", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--level", default="3", help="zstd level (the table in docs/benchmarks.md: 3)")
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for layer in a.layers:
        name = os.path.basename(layer)
        with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, ".cache")) as scratch:
            blob = os.path.join(scratch, "out.blob")
            ours, ref = [], []
            summary = None
            for _ in range(a.runs):
                def conv():
                    nonlocal summary
                    out = subprocess.run([LAZYBLK, "layer", "convert", "--json", "--level", a.level, layer, "-o", blob],
                                         check=True, capture_output=True).stdout
                    summary = json.loads(out)
                ours.append(timed(conv))
                ref.append(timed(lambda: reference(layer, scratch)))
            ver = json.loads(subprocess.run([LAZYBLK, "layer", "inspect", "--verify", "--json", blob],
                                            check=True, capture_output=True).stdout)["verify"]
            gz = os.path.getsize(layer)
            rows.append(dict(
                layer=name, tar_mb=summary["input"]["tar_bytes"] / 1e6, gz_mb=gz / 1e6,
                files=summary["ext4"]["files"], ours=statistics.median(ours), ours_min=min(ours),
                ours_max=max(ours), ref=statistics.median(ref), ref_min=min(ref), ref_max=max(ref),
                blob_mb=summary["blob"]["size"] / 1e6, decode=ver["decoded_mb_per_s"],
            ))
    lines = [
        "| layer | tar MB | files | lazyblk convert s (min-max) | tar -x + whiteouts + mke2fs -d s (min-max) | speedup | .tar.gz MB | blob MB | blob/gz | verify+decode MB/s (1 core) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['tar_mb']:.0f} | {r['files']} | {r['ours']:.2f} ({r['ours_min']:.2f}-{r['ours_max']:.2f}) "
            f"| {r['ref']:.2f} ({r['ref_min']:.2f}-{r['ref_max']:.2f}) | {r['ref'] / r['ours']:.1f}x "
            f"| {r['gz_mb']:.1f} | {r['blob_mb']:.1f} | {r['blob_mb'] / r['gz_mb']:.3f} | {r['decode']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
