//! Original-image indexes (src/original/): a layer indexed in place (gzip — one or several members,
//! zlib's and GNU gzip's encoders —, zstd with one or many frames, a plain tar) serves exactly the
//! disk the converter builds from the same layer, reading file data from the original blob; wrong
//! bytes from the "registry" are refetched and never served; an index does not serve another layer.
//! A fault-injecting reader stands in for the registry where a real one cannot misbehave.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::layer::{LayerTar, DEF, DIR};
use common::*;
use lazyblk::fetch::engine::IndexLocation;
use lazyblk::fetch::remote::{FetchError, FileRange, RangeReader};
use lazyblk::fetch::{BoxFuture, Engine, EngineOptions};
use lazyblk::original::{index_layer, IndexOptions, IndexedLayer, OriginalLayer, TableLocation};

/// A tar with what a real layer has: text, incompressible data, a file larger than a span, many
/// small files, holes, a sparse file, hard links and symlinks.
fn layer_tar() -> Vec<u8> {
    let mut t = LayerTar::new();
    t.dir("usr", DIR).dir("usr/lib", DIR).dir("etc", DIR);
    for i in 0..300 {
        t.file(
            &format!("etc/conf{i}"),
            DEF,
            format!("setting_{i} = {}\n", i * 7)
                .repeat(i % 40 + 1)
                .as_bytes(),
        );
    }
    for i in 0..4 {
        t.file(
            &format!("usr/lib/lib{i}.so"),
            DEF,
            &noise(700_000 + i * 4099, i as u32 + 3),
        );
    }
    let mut big = Vec::new();
    for i in 0..200_000 {
        big.extend_from_slice(format!("line {i} of a large text file\n").as_bytes());
    }
    t.file("usr/lib/big.txt", DEF, &big);
    let mut holes = vec![0u8; 3 << 20];
    holes[1 << 20..(1 << 20) + 5000].copy_from_slice(&noise(5000, 99));
    t.file("usr/lib/holes.bin", DEF, &holes);
    t.pax(&[
        ("GNU.sparse.major", b"1"),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", b"usr/lib/sparse.db"),
        ("GNU.sparse.realsize", b"9000000"),
    ]);
    let mut sparse = b"2\n4096\n8192\n5000000\n4096\n".to_vec();
    sparse.resize(512, 0);
    sparse.extend_from_slice(&noise(8192, 5));
    sparse.extend_from_slice(&noise(4096, 6));
    t.file("usr/lib/GNUSparseFile.0/sparse.db", DEF, &sparse);
    t.hardlink("usr/lib/link.so", "usr/lib/lib1.so");
    t.symlink("usr/lib/sym.so", "lib2.so");
    t.finish()
}

fn gzip(tar: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(tar).unwrap();
    e.finish().unwrap()
}

struct Indexed {
    _dir: tempfile::TempDir,
    original: PathBuf,
    meta: PathBuf,
    spans: PathBuf,
    info: IndexedLayer,
}

fn index(layer: &[u8], span_size: u64) -> Indexed {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("layer");
    std::fs::write(&original, layer).unwrap();
    let (meta, spans) = (dir.path().join("meta"), dir.path().join("spans"));
    let info = index_layer(
        std::fs::File::open(&original).unwrap(),
        &meta,
        &spans,
        &IndexOptions {
            span_size,
            ..IndexOptions::default()
        },
    )
    .unwrap();
    Indexed {
        _dir: dir,
        original,
        meta,
        spans,
        info,
    }
}

/// The disk the converter builds from `layer`.
fn converted_disk(layer: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (input, blob, raw) = (
        dir.path().join("in"),
        dir.path().join("b"),
        dir.path().join("raw"),
    );
    std::fs::write(&input, layer).unwrap();
    convert(&input, &blob);
    export(&blob, &raw);
    std::fs::read(&raw).unwrap()
}

fn location(ix: &Indexed) -> TableLocation {
    TableLocation {
        offset: ix.info.spans.table_offset,
        length: ix.info.spans.table_length,
        digest: lazyblk::format::parse_digest(&ix.info.spans.table_digest).unwrap(),
    }
}

async fn engine(ix: &Indexed, original: Arc<dyn RangeReader>) -> Engine {
    let ext = OriginalLayer::new(
        original,
        Arc::new(FileRange::open(&ix.spans).unwrap()),
        location(ix),
    );
    engine_with(ix, Arc::new(ext)).await
}

