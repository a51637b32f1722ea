//! Building the index of one original layer: the layer is read once; its tar goes through the
//! converter with file data recorded as a map instead of stored (so the blob holds only the ext4
//! metadata), while the compressed stream is cut into verified, resumable spans.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use lazyblk_image_format::{digest_string, sha256, Codec, DEFAULT_CHUNK_SHIFT};

use super::spans::SpanRecorder;
use super::table::{SpanCodec, SpanTable};
use crate::convert::input::{detect, read_ahead_scoped, Compression, DigestReader};
use crate::convert::{
    annotations, apply_tar, finish_options_for, BlobInfo, ChunkingSink, ConvertError, ExternalTap,
    InputSummary, TarStats, ANNOTATION_PREFIX, DEFAULT_MAX_ENTRIES,
};
use crate::ext4::{Ext4Builder, Ext4Summary, BLOCK_SIZE, DATA_START_BLOCK};

/// Default span: a checkpoint every this many compressed bytes.
pub const DEFAULT_SPAN_SIZE: u64 = 1 << 20;
/// zstd level of an index's metadata chunks.
pub const INDEX_ZSTD_LEVEL: i32 = 3;
/// Smallest and largest `--span-size`.
pub const SPAN_SIZE_RANGE: std::ops::RangeInclusive<u64> = (256 << 10)..=(16 << 20);

/// How to index.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Chunk size exponent of the disk.
    pub chunk_shift: u8,
    /// Compressed bytes per span.
    pub span_size: u64,
    /// Compression threads for the metadata chunks.
    pub threads: usize,
    /// Most tar entries accepted.
    pub max_entries: u64,
    /// Largest metadata startup region of the metadata blob, stored bytes (0: none; see
    /// [`crate::convert::ConvertOptions::metadata_region_bytes`]).
    pub metadata_region_bytes: u64,
    /// The layer blob's digest, when the caller proves it of the bytes it feeds (a download that
    /// fails unless the blob matches its descriptor) and uses nothing built before that proof is in:
    /// the blob is then not hashed a second time on the decoder thread, the build's critical path.
    /// `None`: the blob is hashed here and [`IndexedLayer::input`] reports what was read.
    pub proven_source_digest: Option<[u8; 32]>,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            chunk_shift: DEFAULT_CHUNK_SHIFT,
            span_size: DEFAULT_SPAN_SIZE,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            max_entries: DEFAULT_MAX_ENTRIES,
            metadata_region_bytes: crate::convert::DEFAULT_METADATA_REGION,
            proven_source_digest: None,
        }
    }
}

/// The span blob: the stored windows, then the stored span table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpanBlobInfo {
    /// `sha256:` digest of the span blob.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Offset of the stored table in it.
    pub table_offset: u64,
    /// Length of the stored table.
    pub table_length: u64,
    /// `sha256:` of the stored table.
    pub table_digest: String,
    /// Spans.
    pub spans: u64,
    /// Runs of file data in the map.
    pub data_runs: u64,
    /// How the layer is compressed.
    pub codec: SpanCodec,
}

/// What indexing one layer produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IndexedLayer {
    /// The original layer.
    pub input: InputSummary,
    /// The tar's contents.
    pub tar: TarStats,
    /// The filesystem described.
    pub ext4: Ext4Summary,
    /// The metadata blob (a lazyblk blob whose file-data chunks are external).
    pub blob: BlobInfo,
    /// The span blob.
    pub spans: SpanBlobInfo,
    /// Annotations for the metadata blob's descriptor.
    pub annotations: BTreeMap<String, String>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Media type of the span blob.
pub const SPANS_MEDIA_TYPE: &str = "application/vnd.lazyblk.spans.v1";

/// Indexes the layer read from `input`, writing the metadata blob to `blob_out` and the span blob to
/// `spans_out` (both appear only when everything succeeded).
pub fn index_layer<R: Read + Send>(
    input: R,
    blob_out: &Path,
    spans_out: &Path,
    opts: &IndexOptions,
) -> Result<IndexedLayer, ConvertError> {
    index_layer_with(input, blob_out, spans_out, opts, None)
}

