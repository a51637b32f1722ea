//! The fetch engine under faults (a fault-injecting HTTP server stands in for the registry, since a real
//! one cannot misbehave on demand), with single-flight, caches, background fill and recovery.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::faulty::FaultyServer;
use common::layer::{LayerTar, DEF, DIR};
use common::*;
use lazyblk::fetch::diskcache::DiskCache;
use lazyblk::fetch::{open_source, EngineOptions, SourceOptions};

/// (blob bytes, raw image bytes) of a layer of a few MiB.
fn layer() -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    t.dir("d", DIR);
    for i in 0..5 {
        t.file(&format!("d/r{i}"), DEF, &noise(600_000, i + 7));
        t.file(
            &format!("d/t{i}"),
            DEF,
            format!("text {i}\n").repeat(60_000).as_bytes(),
        );
    }
    let tar = dir.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = dir.path().join("l.blob");
    convert(&tar, &blob);
    let raw = dir.path().join("l.img");
    export(&blob, &raw);
    (std::fs::read(&blob).unwrap(), std::fs::read(&raw).unwrap())
}

/// `t` written, converted and exported under `dir`: (tar, blob, conversion summary, raw disk bytes).
fn converted(
    dir: &std::path::Path,
    t: LayerTar,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    serde_json::Value,
    Vec<u8>,
) {
    let tar = dir.join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = dir.join("l.blob");
    let s = convert(&tar, &blob);
    let raw = dir.join("l.img");
    export(&blob, &raw);
    (tar, blob, s, std::fs::read(&raw).unwrap())
}

fn opts(deadline: Duration) -> SourceOptions {
    SourceOptions {
        engine: EngineOptions {
            read_deadline: deadline,
            retry_base: Duration::from_millis(5),
            retry_max: Duration::from_millis(100),
            mem_cache_bytes: 64 << 20,
            ..EngineOptions::default()
        },
        ..SourceOptions::default()
    }
}

