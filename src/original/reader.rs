//! Serving an original-image index's external chunks: a disk range is mapped onto the tar through the
//! data map, the tar onto spans, and each span is range-read from the **original** layer blob,
//! checked against its SHA-256 before it is decoded, decoded from its checkpoint, and cut into the
//! disk bytes asked for. The engine then checks every chunk against the index as usual.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lazyblk_image_format::{sha256, Digest};
use tokio::sync::OnceCell;

use super::inflate::inflate_span;
use super::table::{SpanCodec, SpanTable, MAX_WINDOW_STORED, WINDOW_LEN};
use crate::fetch::remote::{FetchError, RangeReader};
use crate::fetch::{BoxFuture, ExternalData};

/// Decoded spans kept in memory per layer (readers of neighbouring chunks share a span).
const SPAN_CACHE_BYTES: u64 = 64 << 20;
/// Decoded spans kept in memory by all layers of the process together.
const SPAN_CACHE_NODE_BYTES: u64 = 256 << 20;
/// Bytes of decoded spans cached by every layer of the process.
static SPAN_CACHE_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where an original-image index's span table is (from the descriptor annotations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLocation {
    /// Offset of the stored table in the span blob.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// Its SHA-256.
    pub digest: Digest,
}

/// The external chunks of one original-image index.
pub struct OriginalLayer {
    source: Arc<dyn RangeReader>,
    spans_blob: Arc<dyn RangeReader>,
    location: TableLocation,
    table: OnceCell<Arc<SpanTable>>,
    cache: Mutex<SpanCache>,
    fetched: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct SpanCache {
    spans: HashMap<usize, Arc<OnceCell<Bytes>>>,
    order: VecDeque<usize>,
    bytes: u64,
}

impl OriginalLayer {
    /// A reader of `source` (the original layer blob) through the table in `spans_blob` (runs it
    /// maps beyond the disk are never read).
    pub fn new(
        source: Arc<dyn RangeReader>,
        spans_blob: Arc<dyn RangeReader>,
        location: TableLocation,
    ) -> OriginalLayer {
        OriginalLayer {
            source,
            spans_blob,
            location,
            table: OnceCell::new(),
            cache: Mutex::new(SpanCache::default()),
            fetched: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The original layer blob.
    pub fn source(&self) -> Arc<dyn RangeReader> {
        self.source.clone()
    }

    /// The span table: fetched (one range request) and verified on first use.
    pub async fn table(&self) -> Result<Arc<SpanTable>, FetchError> {
        self.table
            .get_or_try_init(|| async {
                let l = &self.location;
                if l.length > super::table::MAX_TABLE_LEN {
                    return Err(FetchError::permanent("format", "span table too large"));
                }
                let stored = self
                    .spans_blob
                    .read_range(l.offset..l.offset + l.length)
                    .await?;
                let t = SpanTable::parse_stored(&stored, &l.digest).map_err(|e| {
                    self.spans_blob.distrust();
                    FetchError::transient("corrupt", format!("{}: {e}", self.spans_blob.describe()))
                })?;
                if t.spans.len() == 1 && t.codec != SpanCodec::None && t.source_size > 4 << 20 {
                    tracing::warn!(
                        layer = %self.source.describe(),
                        bytes = t.source_size,
                        "this layer has one span (a single zstd frame, or gzip without block boundaries): the first file-data read fetches the whole layer"
                    );
                }
                Ok(Arc::new(t))
            })
            .await
            .cloned()
    }

    /// The decoded tar bytes of span `i` (cached; one fetch and decode however many readers wait).
    async fn span(&self, t: &SpanTable, i: usize) -> Result<Bytes, FetchError> {
        let cell = {
            let mut c = self.cache.lock().expect("span cache lock");
            c.spans.entry(i).or_default().clone()
        };
        let b = cell
            .get_or_try_init(|| self.fetch_span(t, i))
            .await?
            .clone();
        use std::sync::atomic::Ordering::Relaxed;
        let mut c = self.cache.lock().expect("span cache lock");
        if !c.order.contains(&i) {
            c.order.push_back(i);
            c.bytes += b.len() as u64;
            SPAN_CACHE_TOTAL.fetch_add(b.len() as u64, Relaxed);
            // Bounded per layer and per process: this layer gives back its oldest spans.
            while (c.bytes > SPAN_CACHE_BYTES
                || SPAN_CACHE_TOTAL.load(Relaxed) > SPAN_CACHE_NODE_BYTES)
                && !c.order.is_empty()
            {
                let old = c.order.pop_front().expect("non-empty");
                if let Some(cell) = c.spans.remove(&old) {
                    let n = cell.get().map_or(0, |b| b.len() as u64);
                    c.bytes -= n;
                    SPAN_CACHE_TOTAL.fetch_sub(n, Relaxed);
                }
            }
        }
        Ok(b)
    }

    async fn fetch_span(&self, t: &SpanTable, i: usize) -> Result<Bytes, FetchError> {
        let s = &t.spans[i];
        let tar = t.span_tar(i);
        let window = async {
            if s.window.is_empty() {
                return Ok(Bytes::new());
            }
            if s.window.end - s.window.start > MAX_WINDOW_STORED {
                return Err(FetchError::permanent("format", "window too large"));
            }
            let w = self.spans_blob.read_range(s.window.clone()).await?;
            if sha256(&w) != s.window_digest {
                self.spans_blob.distrust();
                return Err(FetchError::transient(
                    "corrupt",
                    format!(
                        "{}: the window of span {i} does not match its digest",
                        self.spans_blob.describe()
                    ),
                ));
            }
            Ok(w)
        };
        let comp = self.source.read_range(s.comp.clone());
        let (window, comp) = futures::future::join(window, comp).await;
        let (window, comp) = (window?, comp?);
        self.fetched.fetch_add(
            (window.len() + comp.len()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if comp.len() as u64 != s.comp.end - s.comp.start || sha256(&comp) != s.digest {
            self.source.distrust();
            return Err(FetchError::transient(
                "corrupt",
                format!(
                    "{}: span {i} (bytes {}..{}) does not match its digest",
                    self.source.describe(),
                    s.comp.start,
                    s.comp.end
                ),
            ));
        }
        let (codec, bits, len) = (t.codec, s.bits, (tar.end - tar.start) as usize);
        let what = format!("{} span {i}", self.source.describe());
        tokio::task::spawn_blocking(move || decode_span(codec, &comp, bits, &window, len))
            .await
            .map_err(|e| FetchError::permanent("internal", format!("decode task: {e}")))?
            .map(Bytes::from)
            // Verified bytes that do not decode as the table says: the index is wrong, not the wire.
            .map_err(|e| FetchError::permanent("format", format!("{what}: {e}")))
    }

    async fn read(&self, range: Range<u64>) -> Result<Bytes, FetchError> {
        let t = self.table().await?;
        let mut out = vec![0u8; (range.end - range.start) as usize];
        let pieces = t.pieces(range.clone());
        let mut wanted: Vec<usize> = Vec::new();
        for &(_, tar, len) in &pieces {
            for i in t.span_of(tar)..=t.span_of(tar + len - 1) {
                if !wanted.contains(&i) {
                    wanted.push(i);
                }
            }
        }
        let spans = futures::future::try_join_all(wanted.iter().map(|&i| {
            let t = t.clone();
            async move { self.span(&t, i).await.map(|b| (i, b)) }
        }))
        .await?;
        let spans: HashMap<usize, Bytes> = spans.into_iter().collect();
        for (at, tar, len) in pieces {
            let (mut at, mut tar, mut left) = (at as usize, tar, len);
            while left > 0 {
                let i = t.span_of(tar);
                let r = t.span_tar(i);
                let from = (tar - r.start) as usize;
                let n = left.min(r.end - tar) as usize;
                out[at..at + n].copy_from_slice(&spans[&i][from..from + n]);
                at += n;
                tar += n as u64;
                left -= n as u64;
            }
        }
        Ok(Bytes::from(out))
    }
}

/// Decodes one verified span into exactly `len` tar bytes.
pub fn decode_span(
    codec: SpanCodec,
    comp: &[u8],
    bits: u8,
    window: &[u8],
    len: usize,
) -> Result<Vec<u8>, String> {
    match codec {
        SpanCodec::None => {
            if comp.len() != len {
                return Err(format!("{} bytes for a span of {len}", comp.len()));
            }
            Ok(comp.to_vec())
        }
        SpanCodec::Gzip => {
            let dict = if window.is_empty() {
                Vec::new()
            } else {
                let mut d = Vec::with_capacity(WINDOW_LEN);
                zstd::stream::copy_decode(std::io::Read::take(window, MAX_WINDOW_STORED), &mut d)
                    .map_err(|e| format!("window: zstd: {e}"))?;
                if d.len() > WINDOW_LEN {
                    return Err(format!("window of {} bytes", d.len()));
                }
                d
            };
            inflate_span(comp, bits, &dict, len)
        }
        SpanCodec::Zstd => {
            let mut out = Vec::with_capacity(len);
            let dec =
                zstd::stream::read::Decoder::with_buffer(comp).map_err(|e| format!("zstd: {e}"))?;
            std::io::Read::read_to_end(&mut std::io::Read::take(dec, len as u64 + 1), &mut out)
                .map_err(|e| format!("zstd: {e}"))?;
            if out.len() != len {
                return Err(format!("decoded {} bytes, the table says {len}", out.len()));
            }
            Ok(out)
        }
    }
}

impl Drop for OriginalLayer {
    fn drop(&mut self) {
        let c = self.cache.get_mut().expect("span cache lock");
        SPAN_CACHE_TOTAL.fetch_sub(c.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ExternalData for OriginalLayer {
    fn read_disk(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(self.read(range))
    }

    fn describe(&self) -> String {
        self.source.describe()
    }

    fn fetched_bytes(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }
}
