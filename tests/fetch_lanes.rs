//! Demand reads and the background fill travel on separate connections to the registry (Debian's
//! docker-registry behind a relay that only counts the bytes each connection carries): a demand
//! response never queues behind fill bytes on a shared connection.

mod common;

use std::sync::{Arc, Mutex};

use common::layer::{LayerTar, DEF, DIR};
use common::registry::Registry;
use common::*;
use lazyblk::fetch::{open_source, EngineOptions, SourceOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One value per relayed connection, in the order they were accepted.
type PerConnection<T> = Arc<Mutex<Vec<T>>>;

/// A TCP relay in front of `upstream`; `down[i]` is how many bytes connection `i` brought back,
/// `ranges[i]` the `Range` headers it carried. While `hold` is set, connections after the first
/// hold back their answers (the test's stand-in for a fill stuck on a slow link).
struct Relay {
    addr: String,
    down: PerConnection<u64>,
    ranges: PerConnection<Vec<(u64, u64)>>,
    hold: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(upstream: String) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let down = Arc::new(Mutex::new(Vec::new()));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (hold, held) = tokio::sync::watch::channel(false);
        let (d, rs) = (down.clone(), ranges.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let id = {
                    let mut v = d.lock().unwrap();
                    v.push(0);
                    rs.lock().unwrap().push(Vec::new());
                    v.len() - 1
                };
                let (d, rs, upstream) = (d.clone(), rs.clone(), upstream.clone());
                let mut held = held.clone();
                tokio::spawn(async move {
                    let server = TcpStream::connect(&upstream).await.unwrap();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                                    for line in text.lines() {
                                        if let Some((a, b)) = line
                                            .strip_prefix("range: bytes=")
                                            .and_then(|r| r.trim().split_once('-'))
                                        {
                                            if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                                                rs.lock().unwrap()[id].push((a, b));
                                            }
                                        }
                                    }
                                    if sw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = sw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if id > 0 {
                                    let _ = held.wait_for(|h| !*h).await;
                                }
                                d.lock().unwrap()[id] += n as u64;
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = cw.shutdown().await;
                    up.abort();
                });
            }
        });
        Relay {
            addr,
            down,
            ranges,
            hold,
        }
    }

    fn down(&self) -> Vec<u64> {
        self.down.lock().unwrap().clone()
    }
}

/// A converted layer of a few MiB that does not compress.
fn blob(dir: &std::path::Path) -> std::path::PathBuf {
    let mut t = LayerTar::new();
    t.dir("d", DIR);
    for i in 0..6 {
        t.file(&format!("d/f{i}"), DEF, &noise(700_000, i + 3));
    }
    let tar = dir.join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = dir.join("l.blob");
    convert(&tar, &blob);
    blob
}

/// [`blob`] pushed to `reg` as `repo`: the blob file and its digest.
fn pushed(reg: &Registry, dir: &std::path::Path, repo: &str) -> (std::path::PathBuf, String) {
    let blob = blob(dir);
    let digest = reg.push(repo, &blob);
    (blob, digest)
}

/// The tests' runtime (built after the registry push, which runs one of its own).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_fill_never_shares_a_connection_with_demand_reads() {
    let Some(reg) = Registry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (blob, digest) = pushed(&reg, dir.path(), "lazyblk/lanes");
    let size = std::fs::metadata(&blob).unwrap().len();
    runtime().block_on(check_lanes(&reg, size, &digest));
}

async fn check_lanes(reg: &Registry, size: u64, digest: &str) {
    let relay = Relay::start(reg.addr.clone()).await;
    let opts = options();
    let e = open_source(&format!("{}/lazyblk/lanes@{digest}", relay.addr), &opts)
        .await
        .unwrap();
    // Demand reads: the index (by the open) and the disk's first block.
    e.read(0, 4096).await.unwrap();
    let demand = relay.down();
    assert!(!demand.is_empty() && demand.iter().sum::<u64>() > 0);
    e.background_fill(None).await.unwrap();
    assert_eq!(e.metrics().fill_ratio(), 1.0);
    let after = relay.down();
    // Not one byte more on the connections the demand reads used: the fill opened its own.
    assert_eq!(
        &after[..demand.len()],
        &demand[..],
        "the fill reused a demand connection: {after:?}"
    );
    let fill: u64 = after[demand.len()..].iter().sum();
    assert!(
        fill > size / 2,
        "the fill brought {fill} of {size} blob bytes on its own connections: {after:?}"
    );
    // And a demand read after the fill is back on a demand connection, not on a fill one.
    let e2 = open_source(&format!("{}/lazyblk/lanes@{digest}", relay.addr), &opts)
        .await
        .unwrap();
    let before = relay.down();
    e2.read(size / 2, 4096).await.unwrap();
    let now = relay.down();
    let grew: Vec<usize> = (0..now.len())
        .filter(|&i| now[i] > before.get(i).copied().unwrap_or(0))
        .collect();
    assert!(
        grew.iter().all(|&i| i < demand.len() || i >= after.len()),
        "a demand read went over a fill connection: {before:?} -> {now:?}"
    );
}

/// The engine options of these tests (no disk cache: the fill keeps chunks in memory).
fn options() -> SourceOptions {
    let mut opts = SourceOptions {
        engine: EngineOptions {
            mem_cache_bytes: 64 << 20,
            ..EngineOptions::default()
        },
        ..SourceOptions::default()
    };
    opts.registry.plain_http = true;
    opts
}

#[test]
fn a_demand_read_does_not_wait_for_the_fill_fetching_its_chunk() {
    let Some(reg) = Registry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (blob, digest) = pushed(&reg, dir.path(), "lazyblk/detour");
    let raw = dir.path().join("l.img");
    export(&blob, &raw);
    let raw = std::fs::read(&raw).unwrap();
    runtime().block_on(async {
        let relay = Relay::start(reg.addr.clone()).await;
        let src = format!("{}/lazyblk/detour@{digest}", relay.addr);
        let e = open_source(&src, &options()).await.unwrap();
        // The fill's connections answer nothing until the test says so.
        relay.hold.send_replace(true);
        let filler = e.clone();
        let fill = tokio::spawn(async move { filler.background_fill(None).await });
        // A range the fill has asked for and not received.
        let asked = loop {
            let r = relay
                .ranges
                .lock()
                .unwrap()
                .iter()
                .skip(1)
                .flatten()
                .copied()
                .next();
            if let Some(r) = r {
                break r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let idx = e.index();
        let c = (0..idx.chunk_count())
            .find(|&c| {
                let b = idx.entry(c).blob_range();
                !b.is_empty() && b.start >= asked.0 && b.end <= asked.1 + 1
            })
            .expect("a stored chunk inside the fill's request");
        let off = idx.chunk_offset(c);
        // With the fill's answer held back, the read is answered all the same: on the demand
        // connection. (The timeout only turns a hang, the old behaviour, into a failure.)
        let got = tokio::time::timeout(std::time::Duration::from_secs(60), e.read(off, 4096))
            .await
            .expect("the demand read waited for the fill's held fetch")
            .unwrap();
        assert!(got[..] == raw[off as usize..off as usize + 4096]);
        assert!(
            e.metrics()
                .demand_detours
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        assert!(!fill.is_finished());
        // The fill, released, completes and stores every chunk, that one included.
        relay.hold.send_replace(false);
        fill.await.unwrap().unwrap();
        assert_eq!(e.metrics().fill_ratio(), 1.0);
        let again = e.read(off, 4096).await.unwrap();
        assert!(again[..] == raw[off as usize..off as usize + 4096]);
    });
}
