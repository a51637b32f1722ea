//! `lazyblk serve`: a layer over NBD (userspace clients: nbdinfo, nbdcopy, qemu, nbd-client).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use lazyblk_image_format::parse_digest;

use crate::fetch::diskcache::DiskCache;
use crate::fetch::{open_source, BlockSource, EngineOptions, SourceOptions};

/// Options shared by every command that opens a layer source (persisted with an attached device so
/// `lazyblk recover` can reopen it).
#[derive(Debug, Args, Clone, serde::Serialize, serde::Deserialize)]
pub struct SourceArgs {
    /// Trusted index digest (`sha256:...`, the descriptor's `index-digest` annotation).
    #[arg(long)]
    pub index_digest: Option<String>,
    /// Index offset (annotation `index-offset`); with --index-length and --index-digest the index is
    /// fetched with one exact range request.
    #[arg(long, requires_all = ["index_length", "index_digest"])]
    pub index_offset: Option<u64>,
    /// Index length (annotation `index-length`).
    #[arg(long, requires = "index_offset")]
    pub index_length: Option<u64>,
    /// Start of the blob's startup region (annotation `startup-offset`, from `lazyblk trace relayout`):
    /// fetched with the index in one request and served from memory.
    #[arg(long, requires = "index_offset")]
    #[serde(default)]
    pub startup_offset: Option<u64>,
    /// Registry access.
    #[command(flatten)]
    pub registry: super::RegistryArgs,
    /// Persistent chunk cache directory (shared by all layers).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Disk cache bound, MiB.
    #[arg(long, default_value_t = 10240)]
    pub cache_size_mib: u64,
    /// Memory cache of decompressed chunks, MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_cache_mib: u64,
    /// Seconds before a read that cannot be served fails with EIO.
    #[arg(long, default_value_t = 30.0)]
    pub read_deadline: f64,
    /// Parallel range requests per layer.
    #[arg(long, default_value_t = 8)]
    pub parallel_fetches: usize,
    /// Largest readahead window for sequential readers, in chunks (0 disables readahead).
    #[arg(long, default_value_t = 32)]
    pub readahead_chunks: u64,
    /// Fetch the whole layer in the background after start (foreground reads take priority).
    #[arg(long)]
    pub fill: bool,
    /// Background fill rate limit, MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub fill_rate_mib: u64,
    /// A startup trace (`lazyblk trace record`): the chunks it lists for this layer are fetched
    /// ahead of the workload as soon as the layer is open (before any background fill).
    #[arg(long)]
    #[serde(default)]
    pub prefetch_trace: Option<PathBuf>,
}

impl SourceArgs {
    /// Builds the source options.
    pub fn options(&self) -> Result<SourceOptions> {
        let trusted = self
            .index_digest
            .as_deref()
            .map(parse_digest)
            .transpose()
            .context("--index-digest")?;
        let index = match (self.index_offset, self.index_length, trusted) {
            (Some(o), Some(l), Some(d)) => Some((o, l, d)),
            _ => None,
        };
        let disk_cache = match &self.cache_dir {
            Some(d) => Some(Arc::new(
                DiskCache::open(d, self.cache_size_mib << 20)
                    .with_context(|| format!("opening cache {}", d.display()))?,
            )),
            None => None,
        };
        if self.read_deadline.is_nan() || self.read_deadline <= 0.0 {
            bail!("--read-deadline must be positive");
        }
        Ok(SourceOptions {
            registry: self.registry.options(),
            index,
            startup_offset: self.startup_offset,
            trusted_index_digest: trusted,
            engine: EngineOptions {
                mem_cache_bytes: self.mem_cache_mib << 20,
                disk_cache,
                read_deadline: Duration::from_secs_f64(self.read_deadline),
                max_parallel_fetches: self.parallel_fetches,
                readahead_chunks: self.readahead_chunks,
                ..EngineOptions::default()
            },
        })
    }
}

