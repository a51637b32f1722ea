//! Proving an original-image index: the layer blob is streamed once, start to end, through the
//! same indexing pass that built the index. Its SHA-256 must be the layer digest (which the image
//! manifest names) and the table's, its tar's the table's diff ID, and the disk derived from it must
//! have the served index's disk digest — so every byte of the disk is then chained to the manifest,
//! metadata included. On the way, every external chunk is handed to the engine (checked against the
//! index and cached): one sequential download fills the layer's file data.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazyblk_image_format::digest_string;

use super::build::{index_layer_with, IndexOptions};
use super::reader::OriginalLayer;
use crate::fetch::remote::RangeReader;
use crate::fetch::Engine;

/// Bytes per range request of the stream.
const STREAM_PIECE: u64 = 4 << 20;

/// What a verification established.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    /// The layer blob's digest (equal to the manifest's and the table's).
    pub layer_digest: String,
    /// The tar's digest (the diff ID), equal to the table's.
    pub diff_id: String,
    /// The disk digest derived from the tar, equal to the served index's.
    pub disk_digest: String,
    /// External chunks this pass stored (not local before).
    pub chunks_filled: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// A blocking `Read` over a range reader, in [`STREAM_PIECE`] requests, yielding to foreground reads.
struct RangeStream {
    reader: Arc<dyn RangeReader>,
    rt: tokio::runtime::Handle,
    engine: Engine,
    pos: u64,
    size: u64,
    buf: Bytes,
    /// Reading the registry (not a local copy): pieces wait while the layer has demand reads.
    yields: bool,
}

impl Read for RangeStream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.size {
                return Ok(0);
            }
            while self.yields && self.engine.foreground_reads() > 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            let end = (self.pos + STREAM_PIECE).min(self.size);
            let r = self.pos..end;
            let reader = self.reader.clone();
            let mut tries = 0;
            self.buf = loop {
                match self.rt.block_on(reader.read_range(r.clone())) {
                    Ok(b) if b.len() as u64 == r.end - r.start => break b,
                    Ok(b) => {
                        return Err(std::io::Error::other(format!(
                            "{}: {} bytes for a range of {}",
                            reader.describe(),
                            b.len(),
                            r.end - r.start
                        )))
                    }
                    Err(e) if e.retryable && tries < 5 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(200 << tries));
                    }
                    Err(e) => return Err(std::io::Error::other(e.to_string())),
                }
            };
            self.pos = end;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// Streams `original`'s layer through the indexing pass, fills `engine`'s external chunks and checks
/// that the result is the index being served. `expected_layer` is the layer digest the manifest
/// names, when known.
pub async fn fill_and_verify(
    engine: &Engine,
    original: &OriginalLayer,
    expected_layer: Option<&str>,
) -> Result<Verified, String> {
    let started = Instant::now();
    let table = original.table().await.map_err(|e| e.to_string())?;
    let source = original.source();
    let size = source.size().await.map_err(|e| e.to_string())?;
    if size != table.source_size {
        return Err(format!(
            "{}: the layer is {size} bytes; the index says {}",
            source.describe(),
            table.source_size
        ));
    }
    let stream = RangeStream {
        reader: source.clone(),
        rt: tokio::runtime::Handle::current(),
        engine: engine.clone(),
        pos: 0,
        size: table.source_size,
        buf: Bytes::new(),
        yields: !original.is_local(),
    };
    let opts = IndexOptions {
        chunk_shift: engine.index().chunk_shift(),
        threads: 1,
        // Only the disk's digest is compared: no startup region to mark (nor its index to re-read).
        metadata_region_bytes: 0,
        ..IndexOptions::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(8);
    let tap = Box::new(move |c: u64, b: &[u8]| {
        let _ = tx.blocking_send((c, Bytes::copy_from_slice(b)));
    });
    let e = engine.clone();
    let store = tokio::spawn(async move {
        let mut filled = 0u64;
        let mut first_err = None;
        while let Some((c, b)) = rx.recv().await {
            match e.offer_chunk(c, b) {
                Ok(true) => filled += 1,
                Ok(false) => {}
                Err(err) => {
                    first_err.get_or_insert(err);
                }
            }
        }
        (filled, first_err)
    });
    // The pass decodes the whole layer: background work on a thread of its own at the lowest
    // priority (its decoder thread inherits it), so container starts and demand reads — their
    // decoding included — get the node's CPUs first; it is slowed, never starved.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lazyblk-verify".into())
        .spawn(move || {
            crate::process::lowest_priority();
            let r = tempfile::tempdir().and_then(|dir| {
                index_layer_with(
                    stream,
                    &dir.path().join("meta"),
                    &dir.path().join("spans"),
                    &opts,
                    Some(tap),
                )
                .map_err(|e| std::io::Error::other(e.to_string()))
            });
            let _ = done_tx.send(r);
        })
        .map_err(|e| format!("verify thread: {e}"))?;
    let built = done_rx
        .await
        .map_err(|_| "the verify thread stopped".to_string())?
        .map_err(|e| format!("{}: {e}", source.describe()))?;
    let (filled, chunk_err) = store.await.map_err(|e| format!("store task: {e}"))?;
    let want_layer = digest_string(&table.source_digest);
    let layer = &built.input.digest;
    if layer != &want_layer || expected_layer.is_some_and(|d| d != layer) {
        return Err(format!(
            "{}: the layer's digest is {layer}; the index says {want_layer}{}",
            source.describe(),
            expected_layer
                .map(|d| format!(" and the manifest {d}"))
                .unwrap_or_default()
        ));
    }
    let want_diff = digest_string(&table.diff_id);
    if built.input.diff_id != want_diff {
        return Err(format!(
            "{}: the layer's tar has digest {}; the index says {want_diff}",
            source.describe(),
            built.input.diff_id
        ));
    }
    let served = digest_string(&engine.index().disk_digest());
    if built.blob.disk_digest != served {
        return Err(format!(
            "{}: the layer converts to disk {}, but the index served is disk {served}: the index does not describe this layer",
            source.describe(),
            built.blob.disk_digest
        ));
    }
    if let Some(err) = chunk_err {
        return Err(format!("{}: {err}", source.describe()));
    }
    Ok(Verified {
        layer_digest: layer.clone(),
        diff_id: built.input.diff_id,
        disk_digest: served,
        chunks_filled: filled,
        seconds: started.elapsed().as_secs_f64(),
    })
}
