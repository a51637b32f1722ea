//! Helpers shared by the integration tests: running the binary, loop mounts, e2fsck, tree snapshots.
#![allow(dead_code)]

pub mod faulty;
pub mod layer;
pub mod pki;
pub mod registry;
pub mod token;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// The `lazyblk` binary under test.
pub fn lazyblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazyblk"))
}

/// Runs a command and returns its output, panicking with stderr if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// True when the test may mount things. Outside CI a non-root run skips (loudly); in CI (CI set) a
/// non-root run is a failure, so these tests can never silently pass there.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (loop mounts) and CI is set");
    }
    eprintln!("SKIPPED: needs root for loop mounts");
    false
}

/// A read-only loop mount, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn loop_ro(image: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,ro"])
                .arg(image)
                .arg(dir),
        );
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Converts `input` to `blob`, returning the JSON summary.
pub fn convert(input: &Path, blob: &Path) -> serde_json::Value {
    let out = run_ok(
        lazyblk()
            .args(["layer", "convert", "--json"])
            .arg(input)
            .arg("-o")
            .arg(blob),
    );
    serde_json::from_slice(&out.stdout).expect("convert --json output")
}

/// Exports `blob` to the raw disk image `image` (`lazyblk layer export`).
pub fn export(blob: &Path, image: &Path) {
    run_ok(
        lazyblk()
            .args(["layer", "export"])
            .arg(blob)
            .arg("-o")
            .arg(image),
    );
}

/// Exports `blob` to a raw image and checks it with `e2fsck -fn`.
pub fn export_and_fsck(blob: &Path, image: &Path) {
    export(blob, image);
    e2fsck(image);
}

/// `e2fsck -fn` must report a clean filesystem.
pub fn e2fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("e2fsck (install e2fsprogs)");
    assert!(
        out.status.success(),
        "e2fsck -fn {} failed ({}):\n{}{}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything compared about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub sha256: Option<String>,
    pub target: Option<Vec<u8>>,
    pub rdev: Option<(u64, u64)>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub nlink: Option<u64>,
}

/// A tree: entries by path relative to the root ("" is the root), plus hard-link groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: BTreeMap<String, Entry>,
    pub link_groups: BTreeSet<Vec<String>>,
}

pub fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}
pub fn minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Walks `root` without following symlinks.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut entries = BTreeMap::new();
    let mut by_ino: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((p, rel)) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            'f'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let mut xattrs = BTreeMap::new();
        if kind != 'l' {
            for name in xattr::list(&p).unwrap() {
                let n = name.to_string_lossy().into_owned();
                let v = xattr::get(&p, &name).unwrap().unwrap_or_default();
                xattrs.insert(n, v);
            }
        }
        let e = Entry {
            kind,
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
            size: if kind == 'f' { md.len() } else { 0 },
            sha256: (kind == 'f').then(|| sha256_file(&p)),
            target: (kind == 'l').then(|| {
                use std::os::unix::ffi::OsStrExt;
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            }),
            rdev: matches!(kind, 'c' | 'b').then(|| (major(md.rdev()), minor(md.rdev()))),
            xattrs,
            nlink: (kind != 'd').then(|| md.nlink()),
        };
        if kind != 'd' && md.nlink() > 1 {
            by_ino.entry(md.ino()).or_default().push(rel.clone());
        }
        if kind == 'd' {
            for child in std::fs::read_dir(&p).unwrap() {
                let child = child.unwrap();
                let name = child.file_name().to_string_lossy().into_owned();
                let crel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((child.path(), crel));
            }
        }
        entries.insert(rel, e);
    }
    let link_groups = by_ino
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Snapshot {
        entries,
        link_groups,
    }
}

/// Asserts two snapshots are equal, printing the first differences readably.
pub fn assert_same_tree(expected: &Snapshot, got: &Snapshot) {
    let mut diffs = Vec::new();
    for (p, e) in &expected.entries {
        match got.entries.get(p) {
            None => diffs.push(format!("missing: {p:?} {e:?}")),
            Some(g) if g != e => diffs.push(format!(
                "differs: {p:?}\n  expected {e:?}\n  got      {g:?}"
            )),
            _ => {}
        }
    }
    for p in got.entries.keys() {
        if !expected.entries.contains_key(p) {
            diffs.push(format!("unexpected: {p:?} {:?}", got.entries[p]));
        }
    }
    if expected.link_groups != got.link_groups {
        diffs.push(format!(
            "hard-link groups differ:\n  expected {:?}\n  got      {:?}",
            expected.link_groups, got.link_groups
        ));
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Extracts `tar` with GNU tar as root, preserving everything (the reference for comparisons).
pub fn gnu_tar_extract(tar: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    run_ok(
        Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--same-owner",
                "-xpf",
            ])
            .arg(tar)
            .arg("-C")
            .arg(dir),
    );
    // GNU tar restores a directory's mtime when the archive leaves it; an archive that comes back into
    // the directory later (umoci sorts `a/` < `a.txt` < `a/b`) changes it again. Re-apply every
    // directory's time from the archive itself (exact nanoseconds from PAX records).
    let fix = r#"
import os, sys, tarfile
from decimal import Decimal
root = sys.argv[2]
for ti in tarfile.open(sys.argv[1]):
    if not ti.isdir():
        continue
    name = os.path.normpath(ti.name.lstrip("/"))
    p = os.path.join(root, name) if name != "." else root
    t = Decimal(ti.pax_headers.get("mtime", str(ti.mtime)))
    ns = int(t * 1_000_000_000)
    if os.path.isdir(p) and not os.path.islink(p):
        os.utime(p, ns=(ns, ns), follow_symlinks=False)
"#;
    run_ok(Command::new("python3").arg("-c").arg(fix).arg(tar).arg(dir));
}

