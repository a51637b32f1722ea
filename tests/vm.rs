//! Real-kernel tests in a VM (Debian's 6.12 kernel under QEMU TCG; these hosts have no nbd/ublk and
//! KVM does not work): the ublk, kernel NBD and loop backends each attach, mount read-only, serve every
//! file correctly and read back identical to the raw image (random and sequential), show in `lazyblk
//! ls`, then detach cleanly; ten layers served by one node daemon over HTTP ranges, whose daemon is
//! killed with SIGKILL and HTTP source stopped while readers loop over every file of every layer: a
//! new daemon resumes all ten devices from local state with the readers seeing no error; two layers
//! stack under overlayfs; a server that never comes back gives EIO, not a hang. And the snapshotter
//! with real containerd 1.6 + runc on ublk and NBD, killed together with the node daemon under a
//! container's reads.

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::layer::{LayerTar, DEF, DIR};
use common::*;

/// Both tests build and boot the one VM image under `.cache/vm`: one at a time.
static VM: Mutex<()> = Mutex::new(());

/// Builds the VM's initramfs with `payload` and the guest `scripts` (tools/vm/), boots it (at most
/// `timeout` seconds) and returns the console, failing unless every script passed.
fn boot(payload: &std::path::Path, scripts: &[&str], timeout: u32) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    // LAZYBLK_VM_ONLY=guest-crash.sh boots with that script alone (while working on it; the test's
    // checks of the other scripts then fail).
    let only = std::env::var("LAZYBLK_VM_ONLY").ok();
    let scripts: Vec<&str> = scripts
        .iter()
        .copied()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *s))
        })
        .collect();
    run_ok(
        Command::new(format!("{root}/tools/vm/prepare.sh"))
            .env("LAZYBLK_BIN", env!("CARGO_BIN_EXE_lazyblk"))
            .arg(payload)
            .args(scripts.iter().map(|s| format!("{root}/tools/vm/{s}"))),
    );
    let out = Command::new(format!("{root}/tools/vm/run.sh"))
        .arg(timeout.to_string())
        .output()
        .unwrap();
    let console =
        std::fs::read_to_string(format!("{root}/.cache/vm/console.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "guest test failed; console:\n{console}"
    );
    console
}

fn have_qemu() -> bool {
    let have = Command::new("sh")
        .arg("-c")
        .arg("command -v qemu-system-x86_64 && command -v cpio && test -x /bin/busybox")
        .output()
        .unwrap();
    if !have.status.success() {
        assert!(
            may_skip(),
            "CI must install qemu-system-x86, cpio and busybox-static"
        );
        eprintln!("SKIPPED: qemu-system-x86_64, cpio or busybox-static missing");
        return false;
    }
    true
}

#[test]
fn ublk_nbd_and_loop_backends_in_a_real_6_12_kernel() {
    if !have_qemu() {
        return;
    }
    let _vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let payload = tmp.path().join("payload");
    std::fs::create_dir_all(&payload).unwrap();
    let mut t = LayerTar::new();
    t.dir("data", DIR);
    let mut sums = String::new();
    for i in 0..40u32 {
        let body = if i % 2 == 0 {
            noise(50_000 + i as usize * 997, i + 1)
        } else {
            format!("file {i}\n").repeat(3000).into_bytes()
        };
        let name = format!("data/f{i}");
        t.file(&name, DEF, &body);
        sums.push_str(&format!(
            "{}  {name}\n",
            hex::encode(lazyblk::format::sha256(&body))
        ));
    }
    t.dir("keep", DIR)
        .file("keep/a", DEF, b"a")
        .file("keep/b", DEF, b"b");
    let tar = tmp.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    convert(&tar, &payload.join("layer.blob"));
    // An upper layer: a whiteout and an opaque directory.
    let mut u = LayerTar::new();
    u.dir("data", DIR).file("data/.wh.f1", DEF, b"");
    u.dir("keep", DIR).file("keep/.wh..wh..opq", DEF, b"").file(
        "keep/new",
        DEF,
        b"from the upper layer",
    );
    let utar = tmp.path().join("u.tar");
    std::fs::write(&utar, u.finish()).unwrap();
    convert(&utar, &payload.join("upper.blob"));
    std::fs::write(payload.join("SHA256SUMS"), sums).unwrap();
    hostile_panic_blob(
        &payload.join("layer.blob"),
        &payload.join("panic.blob"),
        tmp.path(),
    );
    let console = boot(
        &payload,
        &[
            "guest-hostile.sh",
            "guest-backends.sh",
            "guest-crash.sh",
            "guest-overlay.sh",
            "guest-dead.sh",
        ],
        // A hang guard, not a timing: five scripts under TCG, beside the other VM test, on two cores.
        1200,
    );
    for backend in ["ublk", "nbd", "loop"] {
        for line in [
            "checksums ok: 40 files",
            "random reads ok: 64 blocks",
            "sequential read identical",
            "listed",
            "detached cleanly",
        ] {
            assert!(
                console.contains(&format!("{backend}: {line}")),
                "{backend}: {line}: {console}"
            );
        }
    }
    for b in ["ublk", "nbd"] {
        for line in [
            "10 layers attached in one daemon",
            "killed the daemon and stopped the HTTP server",
            "daemon restarted, 10 of 10 devices serving",
            "reader rounds ok=",
            "restart during an attach's mount:",
            "after detach all: 0 devices left",
        ] {
            assert!(
                console.contains(&format!("crash-{b}: {line}")),
                "crash test {b}: {line}: {console}"
            );
        }
        for (starts, ends) in [
            (
                "restart during an attach's mount",
                "0 record(s) of the half-done attach, 0 mount(s), helper gone",
            ),
            ("daemon restarted", ", 10 recovered events"),
        ] {
            let line = console
                .lines()
                .find(|l| l.starts_with(&format!("crash-{b}: {starts}")))
                .unwrap_or_default();
            assert!(line.ends_with(ends), "crash test {b}: {line}");
        }
    }
    assert!(
        console.contains("dead: read failed after") && console.contains("dead-ublk: reader exit=1"),
        "{console}"
    );
    assert!(
        console.contains("nbd: attached /dev/nbd")
            && console.contains("ublk: attached /dev/ublkb")
            && console.contains("read-only=1"),
        "{console}"
    );
    assert!(
        console.contains("ublk-control: yes, nbd: yes"),
        "guest kernel lacks ublk/nbd: {console}"
    );
    // The hostile image: the superblock's errors=panic is overridden, the corrupt directory is an
    // error, the kernel lives on.
    for line in [
        "hostile: mounted with ro,nosuid,nodev,noatime",
        "hostile: lookup under the corrupt directory failed:",
        "hostile: ext4 reported the corruption",
        "hostile: other files still read",
        "hostile: kernel alive",
    ] {
        assert!(console.contains(line), "{line}: {console}");
    }
}

