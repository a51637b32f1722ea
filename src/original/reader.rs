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

use super::inflate::{inflate_span, Inflater};
use super::local::{LocalCopy, LocalFile};
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
    local: Option<Arc<LocalCopy>>,
}

#[derive(Default)]
struct SpanCache {
    spans: HashMap<usize, Arc<tokio::sync::Mutex<SpanState>>>,
    /// Spans holding memory, oldest first, with the bytes each holds.
    order: VecDeque<(usize, u64)>,
    bytes: u64,
}

/// A span as far as it has been read: the verified compressed prefix went through `inflater`
/// (kept, so a later read resumes where this one stopped instead of decoding the span again), and
/// `out[..decoded]` is its tar.
#[derive(Default)]
struct SpanState {
    /// Pieces fetched, verified and decoded (for a span without pieces: 0, or 1 when complete).
    pieces: usize,
    inflater: Option<Inflater>,
    out: Vec<u8>,
    decoded: usize,
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
            local: None,
        }
    }

    /// Reads the spans `copy` holds from it, and gives it the verified bytes fetched from the
    /// registry (see [`super::local`]); `copy` must be a copy of this layer's source.
    pub fn with_local_copy(mut self, copy: Arc<LocalCopy>) -> OriginalLayer {
        self.local = Some(copy);
        self
    }

    /// The local copy of the layer blob, if it has one.
    pub fn local_copy(&self) -> Option<&Arc<LocalCopy>> {
        self.local.as_ref()
    }

    /// Whether the whole layer blob is on this node (the registry is no longer needed).
    pub fn is_local(&self) -> bool {
        self.local.as_ref().is_some_and(|c| c.complete())
    }

    /// The original layer blob: its complete local copy if there is one, else the registry's.
    pub fn source(&self) -> Arc<dyn RangeReader> {
        match &self.local {
            Some(c) if c.complete() => Arc::new(LocalFile(c.clone())),
            _ => self.source.clone(),
        }
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

    /// The tar bytes `need` of span `i` (within its tar range): decoded from the span's prefix that
    /// holds them, fetched and verified piece by piece; readers of one span share its fetches.
    async fn span_bytes(
        &self,
        t: &Arc<SpanTable>,
        i: usize,
        need: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        let cell = {
            let mut c = self.cache.lock().expect("span cache lock");
            c.spans.entry(i).or_default().clone()
        };
        let mut st = cell.lock().await;
        let tar = t.span_tar(i);
        let (from, to) = (
            (need.start - tar.start) as usize,
            (need.end - tar.start) as usize,
        );
        if st.decoded < to {
            let held = st.out.len();
            let res = self.advance(t, i, &mut st, need.end).await;
            if res.is_err() {
                // Start this span afresh next time (a refetch replaces whatever was corrupt).
                *st = SpanState::default();
            }
            res?;
            if held == 0 {
                self.account(i, st.out.len() as u64);
            }
        }
        Ok(Bytes::copy_from_slice(&st.out[from..to]))
    }

    /// Counts span `i`'s memory; the oldest spans of this layer give theirs back beyond the bounds.
    fn account(&self, i: usize, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut c = self.cache.lock().expect("span cache lock");
        if c.order.iter().any(|&(j, _)| j == i) {
            return;
        }
        c.order.push_back((i, bytes));
        c.bytes += bytes;
        SPAN_CACHE_TOTAL.fetch_add(bytes, Relaxed);
        // Bounded per layer and per process: this layer gives back its oldest spans.
        while (c.bytes > SPAN_CACHE_BYTES || SPAN_CACHE_TOTAL.load(Relaxed) > SPAN_CACHE_NODE_BYTES)
            && c.order.len() > 1
        {
            let (old, n) = c.order.pop_front().expect("non-empty");
            c.spans.remove(&old);
            c.bytes -= n;
            SPAN_CACHE_TOTAL.fetch_sub(n, Relaxed);
        }
    }

    /// Decodes span `i` at least up to tar offset `need_end`: the next pieces are fetched (at least
    /// as many as were before, so reading a span in order costs a few requests, not one per piece),
    /// each checked against its digest, then fed to the span's inflater where it stopped.
    async fn advance(
        &self,
        t: &Arc<SpanTable>,
        i: usize,
        st: &mut SpanState,
        need_end: u64,
    ) -> Result<(), FetchError> {
        let s = &t.spans[i];
        let tar = t.span_tar(i);
        if s.pieces.is_empty() {
            let b = self.fetch_span(t, i).await?;
            st.out = b.to_vec();
            st.decoded = st.out.len();
            st.pieces = 1;
            return Ok(());
        }
        let n = s.pieces.len();
        let reach = s.pieces.partition_point(|p| p.tar_end < need_end) + 1;
        let upto = reach.max(2 * st.pieces).min(n);
        let first = st.pieces;
        let comp = t.piece_range(i, first).start..t.piece_range(i, upto - 1).end;
        let pieces: Vec<_> = (first..upto)
            .map(|k| (t.piece_range(i, k), s.pieces[k].digest, Some(k)))
            .collect();
        let (window, bytes) = self.fetch_checked(i, s, first == 0, comp, &pieces).await?;
        let mut state = std::mem::take(st);
        let (bits, len) = (s.bits, (tar.end - tar.start) as usize);
        let at_least = (s.pieces[upto - 1].tar_end - tar.start) as usize;
        let complete = upto == n;
        let what = format!("{} span {i}", self.source.describe());
        let state = tokio::task::spawn_blocking(move || {
            resume_span(&mut state, &bytes, first == 0, bits, &window, len)?;
            if state.decoded < at_least || (complete && state.decoded != len) {
                return Err(format!(
                    "{} pieces inflated to {} bytes, the table says {}",
                    upto,
                    state.decoded,
                    if complete { len } else { at_least }
                ));
            }
            if complete {
                state.inflater = None;
            }
            state.pieces = upto;
            Ok(state)
        })
        .await
        .map_err(|e| FetchError::permanent("internal", format!("decode task: {e}")))?
        // Verified bytes that do not decode as the table says: the index is wrong, not the wire.
        .map_err(|e| FetchError::permanent("format", format!("{what}: {e}")))?;
        *st = state;
        Ok(())
    }

    /// The stored window of span `i`, checked against its digest.
    async fn window(&self, i: usize, s: &super::table::Span) -> Result<Bytes, FetchError> {
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
    }

    /// Fetches `comp` of the original blob (and span `i`'s window with it, when `with_window`),
    /// counts the bytes, and checks each `(range, digest, piece)` part of it (`None`: the whole
    /// span) before anything decodes it; a short or corrupt answer is a transient error and the
    /// source is distrusted.
    async fn fetch_checked(
        &self,
        i: usize,
        s: &super::table::Span,
        with_window: bool,
        comp: Range<u64>,
        parts: &[(Range<u64>, Digest, Option<usize>)],
    ) -> Result<(Bytes, Bytes), FetchError> {
        let window = async {
            if !with_window || s.window.is_empty() {
                return Ok(Bytes::new());
            }
            self.window(i, s).await
        };
        let local = self.local.as_ref().filter(|c| c.covers(&comp));
        let data = async {
            match local {
                Some(c) => c.read_local(comp.clone()).await,
                None => self.source.read_range(comp.clone()).await,
            }
        };
        let (window, bytes) = futures::future::join(window, data).await;
        let (window, bytes) = (window?, bytes?);
        let remote = if local.is_some() { 0 } else { bytes.len() };
        self.fetched.fetch_add(
            (window.len() + remote) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let bad = |kind: &'static str, what: String| match local {
            Some(c) => {
                c.discard("a span read from it failed its check");
                FetchError::transient(
                    kind,
                    format!("{} (local copy): {what}", self.source.describe()),
                )
            }
            None => {
                self.source.distrust();
                FetchError::transient(kind, format!("{}: {what}", self.source.describe()))
            }
        };
        if bytes.len() as u64 != comp.end - comp.start {
            return Err(bad(
                "short",
                format!(
                    "{} bytes for bytes {}..{}",
                    bytes.len(),
                    comp.start,
                    comp.end
                ),
            ));
        }
        for (r, digest, piece) in parts {
            let part = &bytes[(r.start - comp.start) as usize..(r.end - comp.start) as usize];
            if sha256(part) != *digest {
                let name = match piece {
                    Some(k) => format!("piece {k} of span {i}"),
                    None => format!("span {i}"),
                };
                return Err(bad(
                    "corrupt",
                    format!(
                        "{name} (bytes {}..{}) does not match its digest",
                        r.start, r.end
                    ),
                ));
            }
        }
        // Verified bytes from the registry: the copy keeps them, so its download skips them.
        if let (None, Some(c)) = (local, &self.local) {
            c.offer(comp, bytes.clone());
        }
        Ok((window, bytes))
    }

    /// A span without pieces, whole: fetched, checked against its digest, decoded.
    async fn fetch_span(&self, t: &SpanTable, i: usize) -> Result<Bytes, FetchError> {
        let s = &t.spans[i];
        let tar = t.span_tar(i);
        let whole = [(s.comp.clone(), s.digest, None)];
        let (window, comp) = self
            .fetch_checked(i, s, true, s.comp.clone(), &whole)
            .await?;
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
        // Each (span, tar range) the disk range needs, in order; the spans are read concurrently.
        let mut parts: Vec<(usize, usize, Range<u64>)> = Vec::new();
        for (at, tar, len) in t.pieces(range.clone()) {
            let (mut at, mut tar, mut left) = (at as usize, tar, len);
            while left > 0 {
                let i = t.span_of(tar);
                let n = left.min(t.span_tar(i).end - tar);
                parts.push((at, i, tar..tar + n));
                at += n as usize;
                tar += n;
                left -= n;
            }
        }
        // One read per span (the furthest byte it needs), then copied out.
        let mut spans: Vec<(usize, Range<u64>)> = Vec::new();
        for (_, i, r) in &parts {
            match spans.iter_mut().find(|(j, _)| j == i) {
                Some((_, have)) => {
                    have.start = have.start.min(r.start);
                    have.end = have.end.max(r.end);
                }
                None => spans.push((*i, r.clone())),
            }
        }
        let got = futures::future::try_join_all(spans.iter().map(|(i, r)| {
            let t = t.clone();
            async move {
                self.span_bytes(&t, *i, r.clone())
                    .await
                    .map(|b| (*i, r.start, b))
            }
        }))
        .await?;
        for (at, i, r) in parts {
            let (_, base, b) = got
                .iter()
                .find(|(j, _, _)| *j == i)
                .expect("every span read");
            let from = (r.start - base) as usize;
            let n = (r.end - r.start) as usize;
            out[at..at + n].copy_from_slice(&b[from..from + n]);
        }
        Ok(Bytes::from(out))
    }
}

