//! The fetch engine: plan → single-flight → coalesced range fetch → verify → decompress → cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lazyblk_image_format::{
    decode_chunk, sha256, verify_chunk, ChunkKind, Digest, Footer, Index, IndexLimits, PlanOptions,
    RangeFetch, FOOTER_LEN,
};
use tokio::sync::{watch, Semaphore};

use super::access::AccessLog;
pub use super::access::ChunkAccess;
use super::diskcache::DiskCache;
use super::fill::{FillGate, LayerActivity};
use super::fill_order::{BatchLimit, FillOrder};
use super::memcache::MemCache;
use super::metrics::Metrics;
use super::readahead::Readahead;
use super::remote::{FetchError, RangeReader};
pub use super::retry::with_retries;
use super::{BlockSource, BoxFuture, ReadError};

/// Tuning of an engine.
#[derive(Clone)]
pub struct EngineOptions {
    /// Memory cache of decompressed chunks, in bytes (when `memory` is not given).
    pub mem_cache_bytes: u64,
    /// A memory cache shared with other layers (the node daemon's budget); else each engine has its
    /// own of `mem_cache_bytes`.
    pub memory: Option<Arc<MemCache>>,
    /// Node-wide persistent cache of stored chunks.
    pub disk_cache: Option<Arc<DiskCache>>,
    /// A read that cannot be served within this time fails with EIO.
    pub read_deadline: Duration,
    /// Range requests in flight at once, per layer.
    pub max_parallel_fetches: usize,
    /// Coalescing of neighbouring chunks into one request.
    pub plan: PlanOptions,
    /// Largest readahead window, in chunks. A read that starts where the previous one ended (a
    /// sequential reader, whatever its request size or connection) keeps a window of chunks requested
    /// ahead that starts at 8 chunks and doubles up to this; other reads fetch only what they ask.
    pub readahead_chunks: u64,
    /// The node's fill scheduler (shared limits, demand reads first); else fills run unscheduled.
    pub fill_gate: Option<Arc<FillGate>>,
    /// Stored bytes after each demand read that the background fill takes first ([`FillOrder`]);
    /// 0: blob order only (the default: measured no better, docs/benchmarks.md).
    pub fill_follow_bytes: u64,
    /// Called for every read that fails (the node daemon turns it into an event).
    pub on_read_error: Option<ReadErrorHook>,
    /// First retry delay (doubles each attempt, with jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Where the index's external chunks come from (an original-image index); an index with
    /// external chunks and no source fails those reads.
    pub external: Option<Arc<dyn super::external::ExternalData>>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            mem_cache_bytes: 256 << 20,
            memory: None,
            disk_cache: None,
            read_deadline: Duration::from_secs(30),
            max_parallel_fetches: 8,
            plan: PlanOptions::default(),
            readahead_chunks: 32,
            fill_gate: None,
            fill_follow_bytes: 0,
            on_read_error: None,
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            external: None,
        }
    }
}

/// What [`Engine::fetch_checked`] does with a fetched range: the engine, the range's chunks, and a
/// function cutting one chunk's stored bytes out of the answer.
type RangeCheck<T> = fn(&Engine, &[u64], &dyn Fn(u64) -> Bytes) -> Result<T, FetchError>;

/// A callback for failed reads: layer name, the error.
pub type ReadErrorHook = Arc<dyn Fn(&str, &ReadError) + Send + Sync>;

/// Where the index is and which digest to trust for it.
#[derive(Debug, Clone)]
pub enum IndexLocation {
    /// From the OCI descriptor annotations: one exact range request, checked against the annotation.
    Known {
        /// Offset in the blob.
        offset: u64,
        /// Length.
        length: u64,
        /// Trusted SHA-256.
        digest: Digest,
        /// Start of the blob's startup region (annotation `startup-offset`), if it has one: the region
        /// `[startup_offset, offset)` is fetched in the same request as the index and its chunks are
        /// served from it (each verified against the index first). Ignored unless it lies before the
        /// index and within [`MAX_STARTUP_REGION`] of it.
        startup_offset: Option<u64>,
    },
    /// Only the blob: read the footer with one suffix request. `trusted` (e.g. `--index-digest`) is
    /// checked if given, else the footer's own digest (detects corruption, not substitution).
    Footer {
        /// Trusted index digest, if known.
        trusted: Option<Digest>,
    },
}

type ChunkResult = Option<Result<Bytes, String>>;

/// A chunk being fetched: where its result will appear, and the lane of the fetch.
struct InFlight {
    rx: watch::Receiver<ChunkResult>,
    lane: super::lane::Lane,
}

impl InFlight {
    /// A fetch by the running task (on its lane).
    fn new(rx: watch::Receiver<ChunkResult>) -> InFlight {
        InFlight {
            rx,
            lane: super::lane::current(),
        }
    }
}

/// Largest startup region fetched together with the index, in bytes.
pub const MAX_STARTUP_REGION: u64 = 64 << 20;

/// Most decoded bytes served from a startup region (its first chunks; the rest are fetched when
/// read). The stored bound above does not bound this: chunks of repeated bytes compress to tens of
/// bytes, so a hostile region could otherwise decode to the whole disk.
pub const MAX_STARTUP_DECODED: u64 = 64 << 20;

/// Decoded bytes of a startup region held at once while it is verified, decoded and cached.
const SEED_BATCH_DECODED: u64 = 8 << 20;

/// A trace replay fetches this many stored bytes per window.
const REPLAY_WINDOW_BYTES: u64 = 4 << 20;
/// Most decoded bytes one fill batch or replay window holds (whatever they compress to).
pub const MAX_BATCH_DECODED: u64 = 16 << 20;
/// Stored bytes a fill batch asks for.
const FILL_BATCH_BYTES: u64 = 4 << 20;
/// Fill batches of one layer in flight at once (the node's fill gate bounds all layers together).
const FILL_DEPTH: usize = 2;

/// What a trace replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Chunks in the trace that are stored (not zero, in range, not repeated).
    pub wanted: u64,
    /// Chunks fetched (from the registry or the disk cache) by the replay.
    pub fetched: u64,
    /// Chunks already in memory or being fetched by a reader.
    pub skipped: u64,
    /// Chunks whose fetch failed (readers will retry them on demand).
    pub failed: u64,
}

/// A layer's virtual disk, served lazily from a [`RangeReader`].
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Largest prefetch hint served (bytes of disk).
pub const MAX_HINT_BYTES: u64 = 32 << 20;
/// Prefetch hints of one layer running at once.
pub const MAX_HINT_PREFETCHES: usize = 4;

struct Inner {
    name: String,
    remote: Arc<dyn RangeReader>,
    index: Index,
    index_digest: String,
    opts: EngineOptions,
    mem: Arc<MemCache>,
    /// This layer's keys in `mem`.
    mem_id: u64,
    inflight: Mutex<HashMap<u64, InFlight>>,
    fetch_slots: Semaphore,
    foreground: AtomicUsize,
    /// Background disk-cache write tasks running now.
    disk_writes: AtomicUsize,
    /// Client prefetch hints (NBD_CMD_CACHE) running now; at most [`MAX_HINT_PREFETCHES`].
    hints: Arc<AtomicUsize>,
    readahead: Readahead,
    /// The disk chunk after the latest demand read, for the fill to take next (`u64::MAX`: none).
    follow_hint: AtomicU64,
    /// When this layer was last read on demand (for the node's fill gate).
    activity: LayerActivity,
    cached: Mutex<Vec<bool>>,
    /// Decoded chunks whose disk-cache write is scheduled and not done: a reader is served from here
    /// instead of fetching them again (a fill's chunks are neither in memory nor in flight nor on
    /// disk then). Every entry is removed when its write ends, written or failed, so this holds at
    /// most the fetches whose writes are queued. Lock order: `writing`, then `cached`.
    writing: Mutex<HashMap<u64, Bytes>>,
    access: Mutex<AccessLog>,
    zeros: Bytes,
    metrics: Arc<Metrics>,
    /// The runtime the engine was made on, for readahead started outside it (ublk queue threads).
    rt: Option<tokio::runtime::Handle>,
}

