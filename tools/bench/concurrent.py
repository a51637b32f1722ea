#!/usr/bin/env python3
"""Concurrent container starts: 20 containers of 20 different images, one after another vs all at once.

    sudo tools/bench/concurrent.py [--images 20] [--runs 3] [--out .cache/bench/concurrent]

Starts its own docker-registry, containerd 1.6 and the lazyblk snapshotter (which starts the node
daemon), builds N small images (busybox-static serving a page that names the image; one layer each,
all different) and converts them with `lazyblk convert`. Each run starts cold (images, snapshots and
the chunk cache removed, page cache dropped) and measures the time from the first `lazyblk pull` to the
last container answering HTTP 200: "serial" pulls and runs the images one after another, "concurrent"
all at once (one thread each). The ratio serial/concurrent says whether the snapshotter and daemon are
the serial part. Writes results.json and results.md.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from benchlib import free_port
import readiness as rd


def build_images(n, work, reg):
    busybox = shutil.which("busybox") or "/bin/busybox"
    for i in range(n):
        layout = os.path.join(work, f"layout{i}")
        rd.sh("umoci", "init", "--layout", layout)
        rd.sh("umoci", "new", "--image", f"{layout}:v1")
        b = os.path.join(work, f"b{i}")
        rd.sh("umoci", "unpack", "--image", f"{layout}:v1", b)
        root = os.path.join(b, "rootfs")
        os.makedirs(os.path.join(root, "bin"))
        os.makedirs(os.path.join(root, "srv/app"))
        shutil.copy(busybox, os.path.join(root, "bin/busybox"))
        with open(os.path.join(root, "srv/app/index.html"), "w") as f:
            f.write(f"image {i}\n")
        # A few MB of per-image data, so every image is a different layer of some size.
        with open(os.path.join(root, "srv/app/data"), "wb") as f:
            f.write(os.urandom(4 << 20))
        rd.sh("umoci", "repack", "--image", f"{layout}:v1", b)
        shutil.rmtree(b)
        rd.sh("umoci", "config", "--image", f"{layout}:v1", "--architecture", "amd64", "--os", "linux")
        rd.sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v1",
              f"docker://{reg}/many/app{i}:v1")
        rd.sh(rd.BIN, "convert", f"{reg}/many/app{i}:v1", f"{reg}/many/app{i}:v1-lazyblk", "--plain-http")


def ready(port, deadline=120):
    t = time.monotonic()
    while time.monotonic() - t < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2).status == 200:
                return time.monotonic()
        except Exception:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"no HTTP 200 on port {port}")


def start_one(env, reg, i, tag, port):
    image = f"{reg}/many/app{i}:v1-lazyblk"
    rd.sh(rd.BIN, "pull", image, "--plain-http", "--address", env.sock)
    env.ctr("run", "-d", "--net-host", "--snapshotter", "lazyblk", image, f"c{i}-{tag}",
            "/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/srv/app")
    return ready(port)


def one_run(env, reg, n, mode, run):
    env.cold()
    ports = [free_port() for _ in range(n)]
    tag = f"{mode}{run}"
    t0 = time.monotonic()
    if mode == "serial":
        ends = [start_one(env, reg, i, tag, ports[i]) for i in range(n)]
    else:
        ends = [None] * n
        errors = []

        def go(i):
            try:
                ends[i] = start_one(env, reg, i, tag, ports[i])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
    return {"mode": mode, "run": run, "containers": n, "seconds": max(ends) - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(rd.ROOT, ".cache/bench/concurrent"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    rd.sh("cargo", "build", "--release", "-q", cwd=rd.ROOT)
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="lazyblk-concurrent-")
    procs = []
    env = rd.Env(work)
    try:
        reg = rd.start_registry(work, procs)
        print(f"building {a.images} images...", file=sys.stderr)
        build_images(a.images, work, reg)
        rd.start_containerd(env, procs)
        rows = []
        for run in range(a.runs):
            for mode in ("serial", "concurrent"):
                r = one_run(env, reg, a.images, mode, run)
                print(json.dumps(r), file=sys.stderr)
                rows.append(r)
        env.cold()
        med = {m: statistics.median(r["seconds"] for r in rows if r["mode"] == m) for m in ("serial", "concurrent")}
        md = "\n".join([
            f"| {a.images} containers of {a.images} images | median s (min–max) |", "|---|---|",
            *[f"| {m} | {med[m]:.2f} ({min(r['seconds'] for r in rows if r['mode'] == m):.2f}–"
              f"{max(r['seconds'] for r in rows if r['mode'] == m):.2f}) |" for m in ("serial", "concurrent")],
            f"| serial / concurrent | {med['serial'] / med['concurrent']:.2f}x |",
        ])
        json.dump(rows, open(os.path.join(a.out, "results.json"), "w"), indent=1)
        open(os.path.join(a.out, "results.md"), "w").write(md + "\n")
        print(md)
    finally:
        env.stop_snapshotter()
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
