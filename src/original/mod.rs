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
pub mod local;
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
use crate::fetch::FetchError;

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

/// The reader of `original`, reading both blobs like the layer's own source; with `copy_to`, it
/// keeps a local copy of the layer blob in that new file (see [`local`]; filled by
/// [`local::LocalCopy::download`]).
pub fn original_layer(
    original: &OriginalRef,
    opts: &SourceOptions,
    sessions: Option<&Sessions>,
    copy_to: Option<&std::path::Path>,
) -> Result<Arc<OriginalLayer>, FetchError> {
    let digest = lazyblk_image_format::parse_digest(&original.table_digest)
        .map_err(|e| FetchError::permanent("config", format!("span table digest: {e}")))?;
    let source = range_reader_in(&original.source, opts, sessions)?;
    let spans = range_reader_in(&original.spans, opts, sessions)?;
    let mut layer = OriginalLayer::new(
        source.clone(),
        spans,
        TableLocation {
            offset: original.table_offset,
            length: original.table_length,
            digest,
        },
    );
    if let Some(path) = copy_to {
        match local::LocalCopy::create(source, path) {
            Ok(c) => layer = layer.with_local_copy(Arc::new(c)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "no local copy of the original layer; its fill reads the registry")
            }
        }
    }
    Ok(Arc::new(layer))
}

impl OriginalRef {
    /// The layer digest the source names (`…@sha256:…`), if it is a registry blob.
    pub fn layer_digest(&self) -> Option<&str> {
        let (_, d) = self.source.rsplit_once('@')?;
        d.starts_with("sha256:").then_some(d)
    }
}
