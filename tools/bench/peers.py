"""The readiness benchmark's registry over TLS and its peers (other lazy loaders), run beside lazyblk.

Every mode talks to one docker-registry over HTTPS under a host *name* (`lazyblk-bench.test`, mapped to
127.0.0.1 in /etc/hosts for the run and removed afterwards), with a throwaway CA that only the
benchmark's processes trust (`SSL_CERT_FILE` = the system bundle + that CA; nothing is installed).
HTTPS under a name is what real registries are, and it is what the SOCI snapshotter needs: it fetches
its index over HTTPS, and blobs of loopback addresses over plain HTTP.

Peers:
  soci   AWS SOCI snapshotter (Debian sid's soci-snapshotter package, unpacked by
         tools/get-sid-package.sh): `soci create` + `soci push` build the index beside the unmodified
         image, `soci image rpull` pulls, `soci-snapshotter-grpc` is a containerd proxy plugin.
  nydus  Nydus (see the Nydus class): sid's nydus-snapshotter with nydusd/nydus-image built from
         upstream source by the user (this repository does not build them).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

HOSTNAME = "lazyblk-bench.test"
HOSTS_MARK = "# lazyblk readiness benchmark"


def sh(*cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stdout}\n{r.stderr}")
    return r


class HostsEntry:
    """Maps HOSTNAME to 127.0.0.1 in /etc/hosts while the benchmark runs."""

    def _drop(self):
        lines = open("/etc/hosts").read().splitlines(keepends=True)
        kept = [l for l in lines if HOSTS_MARK not in l]
        if kept != lines:
            open("/etc/hosts", "w").write("".join(kept))

    def __enter__(self):
        self._drop()
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {HOSTNAME} {HOSTS_MARK}\n")
        return self

    def __exit__(self, *exc):
        self._drop()


def make_tls(work):
    """A CA and a server certificate for HOSTNAME; returns (bundle, cert, key). The bundle (the
    system's CAs + this CA) is what the benchmark's processes get as SSL_CERT_FILE."""
    d = os.path.join(work, "tls")
    os.makedirs(d, mode=0o700)
    ca, cakey = os.path.join(d, "ca.pem"), os.path.join(d, "ca.key")
    cert, key, csr = os.path.join(d, "server.pem"), os.path.join(d, "server.key"), os.path.join(d, "server.csr")
    ext = os.path.join(d, "ext.cnf")
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", cakey, "-out", ca,
       "-days", "2", "-subj", "/CN=lazyblk readiness benchmark CA")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={HOSTNAME}")
    open(ext, "w").write(f"subjectAltName=DNS:{HOSTNAME},IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    sh("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", cakey, "-CAcreateserial", "-out", cert,
       "-days", "2", "-extfile", ext)
    bundle = os.path.join(d, "bundle.pem")
    system = "/etc/ssl/certs/ca-certificates.crt"
    with open(bundle, "w") as f:
        if os.path.exists(system):
            f.write(open(system).read())
        f.write(open(ca).read())
    return bundle, cert, key


def wait_unix(path, what, proc=None):
    for _ in range(400):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
    sys.exit(f"{what} did not start")


class Peer:
    """A peer snapshotter run as a containerd proxy plugin named `name`, with its socket and root in
    the run's work dir; `command()` is its command line."""

    name = ""

    def __init__(self, work):
        self.work = work
        self.sock = os.path.join(work, f"{self.name}.sock")
        self.root = os.path.join(work, f"{self.name}-root")
        self.proc = None

    def command(self):
        raise NotImplementedError

    def containerd_plugin(self):
        return f'[proxy_plugins.{self.name}]\n  type = "snapshot"\n  address = "{self.sock}"\n'

    def start(self):
        log = open(os.path.join(self.work, f"{self.name}.log"), "a")
        os.makedirs(self.root, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        wait_unix(self.sock, self.name, self.proc)

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        # Daemons it started (their command lines name its root), then any FUSE mount left.
        subprocess.run(["pkill", "-f", self.root], capture_output=True)
        for line in open("/proc/self/mountinfo").read().splitlines():
            mp = line.split()[4]
            if mp.startswith(self.root + "/"):
                subprocess.run(["umount", "-l", mp], capture_output=True)

    def cold(self):
        """A fresh snapshotter with an empty root (its caches and metadata go with it)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.start()

    def cleanup(self):
        self.stop()


class Soci(Peer):
    """The AWS SOCI snapshotter as a containerd proxy plugin named "soci"."""

    name = "soci"

    def __init__(self, bindir, work):
        super().__init__(work)
        self.bin = bindir
        self.cfg = os.path.join(work, "soci.toml")
        # The soci CLI keeps its artifacts database and content under this fixed path.
        self.cli_root = "/var/lib/soci-snapshotter-grpc"
        self.cli_root_existed = os.path.exists(self.cli_root)
        open(self.cfg, "w").write("")

    def version(self):
        return sh(os.path.join(self.bin, "soci"), "--version").stdout.strip()

    def command(self):
        return [os.path.join(self.bin, "soci-snapshotter-grpc"), "-address", self.sock, "-root", self.root,
                "-config", self.cfg, "-log-level", "warn"]

    def soci(self, env, *args):
        return sh(os.path.join(self.bin, "soci"), "--address", env.sock, *args)

    def build(self, env, reg, name, layout, ctx):
        """Copies REG/bench/NAME:v1 to REG/bench/NAME-soci:v1, pulls it into containerd, builds its SOCI
        index (defaults: 4 MiB spans, layers of 10 MiB and more) and pushes it to that repository;
        returns the seconds `soci create` + `soci push` took."""
        image = f"{reg}/bench/{name}-soci:v1"
        sh("skopeo", "copy", "--quiet", f"docker://{reg}/bench/{name}:v1", f"docker://{image}")
        env.ctr("images", "pull", image)
        t = time.monotonic()
        self.soci(env, "create", image)
        self.soci(env, "push", image)
        took = time.monotonic() - t
        listing = self.soci(env, "index", "list").stdout
        print(f"soci index of {image}:\n{listing}", file=sys.stderr)
        env.ctr("images", "rm", "--sync", image, check=False)
        return took

    def pull(self, env, image):
        self.soci(env, "image", "rpull", image)

    def cleanup(self):
        super().cleanup()
        if not self.cli_root_existed:
            shutil.rmtree(self.cli_root, ignore_errors=True)


def push_blob(reg, repo, path, ctx):
    """Uploads the file at `path` as a blob of REG/REPO (monolithic upload, streamed from the file:
    a Nydus blob of a large image is several GB); returns (digest, size)."""
    import hashlib
    import urllib.request
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    digest = "sha256:" + h.hexdigest()
    size = os.path.getsize(path)
    req = urllib.request.Request(f"https://{reg}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(req, context=ctx) as r:
        loc = r.headers["Location"]
    if loc.startswith("/"):
        loc = f"https://{reg}{loc}"
    sep = "&" if "?" in loc else "?"
    with open(path, "rb") as body:
        req = urllib.request.Request(f"{loc}{sep}digest={digest}", method="PUT", data=body,
                                     headers={"Content-Type": "application/octet-stream",
                                              "Content-Length": str(size)})
        urllib.request.urlopen(req, context=ctx).close()
    return digest, size


def push_manifest(reg, repo, tag, manifest, ctx):
    import json
    import urllib.request
    body = json.dumps(manifest).encode()
    req = urllib.request.Request(f"https://{reg}/v2/{repo}/manifests/{tag}", method="PUT", data=body,
                                 headers={"Content-Type": manifest["mediaType"]})
    urllib.request.urlopen(req, context=ctx).close()


class Nydus(Peer):
    """Nydus: nydus-snapshotter (Debian sid's package) in FUSE mode (`fusedev`, one nydusd per image)
    as a containerd proxy plugin named "nydus", with nydusd and nydus-image built from the upstream
    source (dragonflyoss/nydus; not built by this repository: pass --nydus-bin). Images are converted
    the way nydusify does it: per layer `nydus-image create --type tar-rafs` (RAFS v6, zstd chunks), the
    layer bootstraps merged into one, pushed as nydus data layers plus a bootstrap layer. Pulled with
    `soci image rpull --snapshotter nydus` (a pull that passes the CRI labels, as nerdctl does)."""

    name = "nydus"

    def __init__(self, snapshotter_bin, nydus_bin, work, bundle, soci_bin):
        super().__init__(work)
        self.sbin = snapshotter_bin
        self.nbin = nydus_bin
        self.soci_bin = soci_bin
        self.nydusd_cfg = os.path.join(work, "nydusd.json")
        import json
        json.dump({
            "device": {
                "backend": {"type": "registry", "config": {
                    "scheme": "https", "timeout": 10, "connect_timeout": 10, "retry_limit": 2,
                    "skip_verify": False, "ca_cert_files": [bundle]}},
                "cache": {"type": "blobcache", "config": {"work_dir": os.path.join(self.root, "cache")}},
            },
            "mode": "direct", "digest_validate": False, "iostats_files": False, "enable_xattr": True,
            # nydus's shipped defaults (misc/configs/nydusd-config.json): prefetch the whole image.
            "fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 1048576, "prefetch_all": True},
        }, open(self.nydusd_cfg, "w"))

    def version(self):
        v = sh(os.path.join(self.nbin, "nydusd"), "--version").stdout.split("\n")
        return "nydusd " + " ".join(l.strip() for l in v[:3] if l.strip())

    def command(self):
        # nydusd raises RLIMIT_NOFILE to 1000000 by default, which a container's hard limit refuses.
        nydusd = os.path.join(self.work, "nydusd")
        open(nydusd, "w").write(f'#!/bin/sh\nexec {os.path.join(self.nbin, "nydusd")} "$@" --rlimit-nofile 0\n')
        os.chmod(nydusd, 0o755)
        return [os.path.join(self.sbin, "containerd-nydus-grpc"), "--root", self.root, "--address", self.sock,
                "--nydusd", nydusd, "--nydus-image", os.path.join(self.nbin, "nydus-image"),
                "--nydusd-config", self.nydusd_cfg, "--daemon-mode", "dedicated", "--fs-driver", "fusedev",
                "--log-level", "warn", "--log-to-stdout"]


    def build(self, env, reg, name, layout, ctx):
        """Converts the OCI layout's image (tag v1) and pushes it as REG/bench/NAME-nydus:v1; returns
        the seconds the conversion and push took."""
        repo, tag = f"bench/{name}-nydus", "v1"
        import gzip
        import json
        import tarfile
        t = time.monotonic()
        d = os.path.join(self.work, f"nydus-conv-{repo.replace('/', '_')}")
        shutil.rmtree(d, ignore_errors=True)
        blobs = os.path.join(d, "blobs")
        os.makedirs(blobs)
        blob = lambda dg: os.path.join(layout, "blobs", *dg.split(":"))
        idx = json.load(open(os.path.join(layout, "index.json")))
        man = json.load(open(blob(idx["manifests"][0]["digest"])))
        cfg = json.load(open(blob(man["config"]["digest"])))
        boots, layers, diff_ids, sizes = [], [], [], []
        for i, l in enumerate(man["layers"]):
            tar = os.path.join(d, f"layer{i}.tar")
            with gzip.open(blob(l["digest"])) as src, open(tar, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            boot, out = os.path.join(d, f"layer{i}.boot"), os.path.join(d, f"layer{i}.json")
            sh(os.path.join(self.nbin, "nydus-image"), "create", "--type", "tar-rafs", "--fs-version", "6",
               "--compressor", "zstd", "--whiteout-spec", "oci", "--blob-dir", blobs, "--bootstrap", boot,
               "--output-json", out, tar)
            os.unlink(tar)
            boots.append(boot)
            for b in json.load(open(out))["blobs"]:
                dg, size = push_blob(reg, repo, os.path.join(blobs, b), ctx)
                layers.append({"mediaType": "application/vnd.oci.image.layer.nydus.blob.v1", "digest": dg,
                               "size": size, "annotations": {"containerd.io/snapshot/nydus-blob": "true"}})
                diff_ids.append(dg)
                sizes.append(str(size))
        final = os.path.join(d, "image.boot")
        # The merged bootstrap names each layer's blob by the digest it was pushed under.
        sh(os.path.join(self.nbin, "nydus-image"), "merge", "--bootstrap", final,
           "--blob-digests", ",".join(x.split(":")[1] for x in diff_ids), "--blob-sizes", ",".join(sizes), *boots)
        boot_tar = os.path.join(d, "bootstrap.tar")
        with tarfile.open(boot_tar, "w") as tf:
            info = tarfile.TarInfo("image")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
            tf.add(final, arcname="image/image.boot")
        import hashlib
        diff_ids.append("sha256:" + hashlib.sha256(open(boot_tar, "rb").read()).hexdigest())
        with open(boot_tar, "rb") as src, gzip.open(boot_tar + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        dg, size = push_blob(reg, repo, boot_tar + ".gz", ctx)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": dg, "size": size,
                       "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                                       "containerd.io/snapshot/nydus-fs-version": "6"}})
        cfg["rootfs"]["diff_ids"] = diff_ids
        cfg_path = os.path.join(d, "config.json")
        json.dump(cfg, open(cfg_path, "w"))
        cdg, csize = push_blob(reg, repo, cfg_path, ctx)
        push_manifest(reg, repo, tag, {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdg, "size": csize},
            "layers": layers}, ctx)
        shutil.rmtree(d, ignore_errors=True)
        return time.monotonic() - t

    def pull(self, env, image):
        sh(os.path.join(self.soci_bin, "soci"), "--address", env.sock, "image", "rpull", "--snapshotter",
           "nydus", image)
