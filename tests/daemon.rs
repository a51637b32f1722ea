//! The node daemon on the host kernel (loop backend): one process serves twenty layers; its one
//! Prometheus endpoint passes `promtool check metrics`; attaches are idempotent; a busy mount is
//! never detached; a failed read is an event, a metric and a line in `lazyblk ls`; after `kill -9`
//! loop devices are reported dead (they die with their server) and `detach all` removes them; a pid
//! reused by another process does not count as a device's server.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::layer::{LayerTar, DEF, DIR};
use common::*;

fn usable() -> bool {
    if !privileged() {
        return false;
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        assert!(may_skip(), "CI needs /dev/fuse and /dev/loop-control");
        eprintln!("SKIPPED: no /dev/fuse or /dev/loop-control");
        return false;
    }
    true
}

/// A layer with `id` (its number) and `data/big` (3 MiB of noise); returns (blob, big's bytes).
fn make_layer(dir: &Path, i: usize) -> (PathBuf, Vec<u8>) {
    let mut t = LayerTar::new();
    t.dir("data", DIR);
    t.file("id", DEF, format!("layer {i}\n").as_bytes());
    let big = noise(3 << 20, i as u32 + 1);
    t.file("data/big", DEF, &big);
    let tar = dir.join(format!("l{i}.tar"));
    std::fs::write(&tar, t.finish()).unwrap();
    let blob = dir.join(format!("l{i}.blob"));
    convert(&tar, &blob);
    (blob, big)
}

fn attach(run: &Path, blob: &Path, mnt: &Path, extra: &[&str]) -> String {
    let out = run_ok(
        lazyblk()
            .args(["attach", "--backend", "loop", "--mount"])
            .arg(mnt)
            .arg("--run-dir")
            .arg(run)
            .args(extra)
            .arg(blob),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn ls(run: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(lazyblk().args(["ls", "--json", "--run-dir"]).arg(run));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let (head, body) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_string()
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(p.to_str().unwrap())
}

#[test]
fn one_daemon_serves_twenty_layers() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let metrics = free_addr();
    let mut daemon = NodeDaemon::start(
        &run,
        &[
            "--cache-dir",
            tmp.path().join("cache").to_str().unwrap(),
            "--memory-mib",
            "16",
            "--metrics-addr",
            &metrics,
        ],
    );
    let daemon_pid = daemon.child.id();
    let mut layers = Vec::new();
    for i in 0..20 {
        let (blob, big) = make_layer(tmp.path(), i);
        let mnt = tmp.path().join(format!("m{i}"));
        let dev = attach(&run, &blob, &mnt, &[]);
        assert!(dev.starts_with("/dev/loop"), "attach printed {dev:?}");
        layers.push((blob, big, mnt, dev));
    }
    for (i, (_, big, mnt, _)) in layers.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(mnt.join("id")).unwrap(),
            format!("layer {i}\n")
        );
        assert!(
            std::fs::read(mnt.join("data/big")).unwrap() == *big,
            "layer {i}: data/big differs"
        );
    }
    // Every device is served by the daemon: one process, whatever the number of layers.
    let v = ls(&run);
    assert_eq!(v.len(), 20);
    for l in &v {
        assert_eq!(l["state"], "serving", "{l}");
        assert_eq!(l["pid"], daemon_pid, "{l}");
        assert_eq!(l["depends_on_registry"], false, "local blobs: {l}");
    }
    // The same layer at the same place again is the same device (single flight, idempotent).
    let (blob0, _, mnt0, dev0) = &layers[0];
    assert_eq!(&attach(&run, blob0, mnt0, &[]), dev0);
    assert_eq!(ls(&run).len(), 20);

    // One endpoint, one series per layer, valid exposition.
    let text = scrape(&metrics);
    for (_, _, _, dev) in &layers {
        assert!(
            text.contains(&format!("device=\"{dev}\"")),
            "no series for {dev}"
        );
    }
    assert_eq!(
        text.matches("# TYPE lazyblk_reads_total counter").count(),
        1
    );
    assert!(text.contains("lazyblk_node_layers 20"), "{text}");
    let budget = text
        .lines()
        .find_map(|l| l.strip_prefix("lazyblk_node_memory_cache_bytes "))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap();
    assert!(
        budget <= 16 << 20,
        "memory cache {budget} over the 16 MiB budget"
    );
    promtool_check(&text);

    // A busy mount is never detached: the device stays and keeps serving.
    let held = std::fs::File::open(mnt0.join("data/big")).unwrap();
    let out = lazyblk()
        .args(["detach", dev0, "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(!out.status.success(), "detach of a busy mount succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("busy"), "{err}");
    assert!(mounted(mnt0));
    assert_eq!(
        std::fs::read_to_string(mnt0.join("id")).unwrap(),
        "layer 0\n"
    );
    drop(held);
    run_ok(lazyblk().args(["detach", dev0, "--run-dir"]).arg(&run));
    assert!(!mounted(mnt0));
    assert_eq!(ls(&run).len(), 19);

    // kill -9: loop devices die with their server; a new daemon says so, and detach removes them.
    daemon.kill9();
    let daemon = NodeDaemon::start(&run, &[]);
    let v = ls(&run);
    assert_eq!(v.len(), 19);
    for l in &v {
        assert_eq!(l["state"], "dead", "{l}");
        assert!(
            l["reason"].as_str().unwrap().contains("loop device dies"),
            "{l}"
        );
    }
    run_ok(lazyblk().args(["detach", "all", "--run-dir"]).arg(&run));
    assert!(ls(&run).is_empty());
    for (_, _, mnt, _) in &layers {
        assert!(!mounted(mnt), "{} still mounted", mnt.display());
    }
    drop(daemon);
    assert!(!mounted(&run), "FUSE exports left mounted");
}

