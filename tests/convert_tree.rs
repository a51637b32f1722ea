//! A synthetic layer with every kind of entry: convert, export, `e2fsck -fn`, loop-mount as root and
//! compare the tree with GNU tar's extraction of the same tar (whiteouts mapped the OCI way).

mod common;

use common::layer::{LayerTar, DEF, DIR, M};
use common::*;
use tar::EntryType;

/// vfs_cap_data revision 2 granting cap_net_bind_service (permitted + effective).
fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

fn everything_layer() -> Vec<u8> {
    let mut t = LayerTar::new();
    t.dir(
        "./",
        M {
            mode: 0o755,
            mtime: 1_500_000_000,
            ..DEF
        },
    );
    // Regular files around block boundaries, with zero runs, all zeros, random data.
    t.dir("files", DIR);
    t.file("files/empty", DEF, b"");
    t.file("files/one", DEF, b"x");
    t.file("files/b4095", DEF, &noise(4095, 1));
    t.file("files/b4096", DEF, &noise(4096, 2));
    t.file("files/b4097", DEF, &noise(4097, 3));
    t.file("files/random-1m", DEF, &noise(1 << 20, 4));
    let mut holey = noise(10_000, 5);
    holey.extend(std::iter::repeat_n(0u8, 3 << 20));
    holey.extend(noise(5000, 6));
    t.file("files/zero-runs", DEF, &holey);
    t.file("files/all-zero-8m", DEF, &vec![0u8; 8 << 20]);
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog\n".repeat(50_000);
    t.file("files/text", DEF, &text);
    // Modes and owners.
    t.file(
        "files/setuid",
        M {
            mode: 0o4755,
            ..DEF
        },
        b"#!/bin/true\n",
    );
    t.file(
        "files/setgid",
        M {
            mode: 0o2711,
            uid: 1000,
            gid: 1000,
            ..DEF
        },
        b"g",
    );
    t.dir(
        "files/sticky",
        M {
            mode: 0o1777,
            ..DIR
        },
    );
    t.file(
        "files/no-perms",
        M {
            mode: 0o000,
            uid: 65534,
            gid: 65534,
            ..DEF
        },
        b"secret",
    );
    t.file(
        "files/big-uid-header",
        M {
            uid: 3_000_000,
            gid: 3_000_001,
            ..DEF
        },
        b"u",
    );
    t.pax(&[("uid", b"4000000"), ("gid", b"4000001")]);
    t.file("files/big-uid-pax", DEF, b"p");
    t.pax(&[("mtime", b"1700000000.123456789")]);
    t.file("files/nanos", DEF, b"n");
    t.pax(&[("mtime", b"-86400.25")]);
    t.file("files/before-1970", DEF, b"old");
    // Extended attributes: small (in inode), binary capability, trusted, big (block), shared big.
    t.pax(&[
        ("SCHILY.xattr.user.small", b"v"),
        ("SCHILY.xattr.trusted.note", b"t"),
    ]);
    t.file("xattr-small", DEF, b"x");
    t.pax(&[("SCHILY.xattr.security.capability", &capability())]);
    t.file("xattr-cap", M { mode: 0o755, ..DEF }, b"#!/bin/true\n");
    let big = noise(1500, 7);
    for i in 0..3 {
        t.pax(&[
            ("SCHILY.xattr.user.big", &big),
            ("SCHILY.xattr.user.other", b"o"),
        ]);
        t.file(&format!("xattr-big-{i}"), DEF, b"b");
    }
    t.pax(&[("SCHILY.xattr.user.dir", b"on a directory")]);
    t.dir("xattr-dir", DIR);
    // Symlinks: relative, absolute, dangling, long (slow symlink), to a directory.
    t.dir("links", DIR);
    t.symlink("links/rel", "../files/one");
    t.symlink("links/abs", "/etc/passwd");
    t.symlink("links/dangling", "does/not/exist");
    let long_target = format!("/{}", "long-target-component/".repeat(10));
    t.symlink("links/long", &long_target);
    t.symlink("links/to-dir", "../files");
    // Hard links, including to a file in another directory and a three-way group.
    t.file("links/orig", DEF, b"linked content\n");
    t.hardlink("links/hard1", "links/orig");
    t.hardlink("links/hard-to-files", "files/one");
    t.file("links/pair", DEF, b"pair");
    t.hardlink("links/pair2", "links/pair");
    // Devices and FIFOs.
    t.dir("dev", DIR);
    t.device("dev/null", EntryType::Char, 1, 3, M { mode: 0o666, ..DEF });
    t.device(
        "dev/loop0",
        EntryType::Block,
        7,
        0,
        M {
            mode: 0o660,
            gid: 6,
            ..DEF
        },
    );
    t.device("dev/big", EntryType::Char, 259, 70000, DEF);
    t.device("dev/fifo", EntryType::Fifo, 0, 0, DEF);
    // Names: long (GNU and PAX), unicode.
    let long_dir = "d".repeat(200);
    let long_name = format!("{long_dir}/{}", "n".repeat(250));
    t.dir(&long_dir, DIR);
    t.file(&long_name, DEF, b"long gnu name");
    t.pax(&[(
        "path",
        format!("{long_dir}/pax-{}", "p".repeat(240)).as_bytes(),
    )]);
    t.file("placeholder-overridden-by-pax", DEF, b"long pax name");
    t.dir("unicodé", DIR);
    t.file("unicodé/日本語.txt", DEF, "こんにちは".as_bytes());
    t.file("unicodé/emoji-🦀", DEF, b"crab");
    // A directory with tens of thousands of entries.
    t.dir("many", DIR);
    for i in 0..30_000 {
        t.file(
            &format!("many/entry-{i:05}-with-a-name-of-some-length"),
            DEF,
            b"",
        );
    }
    // Implicit parents (no directory entries for them).
    t.file("implicit/parent/file", DEF, b"implicit");
    // OCI whiteouts: a file, one in a subdirectory, and an opaque directory with new content.
    t.file(
        ".wh.gone",
        M {
            mode: 0o600,
            uid: 5,
            gid: 6,
            mtime: 1_600_000_555,
        },
        b"",
    );
    t.dir("sub", DIR);
    t.file("sub/.wh.removed-dir", DEF, b"");
    t.dir("opq", DIR);
    t.file("opq/.wh..wh..opq", DEF, b"");
    t.file("opq/new", DEF, b"only this survives");
    t.file(".wh..wh.plnk", DEF, b""); // aufs bookkeeping: ignored
    t.finish()
}

