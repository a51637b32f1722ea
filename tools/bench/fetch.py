#!/usr/bin/env python3
"""Fetch-engine and NBD benchmark (run as root on a machine with docker-registry, libnbd-bin, nbdkit,
qemu-utils). Everything on loopback, in one run:

  1. cold sequential: `nbdcopy` of the whole disk from `lazyblk serve REGISTRY/REPO@DIGEST` (fresh
     process, no cache) vs `curl` of the whole blob from the same registry; compared as blob bytes/s.
  2. random 4 KiB reads, one at a time (latency p50/p99): cold (fresh process) and warm (same process,
     second pass), plus bytes fetched per byte read from the metrics endpoint.
  3. warm sequential `nbdcopy` to /dev/null: lazyblk serve (memory cache warm) vs qemu-nbd serving a
     zstd-compressed qcow2 of the same ext4 image vs nbdkit serving the raw image.

  tools/bench/fetch.py LAYER.tar.gz [--runs 3] [--out results/fetch.md]
"""
import argparse, json, os, random, shutil, socket, statistics, struct, subprocess, sys, tempfile, time, urllib.request

from benchlib import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZYBLK = os.path.join(ROOT, "target", "release", "lazyblk")


def wait_port(port):
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port never opened")


def wait_sock(path):
    for _ in range(600):
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path} never appeared")