/// `from` (a converted layer with a `data` directory) exported, its superblock set to
/// `errors=panic` and the first block of `data` overwritten with garbage, then cut into a blob
/// again (chunks and index that verify: what a hostile publisher would push).
fn hostile_panic_blob(from: &std::path::Path, to: &std::path::Path, tmp: &std::path::Path) {
    use lazyblk_image_format::{encode_chunk, BlobWriter, Codec};
    let raw = tmp.join("panic.img");
    run_ok(
        lazyblk()
            .args(["layer", "export"])
            .arg(from)
            .arg("-o")
            .arg(&raw),
    );
    run_ok(Command::new("tune2fs").args(["-e", "panic"]).arg(&raw));
    let out = run_ok(
        Command::new("debugfs")
            .args(["-R", "bmap /data 0"])
            .arg(&raw),
    );
    let block: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let mut img = std::fs::read(&raw).unwrap();
    let at = (block * 4096) as usize;
    img[at..at + 4096].copy_from_slice(&noise(4096, 99));
    let mut w = BlobWriter::new(std::fs::File::create(to).unwrap(), 18).unwrap();
    for (i, c) in img.chunks(1 << 18).enumerate() {
        w.append(i as u64, &encode_chunk(c, Codec::Zstd { level: 3 }))
            .unwrap();
    }
    w.finish(img.len() as u64).unwrap();
}

#[test]
fn containerd_on_ublk_and_nbd_in_a_real_6_12_kernel() {
    if !have_qemu() {
        return;
    }
    for t in [
        "containerd",
        "runc",
        "umoci",
        "skopeo",
        "docker-registry",
        "curl",
    ] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .map_or(true, |o| !o.status.success())
        {
            assert!(may_skip(), "{t} missing in CI");
            eprintln!("SKIPPED: {t} not installed");
            return;
        }
    }
    let _vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let payload = tmp.path().join("payload");
    let root = env!("CARGO_MANIFEST_DIR");
    run_ok(
        Command::new(format!("{root}/tools/vm/make-containerd-payload.sh"))
            .env("LAZYBLK_BIN", env!("CARGO_BIN_EXE_lazyblk"))
            .arg(&payload),
    );
    let console = boot(&payload, &["guest-containerd.sh"], 900);
    for b in ["ublk", "nbd"] {
        for line in [
            "pull: 127.0.0.1:5000/test/tiny:lazyblk: 1 remote layer(s), 0 unpacked",
            "http: <h1>lazyblk in a VM</h1>",
            "killed the snapshotter and the node daemon",
            "reader in the container: ok=40 fail=0",
            "new container after the restart: <h1>lazyblk in a VM</h1>",
        ] {
            assert!(
                console.contains(&format!("containerd-{b}: {line}")),
                "{b}: {line}: {console}"
            );
        }
    }
}
