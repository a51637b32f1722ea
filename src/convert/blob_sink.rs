//! A [`BlockSink`] that cuts the image into chunks, compresses them on worker threads and appends them
//! to a blob in a deterministic order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use lazyblk_image_format::{
    encode_chunk, encode_external, BlobSummary, BlobWriter, Codec, EncodedChunk,
};

use crate::ext4::BlockSink;

/// (sequence, chunk, bytes, external).
type Job = (u64, u64, Vec<u8>, bool);
type Done = (u64, u64, EncodedChunk);

/// Chunking, compressing sink. Writes at or above `head_end` must come in ascending order; the head
/// (below `head_end`) is buffered until [`BlockSink::set_size`].
pub struct ChunkingSink<W: Write + Send + 'static> {
    chunk_size: u64,
    head_end: u64,
    partial: BTreeMap<u64, Vec<u8>>,
    flushed_below: u64,
    seq: u64,
    size: Option<u64>,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<(W, BlobSummary)>>>,
    size_tx: Option<Sender<u64>>,
    /// Original-image index mode: file data with a known tar origin is recorded here instead of
    /// stored, and chunks holding nothing else become external chunks.
    data_map: Option<Vec<DataRun>>,
    /// Chunks (not flushed yet) written by anything but file data with an origin.
    stored_chunks: HashSet<u64>,
    /// Sees every external chunk's bytes (an original layer's fill).
    tap: Option<ExternalTap>,
}

/// Called with each external chunk's number and bytes.
pub type ExternalTap = Box<dyn FnMut(u64, &[u8]) + Send>;

/// A run of file data on the disk and where it lies in the layer's tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRun {
    /// Byte offset on the disk.
    pub disk: u64,
    /// Byte offset in the uncompressed tar stream.
    pub tar: u64,
    /// Length in bytes.
    pub len: u64,
}