impl Engine {
    /// Opens a layer: fetches and verifies its index.
    pub async fn open(
        remote: Arc<dyn RangeReader>,
        location: IndexLocation,
        opts: EngineOptions,
    ) -> Result<Engine, FetchError> {
        let metrics = Arc::new(Metrics::default());
        let deadline = Instant::now() + opts.read_deadline;
        let limits = IndexLimits::default();
        let mut startup = None;
        let bad = |e: lazyblk_image_format::FormatError| {
            FetchError::permanent("format", format!("{}: {e}", remote.describe()))
        };
        let index = match location {
            IndexLocation::Known {
                offset,
                length,
                digest,
                startup_offset,
            } => {
                if length > limits.max_index_len {
                    return Err(bad(lazyblk_image_format::FormatError::IndexTooLarge {
                        len: length,
                        limit: limits.max_index_len,
                    }));
                }
                let end = offset
                    .checked_add(length)
                    .ok_or_else(|| FetchError::permanent("format", "index range overflows"))?;
                let from = match startup_offset {
                    Some(s) if s < offset && offset - s <= MAX_STARTUP_REGION => s,
                    Some(s) if s != offset => {
                        tracing::warn!(source = %remote.describe(), startup_offset = s, index_offset = offset, "ignoring a startup region that is not just before the index or is over {MAX_STARTUP_REGION} bytes");
                        offset
                    }
                    _ => offset,
                };
                let bytes =
                    with_retries(&opts, &metrics, deadline, || remote.read_range(from..end))
                        .await?;
                metrics.fetches.fetch_add(1, Relaxed);
                metrics.fetched_bytes.fetch_add(bytes.len() as u64, Relaxed);
                let split = (offset - from) as usize;
                let idx = Index::parse_verified(&bytes[split..], &digest, limits).map_err(bad)?;
                idx.check_data_end(offset).map_err(bad)?;
                if split > 0 {
                    startup = Some((from, bytes.slice(..split)));
                }
                idx
            }
            IndexLocation::Footer { trusted } => {
                let size = with_retries(&opts, &metrics, deadline, || remote.size()).await?;
                if size < FOOTER_LEN as u64 {
                    return Err(FetchError::permanent(
                        "format",
                        format!(
                            "{}: {size} bytes is too small for a blob",
                            remote.describe()
                        ),
                    ));
                }
                // One suffix request that usually holds the index too.
                let tail_len = size.min(256 << 10);
                let tail = with_retries(&opts, &metrics, deadline, || {
                    remote.read_range(size - tail_len..size)
                })
                .await?;
                metrics.fetches.fetch_add(1, Relaxed);
                metrics.fetched_bytes.fetch_add(tail.len() as u64, Relaxed);
                let footer =
                    Footer::parse(&tail[tail.len() - FOOTER_LEN..], Some(size)).map_err(bad)?;
                if footer.index_length > limits.max_index_len {
                    return Err(bad(lazyblk_image_format::FormatError::IndexTooLarge {
                        len: footer.index_length,
                        limit: limits.max_index_len,
                    }));
                }
                let ib = if footer.index_offset >= size - tail_len {
                    let at = (footer.index_offset - (size - tail_len)) as usize;
                    tail.slice(at..at + footer.index_length as usize)
                } else {
                    let r = footer.index_offset..footer.index_offset + footer.index_length;
                    metrics.fetches.fetch_add(1, Relaxed);
                    with_retries(&opts, &metrics, deadline, || remote.read_range(r.clone())).await?
                };
                if trusted.is_none() {
                    tracing::warn!(source = %remote.describe(), "index checked against the blob's own footer only; pass the descriptor's index digest to chain it to a manifest");
                }
                let idx = Index::parse_verified(
                    &ib,
                    trusted.as_ref().unwrap_or(&footer.index_digest),
                    limits,
                )
                .map_err(bad)?;
                idx.check_data_end(footer.index_offset).map_err(bad)?;
                idx
            }
        };
        let engine = Engine::from_index(remote, index, opts, metrics);
        if let Some((from, bytes)) = startup {
            engine.seed(from, bytes);
        }
        Ok(engine)
    }

