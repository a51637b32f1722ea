//! `lazyblk convert` against a real registry with real images: a debootstrap'd Debian rootfs plus a
//! layer with deletions and a replaced directory, built with umoci, pushed with skopeo, a two-platform
//! index; registry→registry, layout→registry, registry→layout, referrers, idempotence, errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::Registry;
use common::*;

fn tools_ok() -> bool {
    for t in ["skopeo", "umoci"] {
        if Command::new(t).arg("--version").output().is_err() {
            assert!(may_skip(), "{t} missing in CI");
            eprintln!("SKIPPED: {t} not installed");
            return false;
        }
    }
    true
}

fn rootfs_tar() -> Option<PathBuf> {
    match std::env::var_os("LAZYBLK_ROOTFS_TAR") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(may_skip(), "CI must set LAZYBLK_ROOTFS_TAR");
            eprintln!("SKIPPED: LAZYBLK_ROOTFS_TAR not set");
            None
        }
    }
}

fn json(out: std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn skopeo_raw(image: &str) -> serde_json::Value {
    json(run_ok(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{image}")),
    ))
}

fn convert(args: &[&str]) -> serde_json::Value {
    json(run_ok(
        lazyblk()
            .arg("convert")
            .args(args)
            .args(["--plain-http", "--json"]),
    ))
}

/// Downloads a blob of `repo` with lazyblk's registry client.
fn fetch_blob(reg: &Registry, repo: &str, digest: &str, size: u64, to: &Path) {
    let store = lazyblk::image::store::RegistryStore::new(
        &reg.addr,
        repo,
        &lazyblk::fetch::registry::RegistryOptions {
            plain_http: true,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    let d = lazyblk::image::oci::Descriptor::new("application/octet-stream", digest, size);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    use lazyblk::image::store::ImageStore;
    rt.block_on(store.blob_to_file(&d, to)).unwrap();
}

/// The preconditions, a registry, and `tools/make-test-image.sh`'s layout (in a temp dir) pushed as
/// `test/img:TAG` for each `(TAG, all platforms)`; None means skip.
fn test_images(tags: &[(&str, bool)]) -> Option<(Registry, tempfile::TempDir, PathBuf)> {
    if !tools_ok() {
        return None;
    }
    let rootfs = rootfs_tar()?;
    if !privileged() {
        return None;
    }
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/make-test-image.sh");
    run_ok(Command::new(script).arg(&rootfs).arg(&layout));
    for &(tag, all) in tags {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if all {
            c.arg("--all");
        }
        run_ok(
            c.arg(format!("oci:{}:{tag}", layout.display()))
                .arg(format!("docker://{}/test/img:{tag}", reg.addr)),
        );
    }
    Some((reg, tmp, layout))
}

#[test]
fn converts_real_images_between_registries_and_layouts() {
    let Some((reg, tmp, layout)) = test_images(&[("v2", false), ("multi", true)]) else {
        return;
    };
    let r = &reg.addr;

    // registry → registry, new tag.
    let s = convert(&[
        &format!("{r}/test/img:v2"),
        &format!("{r}/test/img:v2-lazyblk"),
    ]);
    assert_eq!(s["mode"], "tag");
    let target = skopeo_raw(&format!("{r}/test/img:v2-lazyblk"));
    assert_eq!(
        target["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let layers = target["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let src = skopeo_raw(&format!("{r}/test/img:v2"));
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.lazyblk+ext4"
        );
        let a = &l["annotations"];
        let p = "containerd.io/snapshot/lazyblk/";
        assert_eq!(a[format!("{p}source-digest")], src["layers"][i]["digest"]);
        for k in [
            "index-offset",
            "index-length",
            "index-digest",
            "image-size",
            "chunk-size",
            "diff-id",
            "version",
        ] {
            assert!(a[format!("{p}{k}")].is_string(), "annotation {k} missing");
        }
    }
    // The config is the source's with each diff ID replaced by the layer's disk digest (docs/format.md,
    // "Diff IDs and chain IDs"); the original diff IDs stay in the `diff-id` annotations.
    let config_of = |m: &serde_json::Value, at: &str| -> serde_json::Value {
        let p = tmp.path().join(format!("config-{at}.json"));
        fetch_blob(
            &reg,
            "test/img",
            m["config"]["digest"].as_str().unwrap(),
            m["config"]["size"].as_u64().unwrap(),
            &p,
        );
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    };
    let (src_cfg, lazy_cfg) = (config_of(&src, "src"), config_of(&target, "lazy"));
    let mut same = lazy_cfg.clone();
    same["rootfs"]["diff_ids"] = src_cfg["rootfs"]["diff_ids"].clone();
    assert_eq!(same, src_cfg, "only the diff IDs change");
    for (i, l) in layers.iter().enumerate() {
        let a = &l["annotations"];
        let p = "containerd.io/snapshot/lazyblk/";
        assert_eq!(a[format!("{p}diff-id")], src_cfg["rootfs"]["diff_ids"][i]);
    }

    // Each converted layer, fetched back from the registry: verified export (index checked against the
    // manifest's annotation), e2fsck, mount, compare with GNU tar's extraction of the source layer.
    for (i, l) in layers.iter().enumerate() {
        let blob = tmp.path().join(format!("l{i}.blob"));
        fetch_blob(
            &reg,
            "test/img",
            l["digest"].as_str().unwrap(),
            l["size"].as_u64().unwrap(),
            &blob,
        );
        // The disk digest, computed here from the spec: the index bytes with each entry's offset
        // (its first 8 bytes; 48-byte entries after a 64-byte header) zeroed, hashed.
        let num = |k: &str| {
            l["annotations"][format!("containerd.io/snapshot/lazyblk/{k}")]
                .as_str()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        };
        let bytes = std::fs::read(&blob).unwrap();
        let mut index = bytes[num("index-offset")..][..num("index-length")].to_vec();
        for e in index[64..].chunks_mut(48) {
            e[..8].fill(0);
        }
        let disk = format!("sha256:{}", hex::encode(lazyblk::format::sha256(&index)));
        assert_eq!(
            lazy_cfg["rootfs"]["diff_ids"][i],
            disk.as_str(),
            "layer {i}"
        );
        let img = tmp.path().join(format!("l{i}.img"));
        let idx_digest = l["annotations"]["containerd.io/snapshot/lazyblk/index-digest"]
            .as_str()
            .unwrap();
        run_ok(
            lazyblk()
                .args(["layer", "export", "--index-digest", idx_digest])
                .arg(&blob)
                .arg("-o")
                .arg(&img),
        );
        e2fsck(&img);
        let src_layer = tmp.path().join(format!("src{i}.tgz"));
        let sl = &src["layers"][i];
        fetch_blob(
            &reg,
            "test/img",
            sl["digest"].as_str().unwrap(),
            sl["size"].as_u64().unwrap(),
            &src_layer,
        );
        let reference = tmp.path().join(format!("ref{i}"));
        gnu_tar_extract(&src_layer, &reference);
        let m = Mount::loop_ro(&img, &tmp.path().join(format!("m{i}")));
        let got = snapshot(&m.dir);
        let mut expected = oci_semantics(snapshot(&reference));
        set_implicit_dirs(&src_layer, &mut expected);
        assert_same_tree(&expected, &got);
        if i == 0 {
            assert!(got.entries.len() > 1000, "the Debian rootfs layer");
        } else {
            let wo = &got.entries["usr/share/doc"];
            assert_eq!(
                (wo.kind, wo.rdev),
                ('c', Some((0, 0))),
                "deleted directory is a whiteout"
            );
            assert_eq!(
                std::fs::read(m.dir.join("etc/apt/NEW")).unwrap(),
                b"replaced by layer 2\n"
            );
        }
    }

    // Idempotence: converting again uploads nothing and gives the same digests.
    let again = convert(&[
        &format!("{r}/test/img:v2"),
        &format!("{r}/test/img:v2-lazyblk"),
    ]);
    assert_eq!(again["uploaded_bytes"], 0);
    assert_eq!(again["target_digest"], s["target_digest"]);

    // layout → registry and registry → layout give the same manifest (conversion is deterministic).
    let from_layout = convert(&[
        &format!("oci:{}:v2", layout.display()),
        &format!("{r}/other/img:v2"),
    ]);
    assert_eq!(from_layout["target_digest"], s["target_digest"]);
    let out_layout = tmp.path().join("out");
    let to_layout = convert(&[
        &format!("{r}/test/img:v2"),
        &format!("oci:{}:conv", out_layout.display()),
    ]);
    assert_eq!(to_layout["target_digest"], s["target_digest"]);
    // A runtime that does not know lazyblk refuses the image (never a wrong rootfs).
    let umoci = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:conv", out_layout.display()))
        .arg(tmp.path().join("bundle"))
        .output()
        .unwrap();
    assert!(!umoci.status.success());
    assert!(String::from_utf8_lossy(&umoci.stderr)
        .contains("application/vnd.oci.image.layer.v1.lazyblk+ext4"));

    // Multi-platform index, new tag: both platforms kept.
    let multi = convert(&[
        &format!("{r}/test/img:multi"),
        &format!("{r}/test/img:multi-lazyblk"),
    ]);
    assert_eq!(multi["manifests"].as_array().unwrap().len(), 2);
    let ix = skopeo_raw(&format!("{r}/test/img:multi-lazyblk"));
    let plats: Vec<String> = ix["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(plats, ["amd64", "arm64"]);
    let only = convert(&[
        &format!("{r}/test/img:multi"),
        &format!("{r}/test/img:arm-only"),
        "--platform",
        "linux/arm64",
    ]);
    assert_eq!(only["manifests"].as_array().unwrap().len(), 1);

    // Referrer mode: the original index is untouched, the fallback tag lists one artifact per platform,
    // and the lookup finds them.
    let before = skopeo_raw(&format!("{r}/test/img:multi"));
    let refs = convert(&["--referrer", &format!("{r}/test/img:multi")]);
    assert_eq!(refs["mode"], "referrer");
    assert_eq!(
        skopeo_raw(&format!("{r}/test/img:multi")),
        before,
        "original image must not change"
    );
    for m in before["manifests"].as_array().unwrap() {
        let tag = m["digest"].as_str().unwrap().replacen(':', "-", 1);
        let fallback = skopeo_raw(&format!("{r}/test/img:{tag}"));
        let arts = fallback["manifests"].as_array().unwrap();
        assert_eq!(arts.len(), 1);
        assert_eq!(arts[0]["artifactType"], "application/vnd.lazyblk.image.v1");
        let art = skopeo_raw(&format!(
            "{r}/test/img@{}",
            arts[0]["digest"].as_str().unwrap()
        ));
        assert_eq!(art["subject"]["digest"], m["digest"]);
    }
    let found = json(run_ok(
        lazyblk()
            .args(["referrers", "--plain-http", "--json"])
            .arg(format!("{r}/test/img:multi")),
    ));
    assert_eq!(found.as_array().unwrap().len(), 2);
    // Referrer conversion is idempotent too: the fallback index still has one entry per platform.
    convert(&["--referrer", &format!("{r}/test/img:multi")]);
    let tag = before["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .replacen(':', "-", 1);
    assert_eq!(
        skopeo_raw(&format!("{r}/test/img:{tag}"))["manifests"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn conversion_errors_are_clear_and_push_nothing() {
    if !tools_ok() {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let r = &reg.addr;
    // A small image in a layout, built with umoci from a tiny rootfs.
    let layout = tmp.path().join("small");
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(
        Command::new("umoci")
            .args(["new", "--image"])
            .arg(format!("{}:t", layout.display())),
    );
    let bundle = tmp.path().join("b");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:t", layout.display()))
            .arg(&bundle),
    );
    std::fs::write(bundle.join("rootfs/hello"), b"hi").unwrap();
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image"])
            .arg(format!("{}:t", layout.display()))
            .arg(&bundle),
    );
    // Corrupt the layer blob: conversion fails naming the digest, and the target tag never appears.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&mdigest)).unwrap())
            .unwrap();
    let ldigest = manifest["layers"][0]["digest"].as_str().unwrap()[7..].to_string();
    let lpath = layout.join("blobs/sha256").join(&ldigest);
    let mut b = std::fs::read(&lpath).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    std::fs::write(&lpath, &b).unwrap();
    let out = lazyblk()
        .args(["convert", "--plain-http"])
        .arg(format!("oci:{}:t", layout.display()))
        .arg(format!("{r}/bad/img:t"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("digest mismatch") && err.contains(&ldigest),
        "{err}"
    );
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{r}/bad/img:t"))
        .output()
        .unwrap();
    assert!(
        !inspect.status.success(),
        "nothing may be tagged after a failed conversion"
    );
    // Unsupported layers (zstd:chunked, foreign) are refused by name.
    let mut index = index.clone();
    for (tag, patch, needle) in [
        (
            "chunked",
            serde_json::json!({"annotations": {"io.github.containers.zstd-chunked.manifest-checksum": "sha256:00"}}),
            "zstd:chunked",
        ),
        (
            "foreign",
            serde_json::json!({"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}),
            "foreign",
        ),
    ] {
        let mut m2 = manifest.clone();
        for (k, v) in patch.as_object().unwrap() {
            m2["layers"][0][k] = v.clone();
        }
        let m2b = serde_json::to_vec(&m2).unwrap();
        let m2d = hex::encode(lazyblk::format::sha256(&m2b));
        std::fs::write(layout.join("blobs/sha256").join(&m2d), &m2b).unwrap();
        index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{m2d}"), "size": m2b.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}}));
        std::fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        let out = lazyblk()
            .args(["convert", "--plain-http"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("{r}/bad/img:{tag}"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An unreachable registry.
    let out = lazyblk()
        .args([
            "convert",
            "--plain-http",
            "127.0.0.1:1/nothing/here:t",
            "127.0.0.1:1/x:y",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The cause, not only "error sending request".
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("Connection refused"),
        "{err}"
    );
}

/// Converts `test/img:v2` to `:v2-lazyblk` and writes a trace of `chunks` of its first layer to
/// `tmp/t.json`; returns the converted manifest and the trace file.
fn converted_with_a_trace_of_layer0(
    reg: &Registry,
    tmp: &tempfile::TempDir,
    chunks: &[u64],
) -> (serde_json::Value, PathBuf) {
    let r = &reg.addr;
    convert(&[
        &format!("{r}/test/img:v2"),
        &format!("{r}/test/img:v2-lazyblk"),
    ]);
    let converted = skopeo_raw(&format!("{r}/test/img:v2-lazyblk"));
    let index_digest =
        &converted["layers"][0]["annotations"]["containerd.io/snapshot/lazyblk/index-digest"];
    let trace = serde_json::json!({
        "schemaVersion": 1,
        "layers": [{"indexDigest": index_digest, "chunks": chunks}]
    });
    let tfile = tmp.path().join("t.json");
    std::fs::write(&tfile, trace.to_string()).unwrap();
    (converted, tfile)
}

/// `lazyblk trace relayout` of `test/img:v2-lazyblk` into `:v2-relaid` with the trace `tfile`; its
/// output.
fn relayout_v2(r: &str, tfile: &Path) -> String {
    let out = run_ok(
        lazyblk()
            .args(["trace", "relayout"])
            .arg(format!("{r}/test/img:v2-lazyblk"))
            .arg(format!("{r}/test/img:v2-relaid"))
            .arg("--trace")
            .arg(tfile)
            .arg("--plain-http"),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `lazyblk trace relayout` of a converted image: the traced chunks of the traced layer move right
/// before its index (the descriptor says where they start), the disk inside is byte-identical, the
/// other layer and the config are unchanged.
#[test]
fn relayout_puts_the_traced_chunks_next_to_the_index() {
    use lazyblk_image_format::{Footer, Index, IndexLimits, FOOTER_LEN};
    let Some((reg, tmp, _)) = test_images(&[("v2", false)]) else {
        return;
    };
    let r = &reg.addr;
    let (old, tfile) = converted_with_a_trace_of_layer0(&reg, &tmp, &[0, 5, 3, 40, 41, 7, 5]);
    let p = "containerd.io/snapshot/lazyblk/";
    let l0 = &old["layers"][0];
    let out = relayout_v2(r, &tfile);
    assert!(out.contains("copied"), "{out}");
    let new = skopeo_raw(&format!("{r}/test/img:v2-relaid"));
    assert_eq!(new["config"], old["config"]);
    assert_eq!(new["layers"][1], old["layers"][1]);
    let n0 = &new["layers"][0];
    assert_ne!(n0["digest"], l0["digest"]);
    for k in ["source-digest", "diff-id", "image-size", "chunk-size"] {
        assert_eq!(
            n0["annotations"][format!("{p}{k}")],
            l0["annotations"][format!("{p}{k}")]
        );
    }
    let num = |l: &serde_json::Value, k: &str| -> u64 {
        l["annotations"][format!("{p}{k}")]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (old_blob, new_blob) = (tmp.path().join("old.blob"), tmp.path().join("new.blob"));
    for (l, path) in [(l0, &old_blob), (n0, &new_blob)] {
        fetch_blob(
            &reg,
            "test/img",
            l["digest"].as_str().unwrap(),
            l["size"].as_u64().unwrap(),
            path,
        );
    }
    // The region [startup-offset, index-offset) holds exactly the traced stored chunks, in order.
    let blob = std::fs::read(&new_blob).unwrap();
    let f = Footer::parse(&blob[blob.len() - FOOTER_LEN..], Some(blob.len() as u64)).unwrap();
    assert_eq!(f.index_offset, num(n0, "index-offset"));
    assert_eq!(
        lazyblk_image_format::digest_string(&f.index_digest),
        n0["annotations"][format!("{p}index-digest")]
            .as_str()
            .unwrap()
    );
    let idx = Index::parse_verified(
        &blob[f.index_offset as usize..][..f.index_length as usize],
        &f.index_digest,
        IndexLimits::default(),
    )
    .unwrap();
    let mut at = num(n0, "startup-offset");
    for c in [0u64, 5, 3, 40, 41, 7] {
        let e = idx.entry(c);
        if e.blob_range().is_empty() {
            continue; // zero chunk: not stored anywhere
        }
        assert_eq!(e.offset, at, "chunk {c}");
        at += e.stored_len as u64;
    }
    assert_eq!(at, f.index_offset, "nothing else in the startup region");
    // Same disk.
    let export = |b: &Path| {
        let img = b.with_extension("img");
        run_ok(
            lazyblk()
                .args(["layer", "export"])
                .arg(b)
                .arg("-o")
                .arg(&img),
        );
        sha256_file(&img)
    };
    assert_eq!(export(&old_blob), export(&new_blob));
}

/// `lazyblk convert SRC DST --trace FILE` pushes the relaid image straight away: the same manifest,
/// byte for byte, as `convert` then `trace relayout` (conversion is deterministic), and the plain
/// conversion is never pushed. A trace of another conversion (other chunk size: other layers) is
/// refused before anything is pushed.
#[test]
fn convert_with_a_trace_pushes_the_relaid_image() {
    let Some((reg, tmp, _)) = test_images(&[("v2", false)]) else {
        return;
    };
    let r = &reg.addr;
    let (plain, tfile) = converted_with_a_trace_of_layer0(&reg, &tmp, &[9, 2, 40, 0]);
    relayout_v2(r, &tfile);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("mine"), b"kept").unwrap();
    let out = String::from_utf8(
        run_ok(
            lazyblk()
                .args(["convert", "--plain-http", "--trace"])
                .arg(&tfile)
                .arg("--work-dir")
                .arg(&work)
                .arg(format!("{r}/test/img:v2"))
                .arg(format!("{r}/test/other:v2-traced")),
        )
        .stdout,
    )
    .unwrap();
    assert!(out.contains(" startup chunks ("), "{out}");
    let relaid = skopeo_raw(&format!("{r}/test/img:v2-relaid"));
    let traced = skopeo_raw(&format!("{r}/test/other:v2-traced"));
    assert_eq!(traced, relaid);
    assert_ne!(traced["layers"][0], plain["layers"][0]);
    assert_eq!(traced["layers"][1], plain["layers"][1]);
    // Only the relaid layer went to the new repository: the plain conversion's was never pushed.
    let head = |digest: &str| {
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I"])
            .arg(format!("http://{r}/v2/test/other/blobs/{digest}"))
            .output()
            .unwrap()
            .stdout
    };
    assert_eq!(
        head(traced["layers"][0]["digest"].as_str().unwrap()),
        b"200"
    );
    assert_eq!(head(plain["layers"][0]["digest"].as_str().unwrap()), b"404");
    // A work directory the user gave is not removed (only what the job made in it).
    assert_eq!(std::fs::read(work.join("mine")).unwrap(), b"kept");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);
    // The same trace against another conversion (64 KiB chunks: other layers): refused, nothing pushed.
    let out = lazyblk()
        .args(["convert", "--plain-http", "--chunk-size", "64K", "--trace"])
        .arg(&tfile)
        .arg(format!("{r}/test/img:v2"))
        .arg(format!("{r}/test/other:v2-wrong"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the trace names none of"), "{err}");
    let tag = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{r}/test/other:v2-wrong"))
        .output()
        .unwrap();
    assert!(!tag.status.success(), "a refused conversion pushed a tag");
}

/// `lazyblk index` of a two-platform image index: one referrer artifact per platform manifest, each
/// with a metadata blob and a span blob per original layer, the image itself untouched, found again by
/// the referrers lookup; `--platform` indexes one manifest only.
#[test]
fn indexes_every_platform_of_an_image_index() {
    let Some((reg, _tmp, _layout)) = test_images(&[("multi", true)]) else {
        return;
    };
    let r = reg.addr.clone();
    let multi = format!("{r}/test/img:multi");
    let before = skopeo_raw(&multi);
    // One platform first: only its manifest gets an artifact.
    let arm = json(run_ok(lazyblk().args([
        "index",
        &multi,
        "--platform",
        "linux/arm64",
        "--plain-http",
        "--json",
    ])));
    assert_eq!(arm["mode"], "index", "{arm}");
    assert_eq!(arm["manifests"].as_array().unwrap().len(), 1, "{arm}");
    assert_eq!(arm["manifests"][0]["platform"], "linux/arm64", "{arm}");

    let s = json(run_ok(lazyblk().args([
        "index",
        &multi,
        "--plain-http",
        "--json",
    ])));
    assert_eq!(s["mode"], "index", "{s}");
    assert_eq!(s["manifests"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(skopeo_raw(&multi), before, "indexing changed the image");
    let (src, idx) = (
        s["source_bytes"].as_u64().unwrap(),
        s["target_bytes"].as_u64().unwrap(),
    );
    assert!(idx * 20 < src, "index {idx} bytes for {src} of layers");
    for m in before["manifests"].as_array().unwrap() {
        let digest = m["digest"].as_str().unwrap();
        let platform = skopeo_raw(&format!("{r}/test/img@{digest}"));
        let tag = digest.replacen(':', "-", 1);
        let fallback = skopeo_raw(&format!("{r}/test/img:{tag}"));
        let arts = fallback["manifests"].as_array().unwrap();
        assert_eq!(arts.len(), 1, "one artifact per platform: {fallback}");
        let art = skopeo_raw(&format!(
            "{r}/test/img@{}",
            arts[0]["digest"].as_str().unwrap()
        ));
        assert_eq!(art["subject"]["digest"], digest);
        assert_eq!(art["artifactType"], "application/vnd.lazyblk.image.v1");
        let layers = art["layers"].as_array().unwrap();
        let originals = platform["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2 * originals.len(), "{art}");
        for (pair, orig) in layers.chunks(2).zip(originals) {
            let (meta, spans) = (&pair[0], &pair[1]);
            assert_eq!(
                meta["mediaType"],
                "application/vnd.oci.image.layer.v1.lazyblk+ext4"
            );
            assert_eq!(spans["mediaType"], "application/vnd.lazyblk.spans.v1");
            let ann = &meta["annotations"];
            assert_eq!(
                ann["containerd.io/snapshot/lazyblk/spans-digest"],
                spans["digest"]
            );
            assert_eq!(
                ann["containerd.io/snapshot/lazyblk/source-digest"],
                orig["digest"]
            );
            assert_eq!(
                ann["containerd.io/snapshot/lazyblk/source-size"],
                orig["size"].as_u64().unwrap().to_string()
            );
        }
    }
    let found = json(run_ok(
        lazyblk()
            .args(["referrers", "--plain-http", "--json"])
            .arg(&multi),
    ));
    assert_eq!(found.as_array().unwrap().len(), 2, "{found}");
}

/// `lazyblk index` of an image whose registry serves a layer with one byte changed where nothing but
/// its digest can tell (the gzip header's MTIME: same size, same tar, same diff_id): it fails naming
/// the layer's digest and pushes no index. The indexer does not hash the blob itself; the download's
/// digest check is what refuses it.
#[test]
fn indexing_refuses_a_layer_the_registry_serves_changed() {
    let Some((reg, _tmp, _layout)) = test_images(&[("v2", false)]) else {
        return;
    };
    let image = format!("{}/test/img:v2", reg.addr);
    let manifest = skopeo_raw(&image);
    let layer = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap();
    let digest = layer["digest"].as_str().unwrap().to_string();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let data = reg
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    assert_eq!(bytes[..3], [0x1f, 0x8b, 8], "the layer is not gzip");
    bytes[4] ^= 0x40; // MTIME
    std::fs::write(&data, &bytes).unwrap();

    let out = lazyblk()
        .args(["index", &image, "--plain-http", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "indexed a changed layer: {err}");
    assert!(
        err.contains(&digest),
        "the error does not name the layer: {err}"
    );
    assert!(
        err.contains("digest"),
        "the error does not say what was wrong: {err}"
    );
    let manifest_digest = {
        let out = run_ok(
            Command::new("skopeo")
                .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
                .arg(format!("docker://{image}")),
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let fallback = format!(
        "docker://{}/test/img:{}",
        reg.addr,
        manifest_digest.replacen(':', "-", 1)
    );
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&fallback)
        .output()
        .unwrap();
    assert!(
        !inspect.status.success(),
        "an index was pushed for the changed layer"
    );
}
