//! The layer spec: everything the node needs to serve a layer again after a restart or an upgrade,
//! persisted with the device (not a command line: a renamed flag must not break recovery).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device::Backend;
use crate::fetch::registry::RegistryOptions;

/// The spec version this build writes. Readers accept every version up to this one; unknown fields are
/// ignored and missing ones take their defaults, so an older daemon's records load in a newer one.
pub const SPEC_VERSION: u32 = 1;

/// Where a layer's index is (the OCI descriptor's lazyblk annotations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRef {
    /// `index-offset`.
    pub offset: u64,
    /// `index-length`.
    pub length: u64,
    /// `index-digest` (`sha256:…`): what the index is verified against.
    pub digest: String,
}

/// Registry access for a layer (paths only: credentials never leave the docker config file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrySpec {
    /// Plain HTTP.
    #[serde(default)]
    pub plain_http: bool,
    /// containerd-style certs.d directory.
    #[serde(default)]
    pub hosts_dir: Option<PathBuf>,
    /// Docker config with credentials.
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
}

impl RegistrySpec {
    /// The registry client's options.
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            plain_http: self.plain_http,
            hosts_dir: self.hosts_dir.clone(),
            docker_config: self.docker_config.clone(),
        }
    }
}

/// One layer as the node serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// [`SPEC_VERSION`] when written.
    pub version: u32,
    /// Blob file, `http(s)://` URL or `REGISTRY/REPO@sha256:DIGEST`.
    pub source: String,
    /// The index location and digest; without it the footer is read and only self-checked.
    #[serde(default)]
    pub index: Option<IndexRef>,
    /// Trusted index digest when only the blob is known (`--index-digest` without a location).
    #[serde(default)]
    pub index_digest: Option<String>,
    /// Start of the blob's startup region (annotation `startup-offset`).
    #[serde(default)]
    pub startup_offset: Option<u64>,
    /// A startup trace to replay on attach.
    #[serde(default)]
    pub prefetch_trace: Option<PathBuf>,
    /// Fetch the whole layer in the background.
    #[serde(default)]
    pub fill: bool,
    /// Kernel interface (resolved: never `auto` once attached).
    pub backend: Backend,
    /// Mount the ext4 read-only here.
    #[serde(default)]
    pub mount: Option<PathBuf>,
    /// Registry access.
    #[serde(default)]
    pub registry: RegistrySpec,
    /// Seconds before a read that cannot be served fails with EIO (0: the node's default).
    #[serde(default)]
    pub read_deadline_secs: f64,
    /// Largest readahead window in chunks (`None`: the node's default).
    #[serde(default)]
    pub readahead_chunks: Option<u64>,
    /// ublk: hardware queues (0: default).
    #[serde(default)]
    pub ublk_queues: u16,
    /// ublk: queue depth (0: default).
    #[serde(default)]
    pub ublk_depth: u16,
    /// An original-image index: where its external chunks (file data) come from.
    #[serde(default)]
    pub original: Option<crate::original::OriginalRef>,
}

impl LayerSpec {
    /// A spec for `source` with defaults for everything else.
    pub fn new(source: impl Into<String>, backend: Backend) -> LayerSpec {
        LayerSpec {
            version: SPEC_VERSION,
            source: source.into(),
            index: None,
            index_digest: None,
            startup_offset: None,
            prefetch_trace: None,
            fill: false,
            backend,
            mount: None,
            registry: RegistrySpec::default(),
            read_deadline_secs: 0.0,
            readahead_chunks: None,
            ublk_queues: 0,
            ublk_depth: 0,
            original: None,
        }
    }

    /// Parses a persisted or submitted spec, refusing versions from the future and nonsense values.
    pub fn from_json(b: &[u8]) -> Result<LayerSpec, String> {
        let s: LayerSpec = serde_json::from_slice(b).map_err(|e| format!("layer spec: {e}"))?;
        if s.version == 0 || s.version > SPEC_VERSION {
            return Err(format!(
                "layer spec version {} (this lazyblk reads 1..={SPEC_VERSION})",
                s.version
            ));
        }
        if s.source.is_empty() {
            return Err("layer spec: empty source".into());
        }
        if !(s.read_deadline_secs >= 0.0 && s.read_deadline_secs.is_finite()) {
            return Err("layer spec: read_deadline_secs must be >= 0".into());
        }
        if let Some(i) = &s.index {
            lazyblk_image_format::parse_digest(&i.digest)
                .map_err(|e| format!("layer spec: index digest: {e}"))?;
        }
        Ok(s)
    }

    /// The key that makes attaches of the same layer at the same place one operation.
    pub fn key(&self) -> String {
        format!(
            "{}|{}|{}",
            self.source,
            self.index.as_ref().map(|i| i.digest.as_str()).unwrap_or(""),
            self.mount
                .as_ref()
                .map(|m| m.display().to_string())
                .unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_old_or_unknown_fields_are_tolerated() {
        let mut s = LayerSpec::new("reg/app@sha256:00", Backend::Ublk);
        s.mount = Some("/m".into());
        let j = serde_json::to_vec(&s).unwrap();
        assert_eq!(LayerSpec::from_json(&j).unwrap(), s);
        // A record from an older writer with fewer fields, and one with a field this build lacks.
        let old = br#"{"version":1,"source":"x.blob","backend":"nbd","future_field":3}"#;
        let o = LayerSpec::from_json(old).unwrap();
        assert_eq!(o.backend, Backend::Nbd);
        assert!(!o.fill);
    }

    #[test]
    fn future_versions_and_bad_values_are_refused() {
        let e =
            LayerSpec::from_json(br#"{"version":99,"source":"x","backend":"nbd"}"#).unwrap_err();
        assert!(e.contains("version 99"), "{e}");
        assert!(LayerSpec::from_json(br#"{"version":1,"source":"","backend":"nbd"}"#).is_err());
        let bad = br#"{"version":1,"source":"x","backend":"nbd","index":{"offset":1,"length":2,"digest":"md5:x"}}"#;
        assert!(LayerSpec::from_json(bad).is_err());
    }
}
