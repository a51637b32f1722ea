//! Where images live: a registry repository or an OCI image layout directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};

use super::oci::{Descriptor, ImageIndex, OCI_INDEX};
use super::ImageError;
use crate::fetch::registry::{redirect_target, registry_client, RegistryOptions, RepoClient};
use crate::fetch::remote::{read_body, redact, BodyPace};
use crate::fetch::BoxFuture;

/// Largest manifest, index or config accepted (bounded before reading).
pub const MAX_DOCUMENT: u64 = 16 << 20;
/// Blobs up to this size are uploaded in one PUT; bigger ones in PATCH chunks of this size.
pub const UPLOAD_CHUNK: u64 = 16 << 20;

/// A manifest as stored: bytes, media type, digest.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    /// The exact bytes (their digest is the manifest digest).
    pub bytes: Bytes,
    /// Media type.
    pub media_type: String,
    /// `sha256:...`.
    pub digest: String,
}

/// An image repository.
pub trait ImageStore: Send + Sync {
    /// For messages.
    fn describe(&self) -> String;
    /// `(registry, repository)` for registries (cross-repository mounts).
    fn registry_repo(&self) -> Option<(String, String)>;
    /// A manifest or index by tag or digest.
    fn get_manifest<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredManifest>, ImageError>>;
    /// A small blob (config), size-bounded, digest-checked.
    fn get_small_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Bytes, ImageError>>;
    /// Streams a blob into `sink`, checking size and digest (the digest after the last bytes went
    /// out: a consumer of a [`BlobSink::Channel`] must not trust what it read before this is `Ok`).
    fn copy_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
        sink: BlobSink,
    ) -> BoxFuture<'a, Result<(), ImageError>>;
    /// Streams a blob into `path`, checking size and digest.
    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), ImageError>> {
        self.copy_blob(desc, BlobSink::File(path.to_path_buf()))
    }
    /// Stores the blob in `path` unless present (trying a cross-repository mount from `mount_from`
    /// first); returns the bytes uploaded.
    fn put_blob<'a>(
        &'a self,
        path: &'a Path,
        digest: &'a str,
        size: u64,
        mount_from: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, ImageError>>;
    /// Stores a small blob held in memory; returns the bytes uploaded.
    fn put_blob_bytes<'a>(
        &'a self,
        data: Bytes,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<u64, ImageError>>;
    /// Stores a manifest under `reference` (tag or its digest). Returns whether the store indexes
    /// referrers itself (the OCI Referrers API); if not, callers maintain the tag-schema fallback.
    fn put_manifest<'a>(
        &'a self,
        reference: &'a str,
        bytes: &'a [u8],
        media_type: &'a str,
    ) -> BoxFuture<'a, Result<bool, ImageError>>;
    /// Referrers of `digest` from the Referrers API, or `None` if the store has no such API.
    fn referrers<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<ImageIndex>, ImageError>>;
}

fn sha256_hex(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn check_digest(digest: &str) -> Result<&str, ImageError> {
    lazyblk_image_format::parse_digest(digest).map_err(|e| ImageError(e.to_string()))?;
    Ok(&digest[7..])
}

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Where [`ImageStore::copy_blob`] puts a blob's bytes.
pub enum BlobSink {
    /// A new file.
    File(PathBuf),
    /// A bounded channel, in order (a reader on another thread consumes the blob as it arrives).
    Channel(tokio::sync::mpsc::Sender<Bytes>),
}

/// What [`ImageStore::copy_blob`] says when the reader of its channel went away.
pub const READER_STOPPED: &str = "its reader stopped before the end";

/// Writes a blob to its sink while checking it against its descriptor: never more bytes than the
/// size, and the SHA-256 at the end.
struct Verifying<'d> {
    out: Out,
    hasher: Sha256,
    written: u64,
    desc: &'d Descriptor,
}

enum Out {
    File(std::fs::File),
    Channel(tokio::sync::mpsc::Sender<Bytes>),
}

