#!/usr/bin/env python3
"""Readiness benchmark: create -> first successful request, from a cold state, per mode and network.

    sudo tools/bench/readiness.py [--runs 5] [--images nginx,numpy,large] [--profiles loopback,internet]
                                  [--modes ...] [--daemon-arg=--fill-busy-concurrency=0] [--out DIR]

Starts its own docker-registry over HTTPS (a throwaway CA trusted only by the run's processes through
SSL_CERT_FILE; a host name mapped to 127.0.0.1 in /etc/hosts for the run: see peers.py), containerd
(Debian's 1.6) with the lazyblk proxy snapshotter and the peers' snapshotters, and builds the images from
Debian packages with the project's tools (tools/make-rootfs-layer.sh, umoci):
  nginx  Debian + nginx-light, serving its default page
  numpy  Debian + python3-numpy, an app that imports numpy, then serves HTTP
  torch  Debian + python3-torch, python3-scipy, python3-pandas, an app that imports all three, then serves
  large  nginx + a 1 GiB layer of data the app never reads
  torch-large  the torch app + a 4 GiB layer the app never reads, of 64 files that compress about 2:1
               as shared libraries do (each 4 KiB: 2 KiB random, 2 KiB of zeros; no two blocks alike,
               so no format can deduplicate it): issue 15's "large" image
Modes, each run from a cold state (image, content, snapshots, lazyblk's cache and the peers' state
removed, page cache dropped): "overlayfs" (containerd's full pull + unpack: the baseline), "lazyblk"
(`lazyblk pull` + lazily attached layers, zero config; loop backend on hosts without ublk/nbd),
"lazyblk+trace" (the same, with a startup trace recorded once by `lazyblk trace record` and shipped
with `lazyblk trace push` as a referrer of a copy of the image in its own repository, so the
"lazyblk" runs never see it), "lazyblk+autotrace" (the same with the trace the snapshotter recorded
by itself during that recording run, `lazyblk trace recorded`, shipped to a third copy), "lazyblk+relayout" (`lazyblk trace relayout` of the image with that
trace: the traced chunks sit right before each layer's index and arrive with it in one request),
"lazyblk+index" (the *original* image with a `lazyblk index` artifact; "lazyblk+index512" with 512 KiB
spans; "lazyblk+index-whole" indexed by `--index-whole-bin`, an older lazyblk without span pieces), "lazyblk-nometa" (converted
with `--metadata-region 0`: the metadata region lever's "before"), "lazyblk@SPEC" (converted with
the chunk size and zstd level SPEC names: `SIZE`, `zLEVEL` or `SIZE-zLEVEL`, e.g. lazyblk@64K,
lazyblk@z19, lazyblk@1M-z14), and the peers "soci" (AWS SOCI
snapshotter 0.4.1, Debian sid's package, with `soci create` + `soci push` defaults) and "nydus"
(nydus-snapshotter 0.13 + nydusd from upstream source, FUSE mode; needs --nydus-bin).
Every profile (`lazyblk bench shape`: loopback, region = 2 ms RTT 1 Gbit/s, internet = 30 ms RTT
200 Mbit/s) puts the same shaping proxy between containerd's node and the registry for every mode.
Measures pull, start (ctr run returns with the task running), ready (first HTTP 200), total, the
time until the whole image is local (full pull: its pull; lazyblk: every layer filled), bytes fetched
from the registry by the first 200 and in all. Writes results.json, results.md (medians and min-max
per profile) and readiness-PROFILE.svg (stacked bars) to --out.
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port
import peers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target/release/lazyblk")
PORT = 18080
SHOW_LS = False

APPS = {
    "nginx": ["sh", "-c", f"sed -i 's/listen 80 default_server;/listen {PORT} default_server;/; s/listen \\[::\\]:80 default_server;//' /etc/nginx/sites-enabled/default && exec nginx -g 'daemon off;'"],
    "numpy": ["python3", "-c", f"import numpy, http.server; http.server.HTTPServer(('127.0.0.1', {PORT}), http.server.SimpleHTTPRequestHandler).serve_forever()"],
}
APPS["torch"] = ["python3", "-c", f"import torch, scipy, pandas, http.server; http.server.HTTPServer(('127.0.0.1', {PORT}), http.server.SimpleHTTPRequestHandler).serve_forever()"]
APPS["large"] = APPS["nginx"]
APPS["torch-large"] = APPS["torch"]
BASE = {"nginx": "nginx", "numpy": "numpy", "torch": "torch", "large": "nginx", "torch-large": "torch"}
PKGS = {"nginx": "nginx-light", "numpy": "python3-numpy", "torch": "python3-torch,python3-scipy,python3-pandas"}


def sh(*cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stdout}\n{r.stderr}")
    return r


def wait_sock(path, what):
    for _ in range(300):
        if os.path.exists(path):
            return
        time.sleep(0.05)
    sys.exit(f"{what} did not start")


def build_image(name, work, reg, modes):
    """Pushes REG/bench/NAME:v1, its lazyblk conversion :v1-lazyblk and what the other requested modes
    serve (each lazyblk@SPEC mode: a conversion with the chunk size and level of SPEC, tag
    :v1-lazyblk-SPEC)."""
    base = BASE[name]
    sh(os.path.join(ROOT, "tools/make-rootfs-layer.sh"), os.path.join(ROOT, ".cache"), base, PKGS[base])
    layout = os.path.join(work, f"layout-{name}")
    shutil.rmtree(layout, ignore_errors=True)
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:v1")
    b = os.path.join(work, f"b-{name}")
    sh("umoci", "unpack", "--image", f"{layout}:v1", b)
    sh("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
       os.path.join(ROOT, ".cache", f"{base}.tar"), "-C", os.path.join(b, "rootfs"))
    sh("umoci", "repack", "--image", f"{layout}:v1", b)
    shutil.rmtree(b)
    if name == "large":
        sh("umoci", "unpack", "--image", f"{layout}:v1", b)
        d = os.path.join(b, "rootfs/opt/data")
        os.makedirs(d)
        for i in range(16):
            with open(os.path.join(d, f"blob{i}"), "wb") as f:
                f.write(os.urandom(64 << 20))
        sh("umoci", "repack", "--image", f"{layout}:v1", b)
        shutil.rmtree(b)
    if name == "torch-large":
        sh("umoci", "unpack", "--image", f"{layout}:v1", b)
        d = os.path.join(b, "rootfs/opt/unused-libs")
        os.makedirs(d)
        for i in range(64):
            write_half_compressible(os.path.join(d, f"lib{i:02}.so"), 64 << 20)
        sh("umoci", "repack", "--image", f"{layout}:v1", b)
        shutil.rmtree(b)
    sh("umoci", "config", "--image", f"{layout}:v1", "--architecture", "amd64", "--os", "linux")
    sh("skopeo", "copy", "--quiet", f"oci:{layout}:v1", f"docker://{reg}/bench/{name}:v1")
    sh(BIN, "convert", f"{reg}/bench/{name}:v1", f"{reg}/bench/{name}:v1-lazyblk")
    bases = {base_mode(m) for m in modes}
    for spec in sorted({convert_spec_of(m) for m in bases if convert_spec_of(m)}):
        sh(BIN, "convert", f"{reg}/bench/{name}:v1", f"{reg}/bench/{name}:v1-lazyblk-{spec}",
           *convert_args_of(spec))
    # The lever's "before": no metadata region (mode lazyblk-nometa).
    if "lazyblk-nometa" in bases:
        sh(BIN, "convert", f"{reg}/bench/{name}:v1", f"{reg}/bench/{name}:v1-lazyblk-nometa",
           "--metadata-region", "0")
    if any(m.startswith("lazyblk+index") for m in bases):
        build_indexes(name, work, reg)
    # The same image in another repository: the trace is pushed there only.
    if {"lazyblk+trace", "lazyblk+relayout"} & bases:
        sh("skopeo", "copy", "--quiet", f"docker://{reg}/bench/{name}:v1-lazyblk",
           f"docker://{reg}/bench/{name}-traced:v1-lazyblk")
    # And another copy for the trace the snapshotter recorded by itself during that run.
    if "lazyblk+autotrace" in bases:
        sh("skopeo", "copy", "--quiet", f"docker://{reg}/bench/{name}:v1-lazyblk",
           f"docker://{reg}/bench/{name}-autotraced:v1-lazyblk")


def write_half_compressible(path, size):
    """SIZE bytes that compress about 2:1: every 4 KiB block is 2 KiB of random bytes, then 2 KiB of
    zeros."""
    zeros = bytes(2048)
    with open(path, "wb") as f:
        for _ in range(size // (8 << 20)):
            r = os.urandom(4 << 20)
            f.write(b"".join(r[i:i + 2048] + zeros for i in range(0, len(r), 2048)))


def build_indexes(name, work, reg):
    """The original image in its own repositories with `lazyblk index` artifacts (modes lazyblk+index*),
    the index build timed against `skopeo copy`."""
    # The original image in its own repository with a `lazyblk index` artifact (mode lazyblk+index);
    # the index build is timed against a plain `skopeo copy` of the same image (it reads every layer
    # once too).
    # (A copy into a local OCI layout: within one registry skopeo would mount the blobs, not read them.)
    copy_dir = os.path.join(work, f"copy-{name}")
    t = time.monotonic()
    sh("skopeo", "copy", "--quiet", f"docker://{reg}/bench/{name}:v1", f"oci:{copy_dir}:v1")
    t_copy = time.monotonic() - t
    shutil.rmtree(copy_dir)
    sh("skopeo", "copy", "--quiet", f"docker://{reg}/bench/{name}:v1", f"docker://{reg}/bench/{name}-orig:v1")
    t = time.monotonic()
    out = sh(BIN, "index", f"{reg}/bench/{name}-orig:v1", "--json")
    t_index = time.monotonic() - t
    s = json.loads(out.stdout)
    INDEX_STATS.setdefault(name, {}).update({"layers_bytes": s["source_bytes"], "index_bytes": s["target_bytes"],
                         "index_pct": 100.0 * s["target_bytes"] / s["source_bytes"],
                         "index_s": t_index, "skopeo_copy_s": t_copy})
    print(f"index of {name}: {INDEX_STATS[name]}", file=sys.stderr)
    # The span-size lever (mode lazyblk+index512): 512 KiB spans, a copy of the original image.
    sh("skopeo", "copy", "--quiet", f"docker://{reg}/bench/{name}:v1", f"docker://{reg}/bench/{name}-orig512:v1")
    out = sh(BIN, "index", f"{reg}/bench/{name}-orig512:v1", "--json", "--span-size", "512K")
    s = json.loads(out.stdout)
    INDEX_STATS[name]["index512_pct"] = 100.0 * s["target_bytes"] / s["source_bytes"]
    # The "before" of span pieces (mode lazyblk+index-whole): an index built by an older lazyblk
    # (`--index-whole-bin`, span tables without pieces), served by this build span by span.
    if INDEX_WHOLE_BIN:
        sh("skopeo", "copy", "--quiet", f"docker://{reg}/bench/{name}:v1", f"docker://{reg}/bench/{name}-origwhole:v1")
        sh(INDEX_WHOLE_BIN, "index", f"{reg}/bench/{name}-origwhole:v1", "--json")


INDEX_STATS = {}
INDEX_WHOLE_BIN = None
DAEMON_ARGS = []
VARIANTS = {}
SNAPSHOTTER_ARGS = []
MODES = []
TLS_CONTEXT = None


def split_bin(args):
    """A variant's node daemon arguments without its `bin=PATH` and `snap=ARG` entries, and the binary
    that runs the daemon and the snapshotter (that PATH, else the benchmark's)."""
    bins = [x.partition("=")[2] for x in args if x.startswith("bin=")]
    return (os.path.abspath(bins[-1]) if bins else BIN), [x for x in args if not x.startswith(("bin=", "snap="))]


def snap_args(args):
    """A variant's own snapshotter arguments (its `snap=ARG` entries)."""
    return [x.partition("=")[2] for x in args or [] if x.startswith("snap=")]


def base_mode(mode):
    """The mode a variant (MODE~NAME) serves the image of."""
    return mode.split("~")[0]


def convert_spec_of(mode):
    """SPEC of a lazyblk@SPEC mode, else None."""
    return mode.partition("@")[2] if mode.startswith("lazyblk@") else None


def convert_args_of(spec):
    """`lazyblk convert` arguments of a SPEC: SIZE, zLEVEL or SIZE-zLEVEL (e.g. 1M, z19, 256K-z14)."""
    m = re.fullmatch(r"(\d+[KM])?(?:-?z(\d+))?", spec)
    if not m or not any(m.groups()):
        sys.exit(f"lazyblk@{spec}: SPEC is SIZE, zLEVEL or SIZE-zLEVEL (e.g. 1M, z19, 256K-z14)")
    size, level = m.groups()
    return (["--chunk-size", size] if size else []) + (["--level", level] if level else [])


def repo_tag(name, mode):
    mode = base_mode(mode)
    if convert_spec_of(mode):
        return (name, f"v1-lazyblk-{convert_spec_of(mode)}")
    return {"overlayfs": (name, "v1"), "lazyblk": (name, "v1-lazyblk"),
            "lazyblk-nometa": (name, "v1-lazyblk-nometa"),
            "lazyblk+trace": (f"{name}-traced", "v1-lazyblk"),
            "lazyblk+autotrace": (f"{name}-autotraced", "v1-lazyblk"),
            "lazyblk+relayout": (f"{name}-relaid", "v1-lazyblk"),
            "lazyblk+index": (f"{name}-orig", "v1"),
            "lazyblk+index512": (f"{name}-orig512", "v1"),
            "lazyblk+index-whole": (f"{name}-origwhole", "v1"),
            "soci": (f"{name}-soci", "v1"), "nydus": (f"{name}-nydus", "v1")}[mode]


def record_trace(env, reg, name):
    """One recording run of the untraced image (same layers), pushed to the traced repository."""
    env.cold()
    out = os.path.join(env.work, f"trace-{name}.json")
    rec = subprocess.Popen([BIN, "trace", "record", "--run-dir", os.path.join(env.lb, "run"),
                            "--ready-url", f"http://127.0.0.1:{PORT}/", "-o", out, "--timeout", "120"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    image = f"{reg}/bench/{name}:v1-lazyblk"
    sh(BIN, "pull", image, "--address", env.sock)
    cname = f"record-{name}"
    env.ctr("run", "-d", "--net-host", "--snapshotter", "lazyblk", image, cname, *APPS[name])
    so, se = rec.communicate(timeout=180)
    if rec.returncode != 0:
        sys.exit(f"trace record failed:\n{so}\n{se}")
    print(f"trace of {name}:\n{so}", file=sys.stderr)
    auto = recorded_trace(env, name)
    env.ctr("task", "kill", "-s", "SIGKILL", cname, check=False)
    bases = {base_mode(m) for m in MODES}
    if "lazyblk+trace" in bases:
        sh(BIN, "trace", "push", f"{reg}/bench/{name}-traced:v1-lazyblk", out)
    if auto:
        sh(BIN, "trace", "push", f"{reg}/bench/{name}-autotraced:v1-lazyblk", auto)
    if "lazyblk+relayout" in bases:
        sh(BIN, "trace", "relayout", f"{reg}/bench/{name}:v1-lazyblk",
           f"{reg}/bench/{name}-relaid:v1-lazyblk", "--trace", out)


def recorded_trace(env, name, timeout=120):
    """The startup trace the snapshotter recorded by itself for NAME:v1-lazyblk (lazyblk trace
    recorded), waited for; None if the snapshotter records none (an older build)."""
    if not any(base_mode(m) == "lazyblk+autotrace" for m in MODES):
        return None
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = sh(BIN, "trace", "recorded", "--root", env.lb, check=False)
        for line in r.stdout.splitlines():
            if line.split("  ")[0].endswith(f"/bench/{name}:v1-lazyblk"):
                print(f"recorded by the snapshotter: {line}", file=sys.stderr)
                return line.rsplit("  ", 1)[1]
        time.sleep(0.5)
    sys.exit(f"the snapshotter recorded no trace of {name}")


def manifest(reg, name, tag):
    """The image manifest (and its size) of REG/bench/NAME:TAG."""
    req = urllib.request.Request(f"https://{reg}/v2/bench/{name}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, context=TLS_CONTEXT) as r:
        body = r.read()
    return json.loads(body), len(body)


def http_ready(deadline=120):
    t = time.monotonic()
    while time.monotonic() - t < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic()
        except Exception:
            pass
        time.sleep(0.005)
    sys.exit("no HTTP 200")


class Env:
    def __init__(self, work):
        self.work = work
        self.sock = os.path.join(work, "containerd.sock")
        self.snap_sock = os.path.join(work, "lazyblk.sock")
        self.lb = os.path.join(work, "lb")
        self.snapd = None
        self.peers = {}
        # Arguments of the node daemon running now (None: the snapshotter started its own).
        self.daemon_args = list(DAEMON_ARGS) if DAEMON_ARGS else None

    def ctr(self, *args, check=True):
        return sh("ctr", "-a", self.sock, *args, check=check)

    def start_snapshotter(self):
        log = open(os.path.join(self.work, "snapshotter.log"), "a")
        run = os.path.join(self.lb, "run")
        if self.daemon_args is not None:
            # The node daemon with the benchmark's settings (else the snapshotter starts one).
            binary, args = split_bin(self.daemon_args)
            subprocess.Popen([binary, "daemon", "--run-dir", run, "--cache-dir", os.path.join(self.lb, "cache"),
                              *args], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
            peers.wait_unix(os.path.join(run, "daemon.sock"), "lazyblk daemon")
        self.snapd = subprocess.Popen([split_bin(self.daemon_args or [])[0], "snapshotter", "--address", self.snap_sock, "--root", self.lb,
                                       "--backend", "auto", "--grace-secs", "0", *SNAPSHOTTER_ARGS,
                                       *snap_args(self.daemon_args)], stderr=log)
        for _ in range(300):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.snap_sock)
                s.close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit("snapshotter did not start")

    def stop_snapshotter(self):
        if self.snapd:
            self.snapd.send_signal(signal.SIGTERM)
            self.snapd.wait(timeout=30)
            self.snapd = None
        run = os.path.join(self.lb, "run")
        sh(BIN, "detach", "all", "--run-dir", run, check=False)
        # The node daemon the snapshotter started (its own session) leaves with its devices gone.
        try:
            pid = int(open(os.path.join(run, "daemon.pid")).read().split()[0])
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.025)
        except (OSError, ValueError, IndexError):
            pass

    def use_daemon_args(self, args):
        """Restarts the snapshotter and its node daemon if they run with other daemon arguments (a
        variant mode), and waits until containerd reaches the new snapshotter."""
        if args == self.daemon_args:
            return
        self.stop_snapshotter()
        self.daemon_args = args
        self.start_snapshotter()
        for _ in range(600):
            if self.ctr("snapshots", "--snapshotter", "lazyblk", "ls", check=False).returncode == 0:
                return
            time.sleep(0.05)
        sys.exit("containerd did not reconnect to the restarted snapshotter")

    def remove_containers(self):
        """Kills and removes every container (a task's shim outlives containerd: the run's end
        must remove them while containerd still runs, or they keep their rootfs and its layer)."""
        for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("task", "kill", "-s", "SIGKILL", c, check=False)
            time.sleep(0.2)
            self.ctr("task", "rm", "-f", c, check=False)
            self.ctr("containers", "rm", c, check=False)

    def cold(self):
        """Removes images, content and snapshots (containerd's GC removes lazyblk's, which detaches
        their layers), empties lazyblk's chunk cache and drops the page cache. The snapshotter keeps
        running (restarting it would only measure containerd's reconnect backoff)."""
        self.remove_containers()
        imgs = self.ctr("images", "ls", "-q").stdout.split()
        if imgs:
            self.ctr("images", "rm", "--sync", *imgs, check=False)
        run = os.path.join(self.lb, "run")
        for _ in range(200):
            if not glob.glob(os.path.join(run, "devices/*[0-9].json")):
                break
            time.sleep(0.05)
        else:
            sys.exit("lazyblk layers still attached after the images were removed")
        cache = os.path.join(self.lb, "cache")
        # (The daemon may still be finishing a write there: empty what can be emptied, keep going.)
        shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache, exist_ok=True)
        for p in self.peers.values():
            p.cold()
        sh("sync")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def lazyblk_ls(env, json_out=True):
    r = sh(BIN, "ls", *(["--json"] if json_out else []), "--run-dir", os.path.join(env.lb, "run"), check=False)
    return json.loads(r.stdout or "[]") if json_out else r.stdout


def start_registry(work, procs, cert, key):
    """A docker-registry over TLS on a free loopback port (appended to procs); returns NAME:PORT."""
    port = free_port()
    cfg = os.path.join(work, "registry.yml")
    open(cfg, "w").write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/reg\n"
                         f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n"
                         f"  tls:\n    certificate: {cert}\n    key: {key}\n")
    procs.append(subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    reg = f"{peers.HOSTNAME}:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"https://{reg}/v2/", context=TLS_CONTEXT)
            break
        except Exception:
            time.sleep(0.1)
    return reg


def start_containerd(env, procs):
    """The lazyblk snapshotter, then containerd 1.6 with it as a proxy plugin (appended to procs)."""
    work = env.work
    open(os.path.join(work, "containerd.toml"), "w").write(
        f'version = 2\nroot = "{work}/croot"\nstate = "{work}/cstate"\n'
        f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{env.sock}"\n'
        f'[proxy_plugins.lazyblk]\n  type = "snapshot"\n  address = "{env.snap_sock}"\n'
        + "".join(p.containerd_plugin() for p in env.peers.values()))
    env.start_snapshotter()
    for p in env.peers.values():
        p.start()
    procs.append(subprocess.Popen(["containerd", "--config", os.path.join(work, "containerd.toml")],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "containerd.log"), "w")))
    wait_sock(env.sock, "containerd")