async fn engine_with(ix: &Indexed, ext: Arc<OriginalLayer>) -> Engine {
    let opts = EngineOptions {
        read_deadline: Duration::from_secs(5),
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(50),
        external: Some(ext),
        ..EngineOptions::default()
    };
    let digest = lazyblk::format::parse_digest(&ix.info.blob.index_digest).unwrap();
    Engine::open(
        Arc::new(FileRange::open(&ix.meta).unwrap()),
        IndexLocation::Known {
            offset: ix.info.blob.index_offset,
            length: ix.info.blob.index_length,
            digest,
            startup_offset: None,
        },
        opts,
    )
    .await
    .unwrap()
}

async fn read_all(e: &Engine) -> Result<Vec<u8>, lazyblk::fetch::ReadError> {
    use lazyblk::fetch::BlockSource;
    let size = e.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20) as usize;
        out.extend_from_slice(&e.read_at(off, n).await?);
        off += n as u64;
    }
    Ok(out)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Indexes `layer`, serves it from the original bytes and compares with the converter's disk.
fn serves_the_converted_disk(layer: &[u8], span_size: u64) -> Indexed {
    let ix = index(layer, span_size);
    let want = converted_disk(layer);
    let got = rt().block_on(async {
        let e = engine(&ix, Arc::new(FileRange::open(&ix.original).unwrap())).await;
        read_all(&e).await.unwrap()
    });
    assert_eq!(got.len(), want.len(), "disk sizes");
    assert!(
        got == want,
        "the index serves other bytes than the converter writes"
    );
    // Nothing of the file data is in the metadata blob.
    assert!(
        ix.info.blob.stored_bytes < 1 << 20,
        "metadata blob stores {} bytes",
        ix.info.blob.stored_bytes
    );
    ix
}

#[test]
fn gzip_layers_serve_the_converted_disk_from_the_original_bytes() {
    let tar = layer_tar();
    for level in [1, 6, 9] {
        let ix = serves_the_converted_disk(&gzip(&tar, level), 256 << 10);
        eprintln!(
            "gzip -{level}: layer {} bytes, {} spans, index {} + {} bytes ({:.2}%)",
            ix.info.input.bytes,
            ix.info.spans.spans,
            ix.info.blob.size,
            ix.info.spans.size,
            100.0 * (ix.info.blob.size + ix.info.spans.size) as f64 / ix.info.input.bytes as f64
        );
        // zlib-rs (like zlib-ng) writes level 1 as very few deflate blocks: checkpoints can only go
        // at block ends, so such a layer gets few spans (still served exactly).
        if level > 1 {
            assert!(ix.info.spans.spans > 3, "{} spans", ix.info.spans.spans);
        }
    }
}

#[test]
fn gnu_gzip_multi_member_zstd_and_plain_layers_are_served() {
    let tar = layer_tar();
    // GNU gzip's own encoder.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.tar");
    std::fs::write(&p, &tar).unwrap();
    run_ok(std::process::Command::new("gzip").arg("-k").arg(&p));
    let gnu = std::fs::read(dir.path().join("l.tar.gz")).unwrap();
    serves_the_converted_disk(&gnu, 256 << 10);
    // Two gzip members (pigz --independent, concatenated streams).
    let (a, b) = tar.split_at(tar.len() / 3);
    let mut two = gzip(a, 6);
    two.extend_from_slice(&gzip(b, 6));
    let ix = serves_the_converted_disk(&two, 256 << 10);
    assert_eq!(
        ix.info.input.diff_id,
        lazyblk::format::digest_string(&lazyblk::format::sha256(&tar))
    );
    // zstd, many frames (one per 512 KiB of tar): a span starts at a frame boundary.
    let mut frames = Vec::new();
    for part in tar.chunks(512 << 10) {
        frames.extend_from_slice(&zstd::bulk::compress(part, 3).unwrap());
    }
    let ix = serves_the_converted_disk(&frames, 256 << 10);
    assert!(
        ix.info.spans.spans > 3,
        "{} zstd spans",
        ix.info.spans.spans
    );
    // zstd, one frame: one span (a read of any file fetches the whole layer), still correct.
    let one = zstd::bulk::compress(&tar, 3).unwrap();
    let ix = serves_the_converted_disk(&one, 256 << 10);
    assert_eq!(ix.info.spans.spans, 1);
    // An uncompressed tar.
    let ix = serves_the_converted_disk(&tar, 256 << 10);
    assert!(ix.info.spans.spans > 3);
}