/// [`index_layer`], handing each external chunk's bytes to `tap` (re-deriving a served layer's
/// index fills its chunks on the way: `super::verify`).
pub fn index_layer_with<R: Read + Send>(
    input: R,
    blob_out: &Path,
    spans_out: &Path,
    opts: &IndexOptions,
    tap: Option<ExternalTap>,
) -> Result<IndexedLayer, ConvertError> {
    let started = Instant::now();
    let io = |what: &str| {
        let what = what.to_string();
        move |source: std::io::Error| ConvertError::Io {
            context: what,
            source,
        }
    };
    let dir = blob_out.parent().unwrap_or(Path::new("."));
    let blob_tmp = tempfile::Builder::new()
        .prefix(".lazyblk-index-")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file"))?;
    let spans_tmp = tempfile::Builder::new()
        .prefix(".lazyblk-spans-")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file"))?;

    let mut buffered = BufReader::with_capacity(1 << 20, input);
    let compression = detect(&mut buffered)?;
    let codec = match compression {
        Compression::Gzip => SpanCodec::Gzip,
        Compression::Zstd => SpanCodec::Zstd,
        Compression::None => SpanCodec::None,
    };
    let windows = BufWriter::new(
        spans_tmp
            .as_file()
            .try_clone()
            .map_err(io("cloning a handle"))?,
    );
    let mut rec = SpanRecorder::new(buffered, codec, opts.span_size, windows)
        .map_err(io("starting the decoder"))?;
    if let Some(d) = opts.proven_source_digest {
        rec = rec.with_source_digest(d);
    }
    let out = BufWriter::with_capacity(
        1 << 20,
        blob_tmp
            .as_file()
            .try_clone()
            .map_err(io("cloning a handle"))?,
    );
    let sink = ChunkingSink::new(
        out,
        opts.chunk_shift,
        // The index holds only filesystem metadata (about 2% of a layer): a fast level keeps the
        // build near a plain copy of the image, which is what an index build competes with.
        Codec::Zstd {
            level: INDEX_ZSTD_LEVEL,
        },
        opts.threads,
        DATA_START_BLOCK * BLOCK_SIZE as u64,
    )
    .map_err(io("starting the compressors"))?
    .external_file_data();
    let sink = match tap {
        Some(t) => sink.tap_external(t),
        None => sink,
    };
    let mut builder = Ext4Builder::new(sink);
    // Two stages on two threads: decoding (and the compressed stream's digests and checkpoints) on a
    // thread of its own, a few MiB ahead of the tar parser and the diff_id digest on this one.
    let (tar_stats, seen, (diff_id, tar_size)) = std::thread::scope(|scope| {
        let (pipe, recorder) =
            read_ahead_scoped(scope, rec).map_err(io("starting the decoder thread"))?;
        let mut tar = DigestReader::new(pipe);
        let parsed = apply_tar(&mut tar, &mut builder, opts.max_entries)
            .map_err(ConvertError::from)
            .and_then(|(stats, rest)| {
                drain_after_end(rest).map_err(io("reading the end of the layer"))?;
                Ok(stats)
            });
        // Dropping the reader first lets a decoder blocked on a full pipe stop.
        let tar_digest = tar.finish();
        let rec = recorder
            .join()
            .map_err(|_| io("decoding the layer")(std::io::Error::other("decoder panicked")))?;
        let stats = parsed?;
        let seen = rec.finish().map_err(io("reading the end of the layer"))?;
        Ok::<_, ConvertError>((stats, seen, tar_digest))
    })?;
    if tar_size != seen.tar_size {
        return Err(io("decoding the layer")(std::io::Error::other(format!(
            "the decoder produced {} tar bytes, the parser read {tar_size}",
            seen.tar_size
        ))));
    }
    if codec == SpanCodec::Zstd && seen.frames <= 1 {
        tracing::warn!(
            "the layer is a single zstd frame: it cannot be read from the middle, so the first read \
             of its file data fetches the whole layer (recompress it with frames, e.g. zstd --block-size / \
             the zstd:chunked or seekable format, to read it lazily)"
        );
    }
    let (layer_digest, layer_size) = seen.source;
    let (mut sink, ext4) = builder.finish(&finish_options_for(&diff_id))?;
    let map = sink.take_data_map();
    let (mut out, blob) = sink.finish().map_err(io("writing the blob"))?;
    out.flush().map_err(io("writing the blob"))?;
    drop(out);
    let (mut windows, windows_len) = seen.windows;
    let table = SpanTable {
        codec,
        source_size: layer_size,
        tar_size,
        source_digest: layer_digest,
        diff_id,
        spans: seen.spans,
        map,
        piece_size: if codec == SpanCodec::Gzip {
            super::table::PIECE_SIZE
        } else {
            0
        },
    };
    table.validate().map_err(|e| ConvertError::Io {
        context: "building the span table".into(),
        source: std::io::Error::other(e),
    })?;
    let stored = table.to_stored();
    windows
        .write_all(&stored)
        .map_err(io("writing the span blob"))?;
    windows.flush().map_err(io("writing the span blob"))?;
    drop(windows);
    blob_tmp
        .as_file()
        .sync_all()
        .map_err(io("syncing the blob"))?;
    spans_tmp
        .as_file()
        .sync_all()
        .map_err(io("syncing the span blob"))?;
    let spans_digest = digest_string(&file_sha256(spans_tmp.path()).map_err(io("hashing"))?);
    let spans_size = windows_len + stored.len() as u64;
    blob_tmp.persist(blob_out).map_err(|e| ConvertError::Io {
        context: format!("renaming to {}", blob_out.display()),
        source: e.error,
    })?;
    spans_tmp.persist(spans_out).map_err(|e| ConvertError::Io {
        context: format!("renaming to {}", spans_out.display()),
        source: e.error,
    })?;
    let input = InputSummary {
        compression,
        bytes: layer_size,
        digest: digest_string(&layer_digest),
        tar_bytes: tar_size,
        diff_id: digest_string(&diff_id),
    };
    let mut info = BlobInfo::from(&blob);
    // Every stored chunk of an index's blob is metadata: its tail is fetched with the index.
    crate::convert::mark_metadata_region(
        blob_out,
        &mut info,
        &blob.index_digest,
        DATA_START_BLOCK + ext4.data_blocks,
        opts.metadata_region_bytes,
    )?;
    let blob = info;
    let spans = SpanBlobInfo {
        digest: spans_digest,
        size: spans_size,
        table_offset: windows_len,
        table_length: stored.len() as u64,
        table_digest: digest_string(&sha256(&stored)),
        spans: table.spans.len() as u64,
        data_runs: table.map.len() as u64,
        codec,
    };
    let mut ann = annotations(&input, &blob);
    for (k, v) in span_annotations(&spans, layer_size) {
        ann.insert(k, v);
    }
    Ok(IndexedLayer {
        input,
        tar: tar_stats,
        ext4,
        blob,
        spans,
        annotations: ann,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The descriptor annotations that make a lazyblk blob an original-image index (docs/format.md).
pub fn span_annotations(spans: &SpanBlobInfo, source_size: u64) -> BTreeMap<String, String> {
    [
        ("spans-digest", spans.digest.clone()),
        ("spans-table-offset", spans.table_offset.to_string()),
        ("spans-table-length", spans.table_length.to_string()),
        ("spans-table-digest", spans.table_digest.clone()),
        ("source-size", source_size.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v))
    .collect()
}

/// Most bytes accepted after the tar's end-of-archive marker (zero padding, usually a few KiB).
const MAX_AFTER_END: u64 = 16 << 20;

/// Reads what follows the end-of-archive marker (it is part of the diff_id), at most
/// [`MAX_AFTER_END`] bytes.
fn drain_after_end<R: Read>(tar: &mut R) -> std::io::Result<()> {
    let n = std::io::copy(
        &mut tar.by_ref().take(MAX_AFTER_END + 1),
        &mut std::io::sink(),
    )?;
    if n > MAX_AFTER_END {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "more than {} MiB follow the tar's end-of-archive marker",
                MAX_AFTER_END >> 20
            ),
        ));
    }
    Ok(())
}

fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().into())
}
