//! The snapshotter with real components: Debian's containerd 1.6 + runc, docker-registry, a real Debian
//! image (umoci) with a whiteout/opaque layer and a layer carrying a static busybox, converted with
//! `lazyblk convert`; `lazyblk pull` takes every layer remotely (no download), `ctr run` serves HTTP
//! from it, its rootfs equals the same image unpacked by containerd's overlayfs snapshotter, a
//! snapshotter restart leaves the running container serving and new containers start, and an image
//! mixing a lazyblk layer with an ordinary tar.gz layer runs. Host CI: the loop backend.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::Registry;
use common::*;

fn have(tools: &[&str]) -> bool {
    for t in tools {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(may_skip(), "{t} missing in CI");
            eprintln!("SKIPPED: {t} not installed");
            return false;
        }
    }
    true
}

struct Daemon(Child, &'static str);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop; killing", self.1);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the unix socket at `path` accepts connections (its file appears before it listens).
fn wait_for(path: &Path, what: &str) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Env {
    /// Directory with containerd, ctr and containerd-shim-runc-v2.
    bin: PathBuf,
    dir: PathBuf,
    sock: PathBuf,
    snap_sock: PathBuf,
    root: PathBuf,
}

impl Env {
    /// `lazyblk pull IMAGE --plain-http --namespace NS` against this containerd.
    fn lazyblk_pull(&self, image: &str, ns: &str) -> Command {
        let mut c = lazyblk();
        c.args([
            "pull",
            image,
            "--plain-http",
            "--namespace",
            ns,
            "--address",
        ])
        .arg(&self.sock);
        c
    }

    /// The cleanup guard for this environment and containers `(namespace, name)`.
    fn cleanup(&self, containers: Vec<(String, String)>) -> Cleanup {
        Cleanup {
            ctr: self.bin.join("ctr"),
            env_sock: self.sock.clone(),
            root: self.root.clone(),
            containers,
        }
    }

    fn ctr(&self, ns: &str) -> Command {
        let mut c = Command::new(self.bin.join("ctr"));
        c.arg("-a").arg(&self.sock).args(["-n", ns]);
        c
    }

    fn start_containerd(&self, config: &str) -> Daemon {
        std::fs::write(self.dir.join("containerd.toml"), config).unwrap();
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let d = Daemon(
            Command::new(self.bin.join("containerd"))
                .arg("--config")
                .arg(self.dir.join("containerd.toml"))
                .env("PATH", path)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.join("containerd.log")).unwrap())
                .spawn()
                .unwrap(),
            "containerd",
        );
        wait_for(&self.sock, "containerd");
        d
    }

    fn start_snapshotter(&self) -> Daemon {
        self.start_snapshotter_with(&[])
    }

    fn start_snapshotter_with(&self, extra: &[&str]) -> Daemon {
        let _ = std::fs::remove_file(self.dir.join("snap.ready"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("snapshotter.log"))
            .unwrap();
        let child = lazyblk()
            .arg("snapshotter")
            .arg("--address")
            .arg(&self.snap_sock)
            .arg("--root")
            .arg(&self.root)
            .args(["--backend", "loop", "--plain-http", "--grace-secs", "1"])
            .args(["--log", "info"])
            .args(extra)
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.snap_sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "snapshotter did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon(child, "lazyblk snapshotter")
    }
}

