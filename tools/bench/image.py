#!/usr/bin/env python3
"""Image conversion benchmark (run as root; needs docker-registry, skopeo, umoci and a rootfs layer tar).

Builds the two-layer test image (tools/make-test-image.sh), pushes it to a loopback registry, then in
the same run, into a second loopback registry: `skopeo copy` of the image (the floor: moving the bytes)
vs `lazyblk convert` registry→registry (download, convert, upload). Wall time and
CPU time (user+sys of the process and its children), and total layer bytes.

  tools/bench/image.py ROOTFS.tar [--runs 3] [--out results/image.md]
"""
import argparse, json, os, resource, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZYBLK = os.path.join(ROOT, "target", "release", "lazyblk")


def timed(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rootfs")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    work = tempfile.mkdtemp(dir=os.path.join(ROOT, ".cache"))
    reg = None
    try:
        layout = os.path.join(work, "layout")
        subprocess.run([os.path.join(ROOT, "tools", "make-test-image.sh"), a.rootfs, layout], check=True, capture_output=True)
        regs, addrs = [], []
        for name in ("src", "dst"):
            s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
            cfg = os.path.join(work, f"{name}.yml")
            open(cfg, "w").write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/{name}\nhttp:\n  addr: 127.0.0.1:{port}\n")
            regs.append(subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port)).close(); break
                except OSError:
                    time.sleep(0.05)
            addrs.append(f"127.0.0.1:{port}")
        reg = regs
        r, d = addrs
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v2", f"docker://{r}/src/img:v2"], check=True)
        sk, lz = [], []
        summary = None
        for i in range(a.runs):
            sk.append(timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                             f"docker://{r}/src/img:v2", f"docker://{d}/copy{i}/img:v2"])[:2])
            w, c, out = timed([LAZYBLK, "convert", "--plain-http", "--json", f"{r}/src/img:v2", f"{d}/conv{i}/img:v2"])
            lz.append((w, c))
            summary = json.loads(out)
        again = json.loads(timed([LAZYBLK, "convert", "--plain-http", "--json", f"{r}/src/img:v2", f"{d}/conv0/img:v2"])[2])
        med = statistics.median
        lines = [
            f"Two-layer Debian test image ({summary['source_bytes'] / 1e6:.1f} MB of gzip layers), loopback registry, median of {a.runs} runs:",
            "",
            "| | wall s | CPU s | layer bytes pushed |",
            "|---|---:|---:|---:|",
            f"| `skopeo copy` (moves the bytes, the floor) | {med(x[0] for x in sk):.2f} | {med(x[1] for x in sk):.2f} | {summary['source_bytes'] / 1e6:.1f} MB |",
            f"| `lazyblk convert` (download, convert, upload) | {med(x[0] for x in lz):.2f} | {med(x[1] for x in lz):.2f} | {summary['target_bytes'] / 1e6:.1f} MB |",
            "",
            f"Converted/original size: {summary['target_bytes'] / summary['source_bytes']:.3f}. "
            f"Converting again into the same repository uploads {again['uploaded_bytes']} bytes.",
        ]
        text = "\n".join(lines)
        print(text)
        if a.out:
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            open(a.out, "w").write(text + "\n")
    finally:
        for p in reg or []:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
