//! `lazyblk daemon`: the node daemon (every layer of the node served from this one process).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::attach::DEFAULT_RUN_DIR;
use crate::node::{api, Node, NodeConfig};

/// Arguments of `lazyblk daemon` (each also settable in `--config`; flags win).
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// TOML file with any of: run_dir, cache_dir, cache_size_mib, memory_mib, metrics_addr, workers,
    /// read_deadline_secs, parallel_fetches, readahead_chunks, fill_concurrency,
    /// fill_busy_concurrency, fill_rate_mib, fill_follow_kib, loop_direct_io.
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory: device state, the control socket `daemon.sock` [default: /run/lazyblk].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Chunk cache shared by every layer (none: memory only).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Disk cache bound for the node, MiB [default: 10240].
    #[arg(long)]
    cache_size_mib: Option<u64>,
    /// Memory budget for decoded chunks for the node, MiB (the page cache above each device is the
    /// real cache) [default: 64].
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Prometheus endpoint (`127.0.0.1:9100`); loopback only unless --allow-remote-metrics.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Allow a metrics address that is not loopback.
    #[arg(long)]
    allow_remote_metrics: bool,
    /// Runtime worker threads [default: min(CPUs, 4)].
    #[arg(long)]
    workers: Option<usize>,
    /// Fill batches in flight on the node [default: 4].
    #[arg(long)]
    fill_concurrency: Option<usize>,
    /// Fill batches in flight on the node while a workload's read waits (0 = fills pause until
    /// no demand read runs) [default: 4].
    #[arg(long)]
    fill_busy_concurrency: Option<usize>,
    /// Node-wide background fill bandwidth, MiB/s (0 = unlimited) [default: 0].
    #[arg(long)]
    fill_rate_mib: Option<u64>,
    /// Background fills first take this many KiB of the stored chunks that follow each demand read
    /// on the disk, then go on in blob order (0: blob order only) [default: 0].
    #[arg(long)]
    fill_follow_kib: Option<u64>,
    /// Loop devices (the backend where neither ublk nor NBD exists) read their FUSE export with
    /// direct, asynchronous I/O: several reads in flight and no second page cache (false: buffered,
    /// one read at a time) [default: true].
    #[arg(long)]
    loop_direct_io: Option<bool>,
}

/// The `--config` file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    run_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    cache_size_mib: Option<u64>,
    memory_mib: Option<u64>,
    metrics_addr: Option<String>,
    workers: Option<usize>,
    read_deadline_secs: Option<f64>,
    parallel_fetches: Option<usize>,
    readahead_chunks: Option<u64>,
    fill_concurrency: Option<usize>,
    fill_busy_concurrency: Option<usize>,
    fill_rate_mib: Option<u64>,
    fill_follow_kib: Option<u64>,
    loop_direct_io: Option<bool>,
}

struct Settings {
    node: NodeConfig,
    metrics_addr: Option<String>,
    workers: usize,
}