def fetched_lazyblk(env):
    return sum(l.get("fetched_bytes", 0) for l in lazyblk_ls(env))


def one_run(env, reg, name, mode, i):
    lazy = mode.startswith("lazyblk")
    if lazy and VARIANTS:
        env.use_daemon_args(DAEMON_ARGS + VARIANTS.get(mode.partition("~")[2], []))
    env.cold()
    repo, tag = repo_tag(name, mode)
    image = f"{reg}/bench/{repo}:{tag}"
    m, msize = manifest(reg, repo, tag)
    cname = f"bench-{name}-{re.sub('[^A-Za-z0-9]+', '-', mode)}-{i}"
    t0 = time.monotonic()
    started_at = time.time()
    if mode == "overlayfs":
        env.ctr("images", "pull", image)
        snapshotter = "overlayfs"
    elif mode in env.peers:
        env.peers[mode].pull(env, image)
        snapshotter = mode
    else:
        sh(BIN, "pull", image, "--address", env.sock)
        snapshotter = "lazyblk"
    t1 = time.monotonic()
    env.ctr("run", "-d", "--net-host", "--snapshotter", snapshotter, image, cname, *APPS[name])
    t2 = time.monotonic()
    t3 = http_ready()
    meta = msize + m["config"]["size"]
    layers = sum(l["size"] for l in m["layers"])
    # Bytes from the registry: a full pull takes every layer; lazyblk counts its own; peers: None.
    def fetched_now():
        return meta + fetched_lazyblk(env) if lazy else meta + layers if mode == "overlayfs" else None

    at_ready = fetched_now()
    # The whole image local (the registry no longer a runtime dependency): a full pull's pull; for
    # lazyblk, every layer filled. Peers: not measured (None).
    local = t1 - t0 if mode == "overlayfs" else None
    if lazy and "--no-fill" not in SNAPSHOTTER_ARGS:
        while time.monotonic() - t3 < 300:
            ls = lazyblk_ls(env)
            if ls and not any(l.get("depends_on_registry", True) for l in ls):
                local = time.monotonic() - t0
                break
            time.sleep(0.05)
    else:
        time.sleep(1.0)
    fetched = fetched_now()
    if SHOW_LS and mode != "overlayfs":
        print(f"\n$ lazyblk ls   (while {cname} runs)\n{lazyblk_ls(env, json_out=False)}", flush=True)
    env.ctr("task", "kill", "-s", "SIGKILL", cname, check=False)
    return {"image": name, "mode": mode, "run": i, "pull": t1 - t0, "start": t2 - t1, "ready": t3 - t2,
            "total": t3 - t0, "local": local, "fetched_bytes": fetched, "fetched_at_ready": at_ready,
            "image_bytes": sum(l["size"] for l in m["layers"]),
            # Wall-clock start and end, to line a run up with samples taken beside the benchmark.
            "started_at": started_at, "ended_at": time.time()}