/// A reader that flips a byte in the first `bad` answers.
struct Flipping {
    inner: FileRange,
    bad: AtomicUsize,
    reads: AtomicUsize,
}

impl RangeReader for Flipping {
    fn read_range(&self, range: std::ops::Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let b = self.inner.read_range(range).await?;
            let left = self.bad.load(Ordering::Relaxed);
            if left == 0 || b.is_empty() {
                return Ok(b);
            }
            self.bad.store(left - 1, Ordering::Relaxed);
            let mut v = b.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x40;
            Ok(Bytes::from(v))
        })
    }
    fn size(&self) -> BoxFuture<'_, Result<u64, FetchError>> {
        self.inner.size()
    }
    fn describe(&self) -> String {
        "flipping".into()
    }
}

#[test]
fn corrupt_spans_are_refetched_and_never_served() {
    let layer = gzip(&layer_tar(), 6);
    let ix = index(&layer, 256 << 10);
    let want = converted_disk(&layer);
    rt().block_on(async {
        // The first three answers are corrupt: each is refused by its span digest and refetched.
        let flip = Arc::new(Flipping {
            inner: FileRange::open(&ix.original).unwrap(),
            bad: AtomicUsize::new(3),
            reads: AtomicUsize::new(0),
        });
        let e = engine(&ix, flip.clone()).await;
        let got = read_all(&e).await.unwrap();
        assert!(got == want, "wrong bytes served after corrupt answers");
        assert_eq!(flip.bad.load(Ordering::Relaxed), 0);
        // Always corrupt: reads of file data fail (EIO), they never return other bytes.
        let flip = Arc::new(Flipping {
            inner: FileRange::open(&ix.original).unwrap(),
            bad: AtomicUsize::new(usize::MAX),
            reads: AtomicUsize::new(0),
        });
        let e = engine(&ix, flip.clone()).await;
        let err = read_all(&e).await.unwrap_err().to_string();
        // Retried until the read deadline; which of the two ends it first depends on timing.
        assert!(
            err.contains("does not match its digest") || err.contains("deadline"),
            "{err}"
        );
        assert!(flip.reads.load(Ordering::Relaxed) > 1, "not retried");
    });
}

#[test]
fn an_index_does_not_serve_another_layer() {
    let tar = layer_tar();
    let ix = index(&gzip(&tar, 6), 256 << 10);
    // Same files, compressed differently: every span digest differs.
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), gzip(&tar, 1)).unwrap();
    rt().block_on(async {
        let e = engine(&ix, Arc::new(FileRange::open(other.path()).unwrap())).await;
        let err = read_all(&e).await.unwrap_err().to_string();
        assert!(
            err.contains("does not match its digest") || err.contains("deadline"),
            "{err}"
        );
    });
    // A span table that is not the one the descriptor names is refused before it is used.
    let mut wrong = location(&ix);
    wrong.digest[0] ^= 1;
    let ext = OriginalLayer::new(
        Arc::new(FileRange::open(&ix.original).unwrap()),
        Arc::new(FileRange::open(&ix.spans).unwrap()),
        wrong,
    );
    let err = rt().block_on(ext.table()).unwrap_err().to_string();
    assert!(err.contains("span table digest mismatch"), "{err}");
}