fn settings(a: DaemonArgs) -> Result<Settings> {
    let c: ConfigFile = super::config_file(a.config.as_deref())?;
    let d = NodeConfig::default();
    let deadline = c
        .read_deadline_secs
        .unwrap_or(d.read_deadline.as_secs_f64());
    if !(deadline > 0.0 && deadline.is_finite()) {
        bail!("read_deadline_secs must be positive");
    }
    let metrics_addr = a.metrics_addr.or(c.metrics_addr);
    if let Some(addr) = &metrics_addr {
        let sa: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("metrics address {addr:?} (want IP:PORT)"))?;
        if !sa.ip().is_loopback() && !a.allow_remote_metrics {
            bail!("metrics address {addr} is not loopback (pass --allow-remote-metrics)");
        }
    }
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    Ok(Settings {
        node: NodeConfig {
            run_dir: a
                .run_dir
                .or(c.run_dir)
                .unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
            cache_dir: a.cache_dir.or(c.cache_dir),
            cache_size_mib: a
                .cache_size_mib
                .or(c.cache_size_mib)
                .unwrap_or(d.cache_size_mib),
            memory_mib: a.memory_mib.or(c.memory_mib).unwrap_or(d.memory_mib),
            read_deadline: Duration::from_secs_f64(deadline),
            parallel_fetches: c.parallel_fetches.unwrap_or(d.parallel_fetches),
            readahead_chunks: c.readahead_chunks.unwrap_or(d.readahead_chunks),
            fill_concurrency: a
                .fill_concurrency
                .or(c.fill_concurrency)
                .unwrap_or(d.fill_concurrency),
            fill_busy_concurrency: a
                .fill_busy_concurrency
                .or(c.fill_busy_concurrency)
                .unwrap_or(d.fill_busy_concurrency),
            fill_rate_mib: a.fill_rate_mib.or(c.fill_rate_mib).unwrap_or(0),
            fill_follow_bytes: a
                .fill_follow_kib
                .or(c.fill_follow_kib)
                .map_or(d.fill_follow_bytes, |k| k.saturating_mul(1024)),
            loop_direct_io: a
                .loop_direct_io
                .or(c.loop_direct_io)
                .unwrap_or(d.loop_direct_io),
        },
        metrics_addr,
        workers: a.workers.or(c.workers).unwrap_or(cpus.min(4)).max(1),
    })
}

/// Holds `RUN_DIR/daemon.lock` for the life of the process: one daemon per run dir.
fn lock(run_dir: &std::path::Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    crate::process::private_dir(run_dir)?;
    let path = run_dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        bail!("another lazyblk daemon holds {}", path.display());
    }
    let me = crate::process::ProcessId::current();
    crate::process::write_atomic(
        &run_dir.join("daemon.pid"),
        format!("{} {}\n", me.pid, me.start).as_bytes(),
    )?;
    Ok(f)
}

/// Runs the daemon until SIGINT/SIGTERM. Devices stay attached when it exits: the next daemon
/// (restart, upgrade) resumes ublk and NBD devices; `lazyblk detach all` first to remove them.
pub fn run(a: DaemonArgs) -> Result<()> {
    let s = settings(a)?;
    let _lock = lock(&s.node.run_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(s.workers)
        .max_blocking_threads(16)
        .thread_name("lazyblk-node")
        .enable_all()
        .build()?;
    let node = Node::new(s.node.clone(), rt.handle().clone())?;
    rt.block_on(node.recover());
    node.spawn_recovery_loop();
    if let Some(addr) = &s.metrics_addr {
        let l = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("metrics listen {addr}"))?;
        rt.spawn(crate::node::metrics::serve(node.clone(), l));
    }
    let run_dir = s.node.run_dir.clone();
    let served = node.list().len();
    let r = rt.block_on(async {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        let server = api::serve(node.clone(), shutdown);
        tracing::info!(run_dir = %run_dir.display(), devices = served, "lazyblk daemon ready");
        eprintln!(
            "lazyblk daemon serving {} ({} devices)",
            api::socket_path(&run_dir).display(),
            served
        );
        super::snapshotter::sd_notify_ready();
        server.await
    });
    // Leave every device to the next daemon: dropping the node would tear them down.
    std::mem::forget(node);
    if let Err(e) = r {
        eprintln!("lazyblk daemon: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_metrics_stay_on_loopback() {
        let c: ConfigFile =
            toml::from_str(include_str!("../../deploy/lazyblk-daemon.toml")).unwrap();
        assert!(c.memory_mib.is_some());
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: DaemonArgs,
        }
        let t = T::parse_from(["t", "--metrics-addr", "0.0.0.0:9100"]);
        assert!(settings(t.a).is_err());
        let t = T::parse_from(["t", "--metrics-addr", "127.0.0.1:9100", "--memory-mib", "8"]);
        let s = settings(t.a).unwrap();
        assert_eq!(s.node.memory_mib, 8);
        assert!(s.workers <= 4);
    }
}
