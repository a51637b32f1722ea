//! Opening a layer stream: compression detected by magic bytes, digests computed on the way through.

use std::io::{self, BufRead, BufReader, Read};

use sha2::{Digest as _, Sha256};

/// The compression of a layer stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
    /// zstd (`application/vnd.oci.image.layer.v1.tar+zstd`).
    Zstd,
}

/// Why a stream is not a layer we can read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Reading failed.
    #[error("reading the layer: {0}")]
    Io(#[from] io::Error),
    /// A compression we recognise but do not read.
    #[error("layer is {0}-compressed; only tar, tar+gzip and tar+zstd layers are supported")]
    UnsupportedCompression(&'static str),
    /// Empty input.
    #[error("layer is empty (0 bytes)")]
    Empty,
}

/// Looks at the first bytes of `r` and says how it is compressed (without consuming them).
pub fn detect<R: BufRead>(r: &mut R) -> Result<Compression, InputError> {
    let head = r.fill_buf()?;
    if head.is_empty() {
        return Err(InputError::Empty);
    }
    Ok(match head {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            return Err(InputError::UnsupportedCompression("xz"))
        }
        [b'B', b'Z', b'h', ..] => return Err(InputError::UnsupportedCompression("bzip2")),
        _ => Compression::None,
    })
}

/// A reader that hashes and counts what passes through it.
pub struct DigestReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> DigestReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        DigestReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// SHA-256 of the bytes read so far, and their count.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.count)
    }
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Counts bytes read into a shared counter (for progress reporting from another thread).
pub struct CountingReader<R> {
    inner: R,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R> CountingReader<R> {
    /// Wraps `inner`; `counter` is incremented by every read.
    pub fn new(inner: R, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        CountingReader { inner, counter }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// Where the compressed stream's digest and length land when its reader is dropped.
type DigestSlot = std::sync::Arc<std::sync::Mutex<Option<([u8; 32], u64)>>>;

/// The decompressed tar stream of a layer, with the digest of the compressed bytes (the OCI layer
/// digest) and of the tar (the diff ID) computed as it is read.
pub struct LayerStream {
    /// How the input was compressed.
    pub compression: Compression,
    tar: DigestReader<ReadAhead>,
    raw: DigestSlot,
}

/// Feeds the compressed-stream digest to a shared slot once the decoder drops its reader.
struct RawTap<R> {
    inner: Option<DigestReader<BufReader<R>>>,
    slot: DigestSlot,
}

impl<R: Read> Read for RawTap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

impl<R> Drop for RawTap<R> {
    fn drop(&mut self) {
        if let Some(r) = self.inner.take() {
            *self.slot.lock().expect("digest slot") = Some((r.hasher.finalize().into(), r.count));
        }
    }
}

/// Most bytes accepted after a tar's end-of-archive marker (padding).
pub const MAX_TRAILING_BYTES: u64 = 16 << 20;

impl LayerStream {
    /// Opens `input`, detecting its compression.
    pub fn open<R: Read + Send + 'static>(input: R) -> Result<LayerStream, InputError> {
        let mut buffered = BufReader::with_capacity(1 << 20, input);
        let compression = detect(&mut buffered)?;
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
        let tap = RawTap {
            inner: Some(DigestReader::new(buffered)),
            slot: slot.clone(),
        };
        let decoded: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(tap),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(tap)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(tap)?),
        };
        Ok(LayerStream {
            compression,
            tar: DigestReader::new(ReadAhead::spawn(decoded)?),
            raw: slot,
        })
    }

    /// Reads the rest of the stream (so trailing padding and the compressed stream's own checksums are
    /// checked) and returns `(layer digest, compressed bytes, diff ID, tar bytes)`.
    pub fn finish(mut self) -> io::Result<([u8; 32], u64, [u8; 32], u64)> {
        // Bounded: a few bytes of zero padding follow a tar's end in practice, never gigabytes
        // (a small compressed layer could otherwise keep the converter inflating zeros for hours).
        let trailing = io::copy(
            &mut (&mut self.tar).take(MAX_TRAILING_BYTES + 1),
            &mut io::sink(),
        )?;
        if trailing > MAX_TRAILING_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "more than {MAX_TRAILING_BYTES} bytes follow the tar's end-of-archive marker"
                ),
            ));
        }
        let (diff_id, tar_bytes) = self.tar.finish();
        // The decoder thread has been joined and has dropped the decoder and with it the tap, which
        // published the compressed digest.
        let (digest, raw_bytes) = self
            .raw
            .lock()
            .expect("digest slot")
            .take()
            .ok_or_else(|| io::Error::other("layer digest unavailable"))?;
        Ok((digest, raw_bytes, diff_id, tar_bytes))
    }

    /// Decompressed bytes read so far.
    pub fn tar_bytes(&self) -> u64 {
        self.tar.count()
    }
}

impl Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tar.read(buf)
    }
}