/// What the OCI layer means, derived from GNU tar's literal extraction: `.wh.X` files become 0:0 char
/// devices, `.wh..wh..opq` becomes `trusted.overlay.opaque=y` and aufs `.wh..wh.*` entries disappear.
pub fn oci_semantics(mut s: Snapshot) -> Snapshot {
    let paths: Vec<String> = s.entries.keys().cloned().collect();
    for p in paths {
        let (parent, base) = match p.rsplit_once('/') {
            Some((d, b)) => (d.to_string(), b.to_string()),
            None => (String::new(), p.clone()),
        };
        if base == ".wh..wh..opq" {
            s.entries.remove(&p);
            s.entries
                .get_mut(&parent)
                .unwrap()
                .xattrs
                .insert("trusted.overlay.opaque".into(), b"y".to_vec());
        } else if base.starts_with(".wh..wh.") {
            s.entries.remove(&p);
        } else if let Some(hidden) = base.strip_prefix(".wh.") {
            let e = s.entries.remove(&p).unwrap();
            let target = if parent.is_empty() {
                hidden.to_string()
            } else {
                format!("{parent}/{hidden}")
            };
            s.entries.insert(
                target,
                Entry {
                    kind: 'c',
                    perm: 0,
                    size: 0,
                    sha256: None,
                    rdev: Some((0, 0)),
                    nlink: Some(1),
                    ..e
                },
            );
        }
    }
    s
}

/// Directories a tar implies (parents of entries) without listing them. lazyblk gives them
/// root:root 0755 and time 0 (see docs/architecture.md); GNU tar gives them "now".
pub fn set_implicit_dirs(tar: &Path, expected: &mut Snapshot) {
    let list = r#"
import os, sys, tarfile
names = set(); parents = set()
for ti in tarfile.open(sys.argv[1]):
    n = os.path.normpath(ti.name.lstrip("/"))
    if n == ".":
        n = ""
    names.add(n)
    while n:
        n = os.path.dirname(n)
        parents.add(n)
for p in sorted(parents - names):
    print(p)
"#;
    let out = run_ok(Command::new("python3").arg("-c").arg(list).arg(tar));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(e) = expected.entries.get_mut(line) {
            e.mtime = (0, 0);
            e.perm = 0o755;
            e.uid = 0;
            e.gid = 0;
        }
    }
}

/// Deterministic incompressible bytes (xorshift).
pub fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A `lazyblk daemon` serving `run_dir`, stopped (SIGKILL, so its devices stay for the next one, like
/// a crash) when dropped unless [`NodeDaemon::stop`] was called. Tests that start daemons through
/// `attach --daemon` or the snapshotter use [`stop_daemon_of`] instead.
pub struct NodeDaemon {
    pub child: std::process::Child,
    pub run_dir: std::path::PathBuf,
}

impl NodeDaemon {
    /// Starts a daemon with `args` and waits for its socket.
    pub fn start(run_dir: &Path, args: &[&str]) -> NodeDaemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.with_extension("daemon.log"))
            .unwrap();
        let child = lazyblk()
            .arg("daemon")
            .arg("--run-dir")
            .arg(run_dir)
            .args(args)
            .args(["--log", "info"])
            .stdin(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = NodeDaemon {
            child,
            run_dir: run_dir.to_path_buf(),
        };
        let t = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(run_dir.join("daemon.sock")).is_err() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "daemon did not start: {}",
                std::fs::read_to_string(run_dir.with_extension("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        d
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir.with_extension("daemon.log")).unwrap_or_default()
    }
}

impl Drop for NodeDaemon {
    fn drop(&mut self) {
        let _ = lazyblk()
            .args(["detach", "all", "--run-dir"])
            .arg(&self.run_dir)
            .output();
        self.kill9();
    }
}

/// Stops the daemon serving `run_dir` (started by `attach --daemon` or the snapshotter), after
/// detaching its devices.
pub fn stop_daemon_of(run_dir: &Path) {
    let _ = lazyblk()
        .args(["detach", "all", "--run-dir"])
        .arg(run_dir)
        .output();
    let Ok(s) = std::fs::read_to_string(run_dir.join("daemon.pid")) else {
        return;
    };
    let mut it = s.split_whitespace();
    let (Some(pid), Some(start)) = (it.next(), it.next()) else {
        return;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<i32>(), start.parse::<u64>()) else {
        return;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let started = stat
        .rsplit_once(") ")
        .and_then(|(_, r)| r.split_whitespace().nth(19).map(str::to_string));
    if started.as_deref() != Some(start.to_string().as_str()) {
        return;
    }
    // SAFETY: signalling the daemon this test started, identified by pid and start time.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// Whether a test may skip for a missing tool: not in CI, and not under `tools/test.sh` (which
/// installs every tool, so a missing one is a failure there).
pub fn may_skip() -> bool {
    std::env::var_os("CI").is_none() && std::env::var_os("LAZYBLK_REQUIRE_ALL").is_none()
}
