//! `lazyblk bench device`: read latency and throughput of a block device, bypassing the page cache,
//! so that backends (ublk, NBD, loop) and baselines (a loop device on the raw image) are measured the
//! same way by the same code.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Random 4 KiB reads and sequential reads of a block device or file with O_DIRECT.
    Device(DeviceArgs),
    /// A TCP proxy adding round-trip time and a shared bandwidth cap (no netem here): prints its
    /// address, runs until killed.
    Shape(ShapeArgs),
}

/// Arguments of `lazyblk bench shape`.
#[derive(Debug, Args)]
pub struct ShapeArgs {
    /// Where to connect (`127.0.0.1:5000`).
    upstream: String,
    /// Listen address (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// `loopback`, `region` (2 ms RTT, 1 Gbit/s) or `internet` (30 ms RTT, 200 Mbit/s).
    #[arg(long, default_value = "region")]
    profile: String,
    /// Round-trip time in ms (overrides the profile's).
    #[arg(long)]
    rtt_ms: Option<u64>,
    /// Bandwidth per direction in Mbit/s (overrides the profile's; 0 = unlimited).
    #[arg(long)]
    mbit: Option<u64>,
}

fn shape(a: ShapeArgs) -> Result<()> {
    let mut p = crate::shape::Profile::named(&a.profile)
        .ok_or_else(|| anyhow::anyhow!("unknown profile {:?}", a.profile))?;
    if let Some(ms) = a.rtt_ms {
        p.rtt = std::time::Duration::from_millis(ms);
    }
    if let Some(m) = a.mbit {
        p.bits_per_sec = m * 1_000_000;
    }
    let listen: std::net::SocketAddr = a.listen.parse()?;
    if !listen.ip().is_loopback() {
        anyhow::bail!("the shaper listens on loopback only");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let s = crate::shape::start(&a.listen, a.upstream.clone(), p).await?;
        println!("{}", s.addr);
        use std::io::Write;
        std::io::stdout().flush()?;
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

/// Arguments of `lazyblk bench device`.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Block device (or file) to read.
    path: PathBuf,
    /// Random reads to time (QD1, 4 KiB, aligned, seeded so runs read the same blocks).
    #[arg(long, default_value_t = 2000)]
    random: usize,
    /// Random-read block size in bytes.
    #[arg(long, default_value_t = 4096)]
    block: usize,
    /// Sequential pass size in MiB (0 = the whole device).
    #[arg(long, default_value_t = 0)]
    seq_mib: u64,
    /// Sequential request size in KiB.
    #[arg(long, default_value_t = 1024)]
    seq_kib: usize,
    /// Do the sequential pass first (e.g. to measure cold throughput, then warm random reads).
    #[arg(long)]
    seq_first: bool,
    /// Seed for the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Label printed with the results.
    #[arg(long, default_value = "")]
    label: String,
}

/// Runs a benchmark subcommand.
pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Device(a) => device(a),
        BenchCommand::Shape(a) => shape(a),
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        Aligned { ptr, layout }
    }
    fn slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: `ptr` is valid for `layout.size()` bytes and exclusively borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn device_size(f: &std::fs::File) -> Result<u64> {
    use std::io::Seek;
    let mut f = f;
    Ok(f.seek(std::io::SeekFrom::End(0))?)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn device(a: DeviceArgs) -> Result<()> {
    if a.block == 0 || !a.block.is_multiple_of(512) || a.seq_kib == 0 {
        bail!("--block must be a non-zero multiple of 512 and --seq-kib non-zero");
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.path)
        .with_context(|| format!("opening {} with O_DIRECT", a.path.display()))?;
    let size = device_size(&f)?;
    let blocks = size / a.block as u64;
    if blocks == 0 {
        bail!("{} is smaller than one block", a.path.display());
    }
    let seq_len = if a.seq_mib == 0 {
        size
    } else {
        (a.seq_mib << 20).min(size)
    };
    let mut buf = Aligned::new(a.block.max(a.seq_kib << 10));
    let random = |buf: &mut Aligned| -> Result<Vec<Duration>> {
        let mut x = a.seed.max(1);
        let mut lat = Vec::with_capacity(a.random);
        for _ in 0..a.random {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % blocks) * a.block as u64;
            let t = Instant::now();
            f.read_exact_at(buf.slice(a.block), off)
                .with_context(|| format!("reading {} bytes at {off}", a.block))?;
            lat.push(t.elapsed());
        }
        lat.sort();
        Ok(lat)
    };
    let sequential = |buf: &mut Aligned| -> Result<f64> {
        let req = a.seq_kib << 10;
        let t = Instant::now();
        let mut off = 0u64;
        while off < seq_len {
            let n = req.min((seq_len - off) as usize);
            // O_DIRECT needs whole sectors; the device size is a multiple of 512.
            let n = n.div_ceil(512) * 512;
            f.read_exact_at(buf.slice(n), off)
                .with_context(|| format!("reading {n} bytes at {off}"))?;
            off += n as u64;
        }
        Ok(seq_len as f64 / 1e6 / t.elapsed().as_secs_f64())
    };
    let (lat, mbps) = if a.seq_first {
        let m = sequential(&mut buf)?;
        (random(&mut buf)?, m)
    } else {
        let l = random(&mut buf)?;
        (l, sequential(&mut buf)?)
    };
    let mean = lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / lat.len().max(1) as f64 * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "label": a.label,
            "path": a.path,
            "size": size,
            "random_reads": lat.len(),
            "block": a.block,
            "lat_ms_p50": percentile(&lat, 0.5),
            "lat_ms_p99": percentile(&lat, 0.99),
            "lat_ms_mean": mean,
            "seq_bytes": seq_len,
            "seq_mb_s": mbps,
            "seq_first": a.seq_first,
        })
    );
    Ok(())
}