/// Reads `inner` on its own thread, one buffer ahead, so decompression (and the compressed-stream
/// digest) overlaps with tar parsing and the diff-ID digest on the caller's thread.
pub struct ReadAhead {
    pipe: PipeReader,
    thread: Option<std::thread::JoinHandle<()>>,
}

const READ_AHEAD_BUF: usize = 1 << 20;
const READ_AHEAD_DEPTH: usize = 4;

type PipeMessage = io::Result<Vec<u8>>;

/// Reads `inner` to its end (or its first error) in buffers sent to `tx` (reusing those the reader
/// gives back on `free`: fresh 1 MiB buffers cost a page fault per 4 KiB); stops early when the
/// reading side has gone.
fn pump<R: Read>(
    inner: &mut R,
    tx: &crossbeam_channel::Sender<PipeMessage>,
    free: &crossbeam_channel::Receiver<Vec<u8>>,
) {
    loop {
        let mut buf = free.try_recv().unwrap_or_default();
        buf.resize(READ_AHEAD_BUF, 0);
        let mut n = 0;
        let res = loop {
            match inner.read(&mut buf[n..]) {
                Ok(0) => break Ok(()),
                Ok(k) => {
                    n += k;
                    if n == buf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        buf.truncate(n);
        let last = n == 0 || res.is_err();
        let msg = match res {
            Ok(()) => Ok(buf),
            Err(e) => Err(e),
        };
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

impl ReadAhead {
    /// Starts the reading thread.
    pub fn spawn(mut inner: Box<dyn Read + Send>) -> io::Result<ReadAhead> {
        let (tx, rx) = crossbeam_channel::bounded(READ_AHEAD_DEPTH);
        let (free_tx, free) = crossbeam_channel::bounded(READ_AHEAD_DEPTH);
        let thread = std::thread::Builder::new()
            .name("lazyblk-decode".into())
            .spawn(move || pump(&mut inner, &tx, &free))?;
        Ok(ReadAhead {
            pipe: PipeReader::new(rx, free_tx),
            thread: Some(thread),
        })
    }
}

/// Reads `inner` on a thread of `scope`, a few buffers ahead of the returned reader; the handle gives
/// `inner` back once it has been read to its end, failed, or the reader was dropped. Drop the reader
/// before joining (a full pipe holds the thread until then).
pub fn read_ahead_scoped<'scope, R: Read + Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    mut inner: R,
) -> io::Result<(PipeReader, std::thread::ScopedJoinHandle<'scope, R>)> {
    let (tx, rx) = crossbeam_channel::bounded(READ_AHEAD_DEPTH);
    let (free_tx, free) = crossbeam_channel::bounded(READ_AHEAD_DEPTH);
    let thread = std::thread::Builder::new()
        .name("lazyblk-decode".into())
        .spawn_scoped(scope, move || {
            pump(&mut inner, &tx, &free);
            inner
        })?;
    Ok((PipeReader::new(rx, free_tx), thread))
}

/// The reading side of a read-ahead thread.
pub struct PipeReader {
    rx: Option<crossbeam_channel::Receiver<PipeMessage>>,
    /// Read buffers go back to the thread.
    free: crossbeam_channel::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

impl PipeReader {
    fn new(
        rx: crossbeam_channel::Receiver<PipeMessage>,
        free: crossbeam_channel::Sender<Vec<u8>>,
    ) -> PipeReader {
        PipeReader {
            rx: Some(rx),
            free,
            cur: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            let rx = self.rx.as_ref().expect("receiver lives until drop");
            match rx.recv() {
                Ok(Ok(buf)) if buf.is_empty() => self.done = true,
                Ok(Ok(buf)) => {
                    let used = std::mem::replace(&mut self.cur, buf);
                    let _ = self.free.try_send(used);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("decoder thread stopped"));
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.pipe.read(out)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Closing the channel first makes a thread blocked on a full channel give up.
        self.pipe.rx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_magic_and_hashes_both_layers() {
        use std::io::Write;
        let data = b"not really a tar but fine for digests".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let mut s = LayerStream::open(std::io::Cursor::new(gz.clone())).unwrap();
        assert_eq!(s.compression, Compression::Gzip);
        let mut first = [0u8; 10];
        s.read_exact(&mut first).unwrap();
        let (digest, raw, diff_id, tar) = s.finish().unwrap();
        assert_eq!(raw, gz.len() as u64);
        assert_eq!(tar, data.len() as u64);
        assert_eq!(digest, lazyblk_image_format::sha256(&gz));
        assert_eq!(diff_id, lazyblk_image_format::sha256(&data));
        let z = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(
            LayerStream::open(std::io::Cursor::new(z))
                .unwrap()
                .compression,
            Compression::Zstd
        );
        assert!(matches!(
            LayerStream::open(std::io::Cursor::new(Vec::new())),
            Err(InputError::Empty)
        ));
        assert!(matches!(
            LayerStream::open(std::io::Cursor::new(b"\xfd7zXZ\0rest".to_vec())),
            Err(InputError::UnsupportedCompression("xz"))
        ));
    }
}
