//! A real Debian rootfs (debootstrap minbase, packed by `tools/make-rootfs-layer.sh`): convert its gzip
//! layer, export, `e2fsck -fn`, loop-mount and compare every file with GNU tar's extraction.

mod common;

use std::path::PathBuf;

use common::*;

#[test]
fn debian_rootfs_matches_tar_extraction() {
    let Some(tar) = std::env::var_os("LAZYBLK_ROOTFS_TAR").map(PathBuf::from) else {
        assert!(
            may_skip(),
            "CI must set LAZYBLK_ROOTFS_TAR (tools/test.sh does)"
        );
        eprintln!("SKIPPED: set LAZYBLK_ROOTFS_TAR (tools/make-rootfs-layer.sh makes one)");
        return;
    };
    if !privileged() {
        return;
    }
    let gz = tar.with_extension("tar.gz");
    let input = if gz.exists() { gz } else { tar.clone() };
    let tmp = tempfile::tempdir().unwrap();
    let blob = tmp.path().join("rootfs.blob");
    let summary = convert(&input, &blob);
    assert!(
        summary["ext4"]["files"].as_u64().unwrap() > 1000,
        "{summary}"
    );
    assert_eq!(
        summary["input"]["diff_id"],
        format!("sha256:{}", sha256_file(&tar)).as_str()
    );
    let image = tmp.path().join("rootfs.img");
    export_and_fsck(&blob, &image);
    let reference = tmp.path().join("reference");
    gnu_tar_extract(&tar, &reference);
    let mnt = Mount::loop_ro(&image, &tmp.path().join("mnt"));
    assert_same_tree(&snapshot(&reference), &snapshot(&mnt.dir));
}
