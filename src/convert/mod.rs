//! Layer conversion: a tar layer (plain, gzip or zstd) becomes a lazyblk blob holding an ext4 image,
//! in one streaming pass and without extracting anything onto the host filesystem.

mod blob_sink;
pub mod input;
pub mod tar_layer;
pub mod tar_reader;
pub mod tar_sparse;

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lazyblk_image_format::{digest_string, sha256, BlobSummary, Codec, DEFAULT_CHUNK_SHIFT};

pub use blob_sink::{ChunkingSink, DataRun, ExternalTap};
pub use input::{Compression, InputError, LayerStream};
pub use tar_layer::{apply_tar, TarError, TarStats};

use crate::ext4::{
    Ext4Builder, Ext4Error, Ext4Summary, FinishOptions, BLOCK_SIZE, DATA_START_BLOCK,
};

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Chunk size exponent (12..=22).
    pub chunk_shift: u8,
    /// Chunk compression.
    pub codec: Codec,
    /// Compression threads.
    pub threads: usize,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Most tar entries accepted (each costs about 0.6 KiB of memory until the image is written:
    /// 1M entries peaked at 569 MiB).
    pub max_entries: u64,
    /// Largest *metadata startup region*, in stored bytes (0: none): the filesystem metadata at the
    /// end of the blob (directories, inode tables, the superblock's chunk), marked with the
    /// `startup-offset` annotation so a reader fetches it in the same request as the index.
    pub metadata_region_bytes: u64,
}

/// Default [`ConvertOptions::metadata_region_bytes`].
pub const DEFAULT_METADATA_REGION: u64 = 8 << 20;
/// Most decoded bytes a metadata startup region may hold: what a reader serves from one
/// ([`crate::fetch::engine::MAX_STARTUP_DECODED`]). 32 MiB left the root directory of the torch
/// image's layer (35 MB of directories and extent blocks after its file data) outside the region,
/// so every start read it from the registry (docs/benchmarks.md, run W).
pub const MAX_METADATA_REGION_DECODED: u64 = crate::fetch::engine::MAX_STARTUP_DECODED;

/// Default [`ConvertOptions::max_entries`].
pub const DEFAULT_MAX_ENTRIES: u64 = 4_000_000;

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_shift: DEFAULT_CHUNK_SHIFT,
            codec: Codec::default(),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            progress: false,
            max_entries: DEFAULT_MAX_ENTRIES,
            metadata_region_bytes: DEFAULT_METADATA_REGION,
        }
    }
}

/// Why a conversion failed. No output file is left behind in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The input is not a readable layer.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The tar stream or one of its entries is bad.
    #[error(transparent)]
    Tar(#[from] TarError),
    /// Building the filesystem failed.
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConvertError {
    let context = context.into();
    move |source| ConvertError::Io { context, source }
}

/// The input side of a conversion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InputSummary {
    /// Detected compression.
    pub compression: Compression,
    /// Bytes of the (compressed) input: the OCI layer blob.
    pub bytes: u64,
    /// `sha256:` digest of the input: the OCI layer digest.
    pub digest: String,
    /// Bytes of the uncompressed tar.
    pub tar_bytes: u64,
    /// `sha256:` digest of the uncompressed tar: the OCI diff ID.
    pub diff_id: String,
}

/// The output side: everything an OCI descriptor and its annotations need.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobInfo {
    /// `sha256:` digest of the blob.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    /// Offset of the index in the blob.
    pub index_offset: u64,
    /// Index length in bytes.
    pub index_length: u64,
    /// `sha256:` digest of the index.
    pub index_digest: String,
    /// `sha256:` disk digest (digest of the index with chunk offsets zeroed): the layer's diff ID
    /// in a converted image's config.
    pub disk_digest: String,
    /// Uncompressed image size in bytes.
    pub image_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Chunks that are all zeros (not stored).
    pub zero_chunks: u64,
    /// Bytes of stored chunk data.
    pub stored_bytes: u64,
    /// Start of the blob's startup region (`[startup_offset, index_offset)`, fetched with the index):
    /// the filesystem metadata at the end of the blob, if the converter marked it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_offset: Option<u64>,
}

impl From<&BlobSummary> for BlobInfo {
    fn from(s: &BlobSummary) -> Self {
        BlobInfo {
            digest: digest_string(&s.blob_digest),
            size: s.blob_size,
            index_offset: s.index_offset,
            index_length: s.index_length,
            index_digest: digest_string(&s.index_digest),
            disk_digest: digest_string(&s.disk_digest),
            image_size: s.image_size,
            chunk_size: 1 << s.chunk_shift,
            chunk_count: s.chunk_count,
            zero_chunks: s.zero_chunks,
            stored_bytes: s.stored_bytes,
            startup_offset: None,
        }
    }
}