impl<'d> Verifying<'d> {
    fn create(sink: BlobSink, desc: &'d Descriptor) -> Result<Self, ImageError> {
        check_digest(&desc.digest)?;
        let out = match sink {
            BlobSink::File(path) => Out::File(std::fs::File::create(path)?),
            BlobSink::Channel(tx) => Out::Channel(tx),
        };
        Ok(Verifying {
            out,
            hasher: Sha256::new(),
            written: 0,
            desc,
        })
    }

    async fn write(&mut self, data: Bytes) -> Result<(), ImageError> {
        self.written += data.len() as u64;
        if self.written > self.desc.size {
            return Err(ImageError(format!(
                "blob {}: more than the {} bytes its descriptor says",
                self.desc.digest, self.desc.size
            )));
        }
        self.hasher.update(&data);
        match &mut self.out {
            Out::File(f) => f.write_all(&data)?,
            Out::Channel(tx) => tx
                .send(data)
                .await
                .map_err(|_| ImageError(format!("blob {}: {READER_STOPPED}", self.desc.digest)))?,
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ImageError> {
        let got = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if self.written != self.desc.size || got != self.desc.digest {
            return Err(ImageError(format!(
                "blob {}: digest mismatch (got {got}, {} of {} bytes): corrupt source",
                self.desc.digest, self.written, self.desc.size
            )));
        }
        Ok(())
    }
}

/// A repository in a registry.
pub struct RegistryStore {
    repo: RepoClient,
}

impl RegistryStore {
    /// A store for `registry/repository`; `push` enables write scopes.
    pub fn new(
        registry: &str,
        repository: &str,
        opts: &RegistryOptions,
        push: bool,
    ) -> Result<RegistryStore, ImageError> {
        Ok(RegistryStore {
            repo: RepoClient::new(registry_client(), registry, repository, opts, push)
                .map_err(ImageError)?,
        })
    }

    async fn status_error(what: &str, resp: reqwest::Response) -> ImageError {
        let status = resp.status();
        let body = read_body(resp, 64 << 10, what).await.unwrap_or_default();
        ImageError(format!(
            "{what}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        ))
    }

    /// Follows one redirect for blob GETs (object storage), without registry credentials.
    async fn get_blob_response(&self, digest: &str) -> Result<reqwest::Response, ImageError> {
        let resp = self
            .repo
            .send(
                &format!("blobs/{digest}"),
                &|c: &reqwest::Client, u: Url| c.get(u),
            )
            .await?;
        if resp.status().is_redirection() {
            let target = redirect_target(&resp)?;
            return self
                .repo
                .http()
                .get(target.clone())
                .send()
                .await
                .map_err(|e| {
                    ImageError::from(crate::fetch::remote::classify(e, &redact(&target)))
                });
        }
        Ok(resp)
    }

    fn upload_url(&self, location: &str, base: &Url) -> Result<Url, ImageError> {
        base.join(location)
            .map_err(|e| ImageError(format!("bad upload location: {e}")))
    }
}

impl ImageStore for RegistryStore {
    fn describe(&self) -> String {
        format!("{}/{}", self.repo.registry, self.repo.repository)
    }

    fn registry_repo(&self) -> Option<(String, String)> {
        Some((self.repo.registry.clone(), self.repo.repository.clone()))
    }

    fn get_manifest<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredManifest>, ImageError>> {
        Box::pin(async move {
            let what = format!("{}:{reference}", self.describe());
            let resp = self
                .repo
                .send(
                    &format!("manifests/{reference}"),
                    &|c: &reqwest::Client, u: Url| c.get(u).header(ACCEPT, ACCEPT_MANIFESTS),
                )
                .await?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(Self::status_error(&format!("GET manifest {what}"), resp).await);
            }
            let mt = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            // Bounded whatever the headers say (chunked encoding has no Content-Length).
            let bytes = read_body(resp, MAX_DOCUMENT, &format!("manifest {what}"))
                .await
                .map_err(|e| ImageError(e.message))?;
            let digest = sha256_hex(&bytes);
            if reference.starts_with("sha256:") && digest != reference {
                return Err(ImageError(format!(
                    "{what}: manifest digest mismatch (got {digest})"
                )));
            }
            Ok(Some(StoredManifest {
                bytes,
                media_type: mt,
                digest,
            }))
        })
    }

    fn get_small_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Bytes, ImageError>> {
        Box::pin(async move {
            if desc.size > MAX_DOCUMENT {
                return Err(ImageError(format!(
                    "blob {} is {} bytes, over the {MAX_DOCUMENT}-byte limit",
                    desc.digest, desc.size
                )));
            }
            let resp = self.get_blob_response(&desc.digest).await?;
            if !resp.status().is_success() {
                return Err(Self::status_error(&format!("GET blob {}", desc.digest), resp).await);
            }
            let bytes = read_body(resp, desc.size, &format!("blob {}", desc.digest))
                .await
                .map_err(|e| ImageError(e.message))?;
            if bytes.len() as u64 != desc.size || sha256_hex(&bytes) != desc.digest {
                return Err(ImageError(format!(
                    "blob {}: content does not match its descriptor (corrupt source)",
                    desc.digest
                )));
            }
            Ok(bytes)
        })
    }

    fn copy_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
        sink: BlobSink,
    ) -> BoxFuture<'a, Result<(), ImageError>> {
        Box::pin(async move {
            check_digest(&desc.digest)?;
            let mut resp = self.get_blob_response(&desc.digest).await?;
            if !resp.status().is_success() {
                return Err(Self::status_error(&format!("GET blob {}", desc.digest), resp).await);
            }
            let mut out = Verifying::create(sink, desc)?;
            let mut pace = BodyPace::default();
            let what = format!("blob {}", desc.digest);
            while let Some(chunk) = pace
                .next(&mut resp, &what)
                .await
                .map_err(|e| ImageError(e.message))?
            {
                out.write(chunk).await?;
            }
            out.finish()
        })
    }

    fn put_blob<'a>(
        &'a self,
        path: &'a Path,
        digest: &'a str,
        size: u64,
        mount_from: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, ImageError>> {
        Box::pin(async move {
            let head = self
                .repo
                .send(
                    &format!("blobs/{digest}"),
                    &|c: &reqwest::Client, u: Url| c.head(u),
                )
                .await?;
            if head.status().is_success() {
                return Ok(0);
            }
            let origin = self.repo.origin().clone();
            let mut start = self.repo.url(&origin, "blobs/uploads/");
            if let Some(from) = mount_from {
                start
                    .query_pairs_mut()
                    .append_pair("mount", digest)
                    .append_pair("from", from);
            }
            let resp = self
                .repo
                .send_url(&start, &|c: &reqwest::Client, u: Url| {
                    c.post(u).header(CONTENT_LENGTH, "0")
                })
                .await?;
            if resp.status() == StatusCode::CREATED {
                return Ok(0); // mounted from another repository
            }
            if resp.status() != StatusCode::ACCEPTED {
                return Err(Self::status_error("starting upload", resp).await);
            }
            let mut loc = self.upload_url(
                resp.headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
                &start,
            )?;
            if size > UPLOAD_CHUNK {
                // Chunked upload: PATCH pieces, then PUT with the digest.
                use std::io::Read;
                let mut f = std::fs::File::open(path)?;
                let mut off = 0u64;
                while off < size {
                    let n = (size - off).min(UPLOAD_CHUNK) as usize;
                    let mut buf = vec![0u8; n];
                    f.read_exact(&mut buf)?;
                    let range = format!("{}-{}", off, off + n as u64 - 1);
                    let body = Bytes::from(buf);
                    let resp = self
                        .repo
                        .send_url(&loc, &move |c: &reqwest::Client, u: Url| {
                            c.patch(u)
                                .header(CONTENT_TYPE, "application/octet-stream")
                                .header("Content-Range", range.clone())
                                .body(body.clone())
                        })
                        .await?;
                    if resp.status() != StatusCode::ACCEPTED {
                        return Err(Self::status_error("uploading a chunk", resp).await);
                    }
                    loc = self.upload_url(
                        resp.headers()
                            .get(LOCATION)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(""),
                        &loc,
                    )?;
                    off += n as u64;
                }
                loc.query_pairs_mut().append_pair("digest", digest);
                let resp = self
                    .repo
                    .send_url(&loc, &|c: &reqwest::Client, u: Url| {
                        c.put(u).header(CONTENT_LENGTH, "0")
                    })
                    .await?;
                if resp.status() != StatusCode::CREATED {
                    return Err(Self::status_error("finishing upload", resp).await);
                }
            } else {
                let body = Bytes::from(std::fs::read(path)?);
                loc.query_pairs_mut().append_pair("digest", digest);
                let resp = self
                    .repo
                    .send_url(&loc, &move |c: &reqwest::Client, u: Url| {
                        c.put(u)
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .body(body.clone())
                    })
                    .await?;
                if resp.status() != StatusCode::CREATED {
                    return Err(Self::status_error("uploading", resp).await);
                }
            }
            Ok(size)
        })
    }

    fn put_blob_bytes<'a>(
        &'a self,
        data: Bytes,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<u64, ImageError>> {
        Box::pin(async move {
            let dir = tempfile::tempdir()?;
            let p = dir.path().join("blob");
            std::fs::write(&p, &data)?;
            self.put_blob(&p, digest, data.len() as u64, None).await
        })
    }

    fn put_manifest<'a>(
        &'a self,
        reference: &'a str,
        bytes: &'a [u8],
        media_type: &'a str,
    ) -> BoxFuture<'a, Result<bool, ImageError>> {
        Box::pin(async move {
            let body = Bytes::copy_from_slice(bytes);
            let origin = self.repo.origin().clone();
            let url = self.repo.url(&origin, &format!("manifests/{reference}"));
            let mt = media_type.to_string();
            let resp = self
                .repo
                .send_url(&url, &move |c: &reqwest::Client, u: Url| {
                    c.put(u).header(CONTENT_TYPE, mt.clone()).body(body.clone())
                })
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(Self::status_error(
                    &format!("PUT manifest {}:{reference}", self.describe()),
                    resp,
                )
                .await);
            }
            Ok(resp.headers().contains_key("OCI-Subject"))
        })
    }

    fn referrers<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<ImageIndex>, ImageError>> {
        Box::pin(async move {
            let resp = self
                .repo
                .send(
                    &format!("referrers/{digest}"),
                    &|c: &reqwest::Client, u: Url| c.get(u).header(ACCEPT, OCI_INDEX),
                )
                .await?;
            if !resp.status().is_success() {
                return Ok(None);
            }
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| ImageError(e.without_url().to_string()))?;
            Ok(serde_json::from_slice(&bytes).ok())
        })
    }
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`).
pub struct LayoutStore {
    root: PathBuf,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

impl LayoutStore {
    /// Opens `root`; with `create`, makes an empty layout if there is none.
    pub fn open(root: &Path, create: bool) -> Result<LayoutStore, ImageError> {
        if !root.join("oci-layout").exists() {
            if !create {
                return Err(ImageError(format!(
                    "{}: not an OCI image layout (no oci-layout file)",
                    root.display()
                )));
            }
            std::fs::create_dir_all(root.join("blobs/sha256"))?;
            std::fs::write(
                root.join("oci-layout"),
                br#"{"imageLayoutVersion":"1.0.0"}"#,
            )?;
            let empty = ImageIndex {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: vec![],
                annotations: Default::default(),
            };
            std::fs::write(
                root.join("index.json"),
                serde_json::to_vec(&empty).expect("index serialises"),
            )?;
        }
        Ok(LayoutStore {
            root: root.to_path_buf(),
        })
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(check_digest(digest)?))
    }

    fn index(&self) -> Result<ImageIndex, ImageError> {
        let b = std::fs::read(self.root.join("index.json"))?;
        serde_json::from_slice(&b)
            .map_err(|e| ImageError(format!("{}/index.json: {e}", self.root.display())))
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), ImageError> {
        let tmp = path.with_extension("tmp-lazyblk");
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

impl ImageStore for LayoutStore {
    fn describe(&self) -> String {
        format!("oci:{}", self.root.display())
    }

    fn registry_repo(&self) -> Option<(String, String)> {
        None
    }

    fn get_manifest<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredManifest>, ImageError>> {
        Box::pin(async move {
            let index = self.index()?;
            let desc = if reference.starts_with("sha256:") {
                index
                    .manifests
                    .iter()
                    .find(|d| d.digest == reference)
                    .cloned()
                    .or_else(|| Some(Descriptor::new("", reference, 0)))
            } else if reference.is_empty() {
                match index.manifests.as_slice() {
                    [only] => Some(only.clone()),
                    _ => {
                        return Err(ImageError(format!(
                            "{}: several images; name one with oci:PATH:TAG",
                            self.describe()
                        )))
                    }
                }
            } else {
                index
                    .manifests
                    .iter()
                    .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(reference))
                    .cloned()
            };
            let Some(desc) = desc else { return Ok(None) };
            let path = self.blob_path(&desc.digest)?;
            let bytes = match std::fs::read(&path) {
                Ok(b) => Bytes::from(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if sha256_hex(&bytes) != desc.digest {
                return Err(ImageError(format!(
                    "{}: manifest {} does not match its digest",
                    self.describe(),
                    desc.digest
                )));
            }
            Ok(Some(StoredManifest {
                bytes,
                media_type: desc.media_type.clone(),
                digest: desc.digest.clone(),
            }))
        })
    }

    fn get_small_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Bytes, ImageError>> {
        Box::pin(async move {
            if desc.size > MAX_DOCUMENT {
                return Err(ImageError(format!(
                    "blob {} is over the {MAX_DOCUMENT}-byte limit",
                    desc.digest
                )));
            }
            let b = std::fs::read(self.blob_path(&desc.digest)?)?;
            if b.len() as u64 != desc.size || sha256_hex(&b) != desc.digest {
                return Err(ImageError(format!(
                    "blob {}: content does not match its descriptor (corrupt source)",
                    desc.digest
                )));
            }
            Ok(Bytes::from(b))
        })
    }

    fn copy_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
        sink: BlobSink,
    ) -> BoxFuture<'a, Result<(), ImageError>> {
        Box::pin(async move {
            let mut input = std::fs::File::open(self.blob_path(&desc.digest)?)?;
            let mut out = Verifying::create(sink, desc)?;
            loop {
                use std::io::Read;
                let mut buf = vec![0u8; 1 << 20];
                let k = input.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                buf.truncate(k);
                out.write(Bytes::from(buf)).await?;
            }
            out.finish()
        })
    }

    fn put_blob<'a>(
        &'a self,
        path: &'a Path,
        digest: &'a str,
        size: u64,
        _mount_from: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, ImageError>> {
        Box::pin(async move {
            let dst = self.blob_path(digest)?;
            if dst.exists() {
                return Ok(0);
            }
            let tmp = dst.with_extension("tmp-lazyblk");
            std::fs::copy(path, &tmp)?;
            std::fs::rename(&tmp, &dst)?;
            Ok(size)
        })
    }

    fn put_blob_bytes<'a>(
        &'a self,
        data: Bytes,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<u64, ImageError>> {
        Box::pin(async move {
            let dst = self.blob_path(digest)?;
            if dst.exists() {
                return Ok(0);
            }
            self.write_atomic(&dst, &data)?;
            Ok(data.len() as u64)
        })
    }

    fn put_manifest<'a>(
        &'a self,
        reference: &'a str,
        bytes: &'a [u8],
        media_type: &'a str,
    ) -> BoxFuture<'a, Result<bool, ImageError>> {
        Box::pin(async move {
            let digest = sha256_hex(bytes);
            let dst = self.blob_path(&digest)?;
            if !dst.exists() {
                self.write_atomic(&dst, bytes)?;
            }
            if reference.starts_with("sha256:") {
                // Reachable through whatever references it (an index, a referrers tag): blob only.
                return Ok(false);
            }
            let mut index = self.index()?;
            let mut desc = Descriptor::new(media_type, &digest, bytes.len() as u64);
            index
                .manifests
                .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(reference));
            desc.annotations.insert(REF_NAME.into(), reference.into());
            index.manifests.push(desc);
            self.write_atomic(
                &self.root.join("index.json"),
                &serde_json::to_vec(&index).expect("index serialises"),
            )?;
            Ok(false)
        })
    }

    fn referrers<'a>(
        &'a self,
        _digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<ImageIndex>, ImageError>> {
        Box::pin(async move { Ok(None) })
    }
}