/// Undoes everything on the way out, also when an assertion fails: containers, the serving
/// node daemon (own session, so it would outlive the test) and its devices and mounts.
struct Cleanup {
    ctr: PathBuf,
    env_sock: PathBuf,
    root: PathBuf,
    containers: Vec<(String, String)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = self.env_sock.parent().unwrap();
            let daemon_log = self.root.join("run").join("daemon.log");
            for log in [
                dir.join("snapshotter.log"),
                dir.join("containerd.log"),
                daemon_log,
            ] {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let log = log.display();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("--- {log} (last lines)");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for (ns, c) in &self.containers {
            let ctr = |args: &[&str]| {
                let _ = Command::new(&self.ctr)
                    .arg("-a")
                    .arg(&self.env_sock)
                    .args(["-n", ns])
                    .args(args)
                    .output();
            };
            ctr(&["task", "kill", "-s", "SIGKILL", c]);
            std::thread::sleep(Duration::from_millis(200));
            ctr(&["task", "rm", "-f", c]);
            ctr(&["containers", "rm", c]);
        }
        // The node daemon the snapshotter started (own session): detach its layers, stop it.
        stop_daemon_of(&self.root.join("run"));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ctr run -d` of busybox httpd serving /srv/app from `image` on the lazyblk snapshotter, on a free
/// port of the host network; returns the port.
fn start_httpd(env: &Env, image: &str, name: &str) -> u16 {
    start_httpd_on(env, "default", image, name, free_port())
}

/// [`start_httpd`] in namespace `ns` on `port`.
fn start_httpd_on(env: &Env, ns: &str, image: &str, name: &str, port: u16) -> u16 {
    run_ok(env.ctr(ns).args([
        "run",
        "-d",
        "--net-host",
        "--snapshotter",
        "lazyblk",
        image,
        name,
        "/bin/busybox-static",
        "httpd",
        "-f",
        "-p",
        &format!("127.0.0.1:{port}"),
        "-h",
        "/srv/app",
    ]));
    port
}

/// `lazyblk pull` of the mixed image (lazyblk base + ordinary tar.gz layer) into namespace `mixed`,
/// then a container `name` reading from both layers.
fn pull_and_run_mixed(env: &Env, r: &str, name: &str) {
    let mixed_ref = format!("{r}/test/app:mixed");
    let out = stdout(run_ok(&mut env.lazyblk_pull(&mixed_ref, "mixed")));
    assert!(out.contains("1 remote layer(s), 1 unpacked"), "{out}");
    let seen = stdout(run_ok(env.ctr("mixed").args([
        "run",
        "--rm",
        "--snapshotter",
        "lazyblk",
        &mixed_ref,
        name,
        "sh",
        "-c",
        "cat /etc/apt/NEW /srv/app/index.html",
    ])));
    assert!(
        seen.contains("replaced by layer 2") && seen.contains("<h1>lazyblk</h1>"),
        "{seen}"
    );
}

/// GETs `/` until it answers 200 (or 30 s pass); returns the body and how long it took.
fn http_ready(port: u16) -> (String, Duration) {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.") && out.contains(" 200 ") {
                let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                return (body, t.elapsed());
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no HTTP 200 on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a container sees of its root filesystem: every path with type, and for non-directories
/// mode, owner, size, link target, mtime and content digest. Directories' own metadata is left out:
/// directories a layer merely implies get theirs from whoever creates them (containerd's applier or
/// lazyblk's converter; see docs/architecture.md).
const LIST_ROOTFS: &str = r#"find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf \) -prune -o \( -type d -printf '%p d %m %U %G\n' \) -o -printf '%p %y %m %U %G %s %l %T@\n' | sort; find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune -o -type f -exec sha256sum {} + | sort; find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /getfattr \) -prune -o -print0 | xargs -0 /getfattr -h -d -m - -e hex --absolute-names | awk '/^# file: /{f=substr($0,9);next} NF{print "xattr " f " " $0}' | sort; echo LISTING-END"#;

/// The last line of every complete [`LIST_ROOTFS`] output.
const LISTING_END: &str = "LISTING-END\n";

/// Paths, types, modes, owners, sizes, link targets, mtimes, content hashes and extended attributes
/// of the root filesystem of `image` run on `snapshotter` (the host's `getfattr`, bookworm's like
/// the image, bound into the container: a minbase rootfs has none).
fn rootfs_listing(env: &Env, snapshotter: &str, image: &str, name: &str) -> (String, String) {
    // `ctr run` can return before the container's last write reached it (the task's exit races the
    // copy of its output: once, the final `sort`'s lines, the xattrs, were missing under CI load).
    // An output without the end marker is such a loss, not a verdict: the listing is taken again.
    for attempt in 0..3 {
        let out = run_ok(env.ctr("default").args([
            "run",
            "--rm",
            "--mount",
            "type=bind,src=/usr/bin/getfattr,dst=/getfattr,options=rbind:ro",
            "--snapshotter",
            snapshotter,
            image,
            &format!("{name}-{attempt}"),
            "sh",
            "-c",
            LIST_ROOTFS,
        ]));
        // The pipeline's status is echo's: what find, sha256sum or getfattr said goes to stderr.
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        match stdout(out).strip_suffix(LISTING_END) {
            Some(listing) => return (listing.to_string(), err),
            None => {
                eprintln!("{name}: the listing on {snapshotter} lost its end (ctr output); again")
            }
        }
    }
    panic!("{name}: three listings on {snapshotter} in a row lost their end");
}

/// containerd 1.6 (no CRI) with the lazyblk proxy plugin, everything under `dir`.
fn containerd_16_config(dir: &Path) -> String {
    format!(
        "version = 2\nroot = \"{d}/croot\"\nstate = \"{d}/cstate\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{d}/containerd.sock\"\n[proxy_plugins.lazyblk]\n  type = \"snapshot\"\n  address = \"{d}/lazyblk.sock\"\n",
        d = dir.display()
    )
}

/// The root filesystem of `lazy` (on the lazyblk snapshotter) equals that of `full` pulled and
/// unpacked by containerd's own overlayfs snapshotter (the same image content).
fn assert_rootfs_of_full_pull(env: &Env, full: &str, lazy: &str, name: &str) {
    run_ok(
        env.ctr("default")
            .args(["images", "pull", "--plain-http", full]),
    );
    let (a, a_err) = rootfs_listing(env, "overlayfs", full, &format!("{name}-o"));
    let (b, b_err) = rootfs_listing(env, "lazyblk", lazy, &format!("{name}-l"));
    assert!(a.lines().count() > 1000, "{a}");
    // The image's extended attributes (`build_images`) are in the listing, so comparing it compares them.
    for x in [
        "xattr /srv/xattrs user.lazyblk=0x68656c6c6f",
        "xattr /srv/xattrs security.capability=0x0100000200200000000000000000000000000000",
        "xattr /srv/acl system.posix_acl_access=0x0200000001000700ffffffff02000700e8030000",
        "xattr /srv/acl system.posix_acl_default=",
    ] {
        assert!(a.contains(x), "the full pull's listing lacks {x:?}");
    }
    if a != b {
        let (la, lb): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) =
            (a.lines().collect(), b.lines().collect());
        let only_a: Vec<_> = la.difference(&lb).take(20).collect();
        let only_b: Vec<_> = lb.difference(&la).take(20).collect();
        panic!(
            "rootfs differs:\n overlayfs only: {only_a:#?}\n lazyblk only: {only_b:#?}\n \
             overlayfs listing stderr: {a_err}\n lazyblk listing stderr: {b_err}"
        );
    }
}

/// Both traces (`trace record`'s, `manual_file`, and the snapshotter's own, `file`) name layers of
/// `image` only, each with chunks; `file` shipped with a copy of the
/// image (`test/traced`), it is found by `trace show` and replayed when that copy's layers are attached
/// (no layer may be attached before: the device stats count the prefetched chunks), and the
/// container works.
fn check_trace(
    env: &Env,
    r: &str,
    rec: std::process::Output,
    manual_file: &Path,
    file: &Path,
    image: &str,
    cleanup: &mut Cleanup,
) {
    assert!(
        rec.status.success(),
        "trace record: {}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let manual: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manual_file).unwrap()).unwrap();
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &run_ok(Command::new("curl").args([
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{r}/v2/test/app/manifests/web-lazyblk"),
        ]))
        .stdout,
    )
    .unwrap();
    let index_digests: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["containerd.io/snapshot/lazyblk/index-digest"]
                .as_str()
                .unwrap()
        })
        .collect();
    let mut traced_chunks = 0;
    for t in [&manual, &trace] {
        let layers = t["layers"].as_array().unwrap();
        assert!(!layers.is_empty(), "{t}");
        traced_chunks = 0;
        for l in layers {
            assert!(
                index_digests.contains(&l["indexDigest"].as_str().unwrap()),
                "{l} is not a layer of {image}"
            );
            let n = l["chunks"].as_array().unwrap().len();
            assert!(n > 0, "{l}");
            traced_chunks += n as u64;
        }
    }
    let layers = trace["layers"].as_array().unwrap();
    // Ship it with a copy of the image (same layers) and use that copy in a fresh namespace.
    let traced = format!("{r}/test/traced:web-lazyblk");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{image}"),
        &format!("docker://{traced}"),
    ]));
    run_ok(
        lazyblk()
            .args(["trace", "push", &traced])
            .arg(file)
            .arg("--plain-http"),
    );
    let shown = stdout(run_ok(lazyblk().args([
        "trace",
        "show",
        &traced,
        "--plain-http",
    ])));
    assert_eq!(shown.matches(" chunks ").count(), layers.len(), "{shown}");
    let out = stdout(run_ok(&mut env.lazyblk_pull(&traced, "traced")));
    assert!(out.contains("3 remote layer(s)"), "{out}");
    let name = format!("traced-{}", std::process::id());
    cleanup.containers.push(("traced".into(), name.clone()));
    let port = start_httpd_on(env, "traced", &traced, &name, free_port());
    assert_eq!(http_ready(port).0.trim(), "<h1>lazyblk</h1>");
    // The new devices replayed the trace (published within 250 ms).
    let t = Instant::now();
    loop {
        let prefetched: u64 = attached(env)
            .iter()
            .filter_map(|v| v["trace_prefetched"].as_u64())
            .sum();
        if prefetched > 0 {
            assert!(
                prefetched <= traced_chunks,
                "{prefetched} > {traced_chunks}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no device attached for {traced} replayed its trace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The startup trace the snapshotter recorded for `image` (`lazyblk trace recorded`), waited for:
/// the recording ends a few seconds after the container's last new read.
fn recorded_trace(env: &Env, image: &str) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = stdout(run_ok(
            lazyblk()
                .args(["trace", "recorded", "--root"])
                .arg(&env.root),
        ));
        let mine: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("{image}  sha256:")))
            .collect();
        if let [line] = mine[..] {
            assert!(line.contains(" chunks  "), "{line}");
            return PathBuf::from(line.rsplit("  ").next().unwrap());
        }
        assert!(mine.is_empty(), "one trace per image: {out}");
        assert!(
            Instant::now() < deadline,
            "the snapshotter recorded no startup trace of {image}: {out}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The devices the node daemon lists now (`lazyblk ls --json`).
fn attached(env: &Env) -> Vec<serde_json::Value> {
    let out = run_ok(
        lazyblk()
            .args(["ls", "--json", "--run-dir"])
            .arg(env.root.join("run")),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The common preconditions, a registry with the test images ([`build_images`]) and an [`Env`] for
/// containerd binaries in `bin`, all in a temp dir (kept alive by the returned guard); None means skip.
fn setup(tools: &[&str], bin: PathBuf) -> Option<(Registry, tempfile::TempDir, Env)> {
    if !have(tools) {
        return None;
    }
    let Some(rootfs) = std::env::var_os("LAZYBLK_ROOTFS_TAR").map(PathBuf::from) else {
        assert!(may_skip(), "CI must set LAZYBLK_ROOTFS_TAR");
        eprintln!("SKIPPED: LAZYBLK_ROOTFS_TAR not set");
        return None;
    };
    if !privileged() {
        return None;
    }
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    build_images(&dir, &reg, &rootfs);
    let env = Env {
        bin,
        sock: dir.join("containerd.sock"),
        snap_sock: dir.join("lazyblk.sock"),
        root: dir.join("lazyblk"),
        dir,
    };
    Some((reg, tmp, env))
}

/// Pushes `test/app:web` (the Debian rootfs, a layer with deletions and a replaced directory, a
/// layer with a static busybox), converts it to `web-lazyblk`, and assembles `mixed` (the converted
/// base layer under the original tar.gz second layer).
fn build_images(dir: &Path, reg: &Registry, rootfs: &Path) {
    let r = reg.addr.clone();
    // Image: the Debian rootfs, a layer with deletions/replaced dir, a layer with static busybox.
    let layout = dir.join("layout");
    run_ok(
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/make-test-image.sh"
        ))
        .arg(rootfs)
        .arg(&layout),
    );
    let work = dir.join("unpack");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:v2", layout.display()))
            .arg(&work),
    );
    std::fs::copy("/bin/busybox", work.join("rootfs/bin/busybox-static")).unwrap();
    // A setuid-root program (as root it drops to 65534 and re-executes itself, then prints its
    // effective uid) and a device node: layer mounts are nosuid,nodev on the host, but containers
    // must still get both through their overlay mount.
    let src = dir.join("suidcheck.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include <unistd.h>\nint main(int c, char **v) {\n  if (c > 1) { printf(\"euid=%d\\n\", (int)geteuid()); return 0; }\n  if (setgid(65534) || setuid(65534)) return 2;\n  execl(\"/usr/local/bin/suidcheck\", \"suidcheck\", \"x\", (char *)0);\n  return 3;\n}\n",
    )
    .unwrap();
    let bin = work.join("rootfs/usr/local/bin/suidcheck");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    run_ok(
        Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&bin)
            .arg(&src),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o4755)).unwrap();
    }
    run_ok(
        Command::new("mknod")
            .args(["-m", "666"])
            .arg(work.join("rootfs/srv/null"))
            .args(["c", "1", "3"]),
    );
    // Extended attributes the rootfs comparison must carry through: a user xattr, a file capability
    // (cap_net_raw+ep, VFS_CAP_REVISION_2) and POSIX access and default ACLs (user 1000 rwx).
    let xfile = work.join("rootfs/srv/xattrs");
    std::fs::write(&xfile, "xattrs\n").unwrap();
    let acl_dir = work.join("rootfs/srv/acl");
    std::fs::create_dir_all(&acl_dir).unwrap();
    const ACL: &str = "0x0200000001000700ffffffff02000700e803000004000500ffffffff10000700ffffffff20000500ffffffff";
    for (path, name, value) in [
        (&xfile, "user.lazyblk", "hello"),
        (
            &xfile,
            "security.capability",
            "0x0100000200200000000000000000000000000000",
        ),
        (&acl_dir, "system.posix_acl_access", ACL),
        (&acl_dir, "system.posix_acl_default", ACL),
    ] {
        run_ok(
            Command::new("setfattr")
                .args(["-n", name, "-v", value])
                .arg(path),
        );
    }
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image"])
            .arg(format!("{}:web", layout.display()))
            .arg(&work),
    );
    std::fs::remove_dir_all(&work).unwrap();
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:web", layout.display()))
            .arg(format!("docker://{r}/test/app:web")),
    );
    run_ok(lazyblk().args([
        "convert",
        &format!("{r}/test/app:web"),
        &format!("{r}/test/app:web-lazyblk"),
        "--plain-http",
    ]));
    // A mixed image: the converted base layer under the original (tar.gz) second layer.
    let get = |tag: &str| -> serde_json::Value {
        serde_json::from_slice(
            &run_ok(Command::new("curl").args([
                "-sf",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &format!("http://{r}/v2/test/app/manifests/{tag}"),
            ]))
            .stdout,
        )
        .unwrap()
    };
    let (orig, lazy) = (get("web"), get("web-lazyblk"));
    let config = |m: &serde_json::Value| -> serde_json::Value {
        serde_json::from_slice(
            &run_ok(Command::new("curl").args([
                "-sf",
                &format!(
                    "http://{r}/v2/test/app/blobs/{}",
                    m["config"]["digest"].as_str().unwrap()
                ),
            ]))
            .stdout,
        )
        .unwrap()
    };
    let (orig_cfg, lazy_cfg) = (config(&orig), config(&lazy));
    // The converted config names each lazyblk layer by its disk digest, not by the tar's diff ID.
    assert_ne!(
        lazy_cfg["rootfs"]["diff_ids"],
        orig_cfg["rootfs"]["diff_ids"]
    );
    let put = |tag: &str, layers: serde_json::Value, diff_ids: serde_json::Value| {
        let mut cfg = orig_cfg.clone();
        cfg["rootfs"]["diff_ids"] = diff_ids;
        let cfg_bytes = serde_json::to_vec(&cfg).unwrap();
        let cfg_path = dir.join(format!("{tag}-config.json"));
        std::fs::write(&cfg_path, &cfg_bytes).unwrap();
        let mut m = lazy.clone();
        m["layers"] = layers;
        m["config"]["digest"] = reg.push("test/app", &cfg_path).into();
        m["config"]["size"] = cfg_bytes.len().into();
        let mpath = dir.join(format!("{tag}.json"));
        std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
        run_ok(Command::new("curl").args([
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
            "--data-binary",
            &format!("@{}", mpath.display()),
            &format!("http://{r}/v2/test/app/manifests/{tag}"),
        ]));
    };
    // A mixed image: the converted base layer under the original (tar.gz) second layer.
    put(
        "mixed",
        serde_json::json!([lazy["layers"][0], orig["layers"][1]]),
        serde_json::json!([
            lazy_cfg["rootfs"]["diff_ids"][0],
            orig_cfg["rootfs"]["diff_ids"][1]
        ]),
    );
    // A hostile image: lazyblk layers claiming the original tar layers' diff IDs (so their chain IDs),
    // as an image would that wants its own disks used for every image with that base on the node.
    put(
        "poison",
        lazy["layers"].clone(),
        orig_cfg["rootfs"]["diff_ids"].clone(),
    );
}

/// The `poison` image (lazyblk layers under another image's chain IDs) is refused before anything
/// is committed: the original image's chain then still unpacks from its own tar layers.
fn poison_is_refused(env: &Env, r: &str) {
    let out = env
        .lazyblk_pull(&format!("{r}/test/app:poison"), "poison")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the poison image was pulled: {err}");
    assert!(
        err.contains("does not commit to this layer's disk"),
        "unexpected error: {err}"
    );
    let snaps = stdout(run_ok(env.ctr("poison").args([
        "snapshots",
        "--snapshotter",
        "lazyblk",
        "ls",
    ])));
    assert_eq!(snaps.lines().count(), 1, "something was committed: {snaps}");
    let out = stdout(run_ok(
        &mut env.lazyblk_pull(&format!("{r}/test/app:web"), "poison"),
    ));
    assert!(out.contains("0 remote layer(s), 3 unpacked"), "{out}");
}

#[test]
fn containerd_runs_images_from_lazyblk_layers() {
    let tools = ["containerd", "ctr", "runc", "skopeo", "umoci", "curl"];
    let Some((reg, _tmp, env)) = setup(&tools, PathBuf::from("/usr/bin")) else {
        return;
    };
    let r = reg.addr.clone();
    let dir = env.dir.clone();

    // containerd 1.6 with the lazyblk proxy plugin.
    let mut snapd = Some(env.start_snapshotter());
    let _containerd = env.start_containerd(&containerd_16_config(&dir));
    let image = format!("{r}/test/app:web-lazyblk");
    let id = std::process::id();
    let (web1, web2) = (format!("web1-{id}"), format!("web2-{id}"));
    let mut cleanup = env.cleanup(vec![
        ("default".into(), web1.clone()),
        ("default".into(), web2.clone()),
    ]);

    // Pull: every layer remote, nothing downloaded.
    let out = stdout(run_ok(
        lazyblk()
            .args(["pull", &image, "--plain-http", "--address"])
            .arg(&env.sock),
    ));
    assert!(out.contains("3 remote layer(s), 0 unpacked"), "{out}");
    // The pull attaches the layers it recorded, in the background: the container will start on
    // mounted layers whose fill began at pull time.
    let deadline = Instant::now() + Duration::from_secs(120);
    while attached(&env).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the pull did not attach its 3 layers: {:?}",
            attached(&env)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The state directories are root's alone: no local user walks into images' files (the test's
    // own temporary directory opened up so that only lazyblk's modes stand in the way).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["", "layers", "snapshots", "cache", "run"] {
        let p = env.root.join(d);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
        let nobody = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!nobody.status.success(), "nobody can list {}", p.display());
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let _chain = out
        .split("chain ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();

    // Run an HTTP server from the lazily attached layers, recording a startup trace meanwhile.
    let port = free_port();
    let trace_file = dir.join("trace.json");
    let recorder = lazyblk()
        .args(["trace", "record", "--run-dir"])
        .arg(env.root.join("run"))
        .args([
            "--ready-url",
            &format!("http://127.0.0.1:{port}/index.html"),
        ])
        .args(["--timeout", "60", "-o"])
        .arg(&trace_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    start_httpd_on(&env, "default", &image, &web1, port);
    let (body, ready) = http_ready(port);
    assert_eq!(body.trim(), "<h1>lazyblk</h1>");
    eprintln!("web1 ready after {ready:?} (create → first HTTP 200, after ctr run returned)");
    let recorded = recorder.wait_with_output().unwrap();
    // `--allow-new-privs`: ctr's default spec sets NoNewPrivileges, which would hide setuid anyway.
    let seen = stdout(run_ok(env.ctr("default").args([
        "run", "--rm", "--allow-new-privs", "--snapshotter", "lazyblk", &image, "probe",
        "sh", "-c", "cat /etc/apt/NEW; test ! -e /usr/share/doc && echo whiteout-ok; echo x > /tmp/w && cat /tmp/w; echo y > /srv/null && echo device-ok; /usr/local/bin/suidcheck 2>&1; echo suidcheck-rc=$?",
    ])));
    assert!(
        seen.contains("replaced by layer 2") && seen.contains("whiteout-ok") && seen.contains('x'),
        "{seen}"
    );
    assert!(
        seen.contains("device-ok"),
        "device node unusable in the container: {seen}"
    );
    assert!(
        seen.contains("euid=0"),
        "setuid not honoured in the container: {seen}"
    );

    // The rootfs equals the same image unpacked by containerd's own overlayfs snapshotter.
    assert_rootfs_of_full_pull(
        &env,
        &format!("{r}/test/app:web"),
        &image,
        &format!("list-{id}"),
    );

    // No trace was shipped with the image: the snapshotter recorded web1's start by itself.
    let auto_trace = recorded_trace(&env, &image);

    // Restart the snapshotter under the running container: it keeps serving, new containers start.
    drop(snapd.take());
    snapd = Some(env.start_snapshotter());
    let (body, _) = http_ready(port);
    assert_eq!(body.trim(), "<h1>lazyblk</h1>");
    let port2 = free_port();
    // containerd's gRPC client to the proxy backs off (about a second) after the refused dials of
    // the restart window; a new container may need a retry, as kubelet would do.
    let mut tries = 0;
    loop {
        let out = env
            .ctr("default")
            .args([
                "run",
                "-d",
                "--net-host",
                "--snapshotter",
                "lazyblk",
                &image,
                &web2,
                "/bin/busybox-static",
                "httpd",
                "-f",
                "-p",
                &format!("127.0.0.1:{port2}"),
                "-h",
                "/srv/app",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            break;
        }
        tries += 1;
        assert!(
            tries < 20 && err.contains("unavailable"),
            "ctr run after the restart: {err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(http_ready(port2).0.trim(), "<h1>lazyblk</h1>");
    let usage = stdout(run_ok(env.ctr("default").args([
        "snapshots",
        "--snapshotter",
        "lazyblk",
        "usage",
    ])));
    assert!(usage.lines().count() >= 4, "{usage}");

    // Mixed image (lazyblk base + ordinary tar.gz layer), in another namespace.
    pull_and_run_mixed(&env, &r, &format!("m1-{id}"));
    poison_is_refused(&env, &r);

    // Nothing uses the layers any more: containerd's GC removes the snapshots, which detaches them.
    for ns in ["default", "mixed", "poison"] {
        remove_all(&env, ns);
    }
    let t = Instant::now();
    while !attached(&env).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "layers still attached after their images were removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The traces of web1's start (the snapshotter's own, and `trace record`'s) name the image's
    // layers; the snapshotter's is shipped and replayed on a fresh attach.
    check_trace(
        &env,
        &r,
        recorded,
        &trace_file,
        &auto_trace,
        &image,
        &mut cleanup,
    );

    drop(snapd);
}

/// Removes every container and image of namespace `ns` (images synchronously: GC has run).
fn remove_all(env: &Env, ns: &str) {
    let list = |what: &str| -> Vec<String> {
        stdout(run_ok(env.ctr(ns).args([what, "ls", "-q"])))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    for c in list("containers") {
        let _ = env
            .ctr(ns)
            .args(["task", "kill", "-s", "SIGKILL", &c])
            .output();
        let t = Instant::now();
        while !env
            .ctr(ns)
            .args(["task", "rm", "-f", &c])
            .output()
            .unwrap()
            .status
            .success()
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        run_ok(env.ctr(ns).args(["containers", "rm", &c]));
    }
    let images = list("images");
    if !images.is_empty() {
        run_ok(env.ctr(ns).args(["images", "rm", "--sync"]).args(&images));
    }
}

#[test]
fn containerd_2_pulls_lazyblk_images_through_the_transfer_service() {
    let Some(bin) = std::env::var_os("LAZYBLK_CONTAINERD2_DIR").map(PathBuf::from) else {
        assert!(
            may_skip(),
            "CI must set LAZYBLK_CONTAINERD2_DIR (tools/get-containerd2.sh)"
        );
        eprintln!("SKIPPED: LAZYBLK_CONTAINERD2_DIR not set (tools/get-containerd2.sh)");
        return;
    };
    let Some((reg, _tmp, env)) = setup(&["runc", "skopeo", "umoci", "curl"], bin) else {
        return;
    };
    let r = reg.addr.clone();
    let dir = env.dir.clone();
    let snapd = env.start_snapshotter();
    // The configuration deploy/containerd/config-2.x.toml documents: remote-snapshot annotations
    // exported to the proxy, and an unpack entry for lazyblk in the transfer service.
    let _containerd = env.start_containerd(&format!(
        r#"version = 3
root = "{d}/croot"
state = "{d}/cstate"
disabled_plugins = ["io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[proxy_plugins.lazyblk]
  type = "snapshot"
  address = "{d}/lazyblk.sock"
  [proxy_plugins.lazyblk.exports]
    enable_remote_snapshot_annotations = "true"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "lazyblk"
"#,
        d = dir.display()
    ));
    let version = stdout(run_ok(env.ctr("default").arg("version")));
    assert!(
        version.contains("Version:  2.") || version.contains("v2."),
        "{version}"
    );
    let id = std::process::id();
    let web = format!("web-{id}");
    let _cleanup = env.cleanup(vec![
        ("default".into(), web.clone()),
        ("default".into(), format!("ref-{id}")),
    ]);
    // The original image plus a `--referrer` artifact: containerd's own pull of the *original*
    // image (transfer service) gets every layer from the artifact's lazyblk layers.
    run_ok(lazyblk().args([
        "convert",
        &format!("{r}/test/app:web"),
        "--referrer",
        "--plain-http",
    ]));
    let original = format!("{r}/test/app:web");
    run_ok(env.ctr("default").args([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazyblk",
        &original,
    ]));
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap();
    assert_eq!(
        log.matches("remote layer recorded").count(),
        3,
        "the referrer's layers were not used: {log}"
    );
    assert!(log.contains("lazyblk referrer layers"), "{log}");
    let content = stdout(run_ok(env.ctr("default").args(["content", "ls", "-q"])));
    eprintln!(
        "containerd 2 content store after the referrer pull: {} blobs",
        content.lines().count()
    );
    let refweb = format!("ref-{id}");
    let port0 = start_httpd(&env, &original, &refweb);
    assert_eq!(http_ready(port0).0.trim(), "<h1>lazyblk</h1>");

    // containerd's own pull of the converted image: every lazyblk layer is taken remotely, under
    // its own chain IDs (the converted config's diff IDs are disk digests, which the referrer
    // artifact's layers, under the original tar chain, cannot claim).
    let image = format!("{r}/test/app:web-lazyblk");
    run_ok(env.ctr("default").args([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazyblk",
        &image,
    ]));
    let snaps = stdout(run_ok(env.ctr("default").args([
        "snapshots",
        "--snapshotter",
        "lazyblk",
        "ls",
    ])));
    assert_eq!(snaps.lines().count(), 1 + 3 + 3 + 1, "{snaps}");
    let port = start_httpd(&env, &image, &web);
    let (body, ready) = http_ready(port);
    assert_eq!(body.trim(), "<h1>lazyblk</h1>");
    eprintln!("containerd 2: ready after {ready:?}");
    // `lazyblk pull` (containerd's gRPC API) works against 2.x too: the mixed image.
    pull_and_run_mixed(&env, &r, &format!("m2-{id}"));
    for ns in ["default", "mixed"] {
        remove_all(&env, ns);
    }
    // An original image with a `lazyblk index` artifact (no layer converted or copied): containerd
    // 2's own pull takes every layer remotely and the container serves.
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{r}/test/app:web"),
        &format!("docker://{r}/test/orig2:web"),
    ]));
    run_ok(lazyblk().args(["index", &format!("{r}/test/orig2:web"), "--plain-http"]));
    let recorded = |log: &str| log.matches("remote layer recorded").count();
    let before = recorded(&std::fs::read_to_string(dir.join("snapshotter.log")).unwrap());
    let indexed = format!("{r}/test/orig2:web");
    run_ok(env.ctr("default").args([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazyblk",
        &indexed,
    ]));
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap();
    assert_eq!(
        recorded(&log) - before,
        3,
        "the index's layers were not used: {log}"
    );
    let idxweb = format!("idx-{id}");
    let _idx_cleanup = env.cleanup(vec![("default".into(), idxweb.clone())]);
    let port = start_httpd(&env, &indexed, &idxweb);
    assert_eq!(http_ready(port).0.trim(), "<h1>lazyblk</h1>");
    remove_all(&env, "default");
    cross_repository_referrer(&env, &r, &format!("evil-{id}"), &format!("victim-{id}"));
    drop(snapd);
}

/// The same original manifest pushed into another repository (`evil/app`) with a referrer artifact
/// whose top layer is another disk, pulled first: that repository's image gets its own artifact, but
/// the victim's pull of `test/app:web` (another namespace) never shares the chain the impostor
/// defined: it unpacks its own tar layers and serves the original bytes.
fn cross_repository_referrer(env: &Env, r: &str, evil_name: &str, victim_name: &str) {
    let dir = &env.dir;
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{r}/test/app:web"),
        &format!("docker://{r}/evil/app:web"),
    ]));
    let curl_json = |url: &str, accept: &str| -> serde_json::Value {
        serde_json::from_slice(
            &run_ok(Command::new("curl").args(["-sf", "-H", &format!("Accept: {accept}"), url]))
                .stdout,
        )
        .unwrap()
    };
    let put = |url: &str, ty: &str, body: &[u8]| {
        let f = dir.join("put.json");
        std::fs::write(&f, body).unwrap();
        run_ok(Command::new("curl").args([
            "-sf",
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {ty}"),
            "--data-binary",
            &format!("@{}", f.display()),
            url,
        ]));
    };
    let manifest = curl_json(
        &format!("http://{r}/v2/evil/app/manifests/web"),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let mdigest = {
        let raw = run_ok(Command::new("curl").args([
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{r}/v2/evil/app/manifests/web"),
        ]))
        .stdout;
        format!("sha256:{}", hex::encode(lazyblk::format::sha256(&raw)))
    };
    // An honest artifact for evil/app first, then its top layer swapped for another disk.
    run_ok(lazyblk().args([
        "convert",
        &format!("{r}/evil/app:web"),
        "--referrer",
        "--plain-http",
    ]));
    let tag = mdigest.replacen(':', "-", 1);
    let mut index = curl_json(
        &format!("http://{r}/v2/evil/app/manifests/{tag}"),
        "application/vnd.oci.image.index.v1+json",
    );
    let art_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut art = curl_json(
        &format!("http://{r}/v2/evil/app/manifests/{art_digest}"),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let mut t = layer::LayerTar::new();
    t.dir("srv", layer::DIR).dir("srv/app", layer::DIR).file(
        "srv/app/index.html",
        layer::DEF,
        b"<h1>impostor</h1>\n",
    );
    let tar = dir.join("impostor.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = dir.join("impostor.blob");
    let sum = convert(&tar, &blob);
    let reg_push = |repo: &str, p: &Path| -> String {
        let data = bytes::Bytes::from(std::fs::read(p).unwrap());
        let base = reqwest::Url::parse(&format!("http://{r}")).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(lazyblk::fetch::registry::push_blob(
                &reqwest::Client::new(),
                &base,
                repo,
                data,
            ))
            .unwrap()
    };
    let digest = reg_push("evil/app", &blob);
    let top = manifest["layers"].as_array().unwrap().len() - 1;
    let mut ann = sum["annotations"].clone();
    ann["containerd.io/snapshot/lazyblk/source-digest"] = manifest["layers"][top]["digest"].clone();
    art["layers"][top] = serde_json::json!({
        "mediaType": sum["media_type"],
        "digest": digest,
        "size": std::fs::metadata(&blob).unwrap().len(),
        "annotations": ann,
    });
    let art_bytes = serde_json::to_vec(&art).unwrap();
    let new_digest = format!(
        "sha256:{}",
        hex::encode(lazyblk::format::sha256(&art_bytes))
    );
    put(
        &format!("http://{r}/v2/evil/app/manifests/{new_digest}"),
        "application/vnd.oci.image.manifest.v1+json",
        &art_bytes,
    );
    index["manifests"][0]["digest"] = new_digest.into();
    index["manifests"][0]["size"] = art_bytes.len().into();
    put(
        &format!("http://{r}/v2/evil/app/manifests/{tag}"),
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    let recorded = || {
        std::fs::read_to_string(dir.join("snapshotter.log"))
            .unwrap()
            .matches("remote layer recorded")
            .count()
    };
    let before = recorded();
    // The impostor repository's own image gets its own artifact (its publisher's choice).
    run_ok(env.ctr("evil").args([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazyblk",
        &format!("{r}/evil/app:web"),
    ]));
    assert_eq!(
        recorded(),
        before + 3,
        "the evil/app artifact was not taken"
    );
    let seen = stdout(run_ok(env.ctr("evil").args([
        "run",
        "--rm",
        "--snapshotter",
        "lazyblk",
        &format!("{r}/evil/app:web"),
        evil_name,
        "cat",
        "/srv/app/index.html",
    ])));
    assert_eq!(seen.trim(), "<h1>impostor</h1>");
    // The victim's image, same manifest in its own repository, in its own namespace.
    run_ok(env.ctr("victim").args([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazyblk",
        &format!("{r}/test/app:web"),
    ]));
    let seen = stdout(run_ok(env.ctr("victim").args([
        "run",
        "--rm",
        "--snapshotter",
        "lazyblk",
        &format!("{r}/test/app:web"),
        victim_name,
        "cat",
        "/srv/app/index.html",
    ])));
    assert_eq!(
        seen.trim(),
        "<h1>lazyblk</h1>",
        "the victim ran the impostor's disk"
    );
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("chain defined by another repository"), "{log}");
    for ns in ["evil", "victim"] {
        remove_all(env, ns);
    }
}

#[test]
fn cri_pulls_take_lazyblk_layers_remotely() {
    let tools = ["containerd", "ctr", "runc", "skopeo", "umoci", "curl"];
    let Some((reg, _tmp, env)) = setup(&tools, PathBuf::from("/usr/bin")) else {
        return;
    };
    let r = reg.addr.clone();
    let dir = env.dir.clone();
    let snapd = env.start_snapshotter();
    // deploy/containerd/config-1.x.toml's CRI part, plus a plain-HTTP mirror for the test registry.
    let _containerd = env.start_containerd(&cri_config(&dir, &r));
    let _cleanup = env.cleanup(vec![]);
    let image = format!("{r}/test/app:web-lazyblk");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = lazyblk::snapshotter::pull::connect(&env.sock)
            .await
            .unwrap();
        cri_pull(channel, &image, None).await;
    });
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap();
    assert_eq!(
        log.matches("remote layer recorded").count(),
        3,
        "the CRI pull did not hand the layers over: {log}"
    );
    let seen = cat_index(&env, "k8s.io", &image, "cri");
    assert_eq!(seen.trim(), "<h1>lazyblk</h1>");
    drop(snapd);
}

/// Kubernetes pull secrets through the CRI proxy: kubelet's `PullImage` (here the `k8s-cri` client)
/// goes to the snapshotter's proxy socket with credentials for a registry that requires them
/// (htpasswd); containerd pulls with them, and the snapshotter and node daemon read the layers lazily
/// with them too, though no docker config anywhere has them.
#[test]
fn cri_proxy_hands_pull_secrets_to_lazy_layer_reads() {
    let tools = ["containerd", "ctr", "runc", "skopeo", "umoci", "curl"];
    let Some((reg, _tmp, env)) = setup(&tools, PathBuf::from("/usr/bin")) else {
        return;
    };
    // The same images behind a registry that wants alice's password.
    let htpasswd = env.dir.join("htpasswd");
    std::fs::write(&htpasswd, common::pki::htpasswd_line("alice", "s3cret")).unwrap();
    let Some(private) = Registry::start_with(&common::registry::RegistryConfig {
        htpasswd: Some(htpasswd),
        storage: Some(reg.storage.clone()),
        ..Default::default()
    }) else {
        return;
    };
    let p = private.addr.clone();
    let anonymous = stdout(run_ok(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{p}/v2/test/app/manifests/web-lazyblk"),
    ])));
    assert_eq!(
        anonymous, "401",
        "the private registry must want credentials"
    );
    let dir = env.dir.clone();
    let cri_sock = dir.join("cri-proxy.sock");
    let snapd = env.start_snapshotter_with(&[
        "--cri-listen",
        cri_sock.to_str().unwrap(),
        "--cri-backend",
        env.sock.to_str().unwrap(),
    ]);
    let _containerd = env.start_containerd(&cri_config(&dir, &p));
    let _cleanup = env.cleanup(vec![]);
    let image = format!("{p}/test/app:web-lazyblk");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use k8s_cri::v1::{
            image_service_client::ImageServiceClient, AuthConfig, ImageSpec, ImageStatusRequest,
        };
        let channel = lazyblk::snapshotter::pull::connect(&cri_sock)
            .await
            .unwrap();
        // containerd 1.6 parses server_address as a URL: kubelet leaves it empty.
        let auth = AuthConfig {
            username: "alice".into(),
            password: "s3cret".into(),
            ..Default::default()
        };
        cri_pull(channel.clone(), &image, Some(auth)).await;
        let mut images = ImageServiceClient::new(channel);
        // The other image calls pass through unchanged.
        let st = images
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(st.image.is_some(), "ImageStatus through the proxy");
    });
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("pull secret kept"), "{log}");
    assert!(!log.contains("s3cret"), "credentials must never be logged");
    assert_eq!(
        log.matches("remote layer recorded").count(),
        3,
        "the CRI pull did not hand the layers over: {log}"
    );
    let seen = cat_index(&env, "k8s.io", &image, "cri-secret");
    assert_eq!(seen.trim(), "<h1>lazyblk</h1>");
    let daemon_log =
        std::fs::read_to_string(env.root.join("run").join("daemon.log")).unwrap_or_default();
    assert!(
        !daemon_log.contains("s3cret"),
        "credentials must never be logged"
    );
    drop(snapd);
}

/// The snapshotter and `lazyblk pull` against a registry with TLS from a private CA (trusted through
/// hosts.toml `ca` only) and token auth validating real JWTs, credentials in a docker config: a
/// container runs from lazily read layers.
#[test]
fn snapshotter_reads_layers_from_a_tls_token_auth_registry() {
    let tools = [
        "containerd",
        "ctr",
        "runc",
        "skopeo",
        "umoci",
        "curl",
        "openssl",
    ];
    let Some((reg, _tmp, env)) = setup(&tools, PathBuf::from("/usr/bin")) else {
        return;
    };
    let dir = env.dir.clone();
    let pki = common::pki::Pki::new(&dir.join("pki"), "lazyblk containerd test CA");
    let server = pki.issue("server", &["IP:127.0.0.1"], "serverAuth");
    let signer = pki.issue("signer", &[], "serverAuth");
    let (service, issuer) = ("lazyblk-ctr-registry", "lazyblk-ctr-issuer");
    let ts = common::token::token_service(service, issuer, signer.key.clone(), signer.cert.clone());
    // The same images, behind TLS and token auth.
    let Some(private) = Registry::start_with(&common::registry::RegistryConfig {
        tls: Some((server.cert.clone(), server.key.clone())),
        token: Some((
            format!("http://{}/token", ts.addr),
            service.into(),
            issuer.into(),
            pki.ca(),
        )),
        storage: Some(reg.storage.clone()),
        ..Default::default()
    }) else {
        return;
    };
    let p = private.addr.clone();
    let hosts = dir.join("certs.d");
    std::fs::create_dir_all(hosts.join(&p)).unwrap();
    std::fs::write(
        hosts.join(&p).join("hosts.toml"),
        format!(
            "server = \"https://{p}\"\nca = \"{}\"\n",
            pki.ca().display()
        ),
    )
    .unwrap();
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let cfg = dir.join("docker-config.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"{p}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    let registry_args = [
        "--hosts-dir",
        hosts.to_str().unwrap(),
        "--docker-config",
        cfg.to_str().unwrap(),
    ];
    let snapd = env.start_snapshotter_with(&registry_args);
    let _containerd = env.start_containerd(&containerd_16_config(&dir));
    let _cleanup = env.cleanup(vec![]);
    let image = format!("{p}/test/app:web-lazyblk");
    let out = stdout(run_ok(
        env.lazyblk_pull(&image, "default").args(registry_args),
    ));
    assert!(out.contains("3 remote layer(s), 0 unpacked"), "{out}");
    let seen = cat_index(&env, "default", &image, "tls-token");
    assert_eq!(seen.trim(), "<h1>lazyblk</h1>");
    assert!(
        ts.basic_grants.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "tokens for the pull and for the lazy reads"
    );
    drop(snapd);
}

/// The snapshotter reads layers through a hosts.toml mirror that is a pull-through cache of the
/// registry (Debian's docker-registry with `proxy: remoteurl`): the container runs, and the cache
/// holds the layers it served.
#[test]
fn snapshotter_reads_through_a_pull_through_cache_mirror() {
    let tools = ["containerd", "ctr", "runc", "skopeo", "umoci", "curl"];
    let Some((reg, _tmp, env)) = setup(&tools, PathBuf::from("/usr/bin")) else {
        return;
    };
    let r = reg.addr.clone();
    let dir = env.dir.clone();
    let Some(mirror) = Registry::start_with(&common::registry::RegistryConfig {
        proxy_remote: Some(format!("http://{r}")),
        ..Default::default()
    }) else {
        return;
    };
    let m = mirror.addr.clone();
    let hosts = dir.join("certs.d");
    std::fs::create_dir_all(hosts.join(&r)).unwrap();
    std::fs::write(
        hosts.join(&r).join("hosts.toml"),
        format!(
            "server = \"http://{r}\"\n[host.\"http://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    let args = ["--hosts-dir", hosts.to_str().unwrap()];
    let snapd = env.start_snapshotter_with(&args);
    let _containerd = env.start_containerd(&containerd_16_config(&dir));
    let _cleanup = env.cleanup(vec![]);
    let image = format!("{r}/test/app:web-lazyblk");
    let out = stdout(run_ok(env.lazyblk_pull(&image, "default").args(args)));
    assert!(out.contains("3 remote layer(s), 0 unpacked"), "{out}");
    let seen = cat_index(&env, "default", &image, "mirror");
    assert_eq!(seen.trim(), "<h1>lazyblk</h1>");
    // The requests went to the mirror: it fetched (and keeps) the manifest and layer blobs.
    let blobs = mirror.storage.join("docker/registry/v2/blobs/sha256");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror never saw the image's blobs ({n} cached)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(snapd);
}

/// containerd 1.6 with CRI on the lazyblk snapshotter (deploy/containerd/config-1.x.toml's CRI part),
/// plus a plain-HTTP mirror entry for `registry`.
fn cri_config(dir: &Path, registry: &str) -> String {
    format!(
        r#"version = 2
root = "{d}/croot"
state = "{d}/cstate"
[grpc]
  address = "{d}/containerd.sock"
[proxy_plugins.lazyblk]
  type = "snapshot"
  address = "{d}/lazyblk.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "lazyblk"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/conf"
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
  endpoint = ["http://{registry}"]
"#,
        d = dir.display()
    )
}

/// A CRI `PullImage` of `image` (with `auth`) over `channel`, retried while the CRI plugin is still
/// initialising (it starts in the background).
async fn cri_pull(
    channel: tonic::transport::Channel,
    image: &str,
    auth: Option<k8s_cri::v1::AuthConfig>,
) {
    use k8s_cri::v1::{image_service_client::ImageServiceClient, ImageSpec, PullImageRequest};
    let mut images = ImageServiceClient::new(channel);
    let t = Instant::now();
    loop {
        let r = images
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                auth: auth.clone(),
                sandbox_config: None,
            })
            .await;
        match r {
            Ok(_) => return,
            Err(e) if t.elapsed() < Duration::from_secs(60) => {
                eprintln!("CRI PullImage {image}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("CRI PullImage {image}: {e}"),
        }
    }
}

/// `ctr run --rm` of `image` on the lazyblk snapshotter in namespace `ns`, printing
/// /srv/app/index.html; returns what it printed.
fn cat_index(env: &Env, ns: &str, image: &str, name: &str) -> String {
    stdout(run_ok(env.ctr(ns).args([
        "run",
        "--rm",
        "--snapshotter",
        "lazyblk",
        image,
        &format!("{name}-{}", std::process::id()),
        "cat",
        "/srv/app/index.html",
    ])))
}

/// `lazyblk index` (original-image indexes): the *unmodified* image runs lazily. A copy of the
/// original image in its own repository is indexed there; its manifest does not change and the
/// artifact holds no layer data; `lazyblk pull` takes every layer remotely, the container serves, and
/// its root filesystem equals a full pull's (containerd's overlayfs snapshotter).
#[test]
fn original_images_run_lazily_from_an_index() {
    let tools = ["containerd", "ctr", "runc", "skopeo", "umoci", "curl"];
    let Some((reg, _tmp, env)) = setup(&tools, PathBuf::from("/usr/bin")) else {
        return;
    };
    let r = reg.addr.clone();
    let dir = env.dir.clone();
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{r}/test/app:web"),
        &format!("docker://{r}/test/orig:web"),
    ]));
    let digest_of = |tag: &str| {
        let o = run_ok(Command::new("curl").args([
            "-sfI",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{r}/v2/test/orig/manifests/{tag}"),
        ]));
        let h = stdout(o).to_lowercase();
        h.lines()
            .find_map(|l| l.strip_prefix("docker-content-digest: "))
            .unwrap()
            .trim()
            .to_string()
    };
    let before = digest_of("web");
    let started = Instant::now();
    let out = stdout(run_ok(lazyblk().args([
        "index",
        &format!("{r}/test/orig:web"),
        "--plain-http",
        "--json",
    ])));
    let took = started.elapsed();
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["mode"], "index", "{out}");
    let (src, idx) = (
        s["source_bytes"].as_u64().unwrap(),
        s["target_bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "index: {idx} bytes for {src} bytes of layers ({:.2}%), built in {took:?}",
        100.0 * idx as f64 / src as f64
    );
    assert!(idx < src / 4, "the index is not small: {idx} of {src}");
    assert_eq!(digest_of("web"), before, "indexing changed the image");

    let snapd = env.start_snapshotter();
    let _containerd = env.start_containerd(&containerd_16_config(&dir));
    let id = std::process::id();
    let _cleanup = env.cleanup(vec![]);
    let image = format!("{r}/test/orig:web");
    let out = stdout(run_ok(&mut env.lazyblk_pull(&image, "default")));
    assert!(out.contains("3 remote layer(s), 0 unpacked"), "{out}");
    let seen = cat_index(&env, "default", &image, &format!("orig-{id}"));
    assert_eq!(seen.trim(), "<h1>lazyblk</h1>");
    // Every attached layer reads its file data from the original blobs.
    let devs = attached(&env);
    assert_eq!(devs.len(), 3, "{devs:?}");
    for dev in devs {
        assert!(
            dev["original_source"]
                .as_str()
                .is_some_and(|s| s.contains("/test/orig@sha256:")),
            "{dev}"
        );
    }
    assert_rootfs_of_full_pull(
        &env,
        &format!("{r}/test/app:web"),
        &image,
        &format!("olist-{id}"),
    );
    // The snapshotter fills layers in the background: for an index, by streaming each original
    // layer once, which proves the index against it (layer digest, diff ID, derived disk).
    let daemon_log = env.root.join("run").join("daemon.log");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
        assert!(!log.contains("verification failed"), "{log}");
        // (Each attach verifies again: the layers were attached twice.)
        if log.matches("original layer verified").count() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "layers never verified: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The bound form: a new tag whose manifest lists the same layer blobs, annotated with their
    // index, under a config whose diff IDs are the disks' digests (Prepare checks the chain IDs
    // against them, as for a converted image). Nothing is copied.
    let out = stdout(run_ok(lazyblk().args([
        "index",
        &image,
        &format!("{r}/test/orig:web-bound"),
        "--plain-http",
        "--json",
    ])));
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["mode"], "index+bound", "{out}");
    let bound: serde_json::Value = serde_json::from_slice(
        &run_ok(Command::new("curl").args([
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{r}/v2/test/orig/manifests/web-bound"),
        ]))
        .stdout,
    )
    .unwrap();
    let orig: serde_json::Value = serde_json::from_slice(
        &run_ok(Command::new("curl").args([
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{r}/v2/test/orig/manifests/web"),
        ]))
        .stdout,
    )
    .unwrap();
    let digests = |m: &serde_json::Value| -> Vec<String> {
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        digests(&bound),
        digests(&orig),
        "the bound form copies no layer"
    );
    let bimage = format!("{r}/test/orig:web-bound");
    let out = stdout(run_ok(&mut env.lazyblk_pull(&bimage, "default")));
    assert!(out.contains("3 remote layer(s), 0 unpacked"), "{out}");
    let seen = cat_index(&env, "default", &bimage, &format!("bound-{id}"));
    assert_eq!(seen.trim(), "<h1>lazyblk</h1>");
    remove_all(&env, "default");
    drop(snapd);
}
