//! Cutting an original layer into spans while it is read once: a reader that yields the layer's tar
//! stream and records, every `span_size` compressed bytes, a checkpoint where decoding can resume
//! (gzip: a deflate block boundary, its bit offset and the 32 KiB window before it; zstd: a frame
//! boundary; an uncompressed tar: any byte), with the SHA-256 of each span's compressed bytes.

use std::io::{self, Read, Write};
use std::ops::Range;

use sha2::{Digest as _, Sha256};

use super::inflate::Inflater;
use super::table::{Piece, Span, SpanCodec, MAX_SPAN_TAR, PIECE_SIZE, WINDOW_LEN};

/// Reads an original layer and yields its tar, recording spans; windows are written to `windows`.
pub struct SpanRecorder<R, W> {
    src: R,
    codec: SpanCodec,
    span_size: u64,
    inbuf: Vec<u8>,
    in_pos: usize,
    in_len: usize,
    src_eof: bool,
    gz: Option<Inflater>,
    zs: Option<zstd::zstd_safe::DCtx<'static>>,
    /// Compressed bytes consumed by the decoder.
    comp_pos: u64,
    /// Tar bytes produced.
    tar_pos: u64,
    /// The layer blob's digest: computed here, or proven by the caller (see [`SpanRecorder::with_source_digest`]).
    source: SourceDigest,
    source_len: u64,
    span: Option<Open>,
    spans: Vec<Span>,
    window: Vec<u8>,
    windows: W,
    windows_pos: u64,
    last_byte: u8,
    /// A new gzip member started: checkpoint at its header's end (with no window).
    new_member: bool,
    finished: bool,
    /// zstd: the decoder is between frames.
    between_frames: bool,
    frames: u64,
}

/// Where the layer blob's digest comes from.
enum SourceDigest {
    /// Hashed as it is read.
    Compute(Sha256),
    /// Proven by the caller.
    Proven([u8; 32]),
}

/// The span being read.
struct Open {
    start: u64,
    tar_start: u64,
    bits: u8,
    hasher: Sha256,
    window: Range<u64>,
    window_digest: [u8; 32],
    /// gzip: the span's closed pieces and the open one (its hasher; it ends at `piece_end`).
    pieces: Vec<Piece>,
    piece: Sha256,
    piece_end: u64,
}

/// What a recorder saw, when the layer has been read to its end.
pub struct Recorded<W> {
    /// Spans in order.
    pub spans: Vec<Span>,
    /// SHA-256 and size of the layer blob.
    pub source: ([u8; 32], u64),
    /// Size of the tar (its digest is the reader's: the recorder only yields it).
    pub tar_size: u64,
    /// Where the windows were written (and how many bytes).
    pub windows: (W, u64),
    /// zstd frames seen.
    pub frames: u64,
}

impl<R: Read, W: Write> SpanRecorder<R, W> {
    /// Starts reading `src` (compressed with `codec`).
    pub fn new(src: R, codec: SpanCodec, span_size: u64, windows: W) -> io::Result<Self> {
        let gz = match codec {
            SpanCodec::Gzip => Some(Inflater::gzip().map_err(io::Error::other)?),
            _ => None,
        };
        let zs = match codec {
            SpanCodec::Zstd => Some(zstd::zstd_safe::DCtx::create()),
            _ => None,
        };
        Ok(SpanRecorder {
            src,
            codec,
            span_size: span_size.max(64 << 10),
            inbuf: vec![0; 256 << 10],
            in_pos: 0,
            in_len: 0,
            src_eof: false,
            gz,
            zs,
            comp_pos: 0,
            tar_pos: 0,
            source: SourceDigest::Compute(Sha256::new()),
            source_len: 0,
            span: None,
            spans: Vec::new(),
            window: Vec::with_capacity(2 * WINDOW_LEN),
            windows,
            windows_pos: 0,
            last_byte: 0,
            new_member: false,
            finished: false,
            between_frames: true,
            frames: 0,
        })
    }

