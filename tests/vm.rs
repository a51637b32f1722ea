//! Real-kernel tests in a VM (Debian's 6.12 kernel under QEMU TCG; these hosts have no nbd/ublk and
//! KVM does not work): the kernel NBD backend (generic netlink, socketpairs) and the loop backend each
//! attach, mount read-only and serve every file correctly, then detach cleanly; and the NBD server is
//! killed with SIGKILL while a reader loops over every file, `lazyblk recover` takes the device over and
//! the reader sees no error.

mod common;

use std::process::Command;

use common::layer::{LayerTar, DEF, DIR};
use common::*;

#[test]
fn nbd_and_loop_backends_in_a_real_6_12_kernel() {
    let have = Command::new("sh")
        .arg("-c")
        .arg("command -v qemu-system-x86_64 && command -v cpio && test -x /bin/busybox")
        .output()
        .unwrap();
    if !have.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install qemu-system-x86, cpio and busybox-static"
        );
        eprintln!("SKIPPED: qemu-system-x86_64, cpio or busybox-static missing");
        return;
    }
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
    let root = env!("CARGO_MANIFEST_DIR");
    run_ok(
        Command::new(format!("{root}/tools/vm/prepare.sh"))
            .env("LAZYBLK_BIN", env!("CARGO_BIN_EXE_lazyblk"))
            .arg(&payload)
            .arg(format!("{root}/tools/vm/guest-backends.sh"))
            .arg(format!("{root}/tools/vm/guest-crash.sh"))
            .arg(format!("{root}/tools/vm/guest-overlay.sh"))
            .arg(format!("{root}/tools/vm/guest-dead.sh")),
    );
    let out = Command::new(format!("{root}/tools/vm/run.sh"))
        .arg("600")
        .output()
        .unwrap();
    let console =
        std::fs::read_to_string(format!("{root}/.cache/vm/console.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "guest test failed; console:\n{console}"
    );
    for backend in ["nbd", "loop"] {
        assert!(
            console.contains(&format!("{backend}: checksums ok: 40 files")),
            "{backend}: {console}"
        );
        assert!(
            console.contains(&format!("{backend}: detached cleanly")),
            "{backend}: {console}"
        );
    }
    assert!(
        console.contains("nbd: attached /dev/nbd") && console.contains("read-only=1"),
        "{console}"
    );
    assert!(
        console.contains("ublk-control: yes, nbd: yes"),
        "guest kernel lacks ublk/nbd: {console}"
    );
}