/// Feeds `comp` (the span's next verified pieces) to the span's inflater, creating it at the
/// checkpoint (`bits`, `window`) when `fresh`, and decodes into `state.out` (the span's `len` bytes).
fn resume_span(
    state: &mut SpanState,
    comp: &[u8],
    fresh: bool,
    bits: u8,
    window: &[u8],
    len: usize,
) -> Result<(), String> {
    let mut input = comp;
    if fresh {
        let dict = if window.is_empty() {
            Vec::new()
        } else {
            stored_window(window)?
        };
        let (inf, rest) = Inflater::at_checkpoint(comp, bits, &dict)?;
        input = rest;
        state.inflater = Some(inf);
        state.out = vec![0u8; len];
        state.decoded = 0;
    }
    let inf = state
        .inflater
        .as_mut()
        .ok_or("the span's decoder is gone")?;
    state.decoded += inf.inflate_into(input, &mut state.out[state.decoded..])?;
    Ok(())
}

/// A stored (zstd) window, decompressed and checked for size.
fn stored_window(window: &[u8]) -> Result<Vec<u8>, String> {
    let mut d = Vec::with_capacity(WINDOW_LEN);
    zstd::stream::copy_decode(std::io::Read::take(window, MAX_WINDOW_STORED), &mut d)
        .map_err(|e| format!("window: zstd: {e}"))?;
    if d.len() > WINDOW_LEN {
        return Err(format!("window of {} bytes", d.len()));
    }
    Ok(d)
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
                stored_window(window)?
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
            + self.local.as_ref().map_or(0, |c| c.downloaded_bytes())
    }
}