#[test]
fn the_disk_passes_e2fsck_and_mounts() {
    let layer = gzip(&layer_tar(), 6);
    let ix = index(&layer, 1 << 20);
    let disk = rt().block_on(async {
        let e = engine(&ix, Arc::new(FileRange::open(&ix.original).unwrap())).await;
        read_all(&e).await.unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, &disk).unwrap();
    e2fsck(&img);
    if !privileged() {
        return;
    }
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _m = Mount::loop_ro(&img, &mnt);
    let big = std::fs::read_to_string(mnt.join("usr/lib/big.txt")).unwrap();
    assert!(big.starts_with("line 0 of a large text file\n"));
    assert!(big.ends_with("line 199999 of a large text file\n"));
    assert_eq!(
        std::fs::read(mnt.join("usr/lib/sparse.db")).unwrap().len(),
        9_000_000
    );
}

fn original_layer(ix: &Indexed, source: &std::path::Path) -> OriginalLayer {
    OriginalLayer::new(
        Arc::new(FileRange::open(source).unwrap()),
        Arc::new(FileRange::open(&ix.spans).unwrap()),
        location(ix),
    )
}

#[test]
fn streaming_the_whole_layer_fills_it_and_proves_the_index() {
    let layer = gzip(&layer_tar(), 6);
    let ix = index(&layer, 256 << 10);
    let want = converted_disk(&layer);
    rt().block_on(async {
        let e = engine(&ix, Arc::new(FileRange::open(&ix.original).unwrap())).await;
        let ext = original_layer(&ix, &ix.original);
        let v = lazyblk::original::fill_and_verify(&e, &ext, Some(&ix.info.input.digest))
            .await
            .unwrap();
        assert_eq!(v.layer_digest, ix.info.input.digest);
        assert_eq!(v.diff_id, ix.info.input.diff_id);
        assert_eq!(v.disk_digest, ix.info.blob.disk_digest);
        let external = e
            .index()
            .entries()
            .iter()
            .filter(|x| x.kind == lazyblk::format::ChunkKind::External)
            .count() as u64;
        assert_eq!(v.chunks_filled, external);
        // Every file-data chunk is local now: reading the disk needs nothing from the original.
        let before = e.external_fetched_bytes();
        let got = read_all(&e).await.unwrap();
        assert!(got == want);
        assert_eq!(
            e.external_fetched_bytes(),
            before,
            "file data fetched again"
        );
        // The manifest naming another layer digest: refused.
        let e = engine(&ix, Arc::new(FileRange::open(&ix.original).unwrap())).await;
        let err = lazyblk::original::fill_and_verify(
            &e,
            &ext,
            Some(&format!("sha256:{}", "0".repeat(64))),
        )
        .await
        .unwrap_err();
        assert!(err.contains("the manifest"), "{err}");
    });
}

/// The engine of `ix` over a layer whose blob is copied to `copy` (from `remote`) before reads.
async fn copied(
    ix: &Indexed,
    remote: Arc<Flipping>,
    copy: &std::path::Path,
) -> (Engine, Arc<OriginalLayer>) {
    let local =
        Arc::new(lazyblk::original::local::LocalCopy::create(remote.clone(), copy).unwrap());
    let ext = Arc::new(
        OriginalLayer::new(
            remote,
            Arc::new(FileRange::open(&ix.spans).unwrap()),
            location(ix),
        )
        .with_local_copy(local.clone()),
    );
    let size = ext.table().await.unwrap().source_size;
    local.download(size, None).await.unwrap();
    assert!(ext.is_local());
    (engine_with(ix, ext.clone()).await, ext)
}

#[test]
fn a_local_copy_serves_the_layer_and_a_corrupt_copy_is_never_served() {
    let layer = gzip(&layer_tar(), 6);
    let ix = index(&layer, 256 << 10);
    let want = converted_disk(&layer);
    let tmp = tempfile::tempdir().unwrap();
    let counting = || {
        Arc::new(Flipping {
            inner: FileRange::open(&ix.original).unwrap(),
            bad: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
        })
    };
    rt().block_on(async {
        // Downloaded once, start to end; every read after that comes from the copy.
        let remote = counting();
        let (e, ext) = copied(&ix, remote.clone(), &tmp.path().join("a")).await;
        let downloads = remote.reads.load(Ordering::Relaxed);
        assert_eq!(downloads as u64, (layer.len() as u64).div_ceil(4 << 20));
        assert!(read_all(&e).await.unwrap() == want);
        assert_eq!(
            remote.reads.load(Ordering::Relaxed),
            downloads,
            "the registry was read again"
        );
        // Fetched: the download, and the span windows (from the span blob), nothing else.
        let windows = e.external_fetched_bytes() - layer.len() as u64;
        assert!(
            windows <= std::fs::metadata(&ix.spans).unwrap().len(),
            "{windows} bytes fetched beyond the download"
        );
        // The proving pass reads the copy too.
        let v = lazyblk::original::fill_and_verify(&e, &ext, Some(&ix.info.input.digest))
            .await
            .unwrap();
        assert_eq!(v.disk_digest, ix.info.blob.disk_digest);
        assert_eq!(remote.reads.load(Ordering::Relaxed), downloads);

        // A copy corrupted on disk after its download: the span read from it fails its digest, the
        // copy is discarded and the span comes from the registry; the disk is still exact.
        let remote = counting();
        let path = tmp.path().join("b");
        let (e, ext) = copied(&ix, remote.clone(), &path).await;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(b"\xff\x00\xff\x00", layer.len() as u64 / 2)
                .unwrap();
        }
        assert!(
            read_all(&e).await.unwrap() == want,
            "bytes of a corrupt copy served"
        );
        assert!(!ext.is_local(), "the corrupt copy was kept");
        assert!(ext.local_copy().is_some_and(|c| !c.covers(&(0..1))));
        assert!(
            remote.reads.load(Ordering::Relaxed) > downloads,
            "nothing refetched from the registry"
        );
    });
}