/// `promtool check metrics` (Debian's prometheus package) on the exposition; CI must have it.
fn promtool_check(text: &str) {
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(may_skip(), "CI needs promtool");
        eprintln!("SKIPPED promtool check: no promtool");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failed_read_is_an_event_a_metric_and_a_line_in_ls() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let _daemon = NodeDaemon::start(&run, &[]);
    let (blob, _) = make_layer(tmp.path(), 7);
    let mnt = tmp.path().join("m");
    let dev = attach(&run, &blob, &mnt, &["--read-deadline", "1"]);
    // Damage the last data chunk of the blob (inside data/big, which nothing has read yet).
    let info = run_ok(lazyblk().args(["layer", "inspect", "--json"]).arg(&blob));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let at = info["index_offset"].as_u64().unwrap() / 2;
    let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 64], at).unwrap();
    drop(f);
    let err = std::fs::read(mnt.join("data/big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let v = ls(&run);
    assert!(v[0]["read_errors"].as_u64().unwrap() > 0, "{}", v[0]);
    let last = v[0]["last_error"].as_str().unwrap();
    assert!(last.contains("chunk"), "{last}");
    let out = run_ok(lazyblk().args(["events", "--json", "--run-dir"]).arg(&run));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let e = events
        .iter()
        .find(|e| e["kind"] == "read_error")
        .expect("a read_error event");
    assert_eq!(e["device"], dev.as_str());
    assert!(e["message"].as_str().unwrap().contains("chunk"), "{e}");
    assert!(events.iter().any(|e| e["kind"] == "attached"));
}

#[test]
fn a_reused_pid_does_not_count_as_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let devices = run.join("devices");
    std::fs::create_dir_all(&devices).unwrap();
    // Our own pid is alive; with another start time it is what a reused pid looks like.
    let me = std::process::id();
    let stat = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
    let start: u64 = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let state = |start: u64| {
        serde_json::json!({"device": "/dev/nbd42", "backend": "nbd", "source": "x.blob",
            "size": 4096, "pid": me, "pid_start": start, "mount": null, "source_args": null})
    };
    std::fs::write(devices.join("nbd42.json"), state(start + 1).to_string()).unwrap();
    assert_eq!(ls(&run)[0]["state"], "dead");
    std::fs::write(devices.join("nbd42.json"), state(start).to_string()).unwrap();
    assert_eq!(ls(&run)[0]["state"], "serving");
}

