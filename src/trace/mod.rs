//! Startup traces: which chunks of which layers a workload reads until it is ready, in order.
//!
//! A trace is recorded once (`lazyblk trace record`, from the access logs every serving process
//! publishes), shipped next to the image as an OCI artifact that refers to the image manifest
//! (`lazyblk trace push`; the Referrers API or the `sha256-<hex>` tag fallback), and replayed when a
//! layer is attached (`--prefetch-trace`): the recorded chunks are fetched ahead of the workload.
//!
//! A trace only steers *what is fetched early*: every chunk is still verified against the index
//! digest chained to the manifest, so a wrong or hostile trace costs bandwidth, never correctness.
//! Layers are keyed by their **index digest** (the SHA-256 in the layer's `index-digest`
//! annotation), which names both the blob and the meaning of its chunk numbers.

pub mod auto;
pub mod publish;
pub mod record;
pub mod registry;
pub mod relayout;

use serde::{Deserialize, Serialize};

/// Media type (and artifact type) of a trace.
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.lazyblk.trace.v1+json";
/// Largest trace accepted, in bytes (a trace of a million chunks is ~10 MiB of JSON).
pub const MAX_TRACE_BYTES: usize = 16 << 20;

/// A startup trace of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// Always 1.
    pub schema_version: u32,
    /// Milliseconds from the start of recording to readiness (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
    /// One entry per layer that was read.
    pub layers: Vec<LayerTrace>,
}

/// The chunks of one layer read at startup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerTrace {
    /// `sha256:<hex>` of the layer's index.
    pub index_digest: String,
    /// The layer blob, `REGISTRY/REPO@sha256:...` or a path (informational).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Chunk numbers in first-read order.
    pub chunks: Vec<u64>,
    /// For each chunk, milliseconds from the start of recording to its first read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ms: Vec<u64>,
}

/// Why a trace was refused.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Larger than [`MAX_TRACE_BYTES`].
    #[error("trace is {0} bytes, over the {MAX_TRACE_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not a trace.
    #[error("trace is not valid JSON of schema version 1: {0}")]
    Json(#[from] serde_json::Error),
    /// Wrong version or inconsistent fields.
    #[error("trace: {0}")]
    Invalid(String),
    /// The trace file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Trace {
    /// Parses and checks a trace (untrusted input: bounded, versioned, digests well-formed).
    pub fn parse(bytes: &[u8]) -> Result<Trace, TraceError> {
        if bytes.len() > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge(bytes.len()));
        }
        let t: Trace = serde_json::from_slice(bytes)?;
        if t.schema_version != 1 {
            return Err(TraceError::Invalid(format!(
                "schemaVersion {} (only 1 is known)",
                t.schema_version
            )));
        }
        for l in &t.layers {
            lazyblk_image_format::parse_digest(&l.index_digest).map_err(|e| {
                TraceError::Invalid(format!("layer index digest {:?}: {e}", l.index_digest))
            })?;
            if !l.ms.is_empty() && l.ms.len() != l.chunks.len() {
                return Err(TraceError::Invalid(format!(
                    "layer {}: {} chunks but {} times",
                    l.index_digest,
                    l.chunks.len(),
                    l.ms.len()
                )));
            }
        }
        Ok(t)
    }

    /// Reads and parses a trace file.
    pub fn read_file(path: &std::path::Path) -> Result<Trace, TraceError> {
        let bytes = std::fs::read(path).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Trace::parse(&bytes)
    }

    /// Serialises the trace.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("trace serialises")
    }

    /// The recorded chunks of the layer whose index digest is `index_digest`, in order.
    pub fn chunks_for(&self, index_digest: &str) -> Option<&[u64]> {
        self.layers
            .iter()
            .find(|l| l.index_digest == index_digest)
            .map(|l| l.chunks.as_slice())
    }

    /// Total chunks over all layers.
    pub fn chunk_count(&self) -> usize {
        self.layers.iter().map(|l| l.chunks.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn round_trip_and_lookup() {
        let t = Trace {
            schema_version: 1,
            ready_ms: Some(250),
            layers: vec![LayerTrace {
                index_digest: D.into(),
                source: "r/x@sha256:..".into(),
                chunks: vec![5, 0, 9],
                ms: vec![0, 1, 7],
            }],
        };
        let back = Trace::parse(&t.to_bytes()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.chunks_for(D), Some(&[5u64, 0, 9][..]));
        assert_eq!(back.chunks_for("sha256:ff"), None);
        assert_eq!(back.chunk_count(), 3);
    }

    #[test]
    fn refuses_bad_traces() {
        let bad = |s: &str| Trace::parse(s.as_bytes()).unwrap_err().to_string();
        assert!(bad("{").contains("not valid JSON"));
        assert!(bad(r#"{"schemaVersion":2,"layers":[]}"#).contains("schemaVersion 2"));
        assert!(
            bad(r#"{"schemaVersion":1,"layers":[{"indexDigest":"md5:x","chunks":[]}]}"#)
                .contains("index digest")
        );
        let mismatch = format!(
            r#"{{"schemaVersion":1,"layers":[{{"indexDigest":"{D}","chunks":[1,2],"ms":[0]}}]}}"#
        );
        assert!(bad(&mismatch).contains("2 chunks but 1 times"));
        let huge = vec![b' '; MAX_TRACE_BYTES + 1];
        assert!(matches!(Trace::parse(&huge), Err(TraceError::TooLarge(_))));
    }
}