    /// Takes `digest` as the layer blob's digest instead of hashing the blob again on the decoder
    /// thread: for callers that prove it of the very bytes they feed (a download that fails unless
    /// the blob matches its descriptor) and use nothing built before that proof is in.
    pub fn with_source_digest(mut self, digest: [u8; 32]) -> Self {
        self.source = SourceDigest::Proven(digest);
        self
    }

    fn refill(&mut self) -> io::Result<()> {
        if self.in_pos < self.in_len || self.src_eof {
            return Ok(());
        }
        loop {
            match self.src.read(&mut self.inbuf) {
                Ok(0) => {
                    self.src_eof = true;
                    break;
                }
                Ok(n) => {
                    if let SourceDigest::Compute(h) = &mut self.source {
                        h.update(&self.inbuf[..n]);
                    }
                    self.source_len += n as u64;
                    self.in_pos = 0;
                    self.in_len = n;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Consumed `n` bytes of input.
    fn consume(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let bytes = &self.inbuf[self.in_pos..self.in_pos + n];
        if let Some(s) = &mut self.span {
            // gzip spans are verified per piece (their span digest stays zero).
            if self.codec == SpanCodec::Gzip {
                s.piece.update(bytes);
            } else {
                s.hasher.update(bytes);
            }
        }
        self.last_byte = bytes[n - 1];
        self.in_pos += n;
        self.comp_pos += n as u64;
    }

    fn produced(&mut self, out: &[u8]) {
        self.tar_pos += out.len() as u64;
        if self.codec == SpanCodec::Gzip {
            // Only the last WINDOW_LEN bytes can be a checkpoint's window: copy no more of a large
            // step's output than that (the whole tar used to be copied through here).
            if out.len() >= WINDOW_LEN {
                self.window.clear();
                self.window
                    .extend_from_slice(&out[out.len() - WINDOW_LEN..]);
            } else {
                self.window.extend_from_slice(out);
                if self.window.len() > 2 * WINDOW_LEN {
                    let cut = self.window.len() - WINDOW_LEN;
                    self.window.drain(..cut);
                }
            }
        }
    }

    /// gzip: input the decoder may take before the open piece ends (a step never crosses a piece
    /// boundary, so each piece's `tar_end` is what its prefix is sure to decode to).
    fn piece_room(&self, avail: usize) -> usize {
        match (&self.span, self.codec) {
            (Some(s), SpanCodec::Gzip) => avail.min((s.piece_end - self.comp_pos) as usize),
            _ => avail,
        }
    }

    /// gzip: closes the open piece if the input has reached its end (after the step's output was
    /// counted), and opens the next.
    fn piece_done(&mut self) {
        let (pos, tar) = (self.comp_pos, self.tar_pos);
        if let (Some(s), SpanCodec::Gzip) = (&mut self.span, self.codec) {
            if pos == s.piece_end {
                s.pieces.push(Piece {
                    tar_end: tar,
                    digest: std::mem::take(&mut s.piece).finalize().into(),
                });
                s.piece_end = pos + PIECE_SIZE as u64;
            }
        }
    }

    fn close_span(&mut self) {
        if let Some(mut s) = self.span.take() {
            if self.codec == SpanCodec::Gzip && self.comp_pos > s.piece_end - PIECE_SIZE as u64 {
                s.pieces.push(Piece {
                    tar_end: self.tar_pos,
                    digest: s.piece.finalize().into(),
                });
            }
            let digest = if self.codec == SpanCodec::Gzip {
                [0; 32]
            } else {
                s.hasher.finalize().into()
            };
            self.spans.push(Span {
                comp: s.start..self.comp_pos,
                tar_start: s.tar_start,
                bits: s.bits,
                digest,
                window: s.window,
                window_digest: s.window_digest,
                pieces: s.pieces,
            });
        }
    }

    /// A checkpoint here: the open span ends and the next starts (`bits` into the last byte).
    fn checkpoint(&mut self, bits: u8, with_window: bool) -> io::Result<()> {
        self.close_span();
        let (window, window_digest) = if with_window && self.tar_pos > 0 {
            let w = &self.window[self.window.len().saturating_sub(WINDOW_LEN)..];
            let stored = zstd::bulk::compress(w, 3)?;
            self.windows.write_all(&stored)?;
            let r = self.windows_pos..self.windows_pos + stored.len() as u64;
            self.windows_pos = r.end;
            (r, Sha256::digest(&stored).into())
        } else {
            (0..0, [0; 32])
        };
        let mut hasher = Sha256::new();
        if bits > 0 {
            hasher.update([self.last_byte]);
        }
        let start = self.comp_pos - (bits > 0) as u64;
        self.span = Some(Open {
            start,
            tar_start: self.tar_pos,
            bits,
            piece: hasher.clone(),
            hasher,
            window,
            window_digest,
            pieces: Vec::new(),
            piece_end: start + PIECE_SIZE as u64,
        });
        Ok(())
    }

    fn span_full(&self) -> bool {
        match &self.span {
            None => true,
            Some(s) => {
                self.comp_pos - s.start >= self.span_size
                    || self.tar_pos - s.tar_start >= MAX_SPAN_TAR / 4
            }
        }
    }

    fn too_long(&self) -> io::Result<()> {
        match &self.span {
            Some(s) if self.tar_pos - s.tar_start > MAX_SPAN_TAR => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the layer has no place to resume decoding within {} MiB of output (at compressed byte {})",
                    MAX_SPAN_TAR >> 20,
                    self.comp_pos
                ),
            )),
            _ => Ok(()),
        }
    }

    fn read_gzip(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.refill()?;
            if self.in_pos == self.in_len && self.src_eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("gzip stream truncated at byte {}", self.comp_pos),
                ));
            }
            let take = self.piece_room(self.in_len - self.in_pos);
            let input = &self.inbuf[self.in_pos..self.in_pos + take];
            let st = self
                .gz
                .as_mut()
                .expect("gzip decoder")
                .step(input, buf, true)
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("gzip at byte {}: {e}", self.comp_pos),
                    )
                })?;
            self.consume(st.consumed);
            self.produced(&buf[..st.produced]);
            self.piece_done();
            self.too_long()?;
            if st.end {
                self.refill()?;
                if self.in_pos == self.in_len && self.src_eof {
                    self.close_span();
                    self.finished = true;
                } else {
                    // Another gzip member follows (pigz, concatenated layers).
                    self.gz
                        .as_mut()
                        .expect("gzip decoder")
                        .reset()
                        .map_err(io::Error::other)?;
                    self.new_member = true;
                }
            } else if st.at_block_boundary && (self.new_member || self.span_full()) {
                let fresh = self.new_member || self.span.is_none();
                self.checkpoint(st.bits, !fresh)?;
                self.new_member = false;
            }
            if st.produced > 0 || self.finished {
                return Ok(st.produced);
            }
        }
    }

    fn read_zstd(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.refill()?;
            if self.in_pos == self.in_len && self.src_eof {
                if !self.between_frames {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("zstd stream truncated at byte {}", self.comp_pos),
                    ));
                }
                self.close_span();
                self.finished = true;
                return Ok(0);
            }
            if self.between_frames && self.span_full() {
                self.checkpoint(0, false)?;
            }
            let (consumed, produced, hint) = {
                let mut input =
                    zstd::zstd_safe::InBuffer::around(&self.inbuf[self.in_pos..self.in_len]);
                let mut output = zstd::zstd_safe::OutBuffer::around(&mut *buf);
                let hint = self
                    .zs
                    .as_mut()
                    .expect("zstd decoder")
                    .decompress_stream(&mut output, &mut input)
                    .map_err(|c| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "zstd at byte {}: {}",
                                self.comp_pos,
                                zstd::zstd_safe::get_error_name(c)
                            ),
                        )
                    })?;
                (input.pos(), output.pos(), hint)
            };
            self.consume(consumed);
            self.produced(&buf[..produced]);
            self.too_long()?;
            self.between_frames = hint == 0;
            if hint == 0 {
                self.frames += 1;
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.refill()?;
        if self.in_pos == self.in_len && self.src_eof {
            self.close_span();
            self.finished = true;
            return Ok(0);
        }
        if self.span_full() {
            self.checkpoint(0, false)?;
        }
        let room = match &self.span {
            Some(s) => (self.span_size - (self.comp_pos - s.start)) as usize,
            None => buf.len(),
        };
        let n = buf.len().min(self.in_len - self.in_pos).min(room.max(1));
        buf[..n].copy_from_slice(&self.inbuf[self.in_pos..self.in_pos + n]);
        self.consume(n);
        self.produced(&buf[..n]);
        Ok(n)
    }

    /// Reads whatever is left (nothing is expected after the tar's end) and returns what was seen.
    pub fn finish(mut self) -> io::Result<Recorded<W>> {
        let mut sink = vec![0u8; 64 << 10];
        let mut extra = 0u64;
        while self.read(&mut sink)? > 0 {
            extra += 1;
            if extra > 256 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more than 16 MiB follow the tar's end-of-archive marker",
                ));
            }
        }
        Ok(Recorded {
            spans: self.spans,
            source: (
                match self.source {
                    SourceDigest::Compute(h) => h.finalize().into(),
                    SourceDigest::Proven(d) => d,
                },
                self.source_len,
            ),
            tar_size: self.tar_pos,
            windows: (self.windows, self.windows_pos),
            frames: self.frames,
        })
    }
}