#[test]
fn verification_refuses_an_index_of_another_layer() {
    let tar = layer_tar();
    let ix = index(&gzip(&tar, 6), 256 << 10);
    // The same files compressed otherwise: another layer (digest), though the same disk.
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), gzip(&tar, 9)).unwrap();
    // Different files (one byte of one file changed), same compression: another disk.
    let mut tar2 = tar.clone();
    let at = tar2.windows(12).position(|w| w == b"setting_17 =").unwrap();
    tar2[at + 9] = b'8';
    let ix2 = index(&gzip(&tar2, 6), 256 << 10);
    rt().block_on(async {
        let e = engine(&ix, Arc::new(FileRange::open(&ix.original).unwrap())).await;
        let err = lazyblk::original::fill_and_verify(&e, &original_layer(&ix, other.path()), None)
            .await
            .unwrap_err();
        assert!(err.contains("the index says"), "{err}");
        // A span table and layer that agree with each other, under another layer's disk index: the
        // layer converts to another disk, so the served index is refused.
        let e = engine(&ix, Arc::new(FileRange::open(&ix.original).unwrap())).await;
        let err =
            lazyblk::original::fill_and_verify(&e, &original_layer(&ix2, &ix2.original), None)
                .await
                .unwrap_err();
        assert!(
            err.contains("the index does not describe this layer"),
            "{err}"
        );
    });
}

/// A read near the start of a span fetches and inflates only the pieces it needs, not the span;
/// reading on through the span fetches each piece once (the decoder resumes where it stopped).
#[test]
fn a_read_fetches_the_prefix_of_a_span_it_needs() {
    use lazyblk::fetch::ExternalData;
    let layer = gzip(&layer_tar(), 6);
    let ix = index(&layer, 1 << 20);
    let want = converted_disk(&layer);
    rt().block_on(async {
        let ext = original_layer(&ix, &ix.original);
        let t = ext.table().await.unwrap();
        assert!(t.piece_size > 0, "a gzip layer's spans have pieces");
        // A data run starting in the first eighth of a span of many pieces.
        let (run, i) = t
            .map
            .iter()
            .find_map(|r| {
                let i = t.span_of(r.tar);
                let tar = t.span_tar(i);
                let s = &t.spans[i];
                (s.pieces.len() >= 8 && r.tar - tar.start < (tar.end - tar.start) / 8)
                    .then_some((*r, i))
            })
            .expect("a run near a span's start");
        let span = &t.spans[i];
        let comp = span.comp.end - span.comp.start;
        let window = span.window.end - span.window.start;
        let disk = run.disk & !4095..(run.disk & !4095) + 4096;
        let got = ext.read_disk(disk.clone()).await.unwrap();
        assert!(got[..] == want[disk.start as usize..disk.end as usize]);
        let first = ext.fetched_bytes();
        assert!(
            first < comp / 2 + window,
            "one block fetched {first} bytes of a {comp}-byte span"
        );
        // Every run of the same span, in disk order: each piece is fetched once.
        for r in t
            .map
            .iter()
            .filter(|r| t.span_of(r.tar) == i && t.span_of(r.tar + r.len - 1) == i)
        {
            let d = r.disk & !4095..(r.disk + r.len).div_ceil(4096) * 4096;
            let got = ext.read_disk(d.clone()).await.unwrap();
            assert!(got[..] == want[d.start as usize..d.end as usize]);
        }
        let all = ext.fetched_bytes();
        assert!(
            all <= comp + window,
            "the span's {comp} bytes (+{window} window) took {all} bytes of fetches"
        );
    });
}