/// Replays `--prefetch-trace` (if given), then, with `--fill`, fetches the whole layer in the
/// background; once it is complete in the disk cache, pins it there for as long as this process
/// serves it.
pub fn spawn_background(
    rt: &tokio::runtime::Handle,
    engine: &crate::fetch::Engine,
    src: &SourceArgs,
) {
    let chunks = src.prefetch_trace.as_deref().and_then(|p| {
        match crate::trace::Trace::read_file(p) {
            Ok(t) => {
                let c = t.chunks_for(&engine.index_digest()).map(<[u64]>::to_vec);
                if c.is_none() {
                    tracing::info!(layer = %engine.name(), trace = %p.display(), "the trace has no entry for this layer");
                }
                c
            }
            Err(e) => {
                tracing::warn!(trace = %p.display(), error = %e, "ignoring the prefetch trace");
                None
            }
        }
    });
    if chunks.is_none() && !src.fill {
        return;
    }
    let e = engine.clone();
    let fill = src.fill;
    let rate = (src.fill_rate_mib > 0).then_some(src.fill_rate_mib << 20);
    rt.spawn(async move {
        if let Some(chunks) = chunks {
            let started = std::time::Instant::now();
            let s = e.replay(&chunks).await;
            tracing::info!(layer = %e.name(), wanted = s.wanted, fetched = s.fetched, skipped = s.skipped, failed = s.failed, ms = started.elapsed().as_millis() as u64, "startup trace replayed");
        }
        if !fill {
            return;
        }
        match e.background_fill(rate).await {
            Ok(()) => {
                if let Some(pin) = e.pin_if_filled() {
                    tracing::info!(layer = %e.name(), pin = %pin.display(), "layer complete in the disk cache; pinned");
                }
            }
            Err(err) => tracing::error!(layer = %e.name(), error = %err, "background fill stopped"),
        }
    });
}

/// Arguments of `lazyblk serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Blob file, http(s) URL, or REGISTRY/REPO@sha256:DIGEST.
    source: String,
    /// `unix:/path.sock` (created 0600) or `tcp:127.0.0.1:PORT`.
    #[arg(long)]
    listen: String,
    /// Allow a TCP listen address that is not loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Export name (the empty name also selects it).
    #[arg(long, default_value = "lazyblk")]
    export_name: String,
    /// Serve Prometheus metrics on this address (`127.0.0.1:9100`).
    #[arg(long)]
    metrics_addr: Option<String>,
    #[command(flatten)]
    src: SourceArgs,
}

/// Runs `lazyblk serve` until killed.
pub fn run(a: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(a))
}

async fn serve(a: ServeArgs) -> Result<()> {
    let opts = a.src.options()?;
    let engine = open_source(&a.source, &opts)
        .await
        .with_context(|| format!("opening {}", crate::fetch::source::shown(&a.source)))?;
    let desc = format!("lazyblk layer {}", engine.name());
    tracing::info!(source = %engine.name(), size = engine.index().image_size(), "layer opened");
    if let Some(addr) = &a.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listen {addr}"))?;
        tokio::spawn(crate::fetch::metrics::serve_metrics(
            l,
            vec![(engine.name().to_string(), engine.metrics())],
        ));
    }
    spawn_background(&tokio::runtime::Handle::current(), &engine, &a.src);
    let source: Arc<dyn BlockSource> = Arc::new(engine);
    let export = a.export_name.clone();
    if let Some(path) = a.listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        remove_stale_socket(&path)?;
        let l = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        println!("{}", a.listen);
        loop {
            let (sock, _) = l.accept().await?;
            let (src, export, desc) = (source.clone(), export.clone(), desc.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::nbd::serve_connection(sock, src, &export, &desc).await {
                    tracing::warn!(error = %e, "NBD connection ended with an error");
                }
            });
        }
    } else if let Some(addr) = a.listen.strip_prefix("tcp:") {
        let sa: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("bad address {addr:?}"))?;
        if !sa.ip().is_loopback() && !a.allow_remote {
            bail!(
                "{addr} is not a loopback address; pass --allow-remote to serve it to the network"
            );
        }
        let l = tokio::net::TcpListener::bind(sa)
            .await
            .with_context(|| format!("binding {addr}"))?;
        println!("tcp:{}", l.local_addr()?);
        loop {
            let (sock, _) = l.accept().await?;
            let _ = sock.set_nodelay(true);
            let (src, export, desc) = (source.clone(), export.clone(), desc.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::nbd::serve_connection(sock, src, &export, &desc).await {
                    tracing::warn!(error = %e, "NBD connection ended with an error");
                }
            });
        }
    } else {
        bail!("--listen must be unix:/path or tcp:HOST:PORT");
    }
}

/// Removes a socket left by a previous run; refuses to remove anything that is not a socket.
fn remove_stale_socket(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}