    /// An engine over an already verified index.
    pub fn from_index(
        remote: Arc<dyn RangeReader>,
        index: Index,
        opts: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let chunk_count = index.chunk_count();
        let chunk = index.chunk_size();
        let stored = index
            .entries()
            .iter()
            .filter(|e| e.kind != ChunkKind::Zero)
            .count() as u64;
        metrics.fill_total.store(stored, Relaxed);
        let mut cached = vec![false; index.chunk_count() as usize];
        if let Some(dc) = &opts.disk_cache {
            for (i, e) in index.entries().iter().enumerate() {
                if e.kind != ChunkKind::Zero && dc.contains(&e.digest) {
                    cached[i] = true;
                    metrics.fill_done.fetch_add(1, Relaxed);
                }
            }
        }
        if let Some(g) = &opts.fill_gate {
            g.attached();
        }
        Engine {
            inner: Arc::new(Inner {
                name: remote.describe(),
                remote,
                zeros: Bytes::from(vec![0u8; chunk as usize]),
                access: Mutex::new(AccessLog::new(index.chunk_count() as usize)),
                index_digest: lazyblk_image_format::digest_string(&sha256(&index.to_bytes())),
                index,
                mem: opts
                    .memory
                    .clone()
                    .unwrap_or_else(|| MemCache::new(opts.mem_cache_bytes.max(4 * chunk))),
                mem_id: MemCache::new_layer_id(),
                inflight: Mutex::new(HashMap::new()),
                fetch_slots: Semaphore::new(opts.max_parallel_fetches.max(1)),
                foreground: AtomicUsize::new(0),
                hints: Arc::new(AtomicUsize::new(0)),
                disk_writes: AtomicUsize::new(0),
                readahead: Readahead::new(opts.readahead_chunks, chunk_count),
                follow_hint: AtomicU64::new(u64::MAX),
                activity: LayerActivity::default(),
                cached: Mutex::new(cached),
                writing: Mutex::new(HashMap::new()),
                opts,
                metrics,
                rt: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Once every stored chunk is in the disk cache (after a complete background fill), pins them
    /// there for the life of this process: a layer in use stays readable without the registry, whatever
    /// other layers push through the shared cache. Returns the pin file, if pinned.
    pub fn pin_if_filled(&self) -> Option<std::path::PathBuf> {
        let dc = self.inner.opts.disk_cache.as_ref()?;
        let idx = &self.inner.index;
        let digests: Vec<_> = (0..idx.chunk_count())
            .map(|c| idx.entry(c))
            .filter(|e| e.kind != ChunkKind::Zero)
            .map(|e| e.digest)
            .collect();
        if !digests.iter().all(|d| dc.contains(d)) {
            return None;
        }
        match dc.pin(&self.inner.name, digests.into_iter()) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(layer = %self.inner.name, error = %e, "cannot pin the layer's chunks");
                None
            }
        }
    }

    /// The workload's first read of each chunk so far, in order, and when the engine was opened (ms
    /// since the Unix epoch).
    pub fn accesses(&self) -> (u64, Vec<ChunkAccess>) {
        let log = self.inner.access.lock().expect("access lock");
        (log.opened_ms, log.order.clone())
    }

    /// Replays a startup trace: fetches `chunks` (first-read order) ahead of the workload, a window of
    /// a few MiB at a time in trace order with two windows in flight, each window coalesced into as few
    /// range requests as the plan allows. Chunks out of range, zero, repeated, in memory or already
    /// being fetched are skipped; everything fetched is verified as usual and lands in the memory cache
    /// (up to half of it) and the disk cache. Failures are counted, not fatal: readers fetch on demand.
    pub async fn replay(&self, chunks: &[u64]) -> ReplayStats {
        use futures::StreamExt;
        let inner = &self.inner;
        let idx = &inner.index;
        let mut stats = ReplayStats::default();
        let mut seen = vec![false; idx.chunk_count() as usize];
        let mut windows: Vec<Vec<u64>> = vec![Vec::new()];
        let mut window_bytes = 0u64;
        let mut window_decoded = 0u64;
        let mut memory_budget = inner.mem.capacity() / 2;
        let mut to_memory = Vec::new();
        for &c in chunks {
            if c >= idx.chunk_count() || seen[c as usize] || idx.entry(c).kind == ChunkKind::Zero {
                continue;
            }
            seen[c as usize] = true;
            stats.wanted += 1;
            let stored = idx.entry(c).stored_len as u64;
            let len = idx.chunk_len(c) as u64;
            if window_bytes > 0
                && (window_bytes + stored > REPLAY_WINDOW_BYTES
                    || window_decoded + len > MAX_BATCH_DECODED)
            {
                windows.push(Vec::new());
                window_bytes = 0;
                window_decoded = 0;
            }
            window_bytes += stored;
            window_decoded += len;
            windows.last_mut().expect("one window").push(c);
            if memory_budget >= len {
                memory_budget -= len;
                to_memory.push(true);
            } else {
                to_memory.push(false);
            }
        }
        let mut flags = to_memory.into_iter();
        let jobs: Vec<_> = windows
            .into_iter()
            .filter(|w| !w.is_empty())
            .map(|w| {
                let mem: Vec<bool> = flags.by_ref().take(w.len()).collect();
                (w, mem.iter().all(|&m| m))
            })
            .collect();
        let results: Vec<ReplayStats> = futures::stream::iter(jobs)
            .map(|(w, mem)| self.replay_window(w, mem))
            .buffered(2)
            .collect()
            .await;
        for r in results {
            stats.fetched += r.fetched;
            stats.skipped += r.skipped;
            stats.failed += r.failed;
        }
        inner
            .metrics
            .trace_prefetched
            .fetch_add(stats.fetched, Relaxed);
        stats
    }

    async fn replay_window(&self, window: Vec<u64>, to_memory: bool) -> ReplayStats {
        let lead = self.claim(window.iter().copied());
        let mut stats = ReplayStats {
            skipped: (window.len() - lead.len()) as u64,
            ..ReplayStats::default()
        };
        if lead.is_empty() {
            return stats;
        }
        let results: Vec<_> = lead.iter().map(|(_, tx)| tx.subscribe()).collect();
        let deadline = Instant::now() + self.inner.opts.read_deadline;
        self.fetch_chunks(lead, deadline, to_memory).await;
        for rx in results {
            match &*rx.borrow() {
                Some(Ok(_)) => stats.fetched += 1,
                _ => stats.failed += 1,
            }
        }
        stats
    }

    /// Registers as in flight those of `chunks` that are neither in memory nor in flight already, so
    /// readers wait for them; the caller must resolve every returned sender (via
    /// [`Engine::fetch_chunks`] or [`Engine::finish`]).
    fn claim(&self, chunks: impl Iterator<Item = u64>) -> Vec<(u64, watch::Sender<ChunkResult>)> {
        let inner = &self.inner;
        let mut inflight = inner.inflight.lock().expect("inflight lock");
        let mut lead = Vec::new();
        for c in chunks {
            if inner.mem.contains(inner.mem_id, c) || inflight.contains_key(&c) {
                continue;
            }
            let (tx, rx) = watch::channel(None);
            inflight.insert(c, InFlight::new(rx));
            lead.push((c, tx));
        }
        lead
    }

    /// `sha256:<hex>` of the layer's index (what traces key layers by).
    pub fn index_digest(&self) -> String {
        self.inner.index_digest.clone()
    }

    /// The layer's index.
    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    /// Foreground (workload) reads running now; background work yields to them.
    pub fn foreground_reads(&self) -> usize {
        self.inner.foreground.load(Relaxed)
    }

    /// Takes the bytes of external chunk `c` from elsewhere (an original layer streamed whole):
    /// checked against the index like a fetched chunk, then stored like one (disk cache, or memory
    /// without one). `Ok(false)` if the chunk was local already.
    pub fn offer_chunk(&self, c: u64, bytes: Bytes) -> Result<bool, String> {
        let inner = &self.inner;
        if c >= inner.index.chunk_count() || inner.index.entry(c).kind != ChunkKind::External {
            return Err(format!("chunk {c} is not an external chunk of this layer"));
        }
        if inner.cached.lock().expect("cached lock")[c as usize] {
            return Ok(false);
        }
        let decoded = self.decode(c, &bytes).map_err(|e| {
            inner.metrics.corrupt_chunks.fetch_add(1, Relaxed);
            e.to_string()
        })?;
        let to_memory = inner.opts.disk_cache.is_none();
        for (c, b) in self.store_fetched(vec![(c, decoded, bytes)]) {
            if to_memory {
                inner.mem.put(inner.mem_id, c, b);
            }
        }
        Ok(true)
    }

    /// Bytes the external-chunk source (an original layer) fetched.
    pub fn external_fetched_bytes(&self) -> u64 {
        self.inner
            .opts
            .external
            .as_ref()
            .map_or(0, |e| e.fetched_bytes())
    }

    /// When the layer was last read on demand (what the node's fill gate orders fills by).
    pub fn activity(&self) -> &LayerActivity {
        &self.inner.activity
    }

    /// The layer's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The source, for logs.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Reads `len` bytes at `offset` of the virtual disk.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, ReadError> {
        let started = Instant::now();
        let inner = &self.inner;
        inner.metrics.reads.fetch_add(1, Relaxed);
        let res = self.read_inner(offset, len).await;
        let took = started.elapsed();
        inner.metrics.read_latency.observe(took);
        if took >= Duration::from_millis(1) {
            // What a start waits for, read by read (`--log lazyblk::fetch=debug`).
            tracing::debug!(layer = %inner.name, offset, len, seconds = took.as_secs_f64(), "read waited");
        }
        match &res {
            Ok(b) => {
                inner.metrics.read_bytes.fetch_add(b.len() as u64, Relaxed);
            }
            Err(e) => {
                inner.metrics.read_errors.fetch_add(1, Relaxed);
                tracing::error!(layer = %inner.name, offset, len, error = %e, "read failed; returning EIO");
                if let Some(hook) = &inner.opts.on_read_error {
                    hook(&inner.name, e);
                }
            }
        }
        res
    }

    /// Serves a read at once if every chunk it covers is a zero chunk or in the memory cache, without
    /// awaiting anything (callers outside the runtime, like ublk queue threads, skip two thread hops);
    /// `None` means take the async path ([`Engine::read`]).
    pub fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        let mut out = vec![0u8; len];
        self.read_cached_into(offset, &mut out)
            .then(|| Bytes::from(out))
    }

