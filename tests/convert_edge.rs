//! Hostile and malformed layers, replacement semantics, determinism and files over 4 GiB.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};

use common::layer::{LayerTar, DEF, DIR, M};
use common::*;
use tar::EntryType;

/// Every file under `dir`, recursively (relative paths).
fn listing(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            v.push(
                e.path()
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    v.sort();
    v
}

/// Converts `input` bytes (written to `work/in/layer`) in `work/run` as the working directory; returns
/// (success, stderr). Checks that nothing but the output blob appeared anywhere under `work`.
fn convert_in_scratch(input: &[u8]) -> (bool, String, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let indir = work.path().join("in");
    let run = work.path().join("run/deeper/still");
    std::fs::create_dir_all(&indir).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(indir.join("layer"), input).unwrap();
    let before = listing(work.path());
    let out = lazyblk()
        .current_dir(&run)
        .args(["layer", "convert", "../../../in/layer", "-o", "out.blob"])
        .output()
        .unwrap();
    let after = listing(work.path());
    let mut expected = before.clone();
    if out.status.success() {
        expected.push("run/deeper/still/out.blob".into());
        expected.sort();
    }
    assert_eq!(
        after, expected,
        "conversion left files behind or wrote outside its output"
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        work,
    )
}

fn assert_fails(input: &[u8], needles: &[&str]) {
    let (ok, stderr, _w) = convert_in_scratch(input);
    assert!(!ok, "conversion should fail");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn escapes_are_contained_or_refused() {
    // `..` and absolute names are cleaned into the layer root, like containerd does.
    let mut t = LayerTar::new();
    t.raw(
        b"../../../../escape-dotdot",
        EntryType::Regular,
        b"",
        b"contained",
    );
    t.raw(
        b"/abs-escape/file",
        EntryType::Regular,
        b"",
        b"also contained",
    );
    let (ok, stderr, work) = convert_in_scratch(&t.finish());
    assert!(ok, "{stderr}");
    assert!(!Path::new("/escape-dotdot").exists() && !Path::new("/abs-escape").exists());
    if privileged() {
        let img = work.path().join("img");
        export_and_fsck(&work.path().join("run/deeper/still/out.blob"), &img);
        let m = Mount::loop_ro(&img, &work.path().join("mnt"));
        assert_eq!(
            std::fs::read(m.dir.join("escape-dotdot")).unwrap(),
            b"contained"
        );
        assert_eq!(
            std::fs::read(m.dir.join("abs-escape/file")).unwrap(),
            b"also contained"
        );
    }

    // An entry below a symlink would land wherever the link points: refused.
    let mut t = LayerTar::new();
    t.symlink("evil", "/etc");
    t.file("evil/passwd", DEF, b"root::0:0::/:/bin/sh\n");
    assert_fails(&t.finish(), &["evil/passwd", "symlink"]);
    let mut t = LayerTar::new();
    t.symlink("up", "../../..");
    t.dir("up/x", DIR);
    assert_fails(&t.finish(), &["/up", "symlink"]);
    // Hard links may only point at files of this layer.
    let mut t = LayerTar::new();
    t.hardlink("h", "../../../etc/passwd");
    assert_fails(
        &t.finish(),
        &["hard link target /etc/passwd is not in this layer"],
    );
    let mut t = LayerTar::new();
    t.dir("d", DIR);
    t.hardlink("h", "d");
    assert_fails(&t.finish(), &["is a directory"]);
    // A name component longer than ext4 allows.
    let mut t = LayerTar::new();
    t.file(&"n".repeat(300), DEF, b"x");
    assert_fails(&t.finish(), &["255"]);
}

#[test]
fn malformed_inputs_fail_cleanly() {
    let mut t = LayerTar::new();
    t.file("a", DEF, &[7u8; 100_000]);
    t.file("b", DEF, b"b");
    let tar = t.finish();
    // Truncated inside file data, inside a header, and a gzip stream cut short.
    assert_fails(&tar[..50_000], &["truncated"]);
    assert_fails(&tar[..100_864 + 100], &["truncated", "header"]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    assert_fails(&gz[..gz.len() / 2], &["tar"]);
    // A flipped bit inside the deflate stream (the gzip CRC or the tar checksum must catch it).
    let mut bad = gz.clone();
    let mid = bad.len() / 3;
    bad[mid] ^= 0x10;
    assert_fails(&bad, &["converting"]);
    // Garbage, empty input, unsupported compression.
    assert_fails(&[0x42u8; 4096], &["header at byte 0", "not a tar stream"]);
    let mut zeros_then_junk = vec![b'0'; 4096];
    zeros_then_junk[148..156].copy_from_slice(b"0000000\0");
    assert_fails(&zeros_then_junk, &["checksum mismatch", "byte 0"]);
    assert_fails(b"", &["empty"]);
    assert_fails(b"\xfd7zXZ\0\0\0garbage", &["xz"]);
    // Absurd sizes: an 8 GiB file with 1 KiB of data, a 4 EiB file, a 100 MB PAX header.
    let mut t = LayerTar::new();
    t.raw(b"huge", EntryType::Regular, b"", b"");
    let mut huge = t.finish();
    huge[124..136].copy_from_slice(b"77777777777\0");
    fix_checksum(&mut huge[..512]);
    huge.truncate(512 + 1024);
    assert_fails(&huge, &["truncated"]);
    let mut enormous = huge.clone();
    enormous[124] = 0x80;
    enormous[125..136].copy_from_slice(&[0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]);
    fix_checksum(&mut enormous[..512]);
    assert_fails(&enormous, &["too large"]);
    let mut pax = huge.clone();
    pax[156] = b'x';
    pax[124..136].copy_from_slice(b"00574000000\0");
    fix_checksum(&mut pax[..512]);
    assert_fails(&pax, &["limit"]);
    // Unknown entry type.
    let mut odd = huge;
    odd[156] = b'Z';
    odd[124..136].copy_from_slice(b"00000000000\0");
    fix_checksum(&mut odd[..512]);
    assert_fails(&odd, &["unsupported entry type 'Z'"]);
}

fn fix_checksum(h: &mut [u8]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

#[test]
fn later_entries_replace_earlier_ones() {
    if !privileged() {
        return;
    }
    let mut t = LayerTar::new();
    t.file("dup", DEF, &[1u8; 50_000]);
    t.file("dup", DEF, b"second");
    t.dir("d2f", DIR);
    t.file("d2f/child", DEF, &[2u8; 9000]);
    t.file("d2f", DEF, b"now a file");
    t.file("f2d", DEF, b"was a file");
    t.dir("f2d", M { mode: 0o711, ..DIR });
    t.dir("dd", M { mode: 0o700, ..DIR });
    t.file("dd/c", DEF, b"kept");
    t.dir(
        "dd",
        M {
            mode: 0o750,
            uid: 7,
            ..DIR
        },
    );
    t.file("orig", DEF, b"old content");
    t.hardlink("hl", "orig");
    t.file("orig", DEF, b"new content");
    t.symlink("s", "first");
    t.symlink("s", "second");
    let tmp = tempfile::tempdir().unwrap();
    let tar = tmp.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = tmp.path().join("l.blob");
    convert(&tar, &blob);
    let img = tmp.path().join("l.img");
    export_and_fsck(&blob, &img);
    let m = Mount::loop_ro(&img, &tmp.path().join("mnt"));
    let p = |s: &str| m.dir.join(s);
    assert_eq!(std::fs::read(p("dup")).unwrap(), b"second");
    assert_eq!(std::fs::read(p("d2f")).unwrap(), b"now a file");
    assert!(std::fs::metadata(p("f2d")).unwrap().is_dir());
    assert_eq!(std::fs::metadata(p("f2d")).unwrap().mode() & 0o7777, 0o711);
    let dd = std::fs::metadata(p("dd")).unwrap();
    assert_eq!((dd.mode() & 0o7777, dd.uid()), (0o750, 7));
    assert_eq!(std::fs::read(p("dd/c")).unwrap(), b"kept");
    assert_eq!(std::fs::read(p("hl")).unwrap(), b"old content");
    assert_eq!(std::fs::read(p("orig")).unwrap(), b"new content");
    assert_eq!(std::fs::metadata(p("hl")).unwrap().nlink(), 1);
    assert_eq!(std::fs::read_link(p("s")).unwrap(), Path::new("second"));
    let names = listing(&m.dir);
    assert_eq!(
        names,
        ["d2f", "dd", "dd/c", "dup", "f2d", "hl", "orig", "s"]
    );
}

#[test]
fn conversion_is_deterministic() {
    let mut t = LayerTar::new();
    t.dir("etc", DIR);
    for i in 0..200 {
        t.file(
            &format!("etc/f{i}"),
            DEF,
            format!("file {i}\n").repeat(i * 10).as_bytes(),
        );
    }
    t.pax(&[("SCHILY.xattr.user.k", b"v")]);
    t.file("x", DEF, &[9u8; 300_000]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&t.finish()).unwrap();
    let gz = gz.finish().unwrap();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    std::fs::write(a.path().join("in.tgz"), &gz).unwrap();
    run_ok(
        lazyblk()
            .env("TZ", "UTC")
            .args(["layer", "convert", "--threads", "1", "in.tgz", "-o", "out"])
            .current_dir(a.path()),
    );
    // Second run: other directory, other time zone, other thread count, input from stdin.
    let mut child = lazyblk()
        .env("TZ", "Asia/Tokyo")
        .args(["layer", "convert", "--threads", "3", "-", "-o"])
        .arg(b.path().join("out"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&gz).unwrap();
    assert!(child.wait().unwrap().success());
    let x = std::fs::read(a.path().join("out")).unwrap();
    let y = std::fs::read(b.path().join("out")).unwrap();
    assert!(x == y, "two conversions of the same layer differ");
}

/// Zeros except for markers at the start, across the 4 GiB boundary and at the end.
struct BigFile {
    pos: u64,
    size: u64,
}

const MARKS: [u64; 3] = [0, (1 << 32) - 8, (1 << 32) + 12345 - 16];

impl Read for BigFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.size - self.pos) as usize;
        buf[..n].fill(0);
        for m in MARKS {
            for k in 0..16u64 {
                let at = m + k;
                if at >= self.pos && at < self.pos + n as u64 {
                    buf[(at - self.pos) as usize] = 0xA0 + k as u8;
                }
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[test]
fn files_over_4gib_stream_through() {
    if !privileged() {
        return;
    }
    let size = (1u64 << 32) + 12345;
    let tmp = tempfile::tempdir().unwrap();
    let blob = tmp.path().join("big.blob");
    let mut child = lazyblk()
        .args(["layer", "convert", "--json", "-", "-o"])
        .arg(&blob)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut b = tar::Builder::new(stdin);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_mtime(1);
        b.append_data(&mut h, "big", BigFile { pos: 0, size })
            .unwrap();
        b.finish().unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        summary["blob"]["size"].as_u64().unwrap() < 10 << 20,
        "zeros must not be stored: {summary}"
    );
    let img = tmp.path().join("big.img");
    export_and_fsck(&blob, &img);
    let m = Mount::loop_ro(&img, &tmp.path().join("mnt"));
    let f = std::fs::File::open(m.dir.join("big")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    for at in MARKS {
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, at).unwrap();
        let want: Vec<u8> = (0..16).map(|k| 0xA0 + k as u8).collect();
        assert_eq!(b.to_vec(), want, "marker at {at}");
        let mut before = [1u8; 1];
        if at > 0 {
            f.read_exact_at(&mut before, at - 1).unwrap();
            assert_eq!(before[0], 0);
        }
    }
    let _ = Command::new("true").status();
}

#[test]
fn dot_whiteouts_are_refused_and_overlay_xattrs_dropped() {
    // `.wh..` / `.wh...` would whiteout `.` or `..`: entries no directory may hold.
    for name in [&b"d/.wh.."[..], b"d/.wh...", b".wh.."] {
        let mut t = LayerTar::new();
        t.dir("d", DIR);
        t.raw(name, EntryType::Regular, b"", b"");
        assert_fails(&t.finish(), &["whiteout of"]);
    }
    // overlayfs attributes in PAX headers never reach the image; other trusted.* ones do.
    let mut t = LayerTar::new();
    t.pax(&[
        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        ("SCHILY.xattr.trusted.kept", b"1"),
    ]);
    t.dir("o", DIR);
    t.pax(&[("SCHILY.xattr.user.overlay.metacopy", b"")]);
    t.file("o/f", DEF, b"data");
    let (ok, stderr, work) = convert_in_scratch(&t.finish());
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("dropped an overlayfs attribute"),
        "{stderr}"
    );
    if privileged() {
        let img = work.path().join("img");
        export_and_fsck(&work.path().join("run/deeper/still/out.blob"), &img);
        let m = Mount::loop_ro(&img, &work.path().join("mnt"));
        let attrs = |p: &str| {
            String::from_utf8(
                run_ok(
                    Command::new("getfattr")
                        .args(["-d", "-m", "-", "--absolute-names"])
                        .arg(m.dir.join(p)),
                )
                .stdout,
            )
            .unwrap()
        };
        let o = attrs("o");
        assert!(o.contains("trusted.kept"), "{o}");
        assert!(!o.contains("overlay"), "{o}");
        assert!(!attrs("o/f").contains("overlay"));
    }
}

#[test]
fn data_after_the_end_of_the_archive_is_bounded() {
    let mut t = LayerTar::new();
    t.file("f", DEF, b"x");
    let tar = t.finish();
    // Padding after the end-of-archive marker is accepted...
    let mut padded = tar.clone();
    padded.extend_from_slice(&[0u8; 10240]);
    let (ok, stderr, _w) = convert_in_scratch(&padded);
    assert!(ok, "{stderr}");
    // ...but not an endless stream of it (a few KiB of gzip inflating to 17 MiB here).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).unwrap();
    gz.write_all(&vec![0u8; 17 << 20]).unwrap();
    assert_fails(&gz.finish().unwrap(), &["end-of-archive"]);
}

#[test]
fn entry_count_is_bounded() {
    let mut t = LayerTar::new();
    for i in 0..11 {
        t.file(&format!("f{i}"), DEF, b"");
    }
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let out = lazyblk()
        .args(["layer", "convert", "--max-entries", "10"])
        .arg(&tar)
        .arg("-o")
        .arg(work.path().join("b"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("more than 10 entries"), "{err}");
    run_ok(
        lazyblk()
            .args(["layer", "convert", "--max-entries", "11"])
            .arg(&tar)
            .arg("-o")
            .arg(work.path().join("b")),
    );
}

/// POSIX ACLs from both tar forms (the `SCHILY.xattr.system.posix_acl_*` binary value, GNU tar's
/// `SCHILY.acl.*` text) become ext4 ACLs the kernel reads back and enforces; an invalid one is
/// dropped with a warning instead of stored for the kernel to refuse.
#[test]
fn posix_acls_are_stored_as_ext4_acls() {
    // user::rw-, user:1000:r--, group::r--, mask::r--, other::--- in the Linux xattr form.
    let entry = |tag: u16, perm: u16, id: u32| {
        let mut v = tag.to_le_bytes().to_vec();
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
        v
    };
    let mut access = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01, 6, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        access.extend(entry(tag, perm, id));
    }
    let mut t = LayerTar::new();
    t.dir("acl", DIR);
    t.pax(&[("SCHILY.xattr.system.posix_acl_access", &access)]);
    t.file(
        "acl/f",
        M { mode: 0o640, ..DEF },
        b"only uid 1000 may read this\n",
    );
    t.pax(&[
        ("SCHILY.acl.access", b"user::rwx,group::r-x,other::r-x"),
        (
            "SCHILY.acl.default",
            b"user::rwx,user:2000:rwx,group::r-x,mask::rwx,other::---",
        ),
    ]);
    t.dir("acl/d", DIR);
    t.pax(&[(
        "SCHILY.xattr.system.posix_acl_access",
        b"\x02\0\0\0garbage!",
    )]);
    t.file("acl/bad", DEF, b"x");
    let (ok, stderr, work) = convert_in_scratch(&t.finish());
    assert!(ok, "{stderr}");
    assert!(stderr.contains("invalid POSIX ACL"), "{stderr}");
    if !privileged() {
        return;
    }
    let img = work.path().join("img");
    export_and_fsck(&work.path().join("run/deeper/still/out.blob"), &img);
    let m = Mount::loop_ro(&img, &work.path().join("mnt"));
    let value = |p: &str, name: &str| {
        let out = Command::new("getfattr")
            .args(["--only-values", "--absolute-names", "-n", name])
            .arg(m.dir.join(p))
            .output()
            .unwrap();
        out.status.success().then_some(out.stdout)
    };
    assert_eq!(value("acl/f", "system.posix_acl_access"), Some(access));
    let default = value("acl/d", "system.posix_acl_default").expect("default ACL");
    assert_eq!(default.len(), 4 + 5 * 8);
    assert_eq!(&default[16..20], &2000u32.to_le_bytes(), "user:2000 kept");
    assert!(value("acl/bad", "system.posix_acl_access").is_none());
    // The kernel enforces the ACL: uid 1000 reads the 0640 root file, uid 1001 does not.
    let read_as = |uid: &str| {
        Command::new("setpriv")
            .args(["--reuid", uid, "--regid", uid, "--clear-groups", "cat"])
            .arg(m.dir.join("acl/f"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(read_as("1000"), "user:1000:r-- not honoured");
    assert!(!read_as("1001"), "others must not read");
}

/// GNU sparse files, as GNU tar writes them in each format (old GNU `S` with extension headers, PAX
/// 0.0, 0.1 and 1.0): the converted file has the real size and content, and its holes stay holes.
/// Maps that lie (beyond the file, not matching the stored data) are refused.
#[test]
fn gnu_sparse_files_in_every_format() {
    let tools = Command::new("tar").arg("--version").output();
    if tools.is_err() {
        assert!(may_skip(), "GNU tar missing in CI");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // 30 data segments in 96 MiB: more than the old GNU header's 4, so extension headers follow.
    let f = std::fs::File::create(src.join("sparse.bin")).unwrap();
    f.set_len(96 << 20).unwrap();
    for i in 0..30u64 {
        let data = noise(5000 + i as usize * 100, i as u32 + 1);
        f.write_all_at(&data, i * (3 << 20) + 12345).unwrap();
    }
    drop(f);
    let want = sha256_file(&src.join("sparse.bin"));
    for (name, args) in [
        ("gnu", &["--format=gnu"][..]),
        ("pax0.0", &["--format=posix", "--sparse-version=0.0"]),
        ("pax0.1", &["--format=posix", "--sparse-version=0.1"]),
        ("pax1.0", &["--format=posix", "--sparse-version=1.0"]),
    ] {
        let tar = dir.path().join(format!("{name}.tar"));
        run_ok(
            Command::new("tar")
                .arg("--sparse")
                .args(args)
                .arg("-cf")
                .arg(&tar)
                .arg("-C")
                .arg(&src)
                .arg("sparse.bin"),
        );
        assert!(
            std::fs::metadata(&tar).unwrap().len() < 4 << 20,
            "{name}: GNU tar did not store it sparse"
        );
        let (ok, stderr, work) = convert_in_scratch(&std::fs::read(&tar).unwrap());
        assert!(ok, "{name}: {stderr}");
        if !privileged() {
            continue;
        }
        let img = work.path().join("img");
        export_and_fsck(&work.path().join("run/deeper/still/out.blob"), &img);
        let m = Mount::loop_ro(&img, &work.path().join("mnt"));
        let p = m.dir.join("sparse.bin");
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 96 << 20, "{name}");
        assert_eq!(sha256_file(&p), want, "{name}");
        assert!(md.blocks() * 512 < 4 << 20, "{name}: holes were filled");
    }
    // Lying maps.
    for (records, data, why) in [
        (
            vec![
                ("GNU.sparse.size", &b"100"[..]),
                ("GNU.sparse.map", b"90,20"),
            ],
            &b"x"[..],
            "beyond the file",
        ),
        (
            vec![("GNU.sparse.size", &b"100"[..]), ("GNU.sparse.map", b"0,5")],
            &b"xyz"[..],
            "covers 5 bytes",
        ),
        (
            vec![
                ("GNU.sparse.size", &b"100"[..]),
                ("GNU.sparse.map", b"50,2,10,1"),
            ],
            &b"xyz"[..],
            "out of order",
        ),
    ] {
        let mut t = LayerTar::new();
        t.pax(&records);
        t.file("s", DEF, data);
        let (ok, stderr, _w) = convert_in_scratch(&t.finish());
        assert!(!ok && stderr.contains(why), "{why}: {stderr}");
    }
}

/// Large directories are hashed (htree, one and two index levels): e2fsck checks the index, and the
/// kernel finds every name through it.
#[test]
fn large_directories_are_hashed() {
    let mut t = LayerTar::new();
    t.dir("wide", DIR);
    for i in 0..30_000 {
        t.file(&format!("wide/file-{i:06}.txt"), DEF, b"");
    }
    // 200-byte names: 19 per block, over 508 leaves, so a level of index nodes.
    t.dir("deep", DIR);
    let long = |i: usize| format!("{i:06}-{}", "n".repeat(193));
    for i in 0..12_000 {
        t.file(&format!("deep/{}", long(i)), DEF, b"");
    }
    t.dir("small", DIR);
    t.file("small/one", DEF, b"1");
    let (ok, stderr, work) = convert_in_scratch(&t.finish());
    assert!(ok, "{stderr}");
    if !privileged() {
        return;
    }
    let img = work.path().join("img");
    export_and_fsck(&work.path().join("run/deeper/still/out.blob"), &img);
    let dump = |dir: &str| {
        String::from_utf8(
            run_ok(
                Command::new("debugfs")
                    .args(["-R", &format!("htree_dump /{dir}")])
                    .arg(&img),
            )
            .stdout,
        )
        .unwrap()
    };
    assert!(dump("wide").contains("Indirect levels: 0"));
    assert!(dump("deep").contains("Indirect levels: 1"));
    assert!(
        !dump("small").contains("Root node dump"),
        "one block stays linear"
    );
    let m = Mount::loop_ro(&img, &work.path().join("mnt"));
    assert_eq!(
        std::fs::read_dir(m.dir.join("wide")).unwrap().count(),
        30_000
    );
    assert_eq!(
        std::fs::read_dir(m.dir.join("deep")).unwrap().count(),
        12_000
    );
    for i in (0..30_000).step_by(997) {
        assert!(m.dir.join(format!("wide/file-{i:06}.txt")).exists(), "{i}");
    }
    for i in (0..12_000).step_by(331) {
        assert!(m.dir.join("deep").join(long(i)).exists(), "{i}");
    }
    assert!(!m.dir.join("wide/file-030000.txt").exists());
}
