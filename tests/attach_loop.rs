//! `lazyblk attach` with the loop backend on the host kernel: attach, mount, compare the tree, `ls`,
//! `detach`, and nothing left behind.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::layer::{LayerTar, DEF, DIR, M};
use common::*;

#[test]
fn attach_mount_compare_detach() {
    if !privileged() {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists()
        || !std::path::Path::new("/dev/loop-control").exists()
    {
        assert!(may_skip(), "CI needs /dev/fuse and /dev/loop-control");
        eprintln!("SKIPPED: no /dev/fuse or /dev/loop-control");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    t.dir("etc", DIR);
    t.file("etc/hostname", DEF, b"lazyblk\n");
    t.pax(&[("SCHILY.xattr.user.k", b"v")]);
    t.file(
        "big",
        M {
            mode: 0o600,
            uid: 33,
            gid: 33,
            ..DEF
        },
        &b"0123456789abcdef".repeat(300_000),
    );
    t.symlink("link", "etc/hostname");
    t.file(".wh.removed", DEF, b"");
    // What an image author may put in a layer: a setuid-root program and a device node.
    t.file(
        "suid-id",
        M {
            mode: 0o4755,
            ..DEF
        },
        &std::fs::read("/usr/bin/id").unwrap(),
    );
    t.device("null", tar::EntryType::Char, 1, 3, M { mode: 0o666, ..DEF });
    let tar = tmp.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = tmp.path().join("l.blob");
    convert(&tar, &blob);
    let run = tmp.path().join("run");
    let mnt = tmp.path().join("mnt");
    let child = lazyblk()
        .args(["attach", "--backend", "loop", "--mount"])
        .arg(&mnt)
        .arg("--run-dir")
        .arg(&run)
        .arg(&blob)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let dev = line.trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "attach printed {line:?}");
    // The device is read-only and the mount shows the layer.
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{}/ro", &dev[5..]))
            .unwrap()
            .trim(),
        "1"
    );
    // It reads its FUSE file with direct I/O (several reads in flight, no second page cache);
    // the comparison below goes through that path.
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{}/loop/dio", &dev[5..]))
            .unwrap()
            .trim(),
        "1",
        "loop device without direct I/O"
    );
    let reference = tmp.path().join("ref");
    gnu_tar_extract(&tar, &reference);
    let mut expected = oci_semantics(snapshot(&reference));
    set_implicit_dirs(&tar, &mut expected);
    assert_same_tree(&expected, &snapshot(&mnt));
    assert!(
        std::fs::write(mnt.join("new"), b"x").is_err(),
        "read-only mount"
    );
    // The host honours neither: nosuid, nodev, and the superblock's error policy overridden.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} not in mountinfo", mnt.display()));
    let opts = line.split(' ').nth(5).unwrap();
    for o in ["ro", "nosuid", "nodev"] {
        assert!(opts.split(',').any(|x| x == o), "{o} missing: {line}");
    }
    let sb = line.rsplit(' ').next().unwrap();
    assert!(
        sb.contains("errors=remount-ro"),
        "superblock options: {line}"
    );
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("null"))
        .unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EACCES),
        "device node opened: {e}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = run_ok(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(mnt.join("suid-id"))
                .arg("-u"),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "65534",
            "setuid honoured"
        );
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let ls = run_ok(lazyblk().args(["ls", "--json", "--run-dir"]).arg(&run));
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(v[0]["device"], dev.as_str());
    assert_eq!(v[0]["state"], "serving");
    assert_eq!(v[0]["pid"], child.0.id());
    // Detach through the CLI: the serving process exits cleanly and removes everything.
    run_ok(lazyblk().args(["detach", "all", "--run-dir"]).arg(&run));
    let status = child.0.wait().unwrap();
    assert!(status.success(), "attach exited with {status}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(mnt.to_str().unwrap()),
        "ext4 still mounted"
    );
    assert!(
        !mounts.contains(run.to_str().unwrap()),
        "FUSE still mounted"
    );
    let backing = std::fs::read_to_string(format!("/sys/block/{}/loop/backing_file", &dev[5..]))
        .unwrap_or_default();
    assert!(
        !backing.contains(run.to_str().unwrap()),
        "loop device still attached to our file"
    );
    assert!(
        std::fs::read_dir(run.join("devices"))
            .unwrap()
            .next()
            .is_none(),
        "state left behind"
    );
}

#[test]
fn daemon_mode_returns_once_the_device_is_ready() {
    if !privileged() {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        assert!(may_skip(), "CI needs /dev/fuse");
        eprintln!("SKIPPED: no /dev/fuse");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    t.file("hello", DEF, b"from a daemon\n");
    let tar = tmp.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = tmp.path().join("l.blob");
    convert(&tar, &blob);
    let run = tmp.path().join("run");
    let mnt = tmp.path().join("mnt");
    let out = run_ok(
        lazyblk()
            .args(["attach", "--daemon", "--backend", "loop", "--mount"])
            .arg(&mnt)
            .arg("--run-dir")
            .arg(&run)
            .arg(&blob),
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev:?}");
    // It started a node daemon for the run dir, which serves the device.
    let pid: u32 = std::fs::read_to_string(run.join("daemon.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ls = run_ok(lazyblk().args(["ls", "--json", "--run-dir"]).arg(&run));
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(v[0]["pid"], pid);
    // The command has returned; the device keeps serving from the daemon.
    assert_eq!(
        std::fs::read(mnt.join("hello")).unwrap(),
        b"from a daemon\n"
    );
    run_ok(lazyblk().args(["detach", &dev, "--run-dir"]).arg(&run));
    assert!(!std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(mnt.to_str().unwrap()));
    stop_daemon_of(&run);
}

/// Kills the attach process if the test fails half-way (its own SIGTERM handler then detaches).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

/// The mount helper the node runs for every layer mount (`lazyblk __mount-layer DEV DIR`, see
/// `device::mount`): a failure exits 1 naming the device, the directory and the kernel's error.
#[test]
fn the_mount_helper_reports_what_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let out = lazyblk()
        .args(["__mount-layer", "/dev/lazyblk-no-such-device"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/dev/lazyblk-no-such-device") && err.contains(dir.to_str().unwrap()),
        "{err}"
    );
    if privileged() {
        assert!(err.contains("No such file or directory"), "{err}");
    }
    let usage = lazyblk().arg("__mount-layer").output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