impl<R: Read, W: Write> Read for SpanRecorder<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        match self.codec {
            SpanCodec::Gzip => self.read_gzip(buf),
            SpanCodec::Zstd => self.read_zstd(buf),
            SpanCodec::None => self.read_plain(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressible but not trivial bytes (many deflate blocks).
    fn input() -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..6 << 20)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    (x % 16) as u8 + b'a'
                } else {
                    (i / 4096) as u8
                }
            })
            .collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Reads the whole layer `step` bytes at a time.
    fn record(gz: &[u8], step: usize, proven: Option<[u8; 32]>) -> (Vec<u8>, Recorded<Vec<u8>>) {
        let mut rec = SpanRecorder::new(gz, SpanCodec::Gzip, 256 << 10, Vec::new()).unwrap();
        if let Some(d) = proven {
            rec = rec.with_source_digest(d);
        }
        let (mut out, mut buf) = (Vec::new(), vec![0; step]);
        loop {
            let n = rec.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, rec.finish().unwrap())
    }

    #[test]
    fn every_window_is_the_output_before_its_checkpoint_whatever_the_read_size() {
        let data = input();
        let gz = gzip(&data);
        let (small_out, small) = record(&gz, 4 << 10, None);
        let (large_out, large) = record(&gz, 1 << 20, None);
        assert!(
            small_out == data && large_out == data,
            "the tar read differs"
        );
        assert!(small.spans.len() > 4, "{} spans", small.spans.len());
        assert_eq!(small.spans.len(), large.spans.len());
        assert_eq!(small.windows.0, large.windows.0, "the windows differ");
        for (a, b) in small.spans.iter().zip(&large.spans) {
            assert_eq!((a.comp.clone(), a.tar_start), (b.comp.clone(), b.tar_start));
        }
        for s in small.spans.iter().filter(|s| s.window.end > s.window.start) {
            let stored = &small.windows.0[s.window.start as usize..s.window.end as usize];
            let w = zstd::bulk::decompress(stored, WINDOW_LEN).unwrap();
            let t = s.tar_start as usize;
            assert!(w == data[t - WINDOW_LEN..t], "window of span at {t}");
        }
    }

    #[test]
    fn the_layer_digest_is_computed_unless_the_caller_proves_it() {
        let gz = gzip(&input());
        let (_, computed) = record(&gz, 64 << 10, None);
        assert_eq!(computed.source, (sha256_of(&gz), gz.len() as u64));
        let (_, proven) = record(&gz, 64 << 10, Some([7; 32]));
        assert_eq!(proven.source, ([7; 32], gz.len() as u64));
        assert_eq!(proven.spans.len(), computed.spans.len());
    }

    fn sha256_of(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }
}
