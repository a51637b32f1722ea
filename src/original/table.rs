//! The span table of an original-image index: where each span of the original layer's compressed
//! bytes starts, its digest and inflate checkpoint, and where each run of file data of the disk lies
//! in the layer's tar stream. Byte layout: docs/format.md, "Original-image indexes".

use std::ops::Range;

use lazyblk_image_format::{sha256, Digest};

use crate::convert::DataRun;

/// Magic of a span table (`"LZBLKST\x01"`).
pub const TABLE_MAGIC: [u8; 8] = *b"LZBLKST\x01";
/// Table version written (version 1, without pieces, is read too).
pub const TABLE_VERSION: u16 = 2;
/// Bytes of the table header.
pub const HEADER_LEN: usize = 112;
/// Bytes of one span entry.
pub const SPAN_LEN: usize = 112;
/// Bytes of one data-map entry.
pub const RUN_LEN: usize = 24;
/// Bytes of one piece entry.
pub const PIECE_LEN: usize = 40;
/// Compressed bytes per piece this build writes (gzip spans).
pub const PIECE_SIZE: u32 = 64 << 10;
/// Largest decompressed table a reader accepts.
pub const MAX_TABLE_LEN: u64 = 256 << 20;
/// Largest stored (compressed) window a reader accepts.
pub const MAX_WINDOW_STORED: u64 = 64 << 10;
/// Largest inflate window (deflate's 32 KiB history).
pub const WINDOW_LEN: usize = 32 << 10;
/// Most tar bytes one span may produce (a reader holds a span's output in memory).
pub const MAX_SPAN_TAR: u64 = 64 << 20;

/// How the original layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanCodec {
    /// gzip (one or more members): spans start at deflate block boundaries, with a checkpoint.
    Gzip = 1,
    /// zstd: spans start at frame boundaries.
    Zstd = 2,
    /// An uncompressed tar: spans are byte ranges of it.
    None = 3,
}

impl SpanCodec {
    fn from_u8(v: u8) -> Option<SpanCodec> {
        match v {
            1 => Some(SpanCodec::Gzip),
            2 => Some(SpanCodec::Zstd),
            3 => Some(SpanCodec::None),
            _ => None,
        }
    }
}

/// One span: a range of the original blob that decodes, from its checkpoint, to a range of the tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Bytes of the original blob to fetch (for gzip with `bits > 0`, the first byte is shared with
    /// the previous span).
    pub comp: Range<u64>,
    /// Offset in the tar stream of the span's first output byte.
    pub tar_start: u64,
    /// gzip: bits of the first byte that belong to this span's first deflate block (0..=7; 0 means
    /// the span starts on a byte boundary).
    pub bits: u8,
    /// SHA-256 of the `comp` bytes (zero when the span has pieces: they are verified one by one).
    pub digest: Digest,
    /// gzip: the stored (zstd) inflate window — the 32 KiB of tar before `tar_start` — as a range of
    /// the span blob; empty when the span needs no history.
    pub window: Range<u64>,
    /// SHA-256 of the stored window bytes.
    pub window_digest: Digest,
    /// The span's compressed bytes cut every [`SpanTable::piece_size`] bytes, each verifiable on its
    /// own, so a read fetches and inflates only the span's prefix it needs (empty: the whole span).
    pub pieces: Vec<Piece>,
}

/// A piece of a span: its compressed bytes (`SpanTable::piece_range`) and how far into the tar
/// decoding the span from its checkpoint through this piece's end is sure to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Tar offset every byte before which the span's prefix through this piece decodes.
    pub tar_end: u64,
    /// SHA-256 of the piece's compressed bytes.
    pub digest: Digest,
}

/// A parsed, validated span table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanTable {
    /// Compression of the original layer.
    pub codec: SpanCodec,
    /// Size of the original layer blob.
    pub source_size: u64,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
    /// The original layer digest.
    pub source_digest: Digest,
    /// The layer's diff ID (digest of the tar).
    pub diff_id: Digest,
    /// Spans in tar order.
    pub spans: Vec<Span>,
    /// Runs of file data on the disk, in disk order.
    pub map: Vec<DataRun>,
    /// Compressed bytes per piece (0: no span has pieces).
    pub piece_size: u32,
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

