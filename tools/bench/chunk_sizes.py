#!/usr/bin/env python3
"""Chunk-size study (run as root): blob size and read amplification per chunk size, on real layers.

For each layer and chunk size:
  * blob size vs the original .tar.gz, and vs ONE zstd-3 stream of the same ext4 image (the cost of
    independent chunks);
  * random 4 KiB read: mean bytes fetched (= stored size of the chunk holding the block) per 4 KiB;
  * startup-like read: a seeded random 5% of the regular files, read whole with a shared chunk cache
    (block -> chunk mapping from FIEMAP on the loop-mounted image): bytes fetched / bytes read.

  tools/bench/chunk_sizes.py [--sizes 64K,256K,1M] [--out results/chunks.md] LAYER.tar.gz...
"""
import argparse, array, fcntl, json, os, random, struct, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZYBLK = os.path.join(ROOT, "target", "release", "lazyblk")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blobinfo  # noqa: E402

FS_IOC_FIEMAP = 0xC020660B


def fiemap(path):
    """Physical byte extents of a file: [(physical, length)]."""
    out = []
    start = 0
    with open(path, "rb") as f:
        while True:
            n = 64
            buf = bytearray(struct.pack("=QQIIII", start, 2**64 - 1 - start, 0, 0, n, 0) + bytes(56 * n))
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            mapped = struct.unpack_from("=I", buf, 20)[0]
            last = False
            for i in range(mapped):
                lo, ph, ln, _, _, fl = struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)
                out.append((ph, ln))
                start = lo + ln
                last = last or bool(fl & 1)
            if mapped == 0 or last:
                return out


def parse_size(s):
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
    return int(s.rstrip("KM")) * mult


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("layers", nargs="+")
    ap.add_argument("--sizes", default="64K,128K,256K,512K,1M,4M")
    ap.add_argument("--sample", type=float, default=0.05)
    ap.add_argument("--out")
    ap.add_argument("--level", default="3", help="zstd level (the table in docs/format.md: 3)")
    a = ap.parse_args()
    lines = ["| layer | chunk | blob / .tar.gz | blob / one zstd-3 stream | zero chunks | bytes fetched per random 4 KiB read | startup sample: fetched / read |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for layer in a.layers:
        name = os.path.basename(layer)
        gz = os.path.getsize(layer)
        with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, ".cache")) as tmp:
            # One raw image, its single-stream zstd size, and the file -> block map.
            base = os.path.join(tmp, "base.blob")
            subprocess.run([LAZYBLK, "layer", "convert", layer, "-o", base, "--json", "--level", a.level], check=True, capture_output=True)
            raw = os.path.join(tmp, "raw.img")
            subprocess.run([LAZYBLK, "layer", "export", base, "-o", raw], check=True, capture_output=True)
            stream = int(subprocess.run(f"zstd -3 -T1 -c {raw} | wc -c", shell=True, check=True,
                                        capture_output=True, text=True).stdout)
            mnt = os.path.join(tmp, "mnt")
            os.makedirs(mnt)
            subprocess.run(["mount", "-o", "loop,ro", raw, mnt], check=True)
            try:
                files = []
                for d, _, fs in os.walk(mnt):
                    for f in fs:
                        p = os.path.join(d, f)
                        if os.path.isfile(p) and not os.path.islink(p):
                            files.append(p)
                files.sort()
                rng = random.Random(42)
                sample = rng.sample(files, max(1, int(len(files) * a.sample)))
                extents = [fiemap(p) for p in sample]
                read_bytes = sum(os.path.getsize(p) for p in sample)
                # All allocated 4 KiB blocks of all files, for the random-read estimate.
                all_blocks = []
                for p in files:
                    for ph, ln in fiemap(p):
                        all_blocks.extend(range(ph // 4096, (ph + ln) // 4096))
            finally:
                subprocess.run(["umount", mnt], check=True)
            for s in a.sizes.split(","):
                cs = parse_size(s)
                blob = os.path.join(tmp, f"{cs}.blob")
                subprocess.run([LAZYBLK, "layer", "convert", layer, "-o", blob, "--chunk-size", s, "--level", a.level], check=True, capture_output=True)
                with open(blob, "rb") as f:
                    info, chunks = blobinfo.read_index(f, os.path.getsize(blob))
                size = os.path.getsize(blob)
                zero = sum(1 for c in chunks if c[2] == 0)
                per_block = sum(chunks[b * 4096 // cs][1] for b in all_blocks) / max(1, len(all_blocks))
                needed = set()
                for ex in extents:
                    for ph, ln in ex:
                        needed.update(range(ph // cs, (ph + ln - 1) // cs + 1))
                fetched = sum(chunks[c][1] for c in needed)
                lines.append(f"| {name} | {s} | {size / gz:.3f} | {size / stream:.3f} | {zero}/{len(chunks)} "
                             f"| {per_block / 1024:.0f} KiB ({per_block / 4096:.1f}x) | {fetched / max(1, read_bytes):.2f} |")
                os.unlink(blob)
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
