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
    source: Sha256,
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
            source: Sha256::new(),
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
                    self.source.update(&self.inbuf[..n]);
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
            self.window.extend_from_slice(out);
            if self.window.len() > 2 * WINDOW_LEN {
                let cut = self.window.len() - WINDOW_LEN;
                self.window.drain(..cut);
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
            source: (self.source.finalize().into(), self.source_len),
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