/// Reads the whole disk in 1 MiB pieces.
async fn read_all(e: &lazyblk::fetch::Engine) -> Result<Vec<u8>, lazyblk::fetch::ReadError> {
    let size = e.index().image_size();
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20);
        out.extend_from_slice(&e.read(off, n as usize).await?);
        off += n;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_faults_are_retried_and_corrupt_bytes_never_served() {
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    srv.set(|f| {
        f.errors_503 = 2;
        f.resets = 2;
    });
    let e = open_source(&srv.url, &opts(Duration::from_secs(60)))
        .await
        .unwrap();
    srv.set(|f| {
        f.delay = Duration::from_millis(20);
        f.errors_503 = 3;
        f.resets = 2;
        f.truncations = 2;
        f.bit_flips = 3;
    });
    let got = read_all(&e).await.unwrap();
    assert!(got == raw, "bytes served differ from the image");
    let m = e.metrics();
    use std::sync::atomic::Ordering::Relaxed;
    // A flip can land between chunks of a coalesced request (bytes nobody uses); at least one hits data.
    assert!(
        m.corrupt_chunks.load(Relaxed) >= 1,
        "flipped bits must be detected"
    );
    assert!(
        m.fetch_retries.load(Relaxed) >= 10,
        "every fault costs a retry"
    );
    assert_eq!(m.read_errors.load(Relaxed), 0);
    let errors = m.errors.lock().unwrap().clone();
    assert!(
        errors.get("corrupt").copied().unwrap_or(0) >= 1
            && errors.get("http_5xx").copied().unwrap_or(0) >= 3,
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_source_fails_reads_within_the_deadline_then_recovers() {
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    let e = open_source(&srv.url, &opts(Duration::from_millis(800)))
        .await
        .unwrap();
    srv.set(|f| f.down = true);
    // Bounded: the read returns an error (EIO for a device) instead of hanging. The outer timeout only
    // guards the test against a hang; it is not a performance assertion.
    // 8 MiB in: the first file data (the head of the image is zeros, served without a fetch).
    let r = tokio::time::timeout(Duration::from_secs(60), e.read(8 << 20, 4096))
        .await
        .expect("read hung");
    let Err(err) = r else {
        panic!("a read with the source down must fail")
    };
    assert!(err.to_string().contains("chunk"), "{err}");
    use std::sync::atomic::Ordering::Relaxed;
    assert!(e.metrics().read_errors.load(Relaxed) >= 1);
    // The registry comes back: the same reads now succeed.
    srv.set(|f| f.down = false);
    let got = read_all(&e).await.unwrap();
    assert!(got == raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_fetch_each_chunk_once() {
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    srv.set(|f| f.delay = Duration::from_millis(30));
    let e = Arc::new(
        open_source(&srv.url, &opts(Duration::from_secs(60)))
            .await
            .unwrap(),
    );
    let opened = srv.ranges().len();
    let size = raw.len() as u64;
    let raw = Arc::new(raw);
    let mut tasks = Vec::new();
    for t in 0..48u64 {
        let (e, raw) = (e.clone(), raw.clone());
        tasks.push(tokio::spawn(async move {
            let mut x = t * 7919 + 1;
            for _ in 0..20 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = 1 + (x >> 44) % (600 << 10);
                let off = (x >> 7) % (size - len);
                let got = e.read(off, len as usize).await.unwrap();
                assert!(got[..] == raw[off as usize..(off + len) as usize]);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Count, for every stored chunk, how many data requests covered it.
    let ranges = srv.ranges()[opened..].to_vec();
    let idx = e.index();
    for c in 0..idx.chunk_count() {
        let r = idx.entry(c).blob_range();
        if r.is_empty() {
            continue;
        }
        let n = ranges
            .iter()
            .filter(|q| q.start < r.end && r.start < q.end)
            .count();
        assert!(n <= 1, "chunk {c} was fetched {n} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_cache_survives_restart_and_rejects_damage() {
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    let dir = tempfile::tempdir().unwrap();
    let with_cache = || {
        let mut o = opts(Duration::from_millis(500));
        o.engine.disk_cache = Some(Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap()));
        o
    };
    let e = open_source(&srv.url, &with_cache()).await.unwrap();
    // Background fill caches everything; then the source goes away.
    e.background_fill(None).await.unwrap();
    assert_eq!(e.metrics().fill_ratio(), 1.0);
    tokio::time::sleep(Duration::from_millis(200)).await; // cache writes are asynchronous
                                                          // Complete in the disk cache: its chunks are pinned for this process's life.
    let pin = e.pin_if_filled().expect("a filled layer is pinned");
    let pinned = std::fs::read_to_string(&pin).unwrap();
    let stored = (0..e.index().chunk_count())
        .filter(|&c| !e.index().entry(c).blob_range().is_empty())
        .count();
    assert_eq!(pinned.lines().count(), stored);
    let index_range_reads = srv.ranges().len();
    drop(e);
    // "Restart": a new engine over the same cache. The index is fetched, then the source dies.
    let e = open_source(&srv.url, &with_cache()).await.unwrap();
    srv.set(|f| f.down = true);
    let got = read_all(&e).await.unwrap();
    assert!(got == raw, "restart must serve from the disk cache");
    use std::sync::atomic::Ordering::Relaxed;
    assert!(e.metrics().disk_hits.load(Relaxed) > 0);
    assert_eq!(
        srv.ranges().len(),
        index_range_reads + 1,
        "only the index was fetched after restart"
    );
    drop(e);
    // Damage every cached record (a byte of its data, its header intact, so it is adopted on open):
    // each must be detected, not served; with the source back, refetched.
    let mut damaged = 0;
    for f in std::fs::read_dir(dir.path().join("packs")).unwrap() {
        let p = f.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        // Records start at 4 KiB boundaries with the magic `LZBCHNK1`; data follows the 64-byte header.
        for block in (0..b.len()).step_by(4096) {
            if b[block..].starts_with(b"LZBCHNK1") {
                b[block + 64] ^= 0x55;
                damaged += 1;
            }
        }
        std::fs::write(&p, b).unwrap();
    }
    assert_eq!(damaged, stored, "one record per stored chunk");
    srv.set(|f| f.down = false);
    let e = open_source(&srv.url, &with_cache()).await.unwrap();
    let got = read_all(&e).await.unwrap();
    assert!(got == raw);
    assert_eq!(
        e.metrics().disk_hits.load(Relaxed),
        0,
        "damaged entries must never be served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_memory_are_served_at_once_and_only_when_cached() {
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    let e = Arc::new(
        open_source(&srv.url, &opts(Duration::from_secs(30)))
            .await
            .unwrap(),
    );
    let size = raw.len() as u64;
    // Nothing cached yet: a read touching a stored chunk cannot be served at once.
    let stored = (0..e.index().chunk_count())
        .find(|&c| !e.index().entry(c).blob_range().is_empty())
        .unwrap();
    let at = e.index().chunk_offset(stored);
    assert!(e.read_cached(at, 4096).is_none());
    let fetched = srv.ranges().len();
    // Fill the memory cache, then read at random from a thread outside the runtime (as a ublk queue
    // thread does): every answer is immediate, correct, and costs no request.
    read_all(&e).await.unwrap();
    let requests = srv.ranges().len();
    assert!(requests > fetched);
    let (e2, raw2) = (e.clone(), raw.clone());
    std::thread::spawn(move || {
        let mut x = 99u64;
        for _ in 0..500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 1 + (x >> 40) % (700 << 10);
            let off = (x >> 5) % (size - len);
            let got = e2
                .read_cached(off, len as usize)
                .expect("cached after a full read");
            assert!(got[..] == raw2[off as usize..(off + len) as usize]);
        }
    })
    .join()
    .unwrap();
    assert_eq!(srv.ranges().len(), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recorded_trace_replayed_on_a_fresh_engine_serves_the_same_reads_without_fetching() {
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    let o = opts(Duration::from_secs(60));
    // The "startup" of a workload: scattered reads, some twice.
    let size = raw.len() as u64;
    let reads: Vec<(u64, usize)> = (0..12u64)
        .map(|i| {
            (
                (i * 7_654_321) % (size - 200_000),
                4096 + (i as usize % 3) * 60_000,
            )
        })
        .chain([(0, 4096), (1024, 4096)])
        .collect();
    let first = open_source(&srv.url, &o).await.unwrap();
    for &(off, len) in &reads {
        first.read(off, len).await.unwrap();
    }
    let (_, accesses) = first.accesses();
    let chunks: Vec<u64> = accesses.iter().map(|a| a.chunk).collect();
    // First-read order, each chunk once, exactly the chunks the reads covered.
    let idx = first.index();
    let mut expect = Vec::new();
    for &(off, len) in &reads {
        for c in idx.chunks_for(off, len as u64).unwrap() {
            if !expect.contains(&c) {
                expect.push(c);
            }
        }
    }
    assert_eq!(chunks, expect);

    // A fresh engine (new node, cold caches) replays the trace, with junk mixed in.
    let second = open_source(&srv.url, &o).await.unwrap();
    let mut trace = chunks.clone();
    trace.extend([u64::MAX, idx.chunk_count(), chunks[0]]);
    let stored: Vec<u64> = chunks
        .iter()
        .copied()
        .filter(|&c| !idx.entry(c).blob_range().is_empty())
        .collect();
    let s = second.replay(&trace).await;
    assert_eq!(s.wanted, stored.len() as u64, "{s:?}");
    assert_eq!(s.fetched, stored.len() as u64, "{s:?}");
    assert_eq!(s.failed, 0);
    let m = second.metrics();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(m.trace_prefetched.load(Relaxed), stored.len() as u64);
    let fetches_after_replay = m.fetches.load(Relaxed);
    assert!(
        fetches_after_replay - 1 < stored.len() as u64,
        "coalesced: {fetches_after_replay} requests for {} chunks",
        stored.len()
    );
    // The workload now reads what was traced: right bytes, no new request.
    for &(off, len) in &reads {
        let got = second.read(off, len).await.unwrap();
        assert!(got[..] == raw[off as usize..off as usize + len]);
    }
    assert_eq!(m.fetches.load(Relaxed), fetches_after_replay);
    // Replaying again fetches nothing.
    let again = second.replay(&trace).await;
    assert_eq!((again.fetched, again.skipped), (0, stored.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readahead_follows_sequential_readers_only() {
    use std::sync::atomic::Ordering::Relaxed;
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    let o = opts(Duration::from_secs(60));
    // Scattered small reads (a container starting): nothing but the chunks asked for is fetched.
    let e = open_source(&srv.url, &o).await.unwrap();
    let idx_bytes = e.metrics().fetched_bytes.load(Relaxed);
    let size = raw.len() as u64;
    let mut touched = std::collections::BTreeSet::new();
    for i in 0..16u64 {
        let off = (i * 5_123_457) % (size - 8192) / 4096 * 4096;
        let got = e.read(off, 8192).await.unwrap();
        assert!(got[..] == raw[off as usize..off as usize + 8192]);
        touched.extend(e.index().chunks_for(off, 8192).unwrap());
    }
    let m = e.metrics();
    assert_eq!(m.readahead_chunks.load(Relaxed), 0);
    let stored: u64 = touched
        .iter()
        .map(|&c| e.index().entry(c).stored_len as u64)
        .sum();
    let fetched = m.fetched_bytes.load(Relaxed) - idx_bytes;
    // Coalescing may pull in gaps of up to 64 KiB between neighbours, never whole windows.
    assert!(
        fetched <= stored + touched.len() as u64 * (64 << 10),
        "{fetched} bytes fetched for {stored} stored bytes of {} chunks",
        touched.len()
    );
    // A sequential reader gets a growing window fetched ahead, and the right bytes.
    let e = open_source(&srv.url, &o).await.unwrap();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(128 << 10) as usize;
        let got = e.read(off, n).await.unwrap();
        assert!(got[..] == raw[off as usize..off as usize + n]);
        off += n as u64;
    }
    let m = e.metrics();
    assert!(m.readahead_chunks.load(Relaxed) > 0);
    assert!(
        m.fetches.load(Relaxed) < e.index().chunk_count(),
        "{} requests for {} chunks",
        m.fetches.load(Relaxed),
        e.index().chunk_count()
    );
}

/// The converter marks the filesystem metadata at the end of the blob as its startup region: with the
/// descriptor's annotations, the superblock, directories and inode tables arrive with the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metadata_region_arrives_with_the_index() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    for d in 0..20 {
        t.dir(&format!("d{d}"), DIR);
        for i in 0..50 {
            t.file(&format!("d{d}/f{i}"), DEF, &noise(3000, d * 50 + i));
        }
    }
    let (tar, blob, s, raw) = converted(dir.path(), t);
    let b = &s["blob"];
    let ann = &s["annotations"];
    let startup = b["startup_offset"].as_u64().expect("a metadata region");
    let index_offset = b["index_offset"].as_u64().unwrap();
    assert_eq!(
        ann["containerd.io/snapshot/lazyblk/startup-offset"],
        startup.to_string()
    );
    assert!(startup < index_offset);
    let digest = lazyblk_image_format::parse_digest(b["index_digest"].as_str().unwrap()).unwrap();
    let srv = FaultyServer::start(std::fs::read(&blob).unwrap()).await;
    let mut o = opts(Duration::from_secs(60));
    o.index = Some((index_offset, b["index_length"].as_u64().unwrap(), digest));
    o.startup_offset = Some(startup);
    let e = open_source(&srv.url, &o).await.unwrap();
    let m = e.metrics();
    // The superblock and everything after the file data (directories, inode tables): no request
    // beyond the one that brought the index, and the right bytes.
    let meta = (2048 + s["ext4"]["data_blocks"].as_u64().unwrap()) * 4096;
    let size = e.index().image_size();
    assert!(e.read(0, 4096).await.unwrap()[..] == raw[..4096]);
    let got = e.read(meta, (size - meta) as usize).await.unwrap();
    assert!(got[..] == raw[meta as usize..]);
    assert_eq!(m.fetches.load(Relaxed), 1, "{:?}", srv.ranges());
    assert!(m.startup_region_chunks.load(Relaxed) > 0);
    // File data is not in it.
    e.read(2048 * 4096, 4096).await.unwrap();
    assert_eq!(m.fetches.load(Relaxed), 2);
    // `--metadata-region 0` marks none.
    let blob0 = dir.path().join("l0.blob");
    let out = run_ok(
        lazyblk()
            .args(["layer", "convert", "--json", "--metadata-region", "0"])
            .arg(&tar)
            .arg("-o")
            .arg(&blob0),
    );
    let s0: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s0["blob"].get("startup_offset").is_none());
    assert!(s0["annotations"]
        .get("containerd.io/snapshot/lazyblk/startup-offset")
        .is_none());
}

/// A startup region is served only up to its decoded bound: chunks of repeated bytes compress to
/// tens of bytes, so a region within the stored bound could decode to the whole disk (an untrusted
/// annotation names it). The rest is fetched when read, and every read is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_startup_region_is_served_only_up_to_its_decoded_bound() {
    use lazyblk::fetch::engine::MAX_STARTUP_DECODED;
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    for i in 0..96 {
        t.file(
            &format!("f{i}"),
            DEF,
            format!("{i:>7}\n").repeat(1 << 17).as_bytes(),
        );
    }
    let (_, blob, s, raw) = converted(dir.path(), t);
    let b = &s["blob"];
    let index_offset = b["index_offset"].as_u64().unwrap();
    let digest = lazyblk_image_format::parse_digest(b["index_digest"].as_str().unwrap()).unwrap();
    let srv = FaultyServer::start(std::fs::read(&blob).unwrap()).await;
    let mut o = opts(Duration::from_secs(60));
    o.index = Some((index_offset, b["index_length"].as_u64().unwrap(), digest));
    // The whole blob as the "startup region": a few hundred KiB stored, ~100 MiB decoded.
    o.startup_offset = Some(0);
    let e = open_source(&srv.url, &o).await.unwrap();
    let m = e.metrics();
    let cs = e.index().chunk_size();
    let size = e.index().image_size();
    assert!(
        size > MAX_STARTUP_DECODED + (16 << 20),
        "the disk must outgrow the bound"
    );
    assert_eq!(m.fetches.load(Relaxed), 1);
    let got = read_all(&e).await.unwrap();
    assert!(got == raw);
    let seeded = m.startup_region_chunks.load(Relaxed);
    assert!(
        seeded > 0 && seeded <= MAX_STARTUP_DECODED / cs,
        "{seeded} chunks seeded"
    );
    assert!(
        m.fetches.load(Relaxed) > 1,
        "what the bound left out was fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relaid_out_blob_serves_its_startup_region_from_the_index_request() {
    use lazyblk_image_format::{Footer, Index, IndexLimits, FOOTER_LEN};
    use std::sync::atomic::Ordering::Relaxed;
    let (blob, raw) = layer();
    let f = Footer::parse(&blob[blob.len() - FOOTER_LEN..], Some(blob.len() as u64)).unwrap();
    let ib = &blob[f.index_offset as usize..][..f.index_length as usize];
    let idx = Index::parse_verified(ib, &f.index_digest, IndexLimits::default()).unwrap();
    // The "startup set": a few scattered stored chunks, in read order.
    let startup: Vec<u64> = (0..idx.chunk_count())
        .rev()
        .filter(|&c| !idx.entry(c).blob_range().is_empty())
        .step_by(3)
        .take(5)
        .collect();
    let (new, s) = lazyblk_image_format::relayout(
        &idx,
        &startup,
        |_, e| Ok(blob[e.blob_range().start as usize..e.blob_range().end as usize].to_vec()),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(s.startup_chunks, 5);
    let srv = FaultyServer::start(new).await;
    let mut o = opts(Duration::from_secs(60));
    o.index = Some((
        s.blob.index_offset,
        s.blob.index_length,
        s.blob.index_digest,
    ));
    o.startup_offset = Some(s.startup_offset);
    let e = open_source(&srv.url, &o).await.unwrap();
    // One request carried the region and the index.
    assert_eq!(
        srv.ranges(),
        vec![s.startup_offset..s.blob.index_offset + s.blob.index_length]
    );
    let m = e.metrics();
    // Reads of the startup chunks need no other request (they wait for the region's decode if
    // they come first) and return the right bytes.
    let cs = idx.chunk_size();
    for &c in &startup {
        let len = idx.chunk_len(c) as usize;
        let got = e.read(c * cs, len).await.unwrap();
        assert!(got[..] == raw[(c * cs) as usize..(c * cs) as usize + len]);
    }
    assert_eq!(m.fetches.load(Relaxed), 1);
    assert_eq!(m.startup_region_chunks.load(Relaxed), 5);
    // Other chunks are fetched as usual.
    let other = (0..idx.chunk_count())
        .find(|c| !startup.contains(c) && !idx.entry(*c).blob_range().is_empty())
        .unwrap();
    let got = e.read(other * cs, 4096).await.unwrap();
    assert!(got[..] == raw[(other * cs) as usize..(other * cs) as usize + 4096]);
    assert_eq!(m.fetches.load(Relaxed), 2);
    // A startup offset that is not before the index (or too far) is ignored, not trusted.
    let mut bad = o.clone();
    bad.startup_offset = Some(s.blob.index_offset + 10);
    let before = srv.ranges().len();
    open_source(&srv.url, &bad).await.unwrap();
    let index_only = s.blob.index_offset..s.blob.index_offset + s.blob.index_length;
    assert_eq!(srv.ranges()[before..].to_vec(), vec![index_only]);
}

/// A disk cache that cannot take the chunks (a full filesystem): the fill does not report the layer
/// local — it fails loudly, naming the cause — because a chunk counts as filled only once its
/// disk write is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_into_a_full_disk_cache_fails_instead_of_claiming_the_layer_is_local() {
    if !privileged() {
        return;
    }
    let (blob, _) = layer();
    let srv = FaultyServer::start(blob).await;
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB of tmpfs: the first chunks fit, the rest get ENOSPC.
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(dir.path().to_path_buf());
    let mut o = opts(Duration::from_secs(5));
    o.engine.disk_cache = Some(Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap()));
    let e = open_source(&srv.url, &o).await.unwrap();
    let err = e
        .background_fill(None)
        .await
        .expect_err("the fill must not succeed into a full cache");
    assert!(
        err.contains("could not be stored in the disk cache"),
        "{err}"
    );
    assert!(
        e.metrics().fill_ratio() < 1.0,
        "chunks counted as filled without being stored"
    );
    assert!(e.pin_if_filled().is_none());
    // Nothing half-written is left behind.
    for sub in std::fs::read_dir(dir.path()).unwrap() {
        let sub = sub.unwrap().path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).unwrap() {
                let p = f.unwrap().path();
                assert!(
                    !p.to_string_lossy().ends_with(".tmp"),
                    "left {}",
                    p.display()
                );
            }
        }
    }
}

/// After a demand read, the background fill fetches the chunks that follow that read on the disk
/// first (where a starting container reads next), and still fetches every chunk once; with
/// `fill_follow_bytes` 0 (the default) it starts at the lowest chunk of the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fill_follows_demand_reads_then_completes_the_blob() {
    let (blob, raw) = layer();
    for follows in [true, false] {
        let srv = FaultyServer::start(blob.clone()).await;
        let mut o = opts(Duration::from_secs(60));
        o.engine.fill_follow_bytes = if follows { 4 << 20 } else { 0 };
        o.engine.readahead_chunks = 0;
        let e = open_source(&srv.url, &o).await.unwrap();
        let opened = srv.ranges().len();
        let idx = e.index().clone();
        // A read of one chunk in the middle of the disk, not its last stored chunk.
        let stored: Vec<u64> = (0..idx.chunk_count())
            .filter(|&c| idx.entry(c).stored_len > 0)
            .collect();
        let c = stored[stored.len() / 2];
        let next = *stored.iter().find(|&&n| n > c).unwrap();
        let off = idx.chunk_offset(c);
        let got = e.read(off, 4096).await.unwrap();
        assert!(got[..] == raw[off as usize..off as usize + 4096]);
        let before = srv.ranges().len();
        // A fill with a rate of its own runs one batch at a time: its requests come in order.
        e.background_fill(Some(1 << 30)).await.unwrap();
        let fill = srv.ranges()[before..].to_vec();
        let first = fill.first().expect("the fill fetched something").start;
        if follows {
            assert_eq!(
                first,
                idx.entry(next).offset,
                "the fill starts after the read (chunk {next}): {fill:?}"
            );
        } else {
            // One batch holds this small layer: its first request is its first disk chunk's.
            assert_eq!(first, idx.entry(stored[0]).offset, "blob order: {fill:?}");
            assert_ne!(first, idx.entry(next).offset);
        }
        // Every stored chunk was fetched exactly once, by the read or by the fill (the footer
        // request at open may have carried some too: they are not taken from it).
        let mut covered = vec![0u32; idx.chunk_count() as usize];
        for r in &srv.ranges()[opened..] {
            for &s in &stored {
                let e = idx.entry(s);
                if e.offset >= r.start && e.offset + e.stored_len as u64 <= r.end {
                    covered[s as usize] += 1;
                }
            }
        }
        for &s in &stored {
            assert_eq!(
                covered[s as usize],
                1,
                "chunk {s}: {:?}",
                &srv.ranges()[opened..]
            );
        }
        assert!(read_all(&e).await.unwrap() == raw);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_stores_verified_chunks_compressed_and_its_readers_get_them_decoded() {
    use std::sync::atomic::Ordering::Relaxed;
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    let dir = tempfile::tempdir().unwrap();
    let with_cache = |cache: &std::path::Path| {
        let mut o = opts(Duration::from_secs(60));
        o.engine.disk_cache = Some(Arc::new(DiskCache::open(cache, 1 << 30).unwrap()));
        o
    };
    let e = open_source(&srv.url, &with_cache(dir.path()))
        .await
        .unwrap();
    let stored = (0..e.index().chunk_count())
        .filter(|&c| e.index().entry(c).is_stored())
        .count() as u64;
    assert!(stored > 10);
    // The fill verifies what it stores: flipped bits are refetched, never cached.
    srv.set(|f| f.bit_flips = 2);
    e.background_fill(None).await.unwrap();
    let m = e.metrics();
    assert_eq!(m.fill_ratio(), 1.0);
    assert!(
        m.corrupt_chunks.load(Relaxed) >= 1,
        "the fill checks digests"
    );
    assert_eq!(
        m.decoded_chunks.load(Relaxed),
        0,
        "a fill into the disk cache decodes nothing"
    );
    // Served from the disk cache alone, each chunk decoded once (memory holds them all after).
    srv.set(|f| f.down = true);
    assert!(read_all(&e).await.unwrap() == raw);
    assert!(read_all(&e).await.unwrap() == raw);
    assert_eq!(m.decoded_chunks.load(Relaxed), stored);
    assert_eq!(m.disk_hits.load(Relaxed), stored);
    drop(e);
    // Readers racing a fill on a slow source: chunks the fill has in flight are handed to them
    // decoded, the rest fetched or read from disk; every byte right, every chunk filled.
    let dir2 = tempfile::tempdir().unwrap();
    srv.set(|f| {
        f.down = false;
        f.delay = Duration::from_millis(30);
    });
    let e = open_source(&srv.url, &with_cache(dir2.path()))
        .await
        .unwrap();
    let filler = e.clone();
    let fill = tokio::spawn(async move { filler.background_fill(None).await });
    let got = read_all(&e).await.unwrap();
    fill.await.unwrap().unwrap();
    assert!(
        got == raw,
        "bytes served beside a fill differ from the image"
    );
    assert_eq!(e.metrics().fill_ratio(), 1.0);
    assert_eq!(e.metrics().read_errors.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readahead_with_a_disk_cache_fetches_ahead_without_decoding_ahead() {
    use std::sync::atomic::Ordering::Relaxed;
    let (blob, raw) = layer();
    let srv = FaultyServer::start(blob).await;
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(Duration::from_secs(60));
    o.engine.disk_cache = Some(Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap()));
    let e = open_source(&srv.url, &o).await.unwrap();
    let idx = e.index();
    let cs = idx.chunk_size();
    // A sequential reader of the first 4 chunks, 64 KiB at a time: readahead starts on its second read.
    let end = 4 * cs;
    let mut off = 0;
    while off < end {
        let got = e.read(off, 64 << 10).await.unwrap();
        assert!(got[..] == raw[off as usize..(off + (64 << 10)) as usize]);
        off += 64 << 10;
    }
    let m = e.metrics();
    // The window lands in the disk cache (asynchronously): wait for it, within a hang guard.
    let ahead = m.readahead_chunks.load(Relaxed);
    assert!(ahead > 4, "a sequential reader gets a readahead window");
    for _ in 0..500 {
        if m.fill_done.load(Relaxed) >= 4 + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let read_stored = (0..4).filter(|&c| idx.entry(c).is_stored()).count() as u64;
    assert!(
        m.fill_done.load(Relaxed) > read_stored,
        "chunks ahead of the reader are local"
    );
    assert_eq!(
        m.decoded_chunks.load(Relaxed),
        read_stored,
        "only the chunks read were decoded"
    );
}