impl<W: Write + Send + 'static> ChunkingSink<W> {
    /// Starts the worker and writer threads. `threads` compressors (at least one).
    pub fn new(
        out: W,
        chunk_shift: u8,
        codec: Codec,
        threads: usize,
        head_end: u64,
    ) -> io::Result<Self> {
        let blob = BlobWriter::new(out, chunk_shift)?;
        let threads = threads.max(1);
        let (jobs_tx, jobs_rx) = bounded::<Job>(threads * 4);
        let (done_tx, done_rx) = bounded::<Done>(threads * 4);
        let (size_tx, size_rx) = bounded::<u64>(1);
        let workers = (0..threads)
            .map(|i| {
                let rx = jobs_rx.clone();
                let tx = done_tx.clone();
                std::thread::Builder::new()
                    .name(format!("lazyblk-compress-{i}"))
                    .spawn(move || {
                        for (seq, chunk, data, external) in rx {
                            let enc = if external {
                                encode_external(&data)
                            } else {
                                encode_chunk(&data, codec)
                            };
                            if tx.send((seq, chunk, enc)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawn compressor thread")
            })
            .collect();
        drop(done_tx);
        let writer = std::thread::Builder::new()
            .name("lazyblk-blob-writer".into())
            .spawn(move || write_in_order(blob, done_rx, size_rx))?;
        Ok(ChunkingSink {
            chunk_size: 1 << chunk_shift,
            head_end,
            partial: BTreeMap::new(),
            flushed_below: head_end >> chunk_shift,
            seq: 0,
            size: None,
            jobs: Some(jobs_tx),
            workers,
            writer: Some(writer),
            size_tx: Some(size_tx),
            data_map: None,
            stored_chunks: HashSet::new(),
            tap: None,
        })
    }

    /// Original-image index mode: file data written with an origin is not stored; the chunks that
    /// hold only such data become external chunks, and [`ChunkingSink::take_data_map`] says where
    /// their bytes are in the tar.
    pub fn external_file_data(mut self) -> Self {
        self.data_map = Some(Vec::new());
        self
    }

    /// Hands every external chunk's bytes to `tap` as it is completed.
    pub fn tap_external(mut self, tap: ExternalTap) -> Self {
        self.tap = Some(tap);
        self
    }

    /// The data map recorded so far (original-image index mode), in disk order.
    pub fn take_data_map(&mut self) -> Vec<DataRun> {
        self.data_map
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn submit(&mut self, chunk: u64, data: Vec<u8>) -> io::Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let external = self.data_map.is_some() && !self.stored_chunks.remove(&chunk);
        if let (true, Some(tap)) = (external, self.tap.as_mut()) {
            tap(chunk, &data);
        }
        let jobs = self.jobs.as_ref().expect("sink already finished");
        if jobs.send((seq, chunk, data, external)).is_err() {
            return Err(self.writer_error());
        }
        Ok(())
    }

    /// The writer thread stopped early: return its error.
    fn writer_error(&mut self) -> io::Error {
        self.jobs = None;
        match self.writer.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => e,
            _ => io::Error::other("blob writer stopped"),
        }
    }

    /// Waits for every chunk to be written and the index and footer after them.
    pub fn finish(mut self) -> io::Result<(W, BlobSummary)> {
        let size = self
            .size
            .ok_or_else(|| io::Error::other("image size never set"))?;
        self.jobs = None;
        for w in self.workers.drain(..) {
            w.join()
                .map_err(|_| io::Error::other("compressor thread panicked"))?;
        }
        self.size_tx.take().expect("size sender").send(size).ok();
        self.writer
            .take()
            .expect("writer")
            .join()
            .map_err(|_| io::Error::other("blob writer panicked"))?
    }
}

impl<W: Write + Send + 'static> BlockSink for ChunkingSink<W> {
    fn write_file_data(&mut self, offset: u64, data: &[u8], origin: Option<u64>) -> io::Result<()> {
        let (Some(map), Some(tar)) = (self.data_map.as_mut(), origin) else {
            return self.write_at(offset, data);
        };
        let len = data.len() as u64;
        match map.last_mut() {
            Some(l) if l.disk + l.len == offset && l.tar + l.len == tar => l.len += len,
            _ => map.push(DataRun {
                disk: offset,
                tar,
                len,
            }),
        }
        self.write_bytes(offset, data)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.data_map.is_some() && !data.is_empty() {
            let cs = self.chunk_size;
            for c in offset / cs..=(offset + data.len() as u64 - 1) / cs {
                self.stored_chunks.insert(c);
            }
        }
        self.write_bytes(offset, data)
    }

    fn set_size(&mut self, size: u64) -> io::Result<()> {
        self.finish_chunks(size)
    }
}

impl<W: Write + Send + 'static> ChunkingSink<W> {
    fn write_bytes(&mut self, offset: u64, mut data: &[u8]) -> io::Result<()> {
        let cs = self.chunk_size;
        let mut off = offset;
        let first_chunk = offset / cs;
        if off >= self.head_end && first_chunk < self.flushed_below {
            return Err(io::Error::other(format!(
                "write at {offset} after that chunk was flushed"
            )));
        }
        while !data.is_empty() {
            let c = off / cs;
            let within = (off % cs) as usize;
            let n = data.len().min(cs as usize - within);
            let buf = self
                .partial
                .entry(c)
                .or_insert_with(|| vec![0u8; cs as usize]);
            buf[within..within + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            off += n as u64;
        }
        if offset >= self.head_end {
            // Writes are ascending: every chunk before the one this write started in is complete.
            let done: Vec<u64> = self
                .partial
                .range(self.flushed_below..first_chunk)
                .map(|(&c, _)| c)
                .collect();
            for c in done {
                let buf = self.partial.remove(&c).expect("present");
                self.submit(c, buf)?;
            }
            self.flushed_below = self.flushed_below.max(first_chunk);
        }
        Ok(())
    }

    fn finish_chunks(&mut self, size: u64) -> io::Result<()> {
        let cs = self.chunk_size;
        let last = size.div_ceil(cs);
        let rest = std::mem::take(&mut self.partial);
        // Data and metadata chunks first, then the head, so the order in the blob is reproducible.
        let head_chunks = self.head_end.div_ceil(cs);
        let (head, body): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(c, _)| *c < head_chunks);
        for (c, mut buf) in body.into_iter().chain(head) {
            if c >= last {
                return Err(io::Error::other(format!(
                    "chunk {c} lies beyond the image size {size}"
                )));
            }
            buf.truncate((size - c * cs).min(cs) as usize);
            self.submit(c, buf)?;
        }
        self.size = Some(size);
        Ok(())
    }
}

fn write_in_order<W: Write>(
    mut blob: BlobWriter<W>,
    done: Receiver<Done>,
    size: Receiver<u64>,
) -> io::Result<(W, BlobSummary)> {
    let mut pending: HashMap<u64, (u64, EncodedChunk)> = HashMap::new();
    let mut next = 0u64;
    for (seq, chunk, enc) in done {
        pending.insert(seq, (chunk, enc));
        while let Some((chunk, enc)) = pending.remove(&next) {
            blob.append(chunk, &enc)?;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other(
            "chunks missing from the compressor pipeline",
        ));
    }
    let size = size
        .recv()
        .map_err(|_| io::Error::other("conversion aborted"))?;
    blob.finish(size)
}