    /// [`Engine::read_cached`] into `buf` (one copy, straight from the cached chunks); false, with
    /// `buf` unspecified, if some chunk is not in memory.
    pub fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> bool {
        let started = Instant::now();
        let inner = &self.inner;
        let idx = &inner.index;
        let len = buf.len();
        let Ok(chunks) = idx.chunks_for(offset, len as u64) else {
            return false;
        };
        if len == 0 {
            return false;
        }
        let mut parts = Vec::with_capacity((chunks.end - chunks.start) as usize);
        {
            for c in chunks.clone() {
                if idx.entry(c).kind == ChunkKind::Zero {
                    parts.push(None);
                } else {
                    match inner.mem.get(inner.mem_id, c) {
                        Some(b) => parts.push(Some(b.clone())),
                        None => return false,
                    }
                }
            }
        }
        inner
            .metrics
            .mem_hits
            .fetch_add(parts.iter().flatten().count() as u64, Relaxed);
        if let Some(g) = &inner.opts.fill_gate {
            g.local_read();
        }
        self.note_read(offset, len, chunks.clone());
        let mut skip = (offset - idx.chunk_offset(chunks.start)) as usize;
        let mut done = 0;
        for (c, p) in chunks.zip(&parts) {
            let clen = idx.chunk_len(c) as usize;
            let take = (clen - skip).min(len - done);
            match p {
                Some(b) => buf[done..done + take].copy_from_slice(&b[skip..skip + take]),
                None => buf[done..done + take].fill(0),
            }
            done += take;
            skip = 0;
        }
        inner.metrics.reads.fetch_add(1, Relaxed);
        inner.metrics.read_bytes.fetch_add(len as u64, Relaxed);
        inner.metrics.read_latency.observe(started.elapsed());
        true
    }

    async fn read_inner(&self, offset: u64, len: usize) -> Result<Bytes, ReadError> {
        let inner = &self.inner;
        let idx = &inner.index;
        let chunks = idx
            .chunks_for(offset, len as u64)
            .map_err(|_| ReadError::OutOfRange {
                offset,
                len: len as u64,
                size: idx.image_size(),
            })?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.note_read(offset, len, chunks.clone());
        if inner.opts.fill_follow_bytes > 0 {
            inner.follow_hint.store(chunks.end, Relaxed);
        }
        inner.foreground.fetch_add(1, Relaxed);
        let _guard = Decrement(&inner.foreground);
        let _node_demand = inner
            .opts
            .fill_gate
            .as_ref()
            .map(|g| g.demand(&inner.activity, !self.is_local(chunks.clone())));
        let deadline = Instant::now() + inner.opts.read_deadline;
        let parts = match tokio::time::timeout_at(
            deadline.into(),
            self.get_chunks(chunks.clone(), deadline, true),
        )
        .await
        {
            Ok(r) => r.map_err(|(chunk, cause)| ReadError::Fetch {
                offset,
                chunk,
                cause,
            })?,
            Err(_) => {
                return Err(ReadError::Fetch {
                    offset,
                    chunk: chunks.start,
                    cause: format!("deadline of {:?} exceeded", inner.opts.read_deadline),
                })
            }
        };
        let first_off = idx.chunk_offset(chunks.start);
        let start = (offset - first_off) as usize;
        if parts.len() == 1 {
            return Ok(parts[0].slice(start..start + len));
        }
        let mut out = BytesMut::with_capacity(len);
        let mut skip = start;
        for p in &parts {
            let take = (p.len() - skip).min(len - out.len());
            out.extend_from_slice(&p[skip..skip + take]);
            skip = 0;
        }
        Ok(out.freeze())
    }

    /// Bookkeeping of every workload read: the access log (first reads, for traces) and readahead.
    fn note_read(&self, offset: u64, len: usize, chunks: std::ops::Range<u64>) {
        self.inner
            .access
            .lock()
            .expect("access lock")
            .record(chunks.clone());
        self.readahead(offset, len, chunks.end);
    }

    /// Requests what the readahead state machine says a sequential reader will want next.
    fn readahead(&self, offset: u64, len: usize, end_chunk: u64) {
        if let Some(ahead) = self.inner.readahead.on_read(offset, len as u64, end_chunk) {
            self.inner
                .metrics
                .readahead_chunks
                .fetch_add(ahead.end - ahead.start, Relaxed);
            self.spawn_prefetch(ahead, ());
        }
    }

    /// Fetches `chunks` in the background: into the disk cache still compressed when there is one
    /// (decoded when read: a window a reader never reaches, or that memory evicts before it does,
    /// costs no decoding), else into memory; `hold` is dropped when that is done.
    fn spawn_prefetch(&self, chunks: std::ops::Range<u64>, hold: impl Send + 'static) {
        let me = self.clone();
        let task = async move {
            let _hold = hold;
            let deadline = Instant::now() + me.inner.opts.read_deadline;
            if me.fills_to_disk(chunks.clone()) {
                let _ = me.fill_to_disk(chunks, deadline).await;
            } else {
                let _ = me.get_chunks(chunks, deadline, true).await;
            }
        };
        self.spawn_task(task);
    }