/// Load: 16 layers served by one daemon with a 16 MiB memory budget, 64 concurrent random readers on
/// each block device (O_DIRECT, so every read reaches the daemon) for 60 s: zero errors, every byte
/// equal to the exported image, the daemon's RSS within its budget plus a fixed allowance.
#[test]
fn sixteen_layers_under_sixty_four_readers_each() {
    if !usable() {
        return;
    }
    let secs: u64 = std::env::var("LAZYBLK_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let daemon = NodeDaemon::start(&run, &["--memory-mib", "16"]);
    let mut devices = Vec::new();
    for i in 0..16 {
        let mut t = LayerTar::new();
        t.file("data", DEF, &noise(8 << 20, 1000 + i as u32));
        let tar = tmp.path().join(format!("load{i}.tar"));
        std::fs::write(&tar, t.finish()).unwrap();
        let blob = tmp.path().join(format!("load{i}.blob"));
        convert(&tar, &blob);
        let img = tmp.path().join(format!("load{i}.img"));
        run_ok(
            lazyblk()
                .args(["layer", "export"])
                .arg(&blob)
                .arg("-o")
                .arg(&img),
        );
        let out = run_ok(
            lazyblk()
                .args(["attach", "--backend", "loop", "--run-dir"])
                .arg(&run)
                .arg(&blob),
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        devices.push((dev, Arc::new(std::fs::read(&img).unwrap())));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut threads = Vec::new();
    for (d, (dev, image)) in devices.iter().enumerate() {
        for r in 0..64u64 {
            let (dev, image, reads) = (dev.clone(), image.clone(), reads.clone());
            threads.push(std::thread::spawn(move || -> Result<(), String> {
                use std::os::unix::fs::{FileExt, OpenOptionsExt};
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&dev)
                    .map_err(|e| format!("{dev}: {e}"))?;
                let mut raw = vec![0u8; (256 << 10) + 4096];
                let align = raw.as_ptr().align_offset(4096);
                let buf = &mut raw[align..align + (256 << 10)];
                let blocks = image.len() as u64 / 4096;
                let mut x = (d as u64 * 64 + r + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                while std::time::Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len_blocks = 1 + (x >> 40) % 64;
                    let start = (x % blocks).min(blocks - len_blocks);
                    let (off, len) = (start * 4096, (len_blocks * 4096) as usize);
                    f.read_exact_at(&mut buf[..len], off)
                        .map_err(|e| format!("{dev} at {off}+{len}: {e}"))?;
                    if buf[..len] != image[off as usize..off as usize + len] {
                        return Err(format!("{dev}: wrong bytes at {off}+{len}"));
                    }
                    reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }));
        }
    }
    let errors: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    assert!(
        errors.is_empty(),
        "{} readers failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let n = reads.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n > 16 * 64, "only {n} reads");
    let rss_kib = proc_status_kib(daemon.child.id(), "VmRSS");
    eprintln!(
        "{n} reads in {secs} s by 1024 readers on 16 layers; daemon RSS {} MiB",
        rss_kib >> 10
    );
    // The budget for decoded chunks is 16 MiB; the rest is the runtime, 16 FUSE sessions, in-flight
    // request buffers and the allocator's slack (measured: 32 MiB in all after 20 s).
    assert!(
        rss_kib >> 10 <= 16 + 112,
        "daemon RSS {} MiB",
        rss_kib >> 10
    );
    let v = ls(&run);
    assert!(v.iter().all(|l| l["read_errors"] == 0), "{v:?}");
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`...).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

/// A hostile image: a 4 GiB file of one repeated byte (each 256 KiB chunk stores as a few dozen
/// bytes), attached with background fill. Batches are bounded by decoded bytes, not stored bytes,
/// so the daemon's peak memory stays near its budget instead of holding gigabytes decoded.
#[test]
fn a_layer_of_one_repeated_byte_fills_within_the_memory_budget() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let blob = tmp.path().join("a.blob");
    let size: u64 = 4 << 30;
    let gen = r#"
import sys, tarfile, io
size = int(sys.argv[1])
class A(io.RawIOBase):
    def __init__(s): s.left = size
    def readable(s): return True
    def readinto(s, b):
        n = min(len(b), s.left)
        b[:n] = b'A' * n
        s.left -= n
        return n
t = tarfile.open(fileobj=sys.stdout.buffer, mode='w|', format=tarfile.PAX_FORMAT)
ti = tarfile.TarInfo('a'); ti.size = size; ti.mode = 0o644; ti.mtime = 1600000000
t.addfile(ti, io.BufferedReader(A(), 1 << 20))
t.close()
"#;
    let mut py = Command::new("python3")
        .args(["-c", gen, &size.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    run_ok(
        lazyblk()
            .args(["layer", "convert", "-", "-o"])
            .arg(&blob)
            .stdin(py.stdout.take().unwrap()),
    );
    assert!(py.wait().unwrap().success());
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let cache = tmp.path().join("cache");
    let mut d = NodeDaemon::start(
        &run,
        &["--memory-mib", "64", "--cache-dir", cache.to_str().unwrap()],
    );
    let mnt = tmp.path().join("mnt");
    attach(&run, &blob, &mnt, &["--fill"]);
    let t = std::time::Instant::now();
    loop {
        let l = ls(&run);
        if l[0]["fill"].as_f64().unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "fill did not finish: {l:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The file reads back (its last bytes, after the fill put every chunk in the cache).
    let f = std::fs::File::open(mnt.join("a")).unwrap();
    let mut tail = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut tail, size - 4096).unwrap();
    assert!(tail.iter().all(|&b| b == b'A'));
    drop(f);
    let peak = proc_status_kib(d.child.id(), "VmHWM") * 1024;
    eprintln!(
        "daemon peak RSS after filling 4 GiB of one byte: {} MiB",
        peak >> 20
    );
    assert!(
        peak < 400 << 20,
        "daemon peak RSS {} MiB for a 64 MiB memory budget",
        peak >> 20
    );
    run_ok(lazyblk().args(["detach", "all", "--run-dir"]).arg(&run));
    d.kill9();
}
