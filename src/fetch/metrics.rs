//! Per-layer metrics (atomics on the read path) and their exposition through the `prometheus` crate's text
//! encoder: one family per metric, one labelled series per layer.

use std::collections::BTreeMap;

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
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
    /// Chunks decompressed (verified and decoded: the CPU a layer's reads cost).
    pub decoded_chunks: AtomicU64,
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
    /// Chunks a demand read fetched itself rather than wait for the fill's fetch of them
    /// ([`super::lane`]).
    pub demand_detours: AtomicU64,
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

fn label_pairs(labels: &[(&'static str, String)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.clone());
            l
        })
        .collect()
}

fn with(labels: &LayerLabels, key: &'static str, value: &str) -> LayerLabels {
    let mut l = labels.clone();
    l.push((key, value.to_string()));
    l
}

/// A metric family of the exposition.
pub fn family(name: &str, help: &str, ty: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(ty);
    f.set_metric(metrics);
    f
}

/// A counter sample.
pub fn counter(labels: &[(&'static str, String)], v: u64) -> Metric {
    let mut c = prometheus::proto::Counter::default();
    c.set_value(v as f64);
    let mut m = Metric::from_label(label_pairs(labels));
    m.set_counter(c);
    m
}

/// A gauge sample.
pub fn gauge(labels: &[(&'static str, String)], v: f64) -> Metric {
    let mut g = prometheus::proto::Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(label_pairs(labels));
    m.set_gauge(g);
    m
}

/// The per-layer families: one family per metric, one labelled series per layer, so the
/// exposition stays valid with any number of layers.
pub fn layer_families(layers: &[(LayerLabels, Arc<Metrics>)]) -> Vec<MetricFamily> {
    type Get = fn(&Metrics) -> u64;
    let counters: [(&str, &str, Get); 13] = [
        ("lazyblk_reads_total", "Reads of the virtual disk.", |m| {
            m.reads.load(Relaxed)
        }),
        (
            "lazyblk_read_bytes_total",
            "Bytes returned to readers.",
            |m| m.read_bytes.load(Relaxed),
        ),
        (
            "lazyblk_read_errors_total",
            "Reads that failed (EIO).",
            |m| m.read_errors.load(Relaxed),
        ),
        (
            "lazyblk_fetches_total",
            "Range requests sent to the source.",
            |m| m.fetches.load(Relaxed),
        ),
        (
            "lazyblk_fetched_bytes_total",
            "Bytes received from the source.",
            |m| m.fetched_bytes.load(Relaxed),
        ),
        (
            "lazyblk_fetch_retries_total",
            "Range requests retried after an error.",
            |m| m.fetch_retries.load(Relaxed),
        ),
        (
            "lazyblk_decoded_chunks_total",
            "Chunks verified and decompressed for readers (a fill stores them compressed).",
            |m| m.decoded_chunks.load(Relaxed),
        ),
        (
            "lazyblk_corrupt_chunks_total",
            "Chunks that failed verification (refetched, never served).",
            |m| m.corrupt_chunks.load(Relaxed),
        ),
        (
            "lazyblk_readahead_chunks_total",
            "Chunks requested ahead of sequential readers.",
            |m| m.readahead_chunks.load(Relaxed),
        ),
        (
            "lazyblk_startup_region_chunks_total",
            "Chunks that arrived with the index in the blob's startup region.",
            |m| m.startup_region_chunks.load(Relaxed),
        ),
        (
            "lazyblk_trace_prefetched_chunks_total",
            "Chunks fetched ahead of the workload by a startup-trace replay.",
            |m| m.trace_prefetched.load(Relaxed),
        ),
        (
            "lazyblk_demand_detour_chunks_total",
            "Chunks a demand read fetched itself instead of waiting for the background fill's fetch of them.",
            |m| m.demand_detours.load(Relaxed),
        ),
        (
            "lazyblk_fill_chunks_total",
            "Stored chunks of the layer cached locally.",
            |m| m.fill_done.load(Relaxed),
        ),
    ];
    let mut out = Vec::new();
    for (name, help, get) in counters {
        let samples = layers.iter().map(|(l, m)| counter(l, get(m))).collect();
        out.push(family(name, help, MetricType::COUNTER, samples));
    }
    let tiered = |f: fn(&Metrics) -> [(&'static str, u64); 2]| -> Vec<Metric> {
        layers
            .iter()
            .flat_map(|(l, m)| f(m).map(|(tier, v)| counter(&with(l, "tier", tier), v)))
            .collect()
    };
    out.push(family(
        "lazyblk_cache_hits_total",
        "Chunk lookups served from a cache.",
        MetricType::COUNTER,
        tiered(|m| {
            [
                ("memory", m.mem_hits.load(Relaxed)),
                ("disk", m.disk_hits.load(Relaxed)),
            ]
        }),
    ));
    out.push(family(
        "lazyblk_cache_misses_total",
        "Chunk lookups a cache could not serve.",
        MetricType::COUNTER,
        tiered(|m| {
            [
                ("memory", m.mem_misses.load(Relaxed)),
                ("disk", m.disk_misses.load(Relaxed)),
            ]
        }),
    ));
    let errors = layers
        .iter()
        .flat_map(|(l, m)| {
            m.errors
                .lock()
                .expect("metrics lock")
                .iter()
                .map(|(cause, v)| counter(&with(l, "cause", cause), *v))
                .collect::<Vec<_>>()
        })
        .collect();
    out.push(family(
        "lazyblk_errors_total",
        "Fetch errors by cause.",
        MetricType::COUNTER,
        errors,
    ));
    out.push(family(
        "lazyblk_inflight_fetches",
        "Range requests in flight.",
        MetricType::GAUGE,
        layers
            .iter()
            .map(|(l, m)| gauge(l, m.inflight_fetches.load(Relaxed) as f64))
            .collect(),
    ));
    out.push(family(
        "lazyblk_fill_ratio",
        "Fraction of the layer's stored chunks cached locally.",
        MetricType::GAUGE,
        layers
            .iter()
            .map(|(l, m)| gauge(l, m.fill_ratio()))
            .collect(),
    ));
    let histograms = layers
        .iter()
        .map(|(l, m)| {
            let h = &m.read_latency;
            let mut p = prometheus::proto::Histogram::default();
            p.set_sample_count(h.count.load(Relaxed));
            p.set_sample_sum(h.sum_us.load(Relaxed) as f64 / 1e6);
            p.set_bucket(
                h.bounds
                    .iter()
                    .zip(&h.counts)
                    .map(|(b, c)| {
                        let mut bucket = prometheus::proto::Bucket::default();
                        bucket.set_upper_bound(*b);
                        bucket.set_cumulative_count(c.load(Relaxed));
                        bucket
                    })
                    .collect(),
            );
            let mut metric = Metric::from_label(label_pairs(l));
            metric.set_histogram(p);
            metric
        })
        .collect();
    out.push(family(
        "lazyblk_read_duration_seconds",
        "Read latency.",
        MetricType::HISTOGRAM,
        histograms,
    ));
    out
}

/// The exposition of `families` in the Prometheus text format (0.0.4).
pub fn render(families: &[MetricFamily]) -> String {
    // Families without samples are legal but noise (and older parsers dislike them).
    let families: Vec<MetricFamily> = families
        .iter()
        .filter(|f| !f.get_metric().is_empty())
        .cloned()
        .collect();
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

/// Serves `GET /metrics` for a fixed set of layers (`lazyblk serve`).
pub async fn serve_metrics(listener: tokio::net::TcpListener, layers: Vec<(String, Arc<Metrics>)>) {
    let layers: Vec<(LayerLabels, Arc<Metrics>)> = layers
        .into_iter()
        .map(|(name, m)| (vec![("layer", name)], m))
        .collect();
    serve_http(listener, Arc::new(move || render(&layer_families(&layers)))).await
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
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(Duration::from_secs(10), sock.write_all(resp.as_bytes()))
                .await;
        });
    }
}
