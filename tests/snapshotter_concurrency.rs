//! The snapshotter never serialises calls behind network round trips: 16 Prepares of different images
//! whose referrer lookups a registry delays by 3 s are in flight, and 64 concurrent Stat/List calls
//! all complete before the first of those Prepares does (an ordering, not a timing, assertion).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lazyblk::snapshotter::proto::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, ListSnapshotsRequest,
    PrepareSnapshotRequest, StatSnapshotRequest,
};
use lazyblk::snapshotter::service::{
    LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_TARGET,
};

/// A registry that answers every request with 404 after `delay` (referrers API and tag fallback).
fn slow_registry(delay: Duration) -> (u16, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let s = s.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                s.fetch_add(1, SeqCst);
                std::thread::sleep(delay);
                let _ = c.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            });
        }
    });
    (port, seen)
}

#[test]
fn stat_and_list_never_wait_for_slow_prepares() {
    if !privileged() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let sock = tmp.path().join("snap.sock");
    let (port, seen) = slow_registry(Duration::from_secs(3));
    let mut snap = lazyblk()
        .arg("snapshotter")
        .arg("--address")
        .arg(&sock)
        .arg("--root")
        .arg(&root)
        .args(["--backend", "loop", "--plain-http"])
        .stderr(std::fs::File::create(tmp.path().join("snap.log")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "snapshotter did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = rt
        .block_on(lazyblk::snapshotter::pull::connect(&sock))
        .unwrap();
    let client = SnapshotsClient::new(channel);
    let ns = "lazyblk".to_string();
    // A committed snapshot to Stat.
    rt.block_on(async {
        let mut c = client.clone();
        c.prepare(PrepareSnapshotRequest {
            snapshotter: ns.clone(),
            key: "base-active".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.commit(CommitSnapshotRequest {
            snapshotter: ns.clone(),
            name: "base".into(),
            key: "base-active".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let prepares_done = Arc::new(AtomicUsize::new(0));
    let quick_after_prepares = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        let mut prepares = Vec::new();
        for i in 0..16 {
            let mut c = client.clone();
            let (ns, done) = (ns.clone(), prepares_done.clone());
            prepares.push(tokio::spawn(async move {
                let labels: HashMap<String, String> = [
                    (LABEL_TARGET, format!("target-{i}")),
                    (LABEL_IMAGE_REF, format!("127.0.0.1:{port}/app{i}:v1")),
                    (LABEL_MANIFEST_DIGEST, format!("sha256:{:064x}", i + 1)),
                    (LABEL_LAYER_DIGEST, format!("sha256:{:064x}", i + 100)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                let r = c
                    .prepare(PrepareSnapshotRequest {
                        snapshotter: ns,
                        key: format!("extract-{i}"),
                        parent: "base".into(),
                        labels,
                    })
                    .await;
                done.fetch_add(1, SeqCst);
                r.map(|_| ())
            }));
        }
        // Wait until the lookups are at the registry (held there for 3 s).
        let t = Instant::now();
        while seen.load(SeqCst) < 16 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "lookups did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut quick = Vec::new();
        for i in 0..64 {
            let mut c = client.clone();
            let (ns, done, late) = (
                ns.clone(),
                prepares_done.clone(),
                quick_after_prepares.clone(),
            );
            quick.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    c.stat(StatSnapshotRequest {
                        snapshotter: ns,
                        key: "base".into(),
                    })
                    .await
                    .unwrap();
                } else {
                    let mut s = c
                        .list(ListSnapshotsRequest {
                            snapshotter: ns,
                            filters: vec![],
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    while s.message().await.unwrap().is_some() {}
                }
                if done.load(SeqCst) > 0 {
                    late.store(true, SeqCst);
                }
            }));
        }
        for q in quick {
            q.await.unwrap();
        }
        assert!(
            !quick_after_prepares.load(SeqCst),
            "a Stat/List waited for a Prepare's network lookup"
        );
        assert_eq!(prepares_done.load(SeqCst), 0, "the lookups were not held");
        for p in prepares {
            p.await.unwrap().unwrap();
        }
    });
    let _ = snap.kill();
    let _ = snap.wait();
    stop_daemon_of(&root.join("run"));
}
