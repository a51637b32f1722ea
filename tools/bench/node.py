#!/usr/bin/env python3
"""Node footprint: RSS and threads of every lazyblk process on the node, and attach latency.

    sudo tools/bench/node.py [--layers 1,10,100] [--out .cache/bench/node]

Two process models, same blobs (converted from generated layers: 90 small ones, 10 with a 64 MiB file),
same loop backend, same run:
  daemon      one `lazyblk daemon` (--memory-mib 64); layers attached with `lazyblk attach` through it
  per-layer   the old model: one foreground `lazyblk attach` process per layer (its own runtime,
              memory cache and registry client)
For N attached idle layers it reports the sum of VmRSS and of threads over all lazyblk processes, then
(for the largest N) the same after reading 50 MB from each of 10 layers (page cache dropped first), and
the latency of each attach (p50, p90: the CLI command returning with the device mounted). Writes
results.json and results.md.
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target/release/lazyblk")


def sh(*cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stdout}\n{r.stderr}")
    return r


def make_blobs(work, n):
    """n blobs; the last 10 carry a 64 MiB file of noise (for the 50 MB reads)."""
    blobs = []
    for i in range(n):
        src = os.path.join(work, f"src{i}")
        os.makedirs(os.path.join(src, "etc"))
        with open(os.path.join(src, "etc", "id"), "w") as f:
            f.write(f"layer {i}\n")
        if i >= n - 10:
            with open(os.path.join(src, "big"), "wb") as f:
                f.write(os.urandom(64 << 20))
        tar = os.path.join(work, f"l{i}.tar")
        sh("tar", "-C", src, "-cf", tar, ".")
        blob = os.path.join(work, f"l{i}.blob")
        sh(BIN, "layer", "convert", tar, "-o", blob)
        os.remove(tar)
        shutil.rmtree(src)
        blobs.append(blob)
    return blobs


def lazyblk_procs():
    out = []
    for p in glob.glob("/proc/[0-9]*"):
        try:
            exe = os.readlink(os.path.join(p, "exe"))
        except OSError:
            continue
        if os.path.basename(exe).startswith("lazyblk"):
            out.append(p)
    return out


def footprint():
    rss = threads = 0
    procs = lazyblk_procs()
    for p in procs:
        try:
            for line in open(os.path.join(p, "status")):
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
        except OSError:
            pass
    return {"processes": len(procs), "rss_mib": rss / (1 << 20), "threads": threads}


def drop_caches():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_50mb(mounts):
    drop_caches()
    for m in mounts:
        with open(os.path.join(m, "big"), "rb") as f:
            left = 50 << 20
            while left > 0:
                b = f.read(min(left, 1 << 20))
                if not b:
                    break
                left -= len(b)


def run_model(model, blobs, counts, work):
    # The run dir lives on tmpfs, as /run/lazyblk does on a node (state writes are fsynced).
    run = tempfile.mkdtemp(prefix=f"lazyblk-node-{model}-", dir="/run")
    procs = []
    if model == "daemon":
        procs.append(subprocess.Popen([BIN, "daemon", "--run-dir", run, "--memory-mib", "64",
                                       "--cache-dir", os.path.join(work, f"cache-{model}")],
                                      stderr=open(os.path.join(work, "daemon.log"), "w")))
        for _ in range(300):
            if os.path.exists(os.path.join(run, "daemon.sock")):
                break
            time.sleep(0.02)
    rows, lat, mounts = [], [], []
    try:
        for i, blob in enumerate(blobs):
            mnt = os.path.join(work, f"m-{model}-{i}")
            t = time.monotonic()
            if model == "daemon":
                sh(BIN, "attach", blob, "--backend", "loop", "--mount", mnt, "--run-dir", run)
            else:
                p = subprocess.Popen([BIN, "attach", blob, "--backend", "loop", "--mount", mnt, "--run-dir", run,
                                      "--cache-dir", os.path.join(work, f"cache-{model}")],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                procs.append(p)
                if not p.stdout.readline().strip():
                    sys.exit(f"attach {blob} failed")
            lat.append(time.monotonic() - t)
            mounts.append(mnt)
            if i + 1 in counts:
                time.sleep(1.0)
                rows.append({"model": model, "layers": i + 1, "state": "idle", **footprint()})
                print(json.dumps(rows[-1]), file=sys.stderr)
        read_50mb(mounts[-10:])
        time.sleep(1.0)
        rows.append({"model": model, "layers": len(blobs), "state": "after 50 MB from 10", **footprint()})
        print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        subprocess.run([BIN, "detach", "all", "--run-dir", run], capture_output=True)
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(run, ignore_errors=True)
    q = statistics.quantiles(lat, n=10)
    return rows, {"model": model, "attach_p50_ms": statistics.median(lat) * 1e3, "attach_p90_ms": q[8] * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,10,100")
    ap.add_argument("--models", default="daemon,per-layer")
    ap.add_argument("--out", default=os.path.join(ROOT, ".cache/bench/node"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    counts = [int(x) for x in a.layers.split(",")]
    sh("cargo", "build", "--release", "-q", cwd=ROOT)
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="lazyblk-node-")
    try:
        blobs = make_blobs(work, max(counts))
        rows, lats = [], []
        for model in a.models.split(","):
            r, l = run_model(model, blobs, set(counts), work)
            rows += r
            lats.append(l)
        json.dump({"footprint": rows, "attach": lats, "cpus": os.cpu_count()},
                  open(os.path.join(a.out, "results.json"), "w"), indent=1)
        md = ["| model | layers | state | processes | RSS MiB | threads |", "|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['model']} | {r['layers']} | {r['state']} | {r['processes']} | {r['rss_mib']:.0f} | {r['threads']} |")
        md += ["", "| model | attach p50 ms | attach p90 ms |", "|---|---|---|"]
        for l in lats:
            md.append(f"| {l['model']} | {l['attach_p50_ms']:.1f} | {l['attach_p90_ms']:.1f} |")
        text = "\n".join(md)
        open(os.path.join(a.out, "results.md"), "w").write(text + "\n")
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