class Nbd:
    """Minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies, one request at a time."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.recv(18)
        self.s.sendall(struct.pack(">I", 3))
        data = struct.pack(">I", 0) + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
        while True:
            _, _, typ, ln = struct.unpack(">QIII", self.recv(20))
            self.recv(ln)
            if typ == 1:
                break
        self.cookie = 0

    def recv(self, n):
        b = bytearray()
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError
            b += c
        return bytes(b)

    def read(self, off, ln):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, self.cookie, off, ln))
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        if err:
            raise IOError(f"NBD error {err}")
        return self.recv(ln)


def metrics(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name = line.split("{")[0]
        if name in ("lazyblk_fetched_bytes_total", "lazyblk_read_bytes_total", "lazyblk_fetches_total"):
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("layer")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args()
    work = tempfile.mkdtemp(dir=os.path.join(ROOT, ".cache"))
    procs = []
    try:
        blob = os.path.join(work, "layer.blob")
        summary = json.loads(subprocess.run([LAZYBLK, "layer", "convert", "--json", a.layer, "-o", blob],
                                            check=True, capture_output=True).stdout)
        raw = os.path.join(work, "layer.img")
        subprocess.run([LAZYBLK, "layer", "export", blob, "-o", raw], check=True, capture_output=True)
        ann = summary["annotations"]
        P = "containerd.io/snapshot/lazyblk/"
        idx_args = ["--index-offset", ann[P + "index-offset"], "--index-length", ann[P + "index-length"],
                    "--index-digest", ann[P + "index-digest"]]
        blob_size = os.path.getsize(blob)
        image_size = os.path.getsize(raw)
        # A real registry on loopback.
        port = free_port()
        cfg = os.path.join(work, "registry.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/reg\n"
                    f"http:\n  addr: 127.0.0.1:{port}\n")
        procs.append(subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(port)
        digest = summary["blob"]["digest"]
        loc = subprocess.run(["curl", "-sfi", "-X", "POST", f"http://127.0.0.1:{port}/v2/bench/layer/blobs/uploads/"],
                             check=True, capture_output=True, text=True).stdout
        upload = [l.split(": ", 1)[1].strip() for l in loc.splitlines() if l.lower().startswith("location:")][0]
        sep = "&" if "?" in upload else "?"
        subprocess.run(["curl", "-sf", "-X", "PUT", "-H", "Content-Type: application/octet-stream", "--data-binary",
                        f"@{blob}", f"{upload}{sep}digest={digest}"], check=True)
        def push(path, dg):
            loc = subprocess.run(["curl", "-sfi", "-X", "POST", f"http://127.0.0.1:{port}/v2/bench/layer/blobs/uploads/"],
                                 check=True, capture_output=True, text=True).stdout
            up = [l.split(": ", 1)[1].strip() for l in loc.splitlines() if l.lower().startswith("location:")][0]
            subprocess.run(["curl", "-sf", "-X", "PUT", "-H", "Content-Type: application/octet-stream", "--data-binary",
                            f"@{path}", f"{up}{'&' if '?' in up else '?'}digest={dg}"], check=True)
        push(a.layer, summary["input"]["digest"])
        gz_url = f"http://127.0.0.1:{port}/v2/bench/layer/blobs/{summary['input']['digest']}"
        ref = f"127.0.0.1:{port}/bench/layer@{digest}"
        blob_url = f"http://127.0.0.1:{port}/v2/bench/layer/blobs/{digest}"

        def serve(extra=()):
            sock = os.path.join(work, f"s{len(procs)}.sock")
            mport = free_port()
            p = subprocess.Popen([LAZYBLK, "serve", ref, "--plain-http", "--listen", f"unix:{sock}",
                                  "--metrics-addr", f"127.0.0.1:{mport}", *idx_args, *extra],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_sock(sock)
            wait_port(mport)
            return p, sock, mport

        def nbdcopy(uri):
            t = time.perf_counter()
            subprocess.run(["nbdcopy", uri, "null:"], check=True)
            return time.perf_counter() - t

        # 1. cold sequential vs curl
        curl_t, cold_t, pull_t = [], [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            subprocess.run(f"curl -sf {gz_url} | gzip -dc > /dev/null", shell=True, check=True)
            pull_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(["curl", "-sf", "-o", "/dev/null", blob_url], check=True)
            curl_t.append(time.perf_counter() - t)
            p, sock, mport = serve()
            cold_t.append(nbdcopy(f"nbd+unix:///?socket={sock}"))
            seq_m = metrics(mport)
            p.kill(); p.wait()
        # 2. random 4 KiB latency, cold then warm, one process
        rng = random.Random(1)
        # Every read in a different chunk, so each cold read really goes to the registry.
        cs = summary["blob"]["chunk_size"]
        chunks = rng.sample(range(image_size // cs), min(a.reads, image_size // cs))
        offsets = [c * cs + rng.randrange(0, cs // 4096) * 4096 for c in chunks]
        p, sock, mport = serve()
        c = Nbd(sock)
        cold, warm = [], []
        for off in offsets:
            t = time.perf_counter(); c.read(off, 4096); cold.append(time.perf_counter() - t)
        rand_m = metrics(mport)
        for off in offsets:
            t = time.perf_counter(); c.read(off, 4096); warm.append(time.perf_counter() - t)
        p.kill(); p.wait()
        # The same chunks' stored bytes fetched directly with keep-alive HTTP range GETs: the floor.
        import http.client
        with open(blob, "rb") as bf:
            bf.seek(summary["blob"]["index_offset"])
            index = bf.read(summary["blob"]["index_length"])
        hc = http.client.HTTPConnection("127.0.0.1", port)
        direct = []
        for c in chunks:
            off, ln = struct.unpack_from("<QI", index, 64 + 48 * c)
            if ln == 0:
                continue
            t = time.perf_counter()
            hc.request("GET", blob_url.split(str(port), 1)[1], headers={"Range": f"bytes={off}-{off + ln - 1}"})
            r = hc.getresponse(); r.read()
            direct.append(time.perf_counter() - t)
        # 3. warm sequential: lazyblk vs qemu-nbd qcow2(zstd) vs nbdkit file
        qcow = os.path.join(work, "layer.qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd", raw, qcow], check=True)
        p, sock, mport = serve(["--mem-cache-mib", str(image_size // (1 << 20) + 64)])
        nbdcopy(f"nbd+unix:///?socket={sock}")
        lz_warm = [nbdcopy(f"nbd+unix:///?socket={sock}") for _ in range(a.runs)]
        p.kill(); p.wait()
        qsock = os.path.join(work, "q.sock")
        procs.append(subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-k", qsock, "-x", "q", "--shared=8", qcow]))
        wait_sock(qsock)
        nbdcopy(f"nbd+unix:///q?socket={qsock}")
        q_warm = [nbdcopy(f"nbd+unix:///q?socket={qsock}") for _ in range(a.runs)]
        ksock = os.path.join(work, "k.sock")
        procs.append(subprocess.Popen(["nbdkit", "-f", "-U", ksock, "file", raw]))
        wait_sock(ksock)
        nbdcopy(f"nbd+unix:///?socket={ksock}")
        k_warm = [nbdcopy(f"nbd+unix:///?socket={ksock}") for _ in range(a.runs)]

        med = statistics.median
        mb = 1e6
        lines = [
            f"Layer `{os.path.basename(a.layer)}`: blob {blob_size / mb:.1f} MB, disk image {image_size / mb:.1f} MB; "
            f"median of {a.runs} runs (min-max).",
            "",
            "| measurement | lazyblk | baseline | ratio |",
            "|---|---:|---:|---:|",
            f"| cold sequential, whole layer from the registry (blob MB/s) | {blob_size / med(cold_t) / mb:.0f} "
            f"({blob_size / max(cold_t) / mb:.0f}-{blob_size / min(cold_t) / mb:.0f}) | curl of the blob: {blob_size / med(curl_t) / mb:.0f} "
            f"({blob_size / max(curl_t) / mb:.0f}-{blob_size / min(curl_t) / mb:.0f}) | {med(curl_t) / med(cold_t):.2f} |",
            f"| cold sequential, whole layer (seconds until every byte is readable) | {med(cold_t):.2f} | "
            f"curl of the original .tar.gz piped into gunzip: {med(pull_t):.2f} | {med(pull_t) / med(cold_t):.2f} |",
            f"| warm sequential nbdcopy (disk MB/s) | {image_size / med(lz_warm) / mb:.0f} | qemu-nbd qcow2 (zstd): "
            f"{image_size / med(q_warm) / mb:.0f} | {med(q_warm) / med(lz_warm):.2f} |",
            f"| warm sequential nbdcopy (disk MB/s) | {image_size / med(lz_warm) / mb:.0f} | nbdkit file (raw): "
            f"{image_size / med(k_warm) / mb:.0f} | {med(k_warm) / med(lz_warm):.2f} |",
            "",
            "| random 4 KiB reads, one at a time | p50 | p99 |",
            "|---|---:|---:|",
            f"| cold: {len(offsets)} reads, each in a different chunk (fetched from the registry; random, so no readahead) | {pct(cold, .5) * 1e3:.2f} ms | {pct(cold, .99) * 1e3:.2f} ms |",
            f"| the same chunks' bytes, plain HTTP range GET to the registry (keep-alive; no verify/decompress) | {pct(direct, .5) * 1e3:.2f} ms | {pct(direct, .99) * 1e3:.2f} ms |",
            f"| warm (memory cache) | {pct(warm, .5) * 1e3:.3f} ms | {pct(warm, .99) * 1e3:.3f} ms |",
            "",
            f"Bytes fetched per byte read: cold sequential {seq_m['lazyblk_fetched_bytes_total'] / seq_m['lazyblk_read_bytes_total']:.3f} "
            f"(the blob is compressed); {len(offsets)} cold random 4 KiB reads "
            f"{rand_m['lazyblk_fetched_bytes_total'] / rand_m['lazyblk_read_bytes_total']:.1f} "
            f"({rand_m['lazyblk_fetches_total']:.0f} range requests).",
        ]
        text = "\n".join(lines)
        print(text)
        if a.out:
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            open(a.out, "w").write(text + "\n")
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