/// The blob offset from which every stored chunk up to the index is filesystem metadata — a chunk
/// at or after disk byte `metadata_start` (lazyblk's ext4 puts all metadata after the file data) or
/// in the head below `head_end` (the superblock's chunk, written last) — taking chunks from the end
/// while the region stays within `max_stored` stored and [`MAX_METADATA_REGION_DECODED`] decoded
/// bytes. `None` when not even the last chunk qualifies.
pub fn metadata_region(
    index: &lazyblk_image_format::Index,
    index_offset: u64,
    head_end: u64,
    metadata_start: u64,
    max_stored: u64,
) -> Option<u64> {
    let cs = index.chunk_size();
    let mut stored: Vec<u64> = (0..index.chunk_count())
        .filter(|&c| index.entry(c).is_stored())
        .collect();
    stored.sort_by_key(|&c| std::cmp::Reverse(index.entry(c).offset));
    let (mut start, mut decoded) = (index_offset, 0u64);
    for c in stored {
        let e = index.entry(c);
        let metadata = (c + 1) * cs > metadata_start || (c + 1) * cs <= head_end;
        decoded += index.chunk_len(c) as u64;
        if !metadata
            || e.blob_range().end != start
            || index_offset - e.offset > max_stored
            || decoded > MAX_METADATA_REGION_DECODED
        {
            break;
        }
        start = e.offset;
    }
    (start < index_offset).then_some(start)
}

/// Sets `blob.startup_offset` to the metadata region of the blob at `path` (see
/// [`metadata_region`]); file data ends at disk block `data_end_block`.
pub(crate) fn mark_metadata_region(
    path: &Path,
    blob: &mut BlobInfo,
    index_digest: &lazyblk_image_format::Digest,
    data_end_block: u64,
    max_stored: u64,
) -> Result<(), ConvertError> {
    if max_stored == 0 {
        return Ok(());
    }
    let f = crate::blobfile::BlobFile::open(path, Some(index_digest)).map_err(|e| {
        ConvertError::Io {
            context: "reading back the index".into(),
            source: std::io::Error::other(e),
        }
    })?;
    blob.startup_offset = metadata_region(
        f.index(),
        blob.index_offset,
        DATA_START_BLOCK * BLOCK_SIZE as u64,
        data_end_block * BLOCK_SIZE as u64,
        max_stored,
    );
    Ok(())
}

/// Media type of a lazyblk layer blob.
pub const MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.lazyblk+ext4";
/// Prefix of the descriptor annotations (containerd forwards `containerd.io/snapshot/*` to snapshotters).
pub const ANNOTATION_PREFIX: &str = "containerd.io/snapshot/lazyblk/";

/// The descriptor annotations a reader needs to open the blob without extra round trips
/// (see docs/format.md).
pub fn annotations(
    input: &InputSummary,
    blob: &BlobInfo,
) -> std::collections::BTreeMap<String, String> {
    [
        ("version", "1".to_string()),
        ("index-offset", blob.index_offset.to_string()),
        ("index-length", blob.index_length.to_string()),
        ("index-digest", blob.index_digest.clone()),
        ("image-size", blob.image_size.to_string()),
        ("chunk-size", blob.chunk_size.to_string()),
        ("source-digest", input.digest.clone()),
        ("diff-id", input.diff_id.clone()),
    ]
    .into_iter()
    .chain(
        blob.startup_offset
            .map(|o| ("startup-offset", o.to_string())),
    )
    .map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v))
    .collect()
}

/// What a conversion did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertSummary {
    /// The layer read.
    pub input: InputSummary,
    /// The tar's contents.
    pub tar: TarStats,
    /// The filesystem built.
    pub ext4: Ext4Summary,
    /// The blob written.
    pub blob: BlobInfo,
    /// Media type for the blob's descriptor.
    pub media_type: &'static str,
    /// Annotations for the blob's descriptor.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// UUID and hash seed derived from the layer's diff ID, so the same layer gives the same image anywhere.
pub fn finish_options_for(diff_id: &[u8; 32]) -> FinishOptions {
    let derive = |label: &[u8]| {
        let mut v = label.to_vec();
        v.extend_from_slice(diff_id);
        let d = sha256(&v);
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        out
    };
    let mut uuid = derive(b"lazyblk:uuid:");
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    FinishOptions {
        uuid,
        hash_seed: derive(b"lazyblk:hash-seed:"),
        label: "lazyblk".into(),
    }
}