    /// Spawns `task` on the current runtime, or on the one the engine was made on when called from
    /// outside any (ublk queue threads); without either, the task is dropped.
    fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        match (&self.inner.rt, tokio::runtime::Handle::try_current()) {
            (_, Ok(h)) => drop(h.spawn(task)),
            (Some(h), Err(_)) => drop(h.spawn(task)),
            (None, Err(_)) => {}
        }
    }

    /// The decompressed contents of `chunks`, in order. Chunks already being fetched are awaited, not
    /// fetched again; the rest are fetched together by a spawned task (so a reader that gives up does
    /// not cancel a fetch others wait for).
    async fn get_chunks(
        &self,
        chunks: std::ops::Range<u64>,
        deadline: Instant,
        to_memory: bool,
    ) -> Result<Vec<Bytes>, (u64, String)> {
        let inner = &self.inner;
        let n = (chunks.end - chunks.start) as usize;
        let mut out: Vec<Option<Bytes>> = vec![None; n];
        let mut waits: Vec<(usize, u64, watch::Receiver<ChunkResult>)> = Vec::new();
        let mut lead: Vec<(u64, watch::Sender<ChunkResult>)> = Vec::new();
        // Chunks the background fill is fetching that a demand read fetches itself (see below).
        let mut detour: Vec<(usize, u64)> = Vec::new();
        let demand = super::lane::current() == super::lane::Lane::Demand;
        {
            let mut inflight = inner.inflight.lock().expect("inflight lock");
            for (i, c) in chunks.clone().enumerate() {
                let e = inner.index.entry(c);
                if e.kind == ChunkKind::Zero {
                    out[i] = Some(inner.zeros.slice(..inner.index.chunk_len(c) as usize));
                    continue;
                }
                if let Some(b) = inner.mem.get(inner.mem_id, c) {
                    inner.metrics.mem_hits.fetch_add(1, Relaxed);
                    out[i] = Some(b.clone());
                    continue;
                }
                if let Some(b) = inner.writing.lock().expect("writing lock").get(&c) {
                    out[i] = Some(b.clone());
                    continue;
                }
                inner.metrics.mem_misses.fetch_add(1, Relaxed);
                if let Some(f) = inflight.get(&c) {
                    // A demand read does not wait for a bulk fetch: that is a whole fill batch
                    // (megabytes, on connections the fill keeps busy), and the read needs one
                    // chunk. It fetches the chunk on the demand lane; the fill still stores it.
                    if demand && f.lane == super::lane::Lane::Bulk && e.is_stored() {
                        detour.push((i, c));
                    } else {
                        waits.push((i, c, f.rx.clone()));
                    }
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                inflight.insert(c, InFlight::new(rx.clone()));
                waits.push((i, c, rx));
                lead.push((c, tx));
            }
        }
        if !lead.is_empty() {
            let me = self.clone();
            // The fetch keeps the reader's lane (a fill's goes on the bulk connections).
            let fetch = async move { me.fetch_chunks(lead, deadline, to_memory).await };
            tokio::spawn(super::lane::within(super::lane::current(), fetch));
        }
        if !detour.is_empty() {
            for (c, b) in self
                .fetch_detour(detour.iter().map(|&(_, c)| c), deadline)
                .await?
            {
                let i = detour
                    .iter()
                    .find(|&&(_, d)| d == c)
                    .expect("a detour chunk")
                    .0;
                out[i] = Some(b);
            }
        }
        for (i, c, mut rx) in waits {
            let r = rx.wait_for(|v| v.is_some()).await;
            match r.as_deref() {
                Ok(Some(Ok(b))) => out[i] = Some(b.clone()),
                Ok(Some(Err(e))) => return Err((c, e.clone())),
                _ => return Err((c, "fetch task ended without a result".into())),
            }
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every chunk resolved"))
            .collect())
    }

    /// `chunks` (in flight on the bulk lane) fetched, verified and decoded on the demand lane for
    /// one reader, without claiming them: the fill's fetch still stores them. Kept in memory, so
    /// the next reads of them do not wait for the fill either.
    async fn fetch_detour(
        &self,
        chunks: impl Iterator<Item = u64>,
        deadline: Instant,
    ) -> Result<Vec<(u64, Bytes)>, (u64, String)> {
        let inner = &self.inner;
        let plan = inner.index.plan_chunks(chunks, inner.opts.plan);
        let mut out = Vec::new();
        for f in plan.fetches {
            let decoded = self
                .fetch_checked(&f, deadline, |me, chunks, stored_of| {
                    me.decode_range(chunks.iter().copied(), stored_of)
                })
                .await
                .map_err(|e| (f.chunks[0], e))?;
            for (c, b, _) in decoded {
                inner.metrics.demand_detours.fetch_add(1, Relaxed);
                inner.mem.put(inner.mem_id, c, b.clone());
                out.push((c, b));
            }
        }
        debug_assert!(
            plan.external_chunks.is_empty(),
            "only stored chunks take a detour"
        );
        Ok(out)
    }

    /// Resolves `lead` chunks: disk cache first, then coalesced range fetches.
    async fn fetch_chunks(
        &self,
        lead: Vec<(u64, watch::Sender<ChunkResult>)>,
        deadline: Instant,
        to_memory: bool,
    ) {
        let inner = &self.inner;
        let mut senders: HashMap<u64, watch::Sender<ChunkResult>> = lead.into_iter().collect();
        // Disk cache.
        if let Some(dc) = inner.opts.disk_cache.clone() {
            let wanted: Vec<(u64, Digest)> = senders
                .keys()
                .map(|&c| (c, inner.index.entry(c).digest))
                .collect();
            // Read, verified (by the decoder's own digest check: once, not again by the cache)
            // and decoded off the reactor; a rejected entry is removed and fetched again below.
            let me = self.clone();
            let found = tokio::task::spawn_blocking(move || {
                wanted
                    .into_iter()
                    .filter_map(|(c, d)| {
                        dc.get_decoded(&d, |stored| me.decode(c, &stored))
                            .map(|b| (c, b))
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            for (c, b) in found {
                inner.metrics.disk_hits.fetch_add(1, Relaxed);
                // On disk already (another layer's identical chunk, say): local.
                self.mark_cached(c);
                self.finish(c, Ok(b), senders.remove(&c), to_memory);
            }
            inner
                .metrics
                .disk_misses
                .fetch_add(senders.len() as u64, Relaxed);
        }
        if senders.is_empty() {
            return;
        }
        let plan = inner
            .index
            .plan_chunks(senders.keys().copied(), inner.opts.plan);
        let externals = external_runs(&plan.external_chunks, &inner.index, inner.opts.plan);
        let ext_fetches = externals.into_iter().map(|run| {
            let me = self.clone();
            async move {
                let res = me.fetch_external(run.clone(), deadline).await;
                (run, res)
            }
        });
        let fetches = plan.fetches.into_iter().map(|f| {
            let me = self.clone();
            async move {
                let res = me.fetch_range(&f, deadline).await;
                (f, res)
            }
        });
        let (ext_results, results) = futures::future::join(
            futures::future::join_all(ext_fetches),
            futures::future::join_all(fetches),
        )
        .await;
        let outcomes = ext_results
            .into_iter()
            .map(|(run, res)| (run.collect::<Vec<_>>(), res))
            .chain(results.into_iter().map(|(f, res)| (f.chunks, res)));
        for (chunks, res) in outcomes {
            match res {
                Ok(decoded) => {
                    for (c, b) in decoded {
                        self.finish(c, Ok(b), senders.remove(&c), to_memory);
                    }
                }
                Err(e) => {
                    for c in chunks {
                        self.finish(c, Err(e.clone()), senders.remove(&c), to_memory);
                    }
                }
            }
        }
    }

    fn finish(
        &self,
        c: u64,
        r: Result<Bytes, String>,
        tx: Option<watch::Sender<ChunkResult>>,
        to_memory: bool,
    ) {
        let inner = &self.inner;
        if let Ok(b) = &r {
            if to_memory {
                inner.mem.put(inner.mem_id, c, b.clone());
            }
        }
        inner.inflight.lock().expect("inflight lock").remove(&c);
        if let Some(tx) = tx {
            let _ = tx.send(Some(r));
        }
    }

    /// Verifies and decodes `chunks`, each one's stored bytes cut out of a fetched answer by
    /// `stored_of` (a blob range, or a run of external chunks).
    #[allow(clippy::type_complexity)]
    fn decode_range(
        &self,
        chunks: impl IntoIterator<Item = u64>,
        stored_of: impl Fn(u64) -> Bytes,
    ) -> Result<Vec<(u64, Bytes, Bytes)>, FetchError> {
        let mut decoded = Vec::new();
        for c in chunks {
            let stored = stored_of(c);
            match self.decode(c, &stored) {
                Ok(b) => decoded.push((c, b, stored)),
                Err(err) => return Err(self.corrupt(c, err)),
            }
        }
        Ok(decoded)
    }

    fn decode(&self, c: u64, stored: &[u8]) -> Result<Bytes, lazyblk_image_format::FormatError> {
        let idx = &self.inner.index;
        self.inner.metrics.decoded_chunks.fetch_add(1, Relaxed);
        let mut buf = vec![0u8; idx.chunk_len(c) as usize];
        decode_chunk(c, idx.entry(c), stored, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// One coalesced range: fetched, every chunk verified and decoded; retried (corrupt bytes included)
    /// until the deadline.
    async fn fetch_range(
        &self,
        f: &RangeFetch,
        deadline: Instant,
    ) -> Result<Vec<(u64, Bytes)>, String> {
        let res = self
            .fetch_checked(f, deadline, |me, chunks, stored_of| {
                me.decode_range(chunks.iter().copied(), stored_of)
            })
            .await?;
        Ok(self.store_fetched(res))
    }

    /// One coalesced range, fetched and handed to `check` on the blocking pool (never SHA-256 + zstd
    /// of megabytes on the reactor that serves every other layer), with the range's chunks and a
    /// function cutting each one's stored bytes out of the answer; retried until the deadline,
    /// corrupt bytes (a `check` error of kind "corrupt") included.
    async fn fetch_checked<T: Send + 'static>(
        &self,
        f: &RangeFetch,
        deadline: Instant,
        check: RangeCheck<T>,
    ) -> Result<T, String> {
        let inner = &self.inner;
        with_retries(&inner.opts, &inner.metrics, deadline, || async {
            let _slot = inner
                .fetch_slots
                .acquire()
                .await
                .expect("semaphore never closed");
            inner.metrics.inflight_fetches.fetch_add(1, Relaxed);
            let r = inner.remote.read_range(f.blob_range.clone()).await;
            inner.metrics.inflight_fetches.fetch_sub(1, Relaxed);
            inner.metrics.fetches.fetch_add(1, Relaxed);
            let bytes = r?;
            inner
                .metrics
                .fetched_bytes
                .fetch_add(bytes.len() as u64, Relaxed);
            let (me, chunks, start) = (self.clone(), f.chunks.clone(), f.blob_range.start);
            let r = tokio::task::spawn_blocking(move || {
                check(&me, &chunks, &|c| {
                    let r = me.inner.index.entry(c).blob_range();
                    bytes.slice((r.start - start) as usize..(r.end - start) as usize)
                })
            })
            .await
            .map_err(|e| FetchError::permanent("internal", format!("decode task: {e}")))?;
            if r.as_ref().is_err_and(|e| e.kind == "corrupt") {
                inner.remote.distrust();
            }
            r
        })
        .await
        .map_err(|e| e.message)
    }

    /// Checks `chunks` against the index (length and digest), without decoding; the stored bytes of
    /// each, for a cache that decodes them when read.
    fn verify_range(
        &self,
        chunks: &[u64],
        stored_of: &dyn Fn(u64) -> Bytes,
    ) -> Result<Vec<(u64, Bytes)>, FetchError> {
        let inner = &self.inner;
        chunks
            .iter()
            .map(|&c| {
                let stored = stored_of(c);
                verify_chunk(c, inner.index.entry(c), &stored)
                    .map(|()| (c, stored))
                    .map_err(|err| self.corrupt(c, err))
            })
            .collect()
    }

    /// Counts and logs chunk `c` failing verification; the error that makes its fetch retry.
    fn corrupt(&self, c: u64, err: lazyblk_image_format::FormatError) -> FetchError {
        let inner = &self.inner;
        inner.metrics.corrupt_chunks.fetch_add(1, Relaxed);
        tracing::warn!(layer = %inner.name, chunk = c, error = %err, "chunk failed verification; refetching");
        FetchError::transient("corrupt", format!("{}: {err}", inner.remote.describe()))
    }

    /// Whether `chunks` can go through [`Engine::fill_to_disk`]: there is a disk cache and none of
    /// them is external (zero chunks need no fetch at all).
    fn fills_to_disk(&self, mut chunks: std::ops::Range<u64>) -> bool {
        self.inner.opts.disk_cache.is_some()
            && chunks.all(|c| self.inner.index.entry(c).kind != ChunkKind::External)
    }

    /// Fills `run` into the disk cache without decoding it: the chunks not local, in memory or in
    /// flight are claimed, fetched in coalesced ranges, each verified against its digest and its
    /// stored bytes written to the disk cache; they are decoded when read, from there. A reader that
    /// waited for one of them meanwhile gets it decoded. Needs a disk cache and stored (not
    /// external) chunks.
    async fn fill_to_disk(
        &self,
        run: std::ops::Range<u64>,
        deadline: Instant,
    ) -> Result<(), (u64, String)> {
        let inner = &self.inner;
        let Some(dc) = inner.opts.disk_cache.clone() else {
            return Err((run.start, "no disk cache to fill".into()));
        };
        let wanted: Vec<u64> = {
            // Lock order: `writing`, then `cached` (as in `store_fetched`).
            let writing = inner.writing.lock().expect("writing lock");
            let cached = inner.cached.lock().expect("cached lock");
            run.filter(|&c| {
                inner.index.entry(c).is_stored() && !cached[c as usize] && !writing.contains_key(&c)
            })
            .collect()
        };
        let lead = self.claim(wanted.into_iter());
        if lead.is_empty() {
            return Ok(());
        }
        let mut senders: HashMap<u64, watch::Sender<ChunkResult>> = lead.into_iter().collect();
        let plan = inner
            .index
            .plan_chunks(senders.keys().copied(), inner.opts.plan);
        let jobs: Vec<_> = plan
            .fetches
            .into_iter()
            .map(|f| {
                let txs: Vec<_> = f
                    .chunks
                    .iter()
                    .filter_map(|c| senders.remove(c).map(|tx| (*c, tx)))
                    .collect();
                self.fill_range_to_disk(f, txs, dc.clone(), deadline)
            })
            .collect();
        // Anything the plan left out (it covers every claimed chunk) is released, not left in flight.
        let mut failed = None;
        for (c, tx) in senders {
            self.finish(c, Err("not planned".into()), Some(tx), false);
            failed.get_or_insert((c, "not planned".to_string()));
        }
        for r in futures::future::join_all(jobs).await {
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// One range of [`Engine::fill_to_disk`]: fetched and verified, each chunk written to the disk
    /// cache and then released (a reader arriving after the release finds it on disk; one that
    /// subscribed before gets it decoded here).
    async fn fill_range_to_disk(
        &self,
        f: RangeFetch,
        txs: Vec<(u64, watch::Sender<ChunkResult>)>,
        dc: Arc<DiskCache>,
        deadline: Instant,
    ) -> Result<(), (u64, String)> {
        let res = self
            .fetch_checked(&f, deadline, |me, chunks, stored_of| {
                me.verify_range(chunks, stored_of)
            })
            .await;
        let stored = match res {
            Ok(stored) => stored,
            Err(e) => {
                let first = txs.first().map_or(f.chunks[0], |(c, _)| *c);
                for (c, tx) in txs {
                    self.finish(c, Err(e.clone()), Some(tx), false);
                }
                return Err((first, e));
            }
        };
        let me = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut txs: HashMap<u64, _> = txs.into_iter().collect();
            for (c, bytes) in stored {
                let d = me.inner.index.entry(c).digest;
                match dc.put(&d, &bytes) {
                    Ok(()) => me.mark_cached(c),
                    Err(e) => {
                        tracing::warn!(layer = %me.inner.name, chunk = c, error = %e, "disk cache write failed")
                    }
                }
                me.inner.inflight.lock().expect("inflight lock").remove(&c);
                if let Some(tx) = txs.remove(&c).filter(|tx| tx.receiver_count() > 0) {
                    // A reader wants it now: decoded once, and kept in memory for its next read.
                    let r = me.decode(c, &bytes).map_err(|e| e.to_string());
                    if let Ok(b) = &r {
                        me.inner.mem.put(me.inner.mem_id, c, b.clone());
                    }
                    let _ = tx.send(Some(r));
                }
            }
            // (Chunks of the range not claimed here were never in `txs`.)
            for (c, tx) in txs {
                me.finish(c, Err("not in the fetched range".into()), Some(tx), false);
            }
        })
        .await;
        written.map_err(|e| (f.chunks[0], format!("disk write task: {e}")))
    }

    /// A run of consecutive external chunks, read through the external source, every chunk verified
    /// against its index digest; retried (wrong bytes included) until the deadline.
    async fn fetch_external(
        &self,
        run: std::ops::Range<u64>,
        deadline: Instant,
    ) -> Result<Vec<(u64, Bytes)>, String> {
        let inner = &self.inner;
        let Some(ext) = inner.opts.external.clone() else {
            return Err(format!(
                "chunks {}..{} are external and this layer has no source for them",
                run.start, run.end
            ));
        };
        let idx = &inner.index;
        let disk = idx.chunk_offset(run.start)
            ..idx.chunk_offset(run.end - 1) + idx.chunk_len(run.end - 1) as u64;
        let res = with_retries(&inner.opts, &inner.metrics, deadline, || async {
            let _slot = inner
                .fetch_slots
                .acquire()
                .await
                .expect("semaphore never closed");
            inner.metrics.inflight_fetches.fetch_add(1, Relaxed);
            let r = ext.read_disk(disk.clone()).await;
            inner.metrics.inflight_fetches.fetch_sub(1, Relaxed);
            let bytes = r?;
            if bytes.len() as u64 != disk.end - disk.start {
                return Err(FetchError::permanent(
                    "internal",
                    format!(
                        "{}: {} bytes for a read of {}",
                        ext.describe(),
                        bytes.len(),
                        disk.end - disk.start
                    ),
                ));
            }
            let (me, run, base) = (self.clone(), run.clone(), disk.start);
            tokio::task::spawn_blocking(move || {
                me.decode_range(run, |c| {
                    let idx = &me.inner.index;
                    let at = (idx.chunk_offset(c) - base) as usize;
                    bytes.slice(at..at + idx.chunk_len(c) as usize)
                })
            })
            .await
            .map_err(|e| FetchError::permanent("internal", format!("verify task: {e}")))?
        })
        .await
        .map_err(|e| e.message)?;
        Ok(self.store_fetched(res))
    }

    /// Marks verified chunks cached and writes their stored bytes to the disk cache (in the
    /// background); returns the decoded chunks.
    fn store_fetched(&self, res: Vec<(u64, Bytes, Bytes)>) -> Vec<(u64, Bytes)> {
        let inner = &self.inner;
        let mut out = Vec::with_capacity(res.len());
        let mut to_disk = Vec::new();
        {
            // Served from here until its disk write is done, whoever fetched it (a fill does not
            // put it in memory; a reader must not fetch it again meanwhile).
            let mut writing = inner.writing.lock().expect("writing lock");
            for (c, b, stored) in res {
                if inner.opts.disk_cache.is_some() {
                    writing.insert(c, b.clone());
                    to_disk.push((c, inner.index.entry(c).digest, stored));
                } else {
                    self.mark_cached(c);
                }
                out.push((c, b));
            }
        }
        if let Some(dc) = inner.opts.disk_cache.clone() {
            // A chunk counts as local (filled) only once its disk write is done.
            let me = self.clone();
            inner.disk_writes.fetch_add(1, Relaxed);
            tokio::task::spawn_blocking(move || {
                for (c, d, stored) in to_disk {
                    debug_assert_eq!(sha256(&stored), d);
                    let put = dc.put(&d, &stored);
                    let mut writing = me.inner.writing.lock().expect("writing lock");
                    match put {
                        Ok(()) => me.mark_cached(c),
                        Err(e) => {
                            tracing::warn!(layer = %me.inner.name, chunk = c, error = %e, "disk cache write failed")
                        }
                    }
                    writing.remove(&c);
                }
                me.inner.disk_writes.fetch_sub(1, Relaxed);
            });
        }
        out
    }

    /// Whether a read of `chunks` can be served without fetching: each is a zero chunk, local (see
    /// [`Engine::mark_cached`]) or in memory.
    fn is_local(&self, chunks: std::ops::Range<u64>) -> bool {
        let inner = &self.inner;
        let cached = inner.cached.lock().expect("cached lock");
        chunks.into_iter().all(|c| {
            cached[c as usize]
                || inner.index.entry(c).kind == ChunkKind::Zero
                || inner.mem.contains(inner.mem_id, c)
        })
    }

    /// Records chunk `c` as local (in the disk cache, or in memory without one).
    fn mark_cached(&self, c: u64) {
        let mut cached = self.inner.cached.lock().expect("cached lock");
        if !cached[c as usize] {
            cached[c as usize] = true;
            self.inner.metrics.fill_done.fetch_add(1, Relaxed);
        }
    }

    /// Serves the chunks stored wholly inside `bytes` (blob bytes from `start`, fetched with the index
    /// when the blob has a startup region), up to [`MAX_STARTUP_DECODED`] decoded: they are
    /// registered as in flight at once (so readers wait for them instead of fetching), then verified
    /// and decoded off the runtime, [`SEED_BATCH_DECODED`] at a time, and put in the memory cache
    /// (up to half of it) and the disk cache.
    fn seed(&self, start: u64, bytes: Bytes) {
        let inner = &self.inner;
        let end = start + bytes.len() as u64;
        let mut decoded_total = 0u64;
        let in_region = inner
            .index
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                let r = e.blob_range();
                e.is_stored() && r.start >= start && r.end <= end
            })
            .map(|(c, _)| c as u64)
            .take_while(|&c| {
                decoded_total += inner.index.chunk_len(c) as u64;
                decoded_total <= MAX_STARTUP_DECODED
            });
        let lead = self.claim(in_region);
        if lead.is_empty() {
            return;
        }
        let me = self.clone();
        let task = async move {
            let inner = &me.inner;
            let mut budget = inner.opts.mem_cache_bytes / 2;
            let mut senders: HashMap<u64, watch::Sender<ChunkResult>> = lead.into_iter().collect();
            let mut wanted: Vec<u64> = senders.keys().copied().collect();
            wanted.sort_unstable();
            for batch in batches_of(&inner.index, &wanted, SEED_BATCH_DECODED) {
                let (dec, bytes) = (me.clone(), bytes.clone());
                let decoded = tokio::task::spawn_blocking(move || {
                    batch
                        .into_iter()
                        .map(|c| {
                            let r = dec.inner.index.entry(c).blob_range();
                            let stored =
                                bytes.slice((r.start - start) as usize..(r.end - start) as usize);
                            (c, dec.decode(c, &stored).map(|b| (b, stored)))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                let mut ok = Vec::new();
                for (c, r) in decoded {
                    match r {
                        Ok((b, stored)) => ok.push((c, b, stored)),
                        Err(e) => {
                            inner.metrics.corrupt_chunks.fetch_add(1, Relaxed);
                            tracing::warn!(layer = %inner.name, chunk = c, error = %e, "startup region chunk failed verification; refetching it");
                        }
                    }
                }
                inner
                    .metrics
                    .startup_region_chunks
                    .fetch_add(ok.len() as u64, Relaxed);
                for (c, b) in me.store_fetched(ok) {
                    let to_memory = budget >= b.len() as u64;
                    budget = budget.saturating_sub(b.len() as u64);
                    me.finish(c, Ok(b), senders.remove(&c), to_memory);
                }
            }
            // Anything not served (undecodable, or the decode task died) is fetched like any miss,
            // so whoever waits for it gets verified bytes or the usual error.
            if !senders.is_empty() {
                let deadline = Instant::now() + inner.opts.read_deadline;
                me.fetch_chunks(senders.into_iter().collect(), deadline, true)
                    .await;
            }
        };
        self.spawn_task(task);
    }

    /// Fetches every stored chunk not cached yet, in blob order, a few MiB at a time, at most
    /// `bytes_per_sec` (if set). Demand reads come first: the node's fill gate limits fills while
    /// they run; without a gate the fill pauses while this layer has a foreground read. Returns when
    /// the layer is fully cached (or a fetch fails for good).
    pub async fn background_fill(&self, bytes_per_sec: Option<u64>) -> Result<(), String> {
        let inner = &self.inner;
        let mut order: Vec<u64> = (0..inner.index.chunk_count())
            .filter(|&c| inner.index.entry(c).kind != ChunkKind::Zero)
            .collect();
        order.sort_by_key(|&c| inner.index.entry(c).offset);
        // Passes over what is not local yet; a chunk whose disk write failed is fetched again on the
        // next pass, and the fill fails loudly when a pass makes no progress.
        let mut left = order.len();
        loop {
            self.fill_pass(order.clone(), bytes_per_sec).await?;
            while inner.disk_writes.load(Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let cached = inner.cached.lock().expect("cached lock").clone();
            order.retain(|&c| !cached[c as usize]);
            if order.is_empty() {
                return Ok(());
            }
            if order.len() >= left {
                return Err(format!(
                    "{} chunks could not be stored in the disk cache",
                    order.len()
                ));
            }
            left = order.len();
        }
    }

    async fn fill_pass(&self, order: Vec<u64>, bytes_per_sec: Option<u64>) -> Result<(), String> {
        use futures::StreamExt;
        let inner = &self.inner;
        // Two batches of a layer in flight hide a round trip between them (the node's gate bounds
        // the total); one when the layer has its own rate, which is kept batch by batch.
        let depth = if bytes_per_sec.is_some_and(|r| r > 0) {
            1
        } else {
            FILL_DEPTH
        };
        let mut pass = FillOrder::new(order, inner.index.chunk_count());
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < depth && !pass.done() {
                let (batch, bytes) = self.next_fill_batch(&mut pass);
                if batch.is_empty() {
                    break;
                }
                // On the bulk lane: its own connections, so demand reads never queue behind it.
                running.push(super::lane::bulk(self.fill_batch(
                    batch,
                    bytes,
                    bytes_per_sec,
                )));
            }
            match running.next().await {
                Some(r) => r?,
                None => return Ok(()),
            }
        }
    }

    /// The next batch of the pass (at most a batch by stored and by decoded bytes: chunks of one
    /// repeated byte compress to almost nothing, and a batch is held decoded until it is cached),
    /// after the latest demand read first if the fill follows reads; and its stored bytes.
    fn next_fill_batch(&self, pass: &mut FillOrder) -> (Vec<u64>, u64) {
        let inner = &self.inner;
        let hint = inner.follow_hint.swap(u64::MAX, Relaxed);
        if hint != u64::MAX {
            pass.follow(hint, inner.opts.fill_follow_bytes);
        }
        let limit = inner
            .opts
            .fill_gate
            .as_ref()
            .map_or(FILL_BATCH_BYTES, |g| g.batch_bytes(FILL_BATCH_BYTES));
        let cached = inner.cached.lock().expect("cached lock");
        let idx = &inner.index;
        pass.next_batch(
            |c| cached[c as usize],
            |c| (idx.entry(c).stored_len as u64, idx.chunk_len(c) as u64),
            BatchLimit {
                stored: limit,
                decoded: MAX_BATCH_DECODED,
            },
        )
    }

    async fn fill_batch(
        &self,
        batch: Vec<u64>,
        bytes: u64,
        bytes_per_sec: Option<u64>,
    ) -> Result<(), String> {
        let inner = &self.inner;
        let _permit = match &inner.opts.fill_gate {
            // The node's gate decides how much fill runs beside demand reads.
            Some(g) => Some(g.admit(bytes, &inner.activity).await),
            // Unscheduled (a single-layer process): this layer's reads always win.
            None => {
                while inner.foreground.load(Relaxed) > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None
            }
        };
        let started = Instant::now();
        let deadline = Instant::now() + inner.opts.read_deadline;
        // Into memory only when there is no disk cache (otherwise the fill would evict hot chunks);
        // with one, stored chunks go there verified and still compressed (decoded when read).
        let to_memory = inner.opts.disk_cache.is_none();
        for run in contiguous_runs(&batch) {
            if self.fills_to_disk(run.clone()) {
                self.fill_to_disk(run, deadline).await
            } else {
                self.get_chunks(run, deadline, to_memory).await.map(drop)
            }
            .map_err(|(c, e)| format!("chunk {c}: {e}"))?;
        }
        if let Some(rate) = bytes_per_sec.filter(|&r| r > 0) {
            let budget = Duration::from_secs_f64(bytes as f64 / rate as f64);
            if let Some(rest) = budget.checked_sub(started.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
        Ok(())
    }
}

/// `chunks` in order, cut into batches of at most `max_decoded` decoded bytes (at least one chunk
/// each).
fn batches_of(index: &Index, chunks: &[u64], max_decoded: u64) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    let mut size = 0;
    for &c in chunks {
        let len = index.chunk_len(c) as u64;
        match out.last_mut() {
            Some(b) if size + len <= max_decoded => b.push(c),
            _ => {
                out.push(vec![c]);
                size = 0;
            }
        }
        size += len;
    }
    out
}

/// Splits sorted external chunk numbers into runs of consecutive chunks of at most
/// `plan.max_request` bytes of disk each (one read of the external source per run).
fn external_runs(chunks: &[u64], index: &Index, plan: PlanOptions) -> Vec<std::ops::Range<u64>> {
    let per_run = (plan.max_request / index.chunk_size()).max(1);
    let mut out = Vec::new();
    for run in contiguous_runs(chunks) {
        let mut c = run.start;
        while c < run.end {
            let end = (c + per_run).min(run.end);
            out.push(c..end);
            c = end;
        }
    }
    out
}

/// Splits sorted chunk numbers into runs of consecutive numbers.
fn contiguous_runs(chunks: &[u64]) -> Vec<std::ops::Range<u64>> {
    let mut sorted = chunks.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for c in sorted {
        match runs.last_mut() {
            Some(r) if r.end == c => r.end = c + 1,
            _ => runs.push(c..c + 1),
        }
    }
    runs
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A shared memory cache outlives the layer: give its budget back to the others.
        self.mem.forget_layer(self.mem_id);
    }
}

impl BlockSource for Engine {
    fn size(&self) -> u64 {
        self.inner.index.image_size()
    }
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, ReadError>> {
        Box::pin(self.read(offset, len))
    }
    fn read_now_into(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.read_cached_into(offset, buf)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        // A hint, bounded like a read: at most MAX_HINT_BYTES each, MAX_HINT_PREFETCHES at once
        // (further hints are dropped), so a client cannot make the node decode the whole disk.
        let len = len.min(MAX_HINT_BYTES);
        let Ok(chunks) = self.inner.index.chunks_for(offset, len) else {
            return;
        };
        let hints = self.inner.hints.clone();
        if hints.fetch_add(1, Relaxed) >= MAX_HINT_PREFETCHES {
            hints.fetch_sub(1, Relaxed);
            return;
        }
        struct Release(Arc<AtomicUsize>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.spawn_prefetch(chunks, Release(hints));
    }
}
