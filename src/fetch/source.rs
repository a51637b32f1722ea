//! Opening a layer source by name: a blob file, an `http(s)://` URL, or `REGISTRY/REPO@sha256:...`.

use std::path::Path;
use std::sync::Arc;

use lazyblk_image_format::Digest;

use super::engine::{Engine, EngineOptions, IndexLocation};
use super::registry::{registry_client, BlobRef, RegistryBlob, RegistryOptions, Sessions};
use super::remote::{FetchError, FileRange, HttpRange, RangeReader};

/// How to open a source.
#[derive(Clone, Default)]
pub struct SourceOptions {
    /// Registry access (plain HTTP, hosts.toml, docker config).
    pub registry: RegistryOptions,
    /// Index location from the descriptor annotations (offset, length, digest), if known.
    pub index: Option<(u64, u64, Digest)>,
    /// Start of the blob's startup region (annotation `startup-offset`; needs `index`).
    pub startup_offset: Option<u64>,
    /// Trusted index digest when only the blob is known.
    pub trusted_index_digest: Option<Digest>,
    /// Engine tuning.
    pub engine: EngineOptions,
}

/// The range reader for `spec`.
pub fn range_reader(spec: &str, opts: &SourceOptions) -> Result<Arc<dyn RangeReader>, FetchError> {
    range_reader_in(spec, opts, None)
}

/// [`range_reader`], with registry blobs read through `sessions` (shared connections and tokens).
pub fn range_reader_in(
    spec: &str,
    opts: &SourceOptions,
    sessions: Option<&Sessions>,
) -> Result<Arc<dyn RangeReader>, FetchError> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        let url = reqwest::Url::parse(spec)
            .map_err(|e| FetchError::permanent("config", format!("bad URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            // A source is recorded in state files and shown by `lazyblk ls`; credentials belong in
            // the docker config (scoped to their host), never in a URL.
            return Err(FetchError::permanent(
                "config",
                "credentials in a source URL are refused (they would land in state files and \
                 process lists); put them in a docker config.json",
            ));
        }
        let client = super::tls::client_builder(&Default::default())
            .map_err(|e| FetchError::permanent("config", e))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(super::remote::body_idle())
            .build()
            .map_err(|e| FetchError::permanent("config", e.to_string()))?;
        return Ok(Arc::new(HttpRange::new(client, url)));
    }
    if Path::new(spec).exists() {
        let f = FileRange::open(Path::new(spec))
            .map_err(|e| FetchError::permanent("io", format!("{spec}: {e}")))?;
        return Ok(Arc::new(f));
    }
    if spec.contains('@') {
        let blob = BlobRef::parse(spec).map_err(|e| FetchError::permanent("config", e))?;
        let r = match sessions {
            Some(s) => {
                let repo = s
                    .repo(&blob.registry, &blob.repository, &opts.registry)
                    .map_err(|e| FetchError::permanent("config", e))?;
                RegistryBlob::with_session(repo, blob)
            }
            None => RegistryBlob::new(registry_client(), blob, &opts.registry)
                .map_err(|e| FetchError::permanent("config", e))?,
        };
        return Ok(Arc::new(r));
    }
    Err(FetchError::permanent(
        "config",
        format!("{spec:?} is neither a file, an http(s) URL nor REGISTRY/REPO@sha256:DIGEST"),
    ))
}

/// Opens `spec` and its index.
pub async fn open_source(spec: &str, opts: &SourceOptions) -> Result<Engine, FetchError> {
    open_source_in(spec, opts, None).await
}

/// [`open_source`] through shared registry sessions.
pub async fn open_source_in(
    spec: &str,
    opts: &SourceOptions,
    sessions: Option<&Sessions>,
) -> Result<Engine, FetchError> {
    let remote = range_reader_in(spec, opts, sessions)?;
    let location = match opts.index {
        Some((offset, length, digest)) => IndexLocation::Known {
            offset,
            length,
            digest,
            startup_offset: opts.startup_offset,
        },
        None => IndexLocation::Footer {
            trusted: opts.trusted_index_digest,
        },
    };
    Engine::open(remote, location, opts.engine.clone()).await
}

/// Fetches the index of `spec` at `offset..offset + length` with one range request and verifies it
/// against `digest` (and that no chunk lies past the index). Used to check a layer's identity before
/// anything is committed or attached (the snapshotter's Prepare).
pub async fn fetch_index(
    spec: &str,
    offset: u64,
    length: u64,
    digest: Digest,
    registry: &RegistryOptions,
) -> Result<lazyblk_image_format::Index, FetchError> {
    let opts = SourceOptions {
        registry: registry.clone(),
        index: Some((offset, length, digest)),
        engine: EngineOptions {
            mem_cache_bytes: 0,
            ..EngineOptions::default()
        },
        ..SourceOptions::default()
    };
    Ok(open_source(spec, &opts).await?.index().clone())
}

/// `spec` as it may be shown in messages and logs: an `http(s)://` URL without user info or query
/// (which may carry credentials or signatures).
pub fn shown(spec: &str) -> String {
    match reqwest::Url::parse(spec) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => super::remote::redact(&u),
        _ => spec.to_string(),
    }
}
