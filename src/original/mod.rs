//! Original-image indexes (`lazyblk index`): a block device over an image's **unmodified** layers.
//!
//! For each original layer (gzip, zstd or plain tar) an index holds the ext4 metadata of the layer's
//! filesystem (a lazyblk blob whose file-data chunks are *external*), a map from the disk's file-data
//! runs to offsets in the layer's tar stream, and the layer's compressed bytes cut into spans, each
//! with its SHA-256 and the checkpoint decoding resumes from (for gzip the zran technique: bit offset
//! plus the 32 KiB window). Reads of file data become range reads of the original blob, verified per
//! span and then per chunk. Format: docs/format.md, "Original-image indexes".

pub mod build;
pub mod inflate;
pub mod reader;
pub mod spans;
pub mod table;
pub mod verify;

pub use build::{index_layer, IndexOptions, IndexedLayer, SPANS_MEDIA_TYPE};
pub use reader::{OriginalLayer, TableLocation};
pub use verify::{fill_and_verify, Verified};

use std::sync::Arc;

use crate::fetch::registry::Sessions;
use crate::fetch::source::{range_reader_in, SourceOptions};
use crate::fetch::{ExternalData, FetchError};

/// Where an original-image index's external chunks come from: persisted in layer specs and
/// snapshot records (so serde, with defaults for fields a newer build adds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OriginalRef {
    /// The original layer blob: `REGISTRY/REPO@sha256:…`, a file or a URL.
    pub source: String,
    /// The span blob, same forms.
    pub spans: String,
    /// Offset of the stored span table in the span blob.
    pub table_offset: u64,
    /// Its length.
    pub table_length: u64,
    /// Its digest (`sha256:…`), from the index descriptor's annotations.
    pub table_digest: String,
}

/// The external-chunk source for `original`, reading both blobs like the layer's own source.
pub fn external_source(
    original: &OriginalRef,
    opts: &SourceOptions,
    sessions: Option<&Sessions>,
) -> Result<Arc<dyn ExternalData>, FetchError> {
    Ok(original_layer(original, opts, sessions)?)
}

/// The reader of `original` ([`external_source`] before type erasure).
pub fn original_layer(
    original: &OriginalRef,
    opts: &SourceOptions,
    sessions: Option<&Sessions>,
) -> Result<Arc<OriginalLayer>, FetchError> {
    let digest = lazyblk_image_format::parse_digest(&original.table_digest)
        .map_err(|e| FetchError::permanent("config", format!("span table digest: {e}")))?;
    let source = range_reader_in(&original.source, opts, sessions)?;
    let spans = range_reader_in(&original.spans, opts, sessions)?;
    Ok(Arc::new(OriginalLayer::new(
        source,
        spans,
        TableLocation {
            offset: original.table_offset,
            length: original.table_length,
            digest,
        },
    )))
}

impl OriginalRef {
    /// The layer digest the source names (`…@sha256:…`), if it is a registry blob.
    pub fn layer_digest(&self) -> Option<&str> {
        let (_, d) = self.source.rsplit_once('@')?;
        d.starts_with("sha256:").then_some(d)
    }
}