def svg(rows, path):
    groups = sorted({(r["image"], r["mode"]) for r in rows})
    med = {g: {k: statistics.median(r[k] for r in rows if (r["image"], r["mode"]) == g)
               for k in ("pull", "start", "ready")} for g in groups}
    top = max(sum(v.values()) for v in med.values()) or 1
    W, bar, gap, left = 760, 26, 14, 170
    H = 40 + len(groups) * (bar + gap) + 30
    colors = {"pull": "#4e79a7", "start": "#f28e2b", "ready": "#59a14f"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           '<text x="10" y="20" font-size="14">Readiness: create to first HTTP 200 (median seconds)</text>']
    y = 40
    for g in groups:
        out.append(f'<text x="10" y="{y + 17}">{g[0]} / {g[1]}</text>')
        x = left
        for k in ("pull", "start", "ready"):
            w = med[g][k] / top * (W - left - 60)
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar}" fill="{colors[k]}"/>')
            x += w
        out.append(f'<text x="{x + 4:.1f}" y="{y + 17}">{sum(med[g].values()):.2f}s</text>')
        y += bar + gap
    for i, k in enumerate(("pull", "start", "ready")):
        out.append(f'<rect x="{left + i * 90}" y="{y}" width="12" height="12" fill="{colors[k]}"/>'
                   f'<text x="{left + i * 90 + 16}" y="{y + 11}">{k}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))


def table(rows):
    lines = ["| image | mode | pull s | start s | ready s | total s | image local s | MB fetched by ready | MB fetched | total vs overlayfs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups = sorted({(r["image"], r["mode"]) for r in rows})

    def stat(g, k, scale=1.0, fmt="{:.2f}"):
        v = [r[k] * scale for r in rows if (r["image"], r["mode"]) == g and r.get(k) is not None]
        if not v:
            return "–"
        return fmt.format(statistics.median(v)) + " (" + fmt.format(min(v)) + "–" + fmt.format(max(v)) + ")"

    for g in groups:
        tot = statistics.median(r["total"] for r in rows if (r["image"], r["mode"]) == g)
        base = [r["total"] for r in rows if r["image"] == g[0] and r["mode"] == "overlayfs"]
        ratio = f"{tot / statistics.median(base):.2f}x" if base else "–"
        lines.append(f"| {g[0]} | {g[1]} | {stat(g, 'pull')} | {stat(g, 'start')} | {stat(g, 'ready')} | "
                     f"{stat(g, 'total')} | {stat(g, 'local')} | {stat(g, 'fetched_at_ready', 1e-6, '{:.1f}')} | "
                     f"{stat(g, 'fetched_bytes', 1e-6, '{:.1f}')} | {ratio} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--images", default="nginx,numpy,large")
    ap.add_argument("--modes", default="overlayfs,lazyblk,lazyblk+trace,lazyblk+relayout,lazyblk+index,soci")
    ap.add_argument("--out", default=os.path.join(ROOT, ".cache/bench/readiness"))
    ap.add_argument("--show-ls", action="store_true", help="print `lazyblk ls` while each lazyblk container runs")
    ap.add_argument("--profiles", "--profile", default="loopback",
                    help="networks between node and registry, comma-separated: loopback, region (2 ms RTT, "
                         "1 Gbit/s) or internet (30 ms RTT, 200 Mbit/s), through `lazyblk bench shape` for "
                         "every mode")
    ap.add_argument("--peers-dir", default=os.path.join(ROOT, ".cache/peers"),
                    help="where tools/get-sid-package.sh unpacks the peers' Debian packages")
    ap.add_argument("--keep-work", action="store_true", help="keep the work dir (logs) for debugging")
    ap.add_argument("--nydus-bin", help="directory with nydusd and nydus-image (mode nydus)")
    ap.add_argument("--index-whole-bin", help="an older lazyblk whose indexes have no span pieces (mode lazyblk+index-whole)")
    ap.add_argument("--snapshotter-arg", action="append", default=[],
                    help="an argument for the lazyblk snapshotter (e.g. --snapshotter-arg=--no-fill); repeatable")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="an argument for the node daemon the benchmark starts (e.g. "
                         "--daemon-arg=--fill-busy-concurrency=0); repeatable")
    ap.add_argument("--bin", help="the lazyblk binary to measure (default: target/release/lazyblk, built "
                    "first); a copy keeps a rebuild during the run from changing it")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARG[,ARG...]",
                    help="mode lazyblk~NAME (or lazyblk+trace~NAME, ...): that mode with these node daemon "
                         "arguments added, e.g. --variant follow=--fill-follow-kib=4096 (an argument "
                         "bin=PATH runs that variant's daemon and snapshotter from another lazyblk binary, "
                         "e.g. --variant old=bin=/tmp/lazyblk-old; snap=ARG is an argument for that "
                         "variant's snapshotter, e.g. snap=--no-attach-on-pull); the benchmark "
                         "restarts the snapshotter and daemon between modes of different arguments, so A/B "
                         "modes alternate in one run; repeatable")
    a = ap.parse_args()
    for v in a.variant:
        vname, _, vargs = v.partition("=")
        VARIANTS[vname] = [x for x in vargs.split(",") if x]
    global BIN, SHOW_LS, DAEMON_ARGS, SNAPSHOTTER_ARGS, TLS_CONTEXT, INDEX_WHOLE_BIN, MODES
    SHOW_LS = a.show_ls
    INDEX_WHOLE_BIN = a.index_whole_bin
    DAEMON_ARGS = a.daemon_arg
    SNAPSHOTTER_ARGS = a.snapshotter_arg
    if os.geteuid() != 0:
        sys.exit("run as root")
    # A TERM (or an INT in a background job, which ignores it) still runs the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    modes = a.modes.split(",")
    MODES = modes
    if a.bin:
        BIN = os.path.abspath(a.bin)
    else:
        sh("cargo", "build", "--release", "-q", cwd=ROOT)
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="lazyblk-readiness-")
    procs = []
    env = Env(work)
    hosts = peers.HostsEntry()
    try:
        hosts.__enter__()
        bundle, cert, key = peers.make_tls(work)
        # Every process of the run (skopeo, containerd, ctr, lazyblk, the peers) trusts the test CA.
        os.environ["SSL_CERT_FILE"] = bundle
        TLS_CONTEXT = ssl.create_default_context(cafile=bundle)
        if "soci" in modes:
            bindir = sh(os.path.join(ROOT, "tools/get-sid-package.sh"), os.path.join(a.peers_dir, "soci"),
                        "soci-snapshotter").stdout.strip()
            env.peers["soci"] = peers.Soci(bindir, work)
            print(f"peer: {env.peers['soci'].version()}", file=sys.stderr)
        if "nydus" in modes:
            if not a.nydus_bin:
                sys.exit("mode nydus needs --nydus-bin DIR (nydusd and nydus-image built from dragonflyoss/nydus)")
            sbin = sh(os.path.join(ROOT, "tools/get-sid-package.sh"), os.path.join(a.peers_dir, "nydus"),
                      "nydus-snapshotter", "soci-snapshotter").stdout.strip()
            env.peers["nydus"] = peers.Nydus(sbin, a.nydus_bin, work, bundle, sbin)
            print(f"peer: {env.peers['nydus'].version()}", file=sys.stderr)
        reg = start_registry(work, procs, cert, key)
        images = a.images.split(",")
        for name in images:
            print(f"building {name}...", file=sys.stderr)
            build_image(name, work, reg, modes)
        start_containerd(env, procs)
        for name in images:
            for pname, p in env.peers.items():
                took = p.build(env, reg, name, os.path.join(work, f"layout-{name}"), TLS_CONTEXT)
                INDEX_STATS.setdefault(name, {})[f"{pname}_index_s"] = took
        rows = []
        unshaped = reg
        traced = False
        for profile in a.profiles.split(","):
            # Every mode reaches the registry through the same shaped path (images were built unshaped).
            reg = unshaped
            shaper = None
            if profile != "loopback":
                shaper = subprocess.Popen([BIN, "bench", "shape", unshaped, "--profile", profile],
                                          stdout=subprocess.PIPE, text=True)
                procs.append(shaper)  # (stopped at the run's end if the profile does not finish)
                reg = shaper.stdout.readline().strip().replace("127.0.0.1", peers.HOSTNAME)
                print(f"registry through the {profile} shaper at {reg}", file=sys.stderr)
            if not traced and {"lazyblk+trace", "lazyblk+relayout", "lazyblk+autotrace"} & {base_mode(m) for m in modes}:
                for name in images:
                    record_trace(env, unshaped, name)
                traced = True
            for name in images:
                for i in range(a.runs):
                    for mode in modes:
                        r = one_run(env, reg, name, mode, i)
                        r["profile"] = profile
                        print(json.dumps(r), file=sys.stderr)
                        rows.append(r)
            env.cold()
            if shaper:
                shaper.terminate()
                shaper.wait()
                procs.remove(shaper)
        json.dump(rows, open(os.path.join(a.out, "results.json"), "w"), indent=1)
        md = ""
        for profile in a.profiles.split(","):
            prow = [r for r in rows if r["profile"] == profile]
            md += f"### {profile}\n\n" + table(prow) + "\n\n"
            svg(prow, os.path.join(a.out, f"readiness-{profile}.svg"))
        if INDEX_STATS:
            md += ("| image | layers MB | lazyblk index MB | index / layers | lazyblk index s | skopeo copy s "
                   "| soci create+push s | nydus convert+push s | index / layers, 512 KiB spans |\n|---|---|---|---|---|---|---|---|---|\n")
            for n, v in INDEX_STATS.items():
                # Each figure only where its mode ran (soci's build time without a lazyblk+index mode).
                def fig(key, fmt, scale=1.0):
                    return fmt.format(v[key] / scale) if key in v else "–"
                md += (f"| {n} | {fig('layers_bytes', '{:.1f}', 1e6)} | {fig('index_bytes', '{:.2f}', 1e6)} "
                       f"| {fig('index_pct', '{:.2f}%')} | {fig('index_s', '{:.2f}')} | {fig('skopeo_copy_s', '{:.2f}')} "
                       f"| {fig('soci_index_s', '{:.2f}')} | {fig('nydus_index_s', '{:.2f}')} "
                       f"| {fig('index512_pct', '{:.2f}%')} |\n")
        open(os.path.join(a.out, "results.md"), "w").write(md)
        print(md)
    finally:
        env.remove_containers()
        env.stop_snapshotter()
        for p in env.peers.values():
            p.cleanup()
        for p in procs:
            p.terminate()
            p.wait()
        hosts.__exit__(None, None, None)
        if a.keep_work:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
