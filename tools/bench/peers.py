"""The readiness benchmark's registry over TLS and its peers (other lazy loaders), run beside lazyblk.

Every mode talks to one docker-registry over HTTPS under a host *name* (`lazyblk-bench.test`, mapped to
127.0.0.1 in /etc/hosts for the run and removed afterwards), with a throwaway CA that only the
benchmark's processes trust (`SSL_CERT_FILE` = the system bundle + that CA; nothing is installed).
HTTPS under a name is what real registries are, and it is what the SOCI snapshotter needs: it fetches
its index over HTTPS, and blobs of loopback addresses over plain HTTP.

Peers:
  soci   AWS SOCI snapshotter (Debian sid's soci-snapshotter package, unpacked by
         tools/bench/get-peers.sh): `soci create` + `soci push` build the index beside the unmodified
         image, `soci image rpull` pulls, `soci-snapshotter-grpc` is a containerd proxy plugin.
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


class Soci:
    """The AWS SOCI snapshotter as a containerd proxy plugin named "soci"."""

    name = "soci"

    def __init__(self, bindir, work):
        self.bin = bindir
        self.work = work
        self.sock = os.path.join(work, "soci.sock")
        self.root = os.path.join(work, "soci-root")
        self.cfg = os.path.join(work, "soci.toml")
        self.proc = None
        # The soci CLI keeps its artifacts database and content under this fixed path.
        self.cli_root = "/var/lib/soci-snapshotter-grpc"
        self.cli_root_existed = os.path.exists(self.cli_root)
        open(self.cfg, "w").write("")

    def version(self):
        return sh(os.path.join(self.bin, "soci"), "--version").stdout.strip()

    def containerd_plugin(self):
        return f'[proxy_plugins.soci]\n  type = "snapshot"\n  address = "{self.sock}"\n'

    def start(self):
        log = open(os.path.join(self.work, "soci.log"), "a")
        os.makedirs(self.root, exist_ok=True)
        self.proc = subprocess.Popen([os.path.join(self.bin, "soci-snapshotter-grpc"), "-address", self.sock,
                                      "-root", self.root, "-config", self.cfg, "-log-level", "warn"],
                                     stdout=log, stderr=log)
        wait_unix(self.sock, "soci-snapshotter-grpc", self.proc)

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        # Its FUSE mounts go with it; lazily detach any the exit left.
        for line in open("/proc/self/mountinfo").read().splitlines():
            mp = line.split()[4]
            if mp.startswith(self.root + "/"):
                subprocess.run(["umount", "-l", mp], capture_output=True)

    def cold(self):
        """A fresh snapshotter with an empty root (its span cache and metadata go with it)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.start()

    def soci(self, env, *args):
        return sh(os.path.join(self.bin, "soci"), "--address", env.sock, *args)

    def build(self, env, image):
        """Pulls IMAGE into containerd, builds its SOCI index (defaults: 4 MiB spans, layers of 10 MiB
        and more) and pushes it to the image's repository; times `soci create` + `soci push`."""
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
        self.stop()
        if not self.cli_root_existed:
            shutil.rmtree(self.cli_root, ignore_errors=True)