impl SpanTable {
    /// The table's bytes (before compression).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(HEADER_LEN + self.spans.len() * SPAN_LEN + self.map.len() * RUN_LEN);
        b.extend_from_slice(&TABLE_MAGIC);
        b.extend_from_slice(&TABLE_VERSION.to_le_bytes());
        b.push(self.codec as u8);
        b.push(0);
        b.extend_from_slice(&(self.spans.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.source_size.to_le_bytes());
        b.extend_from_slice(&self.tar_size.to_le_bytes());
        b.extend_from_slice(&self.source_digest);
        b.extend_from_slice(&self.diff_id);
        b.extend_from_slice(&self.piece_size.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        debug_assert_eq!(b.len(), HEADER_LEN);
        for s in &self.spans {
            b.extend_from_slice(&s.comp.start.to_le_bytes());
            b.extend_from_slice(&s.comp.end.to_le_bytes());
            b.extend_from_slice(&s.tar_start.to_le_bytes());
            b.extend_from_slice(&s.window.start.to_le_bytes());
            b.extend_from_slice(&((s.window.end - s.window.start) as u32).to_le_bytes());
            b.push(s.bits);
            b.extend_from_slice(&[0; 3]);
            b.extend_from_slice(&s.digest);
            b.extend_from_slice(&s.window_digest);
            b.extend_from_slice(&[0; 8]);
        }
        for r in &self.map {
            b.extend_from_slice(&r.disk.to_le_bytes());
            b.extend_from_slice(&r.tar.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
        }
        for p in self.spans.iter().flat_map(|s| &s.pieces) {
            b.extend_from_slice(&p.tar_end.to_le_bytes());
            b.extend_from_slice(&p.digest);
        }
        b
    }

    /// Pieces span `s` has when the table's piece size is `piece_size` (0: none).
    fn pieces_of(comp: &Range<u64>, piece_size: u32) -> u64 {
        if piece_size == 0 {
            0
        } else {
            (comp.end - comp.start).div_ceil(piece_size as u64)
        }
    }

    /// The compressed bytes of piece `k` of span `i`.
    pub fn piece_range(&self, i: usize, k: usize) -> Range<u64> {
        let c = &self.spans[i].comp;
        let p = self.piece_size as u64;
        let start = c.start + k as u64 * p;
        start..(start + p).min(c.end)
    }

    /// The stored form: one zstd frame of [`SpanTable::to_bytes`].
    pub fn to_stored(&self) -> Vec<u8> {
        zstd::bulk::compress(&self.to_bytes(), 3).expect("zstd compresses a buffer")
    }

    /// Verifies `stored` against `digest` (before decompressing it), decompresses it (at most
    /// [`MAX_TABLE_LEN`] bytes) and parses it.
    pub fn parse_stored(stored: &[u8], digest: &Digest) -> Result<SpanTable, String> {
        let got = sha256(stored);
        if &got != digest {
            return Err(format!(
                "span table digest mismatch: expected sha256:{}, got sha256:{}",
                hex::encode(digest),
                hex::encode(got)
            ));
        }
        let mut raw = Vec::new();
        let dec = zstd::stream::read::Decoder::new(stored)
            .map_err(|e| format!("span table: zstd: {e}"))?;
        std::io::Read::read_to_end(&mut std::io::Read::take(dec, MAX_TABLE_LEN + 1), &mut raw)
            .map_err(|e| format!("span table: zstd: {e}"))?;
        if raw.len() as u64 > MAX_TABLE_LEN {
            return Err(format!("span table larger than {MAX_TABLE_LEN} bytes"));
        }
        SpanTable::parse(&raw)
    }

    /// Parses and validates table bytes.
    pub fn parse(b: &[u8]) -> Result<SpanTable, String> {
        let bad = |what: &str| format!("span table: {what}");
        if b.len() < HEADER_LEN || b[..8] != TABLE_MAGIC {
            return Err(bad("bad magic or short header"));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != 1 && version != TABLE_VERSION {
            return Err(bad(&format!(
                "version {version} (this reader knows 1 and {TABLE_VERSION})"
            )));
        }
        let codec = SpanCodec::from_u8(b[10]).ok_or_else(|| bad(&format!("codec {}", b[10])))?;
        let piece_size = u32::from_le_bytes(b[104..108].try_into().expect("4 bytes"));
        if b[11] != 0 || b[108..112] != [0; 4] || (version == 1 && piece_size != 0) {
            return Err(bad("reserved header bytes are not zero"));
        }
        if piece_size != 0 && (piece_size < 4096 || codec != SpanCodec::Gzip) {
            return Err(bad(&format!(
                "piece size {piece_size} for a {codec:?} layer"
            )));
        }
        let n_spans = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as u64;
        let n_runs = le64(&b[16..]);
        let spans_end = (HEADER_LEN as u64)
            .checked_add(n_spans * SPAN_LEN as u64)
            .and_then(|v| v.checked_add(n_runs.checked_mul(RUN_LEN as u64)?))
            .filter(|&v| v <= b.len() as u64)
            .ok_or_else(|| {
                bad(&format!(
                    "{} bytes for {n_spans} spans and {n_runs} data runs",
                    b.len()
                ))
            })?;
        let source_size = le64(&b[24..]);
        let tar_size = le64(&b[32..]);
        let mut source_digest = [0u8; 32];
        source_digest.copy_from_slice(&b[40..72]);
        let mut diff_id = [0u8; 32];
        diff_id.copy_from_slice(&b[72..104]);
        let mut spans = Vec::with_capacity(n_spans as usize);
        for (i, e) in b[HEADER_LEN..HEADER_LEN + n_spans as usize * SPAN_LEN]
            .chunks_exact(SPAN_LEN)
            .enumerate()
        {
            let wlen = u32::from_le_bytes(e[32..36].try_into().expect("4 bytes")) as u64;
            let wstart = le64(&e[24..]);
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&e[40..72]);
            let mut window_digest = [0u8; 32];
            window_digest.copy_from_slice(&e[72..104]);
            if e[37..40] != [0; 3] || e[104..112] != [0; 8] {
                return Err(bad(&format!("span {i}: reserved bytes are not zero")));
            }
            spans.push(Span {
                comp: le64(&e[0..])..le64(&e[8..]),
                tar_start: le64(&e[16..]),
                bits: e[36],
                digest,
                window: wstart
                    ..wstart
                        .checked_add(wlen)
                        .ok_or_else(|| bad("window overflows"))?,
                window_digest,
                pieces: Vec::new(),
            });
        }
        // The pieces section's length follows from the spans (checked before anything is allocated).
        let mut n_pieces = 0u64;
        for s in &spans {
            if s.comp.start > s.comp.end {
                return Err(bad("a span's compressed range is reversed"));
            }
            n_pieces = n_pieces.saturating_add(Self::pieces_of(&s.comp, piece_size));
        }
        if n_pieces.checked_mul(PIECE_LEN as u64) != Some(b.len() as u64 - spans_end) {
            return Err(bad(&format!(
                "{} bytes for {n_spans} spans, {n_runs} data runs and {n_pieces} pieces",
                b.len()
            )));
        }
        let mut at = spans_end as usize;
        for s in &mut spans {
            let n = Self::pieces_of(&s.comp, piece_size) as usize;
            s.pieces = b[at..at + n * PIECE_LEN]
                .chunks_exact(PIECE_LEN)
                .map(|e| {
                    let mut digest = [0u8; 32];
                    digest.copy_from_slice(&e[8..40]);
                    Piece {
                        tar_end: le64(e),
                        digest,
                    }
                })
                .collect();
            at += n * PIECE_LEN;
        }
        let mut map = Vec::with_capacity(n_runs as usize);
        for e in
            b[HEADER_LEN + n_spans as usize * SPAN_LEN..spans_end as usize].chunks_exact(RUN_LEN)
        {
            map.push(DataRun {
                disk: le64(&e[0..]),
                tar: le64(&e[8..]),
                len: le64(&e[16..]),
            });
        }
        let t = SpanTable {
            codec,
            source_size,
            tar_size,
            source_digest,
            diff_id,
            spans,
            map,
            piece_size,
        };
        t.validate()?;
        Ok(t)
    }

    /// The checks a reader makes before using a table (also run on tables this build writes).
    pub fn validate(&self) -> Result<(), String> {
        let bad = |what: String| Err(format!("span table: {what}"));
        if self.tar_size > 0 && self.spans.first().map(|s| s.tar_start) != Some(0) {
            return bad("the first span does not start at tar offset 0".into());
        }
        for (i, s) in self.spans.iter().enumerate() {
            let end = self.span_tar(i).end;
            if s.tar_start >= end {
                return bad(format!("span {i}: tar offsets not increasing"));
            }
            if end - s.tar_start > MAX_SPAN_TAR {
                return bad(format!(
                    "span {i}: {} tar bytes (limit {MAX_SPAN_TAR})",
                    end - s.tar_start
                ));
            }
            if s.comp.start > s.comp.end || s.comp.end > self.source_size {
                return bad(format!("span {i}: compressed range outside the layer"));
            }
            if i > 0 && s.comp.start < self.spans[i - 1].comp.start {
                return bad(format!("span {i}: compressed offsets not increasing"));
            }
            if s.window.end - s.window.start > MAX_WINDOW_STORED {
                return bad(format!("span {i}: window over {MAX_WINDOW_STORED} bytes"));
            }
            match self.codec {
                SpanCodec::Gzip => {
                    if s.bits > 7 || (s.bits > 0 && s.comp.is_empty()) {
                        return bad(format!("span {i}: bits {}", s.bits));
                    }
                }
                SpanCodec::Zstd | SpanCodec::None => {
                    if s.bits != 0 || !s.window.is_empty() {
                        return bad(format!("span {i}: a checkpoint this codec does not use"));
                    }
                }
            }
            if self.codec == SpanCodec::None && (s.comp.start != s.tar_start || s.comp.end != end) {
                return bad(format!("span {i}: an uncompressed span must map 1:1"));
            }
            if s.pieces.len() as u64 != Self::pieces_of(&s.comp, self.piece_size) {
                return bad(format!("span {i}: {} pieces", s.pieces.len()));
            }
            let mut reach = s.tar_start;
            for (k, p) in s.pieces.iter().enumerate() {
                if p.tar_end < reach || p.tar_end > end {
                    return bad(format!(
                        "span {i}: piece {k} reaches tar offset {}",
                        p.tar_end
                    ));
                }
                reach = p.tar_end;
            }
            if !s.pieces.is_empty() && reach != end {
                return bad(format!(
                    "span {i}: its last piece does not reach the span's end"
                ));
            }
            if !s.pieces.is_empty() && s.digest != [0; 32] {
                return bad(format!("span {i}: a span digest beside pieces"));
            }
        }
        let mut prev_end = 0u64;
        for (i, r) in self.map.iter().enumerate() {
            let (Some(dend), Some(tend)) = (r.disk.checked_add(r.len), r.tar.checked_add(r.len))
            else {
                return bad(format!("data run {i} overflows"));
            };
            if r.len == 0 || r.disk < prev_end || tend > self.tar_size {
                return bad(format!(
                    "data run {i} (disk {}+{}, tar {}) is empty, out of order or past the tar",
                    r.disk, r.len, r.tar
                ));
            }
            prev_end = dend;
        }
        Ok(())
    }

    /// The tar range span `i` produces.
    pub fn span_tar(&self, i: usize) -> Range<u64> {
        let end = self
            .spans
            .get(i + 1)
            .map(|s| s.tar_start)
            .unwrap_or(self.tar_size);
        self.spans[i].tar_start..end
    }

    /// The span holding tar byte `at` (which must be below `tar_size`).
    pub fn span_of(&self, at: u64) -> usize {
        self.spans.partition_point(|s| s.tar_start <= at) - 1
    }

    /// The data runs that overlap disk range `r`, as `(offset in r, tar offset, length)`.
    pub fn pieces(&self, r: Range<u64>) -> Vec<(u64, u64, u64)> {
        let first = self.map.partition_point(|m| m.disk + m.len <= r.start);
        let mut out = Vec::new();
        for m in &self.map[first..] {
            if m.disk >= r.end {
                break;
            }
            let from = m.disk.max(r.start);
            let to = (m.disk + m.len).min(r.end);
            out.push((from - r.start, m.tar + (from - m.disk), to - from));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SpanTable {
        SpanTable {
            codec: SpanCodec::Gzip,
            source_size: 1000,
            tar_size: 5000,
            source_digest: [1; 32],
            diff_id: [2; 32],
            spans: vec![
                Span {
                    comp: 10..600,
                    tar_start: 0,
                    bits: 0,
                    digest: [3; 32],
                    window: 0..0,
                    window_digest: [0; 32],
                    pieces: vec![],
                },
                Span {
                    comp: 599..992,
                    tar_start: 3000,
                    bits: 5,
                    digest: [4; 32],
                    window: 0..40,
                    window_digest: [5; 32],
                    pieces: vec![],
                },
            ],
            map: vec![
                DataRun {
                    disk: 8192,
                    tar: 512,
                    len: 100,
                },
                DataRun {
                    disk: 12288,
                    tar: 1536,
                    len: 3000,
                },
            ],
            piece_size: 0,
        }
    }

    #[test]
    fn round_trips_and_checks_its_digest() {
        let t = sample();
        let stored = t.to_stored();
        let d = sha256(&stored);
        assert_eq!(SpanTable::parse_stored(&stored, &d).unwrap(), t);
        let err = SpanTable::parse_stored(&stored, &[0; 32]).unwrap_err();
        assert!(err.contains("digest mismatch"), "{err}");
    }

    /// `sample` with 4 KiB pieces: span 0 has 3, span 1 has 2.
    fn with_pieces() -> SpanTable {
        let mut t = sample();
        t.piece_size = 4096;
        t.spans[0].comp = 10..10 + 3 * 4096 - 100;
        t.spans[1].comp = t.spans[0].comp.end - 1..t.spans[0].comp.end - 1 + 5000;
        t.source_size = t.spans[1].comp.end;
        let p = |tar_end, d| Piece {
            tar_end,
            digest: [d; 32],
        };
        t.spans[0].pieces = vec![p(1000, 6), p(1000, 7), p(3000, 8)];
        t.spans[1].pieces = vec![p(4000, 9), p(5000, 10)];
        t.spans[0].digest = [0; 32];
        t.spans[1].digest = [0; 32];
        t
    }

    #[test]
    fn pieces_round_trip_and_are_checked() {
        let t = with_pieces();
        let stored = t.to_stored();
        assert_eq!(
            SpanTable::parse_stored(&stored, &sha256(&stored)).unwrap(),
            t
        );
        assert_eq!(t.piece_range(0, 2), 10 + 8192..10 + 3 * 4096 - 100);
        assert_eq!(t.piece_range(1, 1).end, t.source_size);
        type Break = Box<dyn Fn(&mut SpanTable)>;
        let cases: Vec<(&str, Break)> = vec![
            (
                "and 5 pieces",
                Box::new(|t| {
                    t.spans[0].pieces.pop();
                }),
            ),
            ("reaches", Box::new(|t| t.spans[0].pieces[1].tar_end = 999)),
            ("reaches", Box::new(|t| t.spans[1].pieces[0].tar_end = 6000)),
            (
                "last piece",
                Box::new(|t| t.spans[0].pieces[2].tar_end = 2999),
            ),
            ("beside pieces", Box::new(|t| t.spans[1].digest = [1; 32])),
        ];
        for (want, f) in cases {
            let mut t = with_pieces();
            f(&mut t);
            let err = SpanTable::parse(&t.to_bytes()).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        let mut t = with_pieces();
        t.spans[0].pieces.pop();
        assert!(t.validate().unwrap_err().contains("span 0: 2 pieces"));
        // A version-1 table cannot carry pieces; zstd layers have none.
        let mut b = with_pieces().to_bytes();
        b[8] = 1;
        assert!(SpanTable::parse(&b).unwrap_err().contains("reserved"));
        let mut t = with_pieces();
        t.codec = SpanCodec::Zstd;
        assert!(SpanTable::parse(&t.to_bytes())
            .unwrap_err()
            .contains("piece size"));
        let mut b = with_pieces().to_bytes();
        b.truncate(b.len() - 1);
        assert!(SpanTable::parse(&b).unwrap_err().contains("pieces"));
    }

    #[test]
    fn lookups() {
        let t = sample();
        assert_eq!(t.span_of(0), 0);
        assert_eq!(t.span_of(2999), 0);
        assert_eq!(t.span_of(3000), 1);
        assert_eq!(t.span_tar(1), 3000..5000);
        assert_eq!(
            t.pieces(8192..16384),
            vec![(0, 512, 100), (4096, 1536, 3000)]
        );
        assert_eq!(t.pieces(12288 + 1000..12288 + 1100), vec![(0, 2536, 100)]);
        assert!(t.pieces(0..8192).is_empty());
    }

    #[test]
    fn malformed_tables_are_refused() {
        type Break = Box<dyn Fn(&mut SpanTable)>;
        let cases: Vec<(&str, Break)> = vec![
            ("first span", Box::new(|t| t.spans[0].tar_start = 1)),
            ("not increasing", Box::new(|t| t.spans[1].tar_start = 0)),
            (
                "outside the layer",
                Box::new(|t| t.spans[1].comp.end = 5000),
            ),
            ("bits", Box::new(|t| t.spans[1].bits = 9)),
            ("out of order", Box::new(|t| t.map[1].disk = 8200)),
            ("past the tar", Box::new(|t| t.map[1].len = 4000)),
            ("limit", Box::new(|t| t.tar_size = MAX_SPAN_TAR + 4000)),
        ];
        for (want, f) in cases {
            let mut t = sample();
            f(&mut t);
            let err = SpanTable::parse(&t.to_bytes()).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        let mut b = sample().to_bytes();
        b.truncate(b.len() - 1);
        assert!(SpanTable::parse(&b).unwrap_err().contains("bytes for"));
    }
}
