//! Hostile registries: answers that stall, trickle, run past what was asked or past any sane size,
//! and clients asking the node to prefetch everything. Each must end in a clear error (or a bounded
//! amount of work), never a hang, a panic or bytes that were not verified. The servers are mocks:
//! a real registry does not misbehave on demand.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::faulty::FaultyServer;
use common::layer::{LayerTar, DEF};
use common::*;
use lazyblk::fetch::{open_source, BlockSource, EngineOptions, SourceOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A loopback server: for each request line, `answer(path)` writes the whole response itself.
fn serve<F, Fut>(answer: F) -> String
where
    F: Fn(String, tokio::net::TcpStream) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let (sock, _) = l.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(sock);
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    answer(path, r.into_inner()).await;
                });
            }
        });
    });
    addr
}

/// `lazyblk convert` from `addr` with a 1 s pacing window; returns stderr (it must fail, and in
/// bounded time: the child is killed after 120 s, which fails the test instead of hanging it).
fn convert_from(addr: &str) -> String {
    let mut child = lazyblk()
        .env("LAZYBLK_BODY_IDLE_SECS", "1")
        .args([
            "convert",
            "--plain-http",
            &format!("{addr}/x/y:t"),
            "127.0.0.1:1/a:b",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert!(
                !status.success(),
                "convert succeeded against a hostile registry"
            );
            assert!(!err.contains("panicked"), "{err}");
            return err;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("convert hung on a hostile registry");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_registry_that_stalls_or_trickles_fails_the_attempt() {
    // Headers never come.
    let stall = serve(|_, mut s| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let _ = s.shutdown().await;
    });
    let err = convert_from(&stall);
    assert!(err.contains("x/y:t"), "{err}");
    // Headers, then a byte every 100 ms of a manifest that claims 10 kB.
    let trickle = serve(|_, mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 10000\r\n\r\n{")
            .await;
        for _ in 0..10_000 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let err = convert_from(&trickle);
    assert!(err.contains("too slow") || err.contains("no data"), "{err}");
}

#[test]
fn a_manifest_without_length_is_bounded() {
    // Chunked encoding, no Content-Length, and no end: 17 MiB of it is refused at 16 MiB.
    let sent = Arc::new(AtomicU64::new(0));
    let s2 = sent.clone();
    let endless = serve(move |_, mut s| {
        let sent = s2.clone();
        async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
            let piece = vec![b' '; 1 << 20];
            for _ in 0..64 {
                let head = format!("{:x}\r\n", piece.len());
                if s.write_all(head.as_bytes()).await.is_err()
                    || s.write_all(&piece).await.is_err()
                    || s.write_all(b"\r\n").await.is_err()
                {
                    return;
                }
                sent.fetch_add(piece.len() as u64, Relaxed);
            }
        }
    });
    let err = convert_from(&endless);
    assert!(err.contains("limit"), "{err}");
}

fn small_layer() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    for i in 0..44 {
        t.file(&format!("r{i}"), DEF, &noise(1 << 20, i + 3));
    }
    let tar = dir.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = dir.path().join("l.blob");
    convert(&tar, &blob);
    std::fs::read(&blob).unwrap()
}

fn opts() -> SourceOptions {
    SourceOptions {
        engine: EngineOptions {
            read_deadline: Duration::from_secs(10),
            retry_base: Duration::from_millis(5),
            retry_max: Duration::from_millis(50),
            ..EngineOptions::default()
        },
        ..SourceOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answer_longer_than_asked_is_never_read_or_served() {
    let b = Arc::new(small_layer());
    // 206 with the asked bytes followed by 1 MiB more than asked.
    let b2 = b.clone();
    let addr = serve(move |_, mut s| {
        let b = b2.clone();
        async move {
            let extra = 1 << 20;
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\r\n",
                        b.len() + extra
                    )
                    .as_bytes(),
                )
                .await;
            let _ = s.write_all(&b).await;
            let _ = s.write_all(&vec![0u8; extra]).await;
        }
    });
    let err = open_source(&format!("http://{addr}/blob"), &opts())
        .await
        .err()
        .expect("a longer range answer must fail");
    assert!(err.message.contains("more than the"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_hints_are_bounded() {
    let blob = small_layer();
    let server = FaultyServer::start(blob).await;
    let e = open_source(&server.url, &opts()).await.unwrap();
    let disk = e.index().image_size();
    assert!(disk > 40 << 20, "the disk must be larger than one hint");
    // A client asks to cache the whole disk, many times over (NBD_CMD_CACHE).
    for _ in 0..50 {
        e.prefetch(0, disk);
    }
    // Wait until the hints are done (fetches stop), then count what was fetched.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now: u64 = server.ranges().iter().map(|r| r.end - r.start).sum();
        if now == last {
            break;
        }
        last = now;
    }
    let index_fetch: u64 = e.index().chunk_count() * 48 + 64;
    assert!(
        last <= (32 << 20) + index_fetch + (1 << 20),
        "{last} bytes fetched for prefetch hints of a {disk}-byte disk"
    );
}

#[test]
fn credentials_in_a_source_url_are_refused_and_never_echoed() {
    let run = tempfile::tempdir().unwrap();
    let out = lazyblk()
        .args(["attach", "--backend", "loop", "--run-dir"])
        .arg(run.path())
        .arg("https://alice:s3cret@127.0.0.1:1/blob")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("credentials in a source URL are refused"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "the password was echoed: {err}");
    assert!(
        !run.path().join("devices").exists()
            || std::fs::read_dir(run.path().join("devices"))
                .unwrap()
                .next()
                .is_none(),
        "state written for a refused source"
    );
}