#[test]
fn everything_round_trips_against_gnu_tar() {
    if !privileged() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tar_path = tmp.path().join("layer.tar");
    std::fs::write(&tar_path, everything_layer()).unwrap();
    // gzip it too: conversion must detect the compression by content, not by name.
    let gz_path = tmp.path().join("layer.gz-without-extension");
    {
        let f = std::fs::File::create(&gz_path).unwrap();
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        std::io::copy(&mut std::fs::File::open(&tar_path).unwrap(), &mut enc).unwrap();
        enc.finish().unwrap();
    }
    let blob = tmp.path().join("layer.blob");
    let summary = convert(&gz_path, &blob);
    assert_eq!(summary["input"]["compression"], "gzip");
    assert_eq!(summary["tar"]["whiteouts"], 2);
    assert_eq!(summary["tar"]["opaque_dirs"], 1);
    let diff_id = format!("sha256:{}", sha256_file(&tar_path));
    assert_eq!(summary["input"]["diff_id"], diff_id.as_str());
    assert_eq!(
        summary["input"]["digest"],
        format!("sha256:{}", sha256_file(&gz_path)).as_str()
    );
    assert_eq!(
        summary["blob"]["digest"],
        format!("sha256:{}", sha256_file(&blob)).as_str()
    );

    let image = tmp.path().join("layer.img");
    export_and_fsck(&blob, &image);

    let reference = tmp.path().join("reference");
    gnu_tar_extract(&tar_path, &reference);
    let mut expected = oci_semantics(snapshot(&reference));
    // Directories the tar only implies: root:root 0755, time 0 (tar would use "now").
    for p in ["implicit", "implicit/parent"] {
        let e = expected.entries.get_mut(p).unwrap();
        e.mtime = (0, 0);
        e.perm = 0o755;
        e.uid = 0;
        e.gid = 0;
    }
    let mnt = Mount::loop_ro(&image, &tmp.path().join("mnt"));
    let got = snapshot(&mnt.dir);
    assert_same_tree(&expected, &got);

    // Holes: the all-zero file and the zero run take no data blocks.
    use std::os::unix::fs::MetadataExt;
    let zero = std::fs::metadata(mnt.dir.join("files/all-zero-8m")).unwrap();
    assert_eq!((zero.len(), zero.blocks()), (8 << 20, 0));
    let holey = std::fs::metadata(mnt.dir.join("files/zero-runs")).unwrap();
    assert!(
        holey.blocks() * 512 < 100_000,
        "zero run was stored: {} sectors",
        holey.blocks()
    );
}