/// Converts the layer read from `input` into a blob at `output`. `input_len`, when known, sizes the
/// progress bar. The blob appears at `output` only when everything succeeded.
pub fn convert_layer<R: Read + Send + 'static>(
    input: R,
    input_len: Option<u64>,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary, ConvertError> {
    let started = Instant::now();
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".lazyblk-convert-")
        .tempfile_in(dir)
        .map_err(io_ctx(format!(
            "creating a temporary file in {}",
            dir.display()
        )))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(io_ctx("cloning the output handle"))?;
    let out = BufWriter::with_capacity(1 << 20, file);
    let sink = ChunkingSink::new(
        out,
        opts.chunk_shift,
        opts.codec,
        opts.threads,
        DATA_START_BLOCK * BLOCK_SIZE as u64,
    )
    .map_err(io_ctx("starting the compressors"))?;

    let counter = Arc::new(AtomicU64::new(0));
    let progress = opts
        .progress
        .then(|| Progress::start(counter.clone(), input_len))
        .flatten();
    let mut stream = LayerStream::open(input::CountingReader::new(input, counter))?;
    let mut builder = Ext4Builder::new(sink);
    let (tar_stats, _) = apply_tar(&mut stream, &mut builder, opts.max_entries)?;
    let compression = stream.compression;
    let (layer_digest, raw_bytes, diff_id, tar_bytes) = stream
        .finish()
        .map_err(io_ctx("reading the end of the layer stream"))?;
    let (sink, ext4) = builder.finish(&finish_options_for(&diff_id))?;
    let (mut out, blob) = sink.finish().map_err(io_ctx("writing the blob"))?;
    out.flush().map_err(io_ctx("writing the blob"))?;
    let file = out.into_inner().map_err(|e| ConvertError::Io {
        context: "writing the blob".into(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_ctx("syncing the blob"))?;
    if let Some(p) = progress {
        p.stop();
    }
    tmp.persist(output).map_err(|e| ConvertError::Io {
        context: format!("renaming the blob to {}", output.display()),
        source: e.error,
    })?;
    let input = InputSummary {
        compression,
        bytes: raw_bytes,
        digest: digest_string(&layer_digest),
        tar_bytes,
        diff_id: digest_string(&diff_id),
    };
    let mut info = BlobInfo::from(&blob);
    mark_metadata_region(
        output,
        &mut info,
        &blob.index_digest,
        DATA_START_BLOCK + ext4.data_blocks,
        opts.metadata_region_bytes,
    )?;
    let blob = info;
    Ok(ConvertSummary {
        annotations: annotations(&input, &blob),
        media_type: MEDIA_TYPE,
        input,
        tar: tar_stats,
        ext4,
        blob,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A progress bar on stderr fed from a byte counter.
struct Progress {
    bar: indicatif::ProgressBar,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Progress {
    fn start(counter: Arc<AtomicU64>, len: Option<u64>) -> Option<Progress> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = match len {
            Some(n) => indicatif::ProgressBar::new(n).with_style(
                indicatif::ProgressStyle::with_template("{spinner} converting [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .ok()?,
            ),
            None => indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template("{spinner} converting {bytes} {bytes_per_sec}").ok()?,
            ),
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, s) = (bar.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                b.set_position(counter.load(Ordering::Relaxed));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        Some(Progress { bar, stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazyblk_image_format::{ChunkEntry, ChunkKind, Index};

    /// 4 KiB chunks: 0 the head (written last), 1 zero, 2..=6 file data, 7..=9 metadata (from disk
    /// byte 7 * 4096 + 100), each stored as 100 bytes in that order.
    fn index() -> (Index, u64) {
        let order = [2u64, 3, 4, 5, 6, 7, 8, 9, 0];
        let mut entries = vec![ChunkEntry::ZERO; 10];
        for (i, &c) in order.iter().enumerate() {
            entries[c as usize] = ChunkEntry {
                offset: i as u64 * 100,
                stored_len: 100,
                kind: ChunkKind::Zstd,
                digest: [0; 32],
            };
        }
        let end = order.len() as u64 * 100;
        (Index::new(12, 10 * 4096, entries, end).unwrap(), end)
    }

    #[test]
    fn the_metadata_region_is_the_metadata_and_head_chunks_at_the_end() {
        let (idx, end) = index();
        let meta = 7 * 4096 + 100;
        // Chunks 7, 8, 9 and the head: from chunk 7's offset.
        assert_eq!(metadata_region(&idx, end, 8192, meta, 1 << 20), Some(500));
        // Bounded by stored bytes: the head and chunk 9 only.
        assert_eq!(metadata_region(&idx, end, 8192, meta, 250), Some(700));
        // Metadata starting later leaves chunk 7 out (it is file data then).
        assert_eq!(
            metadata_region(&idx, end, 8192, 8 * 4096, 1 << 20),
            Some(600)
        );
        // Nothing fits.
        assert_eq!(metadata_region(&idx, end, 8192, meta, 50), None);
    }
}
