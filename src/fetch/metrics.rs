//! Per-layer metrics, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A latency histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            bounds: LATENCY_BOUNDS,
            counts: (0..LATENCY_BOUNDS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in self.bounds.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{b}\"}} {}",
                self.counts[i].load(Relaxed)
            );
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {n}");
    }
}

/// Counters of one layer's engine.
#[derive(Default)]
pub struct Metrics {
    /// Reads served (successfully or not).
    pub reads: AtomicU64,
    /// Bytes returned to readers.
    pub read_bytes: AtomicU64,
    /// Reads that failed.
    pub read_errors: AtomicU64,
    /// Read latency.
    pub read_latency: Histogram,
    /// Chunk lookups answered from memory.
    pub mem_hits: AtomicU64,
    /// Chunk lookups memory could not answer.
    pub mem_misses: AtomicU64,
    /// Chunks served from the disk cache.
    pub disk_hits: AtomicU64,
    /// Chunks the disk cache did not have.
    pub disk_misses: AtomicU64,
    /// Range requests sent.
    pub fetches: AtomicU64,
    /// Bytes received from range requests.
    pub fetched_bytes: AtomicU64,
    /// Range requests retried.
    pub fetch_retries: AtomicU64,
    /// Range requests in flight.
    pub inflight_fetches: AtomicI64,
    /// Chunks whose bytes failed verification (then refetched, never served).
    pub corrupt_chunks: AtomicU64,
    /// Non-zero chunks in the layer (fill target).
    pub fill_total: AtomicU64,
    /// Non-zero chunks cached by the background fill or by reads.
    pub fill_done: AtomicU64,
    /// Chunks requested by sequential readahead.
    pub readahead_chunks: AtomicU64,
    /// Chunks served from the blob's startup region (fetched with the index).
    pub startup_region_chunks: AtomicU64,
    /// Chunks fetched ahead of the workload by a trace replay.
    pub trace_prefetched: AtomicU64,
    /// Errors by cause.
    pub errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts an error of kind `kind`.
    pub fn error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .expect("metrics lock")
            .entry(kind)
            .or_default() += 1;
    }

    /// Fraction of non-zero chunks cached, 0..=1.
    pub fn fill_ratio(&self) -> f64 {
        let t = self.fill_total.load(Relaxed);
        if t == 0 {
            1.0
        } else {
            self.fill_done.load(Relaxed) as f64 / t as f64
        }
    }

    /// Renders this layer's metrics with `layer="<name>"`.
    pub fn render(&self, out: &mut String, layer: &str) {
        let l = format!(
            "layer=\"{}\"",
            layer.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let c = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP lazyblk_{name} {help}\n# TYPE lazyblk_{name} counter\nlazyblk_{name}{{{l}}} {v}");
        };
        c(
            out,
            "reads_total",
            "Reads of the virtual disk.",
            self.reads.load(Relaxed),
        );
        c(
            out,
            "read_bytes_total",
            "Bytes returned to readers.",
            self.read_bytes.load(Relaxed),
        );
        c(
            out,
            "read_errors_total",
            "Reads that failed (EIO).",
            self.read_errors.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP lazyblk_cache_hits_total Chunk lookups served from a cache.\n# TYPE lazyblk_cache_hits_total counter");
        let _ = writeln!(
            out,
            "lazyblk_cache_hits_total{{{l},tier=\"memory\"}} {}",
            self.mem_hits.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "lazyblk_cache_hits_total{{{l},tier=\"disk\"}} {}",
            self.disk_hits.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP lazyblk_cache_misses_total Chunk lookups a cache could not serve.\n# TYPE lazyblk_cache_misses_total counter");
        let _ = writeln!(
            out,
            "lazyblk_cache_misses_total{{{l},tier=\"memory\"}} {}",
            self.mem_misses.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "lazyblk_cache_misses_total{{{l},tier=\"disk\"}} {}",
            self.disk_misses.load(Relaxed)
        );
        c(
            out,
            "fetches_total",
            "Range requests sent to the source.",
            self.fetches.load(Relaxed),
        );
        c(
            out,
            "fetched_bytes_total",
            "Bytes received from the source.",
            self.fetched_bytes.load(Relaxed),
        );
        c(
            out,
            "fetch_retries_total",
            "Range requests retried after an error.",
            self.fetch_retries.load(Relaxed),
        );
        c(
            out,
            "corrupt_chunks_total",
            "Chunks that failed verification (refetched, never served).",
            self.corrupt_chunks.load(Relaxed),
        );
        c(
            out,
            "readahead_chunks_total",
            "Chunks requested ahead of sequential readers.",
            self.readahead_chunks.load(Relaxed),
        );
        c(
            out,
            "startup_region_chunks_total",
            "Chunks that arrived with the index in the blob's startup region.",
            self.startup_region_chunks.load(Relaxed),
        );
        c(
            out,
            "trace_prefetched_chunks_total",
            "Chunks fetched ahead of the workload by a startup-trace replay.",
            self.trace_prefetched.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP lazyblk_inflight_fetches Range requests in flight.\n# TYPE lazyblk_inflight_fetches gauge\nlazyblk_inflight_fetches{{{l}}} {}", self.inflight_fetches.load(Relaxed));
        let _ = writeln!(out, "# HELP lazyblk_fill_ratio Fraction of the layer's stored chunks cached locally.\n# TYPE lazyblk_fill_ratio gauge\nlazyblk_fill_ratio{{{l}}} {}", self.fill_ratio());
        let _ = writeln!(out, "# HELP lazyblk_errors_total Fetch errors by cause.\n# TYPE lazyblk_errors_total counter");
        for (k, v) in self.errors.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "lazyblk_errors_total{{{l},cause=\"{k}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP lazyblk_read_duration_seconds Read latency.\n# TYPE lazyblk_read_duration_seconds histogram");
        self.read_latency
            .render(out, "lazyblk_read_duration_seconds", &l);
    }
}

/// Serves `GET /metrics` in the Prometheus text format on `listener` until the task is dropped.
pub async fn serve_metrics(listener: tokio::net::TcpListener, layers: Vec<(String, Arc<Metrics>)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let layers = layers.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut req))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(0);
            let line = String::from_utf8_lossy(&req[..n]);
            let (status, body) = if line.starts_with("GET /metrics") {
                let mut body = String::new();
                for (name, m) in &layers {
                    m.render(&mut body, name);
                }
                ("200 OK", body)
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