#[test]
fn plain_and_zstd_inputs_give_the_same_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    t.dir("d", DIR)
        .file("d/f", DEF, &noise(100_000, 9))
        .symlink("s", "d/f");
    let tar = t.finish();
    let plain = tmp.path().join("plain.tar");
    std::fs::write(&plain, &tar).unwrap();
    let zst = tmp.path().join("layer.zst");
    std::fs::write(&zst, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();
    let a = convert(&plain, &tmp.path().join("a.blob"));
    let b = convert(&zst, &tmp.path().join("b.blob"));
    assert_eq!(a["input"]["compression"], "none");
    assert_eq!(b["input"]["compression"], "zstd");
    assert_eq!(a["input"]["diff_id"], b["input"]["diff_id"]);
    assert_eq!(
        a["blob"]["digest"], b["blob"]["digest"],
        "same tar, same blob"
    );
}

/// docs/format.md is precise enough for an independent reader: the Python one in tools/bench, written
/// from the spec alone, exports the same disk image as lazyblk, and rejects a corrupted chunk.
#[test]
fn independent_python_reader_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    t.dir("d", DIR).file("d/f", DEF, &noise(300_000, 11)).file(
        "d/t",
        DEF,
        &b"text ".repeat(100_000),
    );
    let tar = tmp.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = tmp.path().join("l.blob");
    convert(&tar, &blob);
    let ours = tmp.path().join("ours.img");
    run_ok(
        lazyblk()
            .args(["layer", "export"])
            .arg(&blob)
            .arg("-o")
            .arg(&ours),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench/blobinfo.py");
    let theirs = tmp.path().join("theirs.img");
    run_ok(
        std::process::Command::new("python3")
            .arg(script)
            .arg(&blob)
            .arg("--export")
            .arg(&theirs),
    );
    assert!(
        std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
        "readers disagree"
    );
    // Flip one byte of the first stored chunk: both readers must refuse.
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    let py = std::process::Command::new("python3")
        .arg(script)
        .arg(&blob)
        .arg("--export")
        .arg(&theirs)
        .output()
        .unwrap();
    assert!(
        !py.status.success() && String::from_utf8_lossy(&py.stderr).contains("digest mismatch")
    );
    let rs = lazyblk()
        .args(["layer", "export"])
        .arg(&blob)
        .arg("-o")
        .arg(&ours)
        .output()
        .unwrap();
    assert!(!rs.status.success());
    assert!(
        String::from_utf8_lossy(&rs.stderr).contains("digest mismatch"),
        "{}",
        String::from_utf8_lossy(&rs.stderr)
    );
}
