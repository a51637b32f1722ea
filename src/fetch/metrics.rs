//! Per-layer metrics (atomics on the read path) and their exposition through prometheus-client: one
//! family per metric, one labelled series per layer.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
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
}

/// The labels of one layer's series (e.g. `layer`, `device`).
pub type LayerLabels = Vec<(&'static str, String)>;

fn with(labels: &LayerLabels, key: &'static str, value: &str) -> LayerLabels {
    let mut l = labels.clone();
    l.push((key, value.to_string()));
    l
}

/// Encodes the per-layer families: one descriptor per family, one series per layer (labelled), so
/// the exposition stays valid with any number of layers.
pub fn encode_layers(
    encoder: &mut DescriptorEncoder,
    layers: &[(LayerLabels, Arc<Metrics>)],
) -> Result<(), std::fmt::Error> {
    type Get = fn(&Metrics) -> u64;
    let counters: [(&str, &str, Get); 11] = [
        ("lazyblk_reads", "Reads of the virtual disk.", |m| {
            m.reads.load(Relaxed)
        }),
        ("lazyblk_read_bytes", "Bytes returned to readers.", |m| {
            m.read_bytes.load(Relaxed)
        }),
        ("lazyblk_read_errors", "Reads that failed (EIO).", |m| {
            m.read_errors.load(Relaxed)
        }),
        (
            "lazyblk_fetches",
            "Range requests sent to the source.",
            |m| m.fetches.load(Relaxed),
        ),
        (
            "lazyblk_fetched_bytes",
            "Bytes received from the source.",
            |m| m.fetched_bytes.load(Relaxed),
        ),
        (
            "lazyblk_fetch_retries",
            "Range requests retried after an error.",
            |m| m.fetch_retries.load(Relaxed),
        ),
        (
            "lazyblk_corrupt_chunks",
            "Chunks that failed verification (refetched, never served).",
            |m| m.corrupt_chunks.load(Relaxed),
        ),
        (
            "lazyblk_readahead_chunks",
            "Chunks requested ahead of sequential readers.",
            |m| m.readahead_chunks.load(Relaxed),
        ),
        (
            "lazyblk_startup_region_chunks",
            "Chunks that arrived with the index in the blob's startup region.",
            |m| m.startup_region_chunks.load(Relaxed),
        ),
        (
            "lazyblk_trace_prefetched_chunks",
            "Chunks fetched ahead of the workload by a startup-trace replay.",
            |m| m.trace_prefetched.load(Relaxed),
        ),
        (
            "lazyblk_fill_chunks",
            "Stored chunks of the layer cached locally.",
            |m| m.fill_done.load(Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        let mut f = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, m) in layers {
            ConstCounter::new(get(m)).encode(f.encode_family(labels)?)?;
        }
    }
    let mut f = encoder.encode_descriptor(
        "lazyblk_cache_hits",
        "Chunk lookups served from a cache.",
        None,
        MetricType::Counter,
    )?;
    for (labels, m) in layers {
        for (tier, v) in [("memory", &m.mem_hits), ("disk", &m.disk_hits)] {
            let l = with(labels, "tier", tier);
            ConstCounter::new(v.load(Relaxed)).encode(f.encode_family(&l)?)?;
        }
    }
    let mut f = encoder.encode_descriptor(
        "lazyblk_cache_misses",
        "Chunk lookups a cache could not serve.",
        None,
        MetricType::Counter,
    )?;
    for (labels, m) in layers {
        for (tier, v) in [("memory", &m.mem_misses), ("disk", &m.disk_misses)] {
            let l = with(labels, "tier", tier);
            ConstCounter::new(v.load(Relaxed)).encode(f.encode_family(&l)?)?;
        }
    }
    let mut f = encoder.encode_descriptor(
        "lazyblk_errors",
        "Fetch errors by cause.",
        None,
        MetricType::Counter,
    )?;
    for (labels, m) in layers {
        for (cause, v) in m.errors.lock().expect("metrics lock").iter() {
            let l = with(labels, "cause", cause);
            ConstCounter::new(*v).encode(f.encode_family(&l)?)?;
        }
    }
    let mut f = encoder.encode_descriptor(
        "lazyblk_inflight_fetches",
        "Range requests in flight.",
        None,
        MetricType::Gauge,
    )?;
    for (labels, m) in layers {
        ConstGauge::new(m.inflight_fetches.load(Relaxed)).encode(f.encode_family(labels)?)?;
    }
    let mut f = encoder.encode_descriptor(
        "lazyblk_fill_ratio",
        "Fraction of the layer's stored chunks cached locally.",
        None,
        MetricType::Gauge,
    )?;
    for (labels, m) in layers {
        ConstGauge::new(m.fill_ratio()).encode(f.encode_family(labels)?)?;
    }
    let mut f = encoder.encode_descriptor(
        "lazyblk_read_duration_seconds",
        "Read latency.",
        None,
        MetricType::Histogram,
    )?;
    for (labels, m) in layers {
        let h = &m.read_latency;
        let count = h.count.load(Relaxed);
        let mut buckets = Vec::with_capacity(h.bounds.len() + 1);
        let mut below = 0;
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            let c = c.load(Relaxed).max(below);
            buckets.push((*b, c - below));
            below = c;
        }
        buckets.push((f64::INFINITY, count.saturating_sub(below)));
        f.encode_family(labels)?.encode_histogram::<NoLabelSet>(
            h.sum_us.load(Relaxed) as f64 / 1e6,
            count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

/// A prometheus-client collector over a fixed set of layers (`lazyblk serve`, foreground attach).
#[derive(Debug)]
struct FixedLayers(Vec<(LayerLabels, Arc<Metrics>)>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Collector for FixedLayers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_layers(&mut encoder, &self.0)
    }
}

/// The exposition of `registry` in the text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
    out
}

/// Serves `GET /metrics` for a fixed set of layers (`lazyblk serve`).
pub async fn serve_metrics(listener: tokio::net::TcpListener, layers: Vec<(String, Arc<Metrics>)>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FixedLayers(
        layers
            .into_iter()
            .map(|(name, m)| (vec![("layer", name)], m))
            .collect(),
    )));
    let registry = Arc::new(registry);
    serve_http(listener, Arc::new(move || render(&registry))).await
}

/// Serves `GET /metrics` with the text `render` produces on each scrape, until the task is dropped.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut req))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(0);
            let line = String::from_utf8_lossy(&req[..n]);
            let (status, body) = if line.starts_with("GET /metrics") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(Duration::from_secs(10), sock.write_all(resp.as_bytes()))
                .await;
        });
    }
}
