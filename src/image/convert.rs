//! `lazyblk convert`: every layer of an image (every platform of an index) becomes a lazyblk blob.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use super::oci::*;
use super::store::{BlobSink, ImageStore, READER_STOPPED};
use super::{ImageError, ImageRef};
use crate::convert::{convert_layer, ConvertOptions, MEDIA_TYPE};
use crate::fetch::registry::RegistryOptions;

/// How to convert an image.
#[derive(Clone)]
pub struct ImageConvertOptions {
    /// Only these platforms (`linux/amd64`); all when empty.
    pub platforms: Vec<String>,
    /// Push an OCI referrer artifact instead of a new tag.
    pub referrer: bool,
    /// Layer conversion options.
    pub layer: ConvertOptions,
    /// Layers converted at once.
    pub parallel_layers: usize,
    /// Scratch directory for downloaded and converted layers (one layer pair at a time per slot).
    pub work_dir: PathBuf,
    /// Registry access.
    pub registry: RegistryOptions,
    /// Progress bars on stderr (only on a terminal).
    pub progress: bool,
    /// Original-image index mode (`lazyblk index`, implies `referrer`): each layer gets an index
    /// (metadata blob + span blob with spans of this many compressed bytes) instead of a copy.
    pub index_spans: Option<u64>,
    /// Index mode with a destination: also push the *bound form* there — the original manifest's
    /// layers (the same blobs) annotated with their index, under a config whose diff IDs are the
    /// disks' digests (immutable, and its chain IDs commit to the disks like a converted image's).
    pub bound: bool,
}

/// One converted layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    /// Source layer digest.
    pub source_digest: String,
    /// Source layer size.
    pub source_size: u64,
    /// lazyblk blob digest.
    pub target_digest: String,
    /// lazyblk blob size.
    pub target_size: u64,
    /// The lazyblk layer's disk digest: its diff ID in the converted image's config.
    pub disk_digest: String,
    /// Bytes actually uploaded (0 when the target already had the blob).
    pub uploaded_bytes: u64,
    /// Download + convert + upload time.
    pub seconds: f64,
}

/// One converted image manifest.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestSummary {
    /// `os/arch` when known.
    pub platform: Option<String>,
    /// Source manifest digest.
    pub source_digest: String,
    /// The new manifest (new-tag mode) or referrer artifact digest.
    pub target_digest: String,
    /// Its layers.
    pub layers: Vec<LayerSummary>,
}

/// What `lazyblk convert` did.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    /// Source reference.
    pub source: String,
    /// Target reference (new tag), or the source (referrer mode).
    pub target: String,
    /// `tag` or `referrer`.
    pub mode: &'static str,
    /// Digest of what the target tag points at (new-tag mode).
    pub target_digest: Option<String>,
    /// Per manifest.
    pub manifests: Vec<ManifestSummary>,
    /// Sum of source layer sizes.
    pub source_bytes: u64,
    /// Sum of converted layer sizes.
    pub target_bytes: u64,
    /// Bytes uploaded in total (0 on an idempotent re-run).
    pub uploaded_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

struct Ctx<'a> {
    src: &'a dyn ImageStore,
    dst: &'a dyn ImageStore,
    opts: &'a ImageConvertOptions,
    bars: Option<indicatif::MultiProgress>,
}

/// `sha256:<hex>` of `b`.
pub fn sha256_str(b: &[u8]) -> String {
    lazyblk_image_format::digest_string(&lazyblk_image_format::sha256(b))
}

/// Converts `src` into `dst` (new tag), or pushes referrer artifacts next to `src` (when
/// `opts.referrer`; `dst` then names where, default the source repository).
pub async fn convert_image(
    src: &ImageRef,
    dst: Option<&ImageRef>,
    opts: &ImageConvertOptions,
) -> Result<ImageSummary, ImageError> {
    let started = Instant::now();
    if opts.index_spans.is_some() && !opts.referrer {
        return Err(ImageError(
            "an original-image index is pushed as a referrer artifact".into(),
        ));
    }
    if opts.bound {
        let same_repo = match (src, dst) {
            (
                ImageRef::Registry {
                    registry: r1,
                    repository: p1,
                    ..
                },
                Some(ImageRef::Registry {
                    registry: r2,
                    repository: p2,
                    ..
                }),
            ) => r1 == r2 && p1 == p2,
            _ => false,
        };
        if opts.index_spans.is_none() || !same_repo {
            return Err(ImageError(
                "the bound form of an index is a new tag in the image's own repository (it reuses the image's layer blobs)".into(),
            ));
        }
    }
    let push_manifest = !opts.referrer || opts.bound;
    let src_store = src.store(&opts.registry, false)?;
    let target = match (dst, opts.referrer) {
        (Some(d), _) => d.clone(),
        (None, true) => src.clone(),
        (None, false) => return Err(ImageError("a destination is needed (or --referrer)".into())),
    };
    let dst_store = target.store(&opts.registry, true)?;
    std::fs::create_dir_all(&opts.work_dir)?;
    use std::io::IsTerminal;
    let bars =
        (opts.progress && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
    let ctx = Ctx {
        src: src_store.as_ref(),
        dst: dst_store.as_ref(),
        opts,
        bars,
    };
    let top = ctx
        .src
        .get_manifest(src.reference())
        .await?
        .ok_or_else(|| ImageError(format!("{src}: not found")))?;
    let mut manifests = Vec::new();
    let mut target_digest = None;
    match parse_document(&top.bytes, &top.media_type)
        .map_err(|e| ImageError(format!("{src}: {e}")))?
    {
        Document::Manifest(m) => {
            let subject = Descriptor::new(
                doc_type(&top.media_type, OCI_MANIFEST),
                &top.digest,
                top.bytes.len() as u64,
            );
            let (summary, bytes) = convert_manifest(&ctx, *m, subject, None).await?;
            if push_manifest {
                ctx.dst
                    .put_manifest(target.reference(), &bytes, OCI_MANIFEST)
                    .await?;
                target_digest = Some(summary.target_digest.clone());
            }
            manifests.push(summary);
        }
        Document::Index(ix) => {
            let mut entries = Vec::new();
            for d in &ix.manifests {
                let name = d.platform.as_ref().map(|p| p.name());
                if !opts.platforms.is_empty()
                    && !name.as_ref().is_some_and(|n| {
                        opts.platforms
                            .iter()
                            .any(|p| n == p || n.starts_with(&format!("{p}/")))
                    })
                {
                    continue;
                }
                if d.platform
                    .as_ref()
                    .is_some_and(|p| p.architecture == "unknown")
                {
                    continue; // attestation manifests (buildx), not runnable images
                }
                let m = ctx.src.get_manifest(&d.digest).await?.ok_or_else(|| {
                    ImageError(format!(
                        "{src}: manifest {} listed in the index is missing",
                        d.digest
                    ))
                })?;
                let Document::Manifest(man) = parse_document(&m.bytes, &d.media_type)
                    .map_err(|e| ImageError(format!("{}: {e}", d.digest)))?
                else {
                    return Err(ImageError(format!(
                        "{}: nested indexes are not supported",
                        d.digest
                    )));
                };
                let subject = Descriptor::new(
                    doc_type(&d.media_type, OCI_MANIFEST),
                    &d.digest,
                    m.bytes.len() as u64,
                );
                let (summary, bytes) =
                    convert_manifest(&ctx, *man, subject, d.platform.clone()).await?;
                if push_manifest {
                    // Push each platform manifest by digest; the index (last) makes them reachable.
                    ctx.dst
                        .put_manifest(&summary.target_digest, &bytes, OCI_MANIFEST)
                        .await?;
                    let mut e =
                        Descriptor::new(OCI_MANIFEST, &summary.target_digest, bytes.len() as u64);
                    e.platform = d.platform.clone();
                    entries.push(e);
                }
                manifests.push(summary);
            }
            if manifests.is_empty() {
                return Err(ImageError(format!(
                    "{src}: no manifest matches --platform {}",
                    opts.platforms.join(",")
                )));
            }
            if push_manifest {
                let mut annotations = BTreeMap::new();
                annotations.insert(SOURCE_MANIFEST_ANNOTATION.to_string(), top.digest.clone());
                let index = ImageIndex {
                    schema_version: 2,
                    media_type: Some(OCI_INDEX.into()),
                    manifests: entries,
                    annotations,
                };
                let bytes = serde_json::to_vec(&index).expect("index serialises");
                ctx.dst
                    .put_manifest(target.reference(), &bytes, OCI_INDEX)
                    .await?;
                target_digest = Some(sha256_str(&bytes));
            }
        }
    }
    let layers = manifests.iter().flat_map(|m| &m.layers);
    let (source_bytes, target_bytes, uploaded) = layers.fold((0, 0, 0), |(s, t, u), l| {
        (s + l.source_size, t + l.target_size, u + l.uploaded_bytes)
    });
    Ok(ImageSummary {
        source: src.to_string(),
        target: target.to_string(),
        mode: match (opts.index_spans, opts.referrer) {
            (Some(_), _) if opts.bound => "index+bound",
            (Some(_), _) => "index",
            (None, true) => "referrer",
            (None, false) => "tag",
        },
        target_digest,
        manifests,
        source_bytes,
        target_bytes,
        uploaded_bytes: uploaded,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn doc_type(given: &str, default: &str) -> &'static str {
    match given {
        DOCKER_MANIFEST => DOCKER_MANIFEST,
        OCI_MANIFEST => OCI_MANIFEST,
        _ if default == OCI_MANIFEST => OCI_MANIFEST,
        _ => OCI_INDEX,
    }
}

/// Converts one image manifest's layers and returns the new manifest (new-tag mode) or referrer
/// artifact (already pushed by digest, with the referrers fallback tag updated).
async fn convert_manifest(
    ctx: &Ctx<'_>,
    m: Manifest,
    subject: Descriptor,
    platform: Option<Platform>,
) -> Result<(ManifestSummary, Vec<u8>), ImageError> {
    for l in &m.layers {
        if l.urls.is_some()
            || l.media_type.contains("foreign")
            || l.media_type.contains("nondistributable")
        {
            return Err(ImageError(format!(
                "layer {}: foreign/non-distributable layer ({}) cannot be converted",
                l.digest, l.media_type
            )));
        }
        if l.annotations
            .keys()
            .any(|k| k.starts_with("io.github.containers.zstd-chunked"))
        {
            return Err(ImageError(format!(
                "layer {}: zstd:chunked layers are not supported",
                l.digest
            )));
        }
        if !convertible_layer(&l.media_type) {
            return Err(ImageError(format!(
                "layer {}: unsupported media type {:?}",
                l.digest, l.media_type
            )));
        }
    }
    let config = ctx.src.get_small_blob(&m.config).await?;
    let cfg: serde_json::Value = serde_json::from_slice(&config)
        .map_err(|e| ImageError(format!("config {}: {e}", m.config.digest)))?;
    let diff_ids = crate::image::oci::diff_ids(&cfg);
    if diff_ids.len() != m.layers.len() {
        return Err(ImageError(format!(
            "config {}: {} diff_ids for {} layers",
            m.config.digest,
            diff_ids.len(),
            m.layers.len()
        )));
    }
    let results: Vec<Result<(Vec<Descriptor>, LayerSummary), ImageError>> =
        futures::stream::iter(m.layers.iter().zip(&diff_ids).enumerate())
            .map(|(i, (l, diff_id))| convert_one(ctx, i, l, diff_id))
            .buffered(ctx.opts.parallel_layers.max(1))
            .collect()
            .await;
    let mut layers = Vec::new();
    let mut summaries = Vec::new();
    for r in results {
        let (d, s) = r?;
        layers.extend(d);
        summaries.push(s);
    }
    let config_type = if m.config.media_type == DOCKER_CONFIG {
        OCI_CONFIG
    } else {
        &m.config.media_type
    };
    // Config: in new-tag mode, the same config with each layer's diff ID replaced by its disk digest,
    // so containerd's chain IDs name the lazyblk disks (a snapshotter checks this before it commits a
    // remote layer: docs/format.md, "Diff IDs and chain IDs"). In referrer mode the original image,
    // config included, stays as it is.
    let config_desc = if ctx.opts.referrer {
        m.config.clone()
    } else {
        let disks: Vec<String> = summaries.iter().map(|s| s.disk_digest.clone()).collect();
        let bytes = Bytes::from(converted_config(&cfg, &disks)?);
        let digest = sha256_str(&bytes);
        ctx.dst.put_blob_bytes(bytes.clone(), &digest).await?;
        Descriptor::new(config_type, &digest, bytes.len() as u64)
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(
        SOURCE_MANIFEST_ANNOTATION.to_string(),
        subject.digest.clone(),
    );
    let mut man = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(config_type, &config_desc.digest, config_desc.size),
        layers,
        subject: None,
        annotations,
    };
    if ctx.opts.referrer {
        // An artifact: empty config, the original manifest as subject.
        let empty = sha256_str(EMPTY_JSON);
        ctx.dst
            .put_blob_bytes(Bytes::from_static(EMPTY_JSON), &empty)
            .await?;
        man.artifact_type = Some(LAZYBLK_ARTIFACT.into());
        man.config = Descriptor::new(OCI_EMPTY, &empty, EMPTY_JSON.len() as u64);
        man.subject = Some(subject.clone());
    }
    let mut bytes = serde_json::to_vec(&man).expect("manifest serialises");
    if ctx.opts.referrer {
        push_referrer(ctx.dst, &man).await?;
    }
    if ctx.opts.bound {
        bytes = bound_manifest(
            ctx,
            &m,
            &cfg,
            config_type,
            &man.layers,
            &summaries,
            &subject,
        )
        .await?;
    }
    Ok((
        ManifestSummary {
            platform: platform.map(|p| p.name()),
            source_digest: subject.digest,
            target_digest: sha256_str(&bytes),
            layers: summaries,
        },
        bytes,
    ))
}

/// The bound form of an original-image index (docs/format.md, "Original-image indexes"): `m`'s
/// layer descriptors (the same blobs), each with its index's annotations and `index-blob` (the
/// metadata blob), under `cfg` with each diff ID replaced by the layer's disk digest.
async fn bound_manifest(
    ctx: &Ctx<'_>,
    m: &Manifest,
    cfg: &serde_json::Value,
    config_type: &str,
    index_layers: &[Descriptor],
    summaries: &[LayerSummary],
    subject: &Descriptor,
) -> Result<Vec<u8>, ImageError> {
    let disks: Vec<String> = summaries.iter().map(|s| s.disk_digest.clone()).collect();
    let config = Bytes::from(converted_config(cfg, &disks)?);
    let digest = sha256_str(&config);
    ctx.dst.put_blob_bytes(config.clone(), &digest).await?;
    let metas = index_layers.iter().filter(|d| d.media_type == MEDIA_TYPE);
    let mut layers = Vec::with_capacity(m.layers.len());
    for (l, meta) in m.layers.iter().zip(metas) {
        let mut d = l.clone();
        d.annotations.extend(meta.annotations.clone());
        d.annotations.insert(
            format!("{}index-blob", crate::convert::ANNOTATION_PREFIX),
            meta.digest.clone(),
        );
        layers.push(d);
    }
    let mut annotations = BTreeMap::new();
    annotations.insert(
        SOURCE_MANIFEST_ANNOTATION.to_string(),
        subject.digest.clone(),
    );
    let man = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(config_type, &digest, config.len() as u64),
        layers,
        subject: None,
        annotations,
    };
    Ok(serde_json::to_vec(&man).expect("manifest serialises"))
}

/// Image config `cfg` with its `rootfs.diff_ids` replaced by `disk_digests` (one per layer); every
/// other field is kept. The original diff IDs stay in each layer's `diff-id` annotation.
pub fn converted_config(
    cfg: &serde_json::Value,
    disk_digests: &[String],
) -> Result<Vec<u8>, ImageError> {
    let mut cfg = cfg.clone();
    let rootfs = cfg
        .get_mut("rootfs")
        .and_then(|r| r.as_object_mut())
        .ok_or_else(|| ImageError("image config has no rootfs object".into()))?;
    rootfs.insert(
        "diff_ids".into(),
        serde_json::Value::Array(
            disk_digests
                .iter()
                .map(|d| serde_json::Value::String(d.clone()))
                .collect(),
        ),
    );
    Ok(serde_json::to_vec(&cfg).expect("config serialises"))
}

impl Ctx<'_> {
    fn bar(&self, i: usize, digest: &str) -> Option<indicatif::ProgressBar> {
        let bars = self.bars.as_ref()?;
        let b = bars.add(indicatif::ProgressBar::new_spinner());
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} layer {prefix} {msg} {elapsed}")
                .ok()?,
        );
        b.set_prefix(format!("{i} {}", &digest[7..19.min(digest.len())]));
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(b)
    }
}

/// The tag-schema fallback of the Referrers API: tag `sha256-<hex>` of the subject holds an index of its
/// referrers. Adds `artifact` to it (once).
async fn add_to_fallback_tag(
    dst: &dyn ImageStore,
    subject: &str,
    artifact: &Manifest,
    digest: &str,
    size: u64,
) -> Result<(), ImageError> {
    let tag = fallback_tag(subject);
    let mut index = match dst.get_manifest(&tag).await? {
        Some(m) => serde_json::from_slice::<ImageIndex>(&m.bytes)
            .map_err(|e| ImageError(format!("referrers tag {tag}: {e}")))?,
        None => ImageIndex {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            manifests: vec![],
            annotations: Default::default(),
        },
    };
    if index.manifests.iter().any(|d| d.digest == digest) {
        return Ok(());
    }
    let mut d = Descriptor::new(OCI_MANIFEST, digest, size);
    d.artifact_type = artifact.artifact_type.clone();
    d.annotations = artifact.annotations.clone();
    index.manifests.push(d);
    let bytes = serde_json::to_vec(&index).expect("index serialises");
    dst.put_manifest(&tag, &bytes, OCI_INDEX).await?;
    Ok(())
}

/// `sha256-<hex>`: the referrers fallback tag of a manifest digest.
pub fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

async fn convert_one(
    ctx: &Ctx<'_>,
    i: usize,
    l: &Descriptor,
    diff_id: &str,
) -> Result<(Vec<Descriptor>, LayerSummary), ImageError> {
    if let Some(span_size) = ctx.opts.index_spans {
        return index_one(ctx, i, l, diff_id, span_size).await;
    }
    let started = Instant::now();
    let (dir, src_path, bar) = download_layer(ctx, i, l).await?;
    let say = |m: &str| {
        if let Some(b) = &bar {
            b.set_message(m.to_string());
        }
    };
    say("converting");
    let out_path = dir.path().join("layer.lazyblk");
    let layer_opts = ctx.opts.layer.clone();
    let (sp, op) = (src_path.clone(), out_path.clone());
    let summary = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&sp)?;
        convert_layer(f, None, &op, &layer_opts).map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await
    .map_err(|e| ImageError(e.to_string()))?
    .map_err(|e| ImageError(format!("layer {i} ({}): {e}", l.digest)))?;
    if summary.input.diff_id != diff_id {
        return Err(ImageError(format!(
            "layer {i} ({}): uncompressed digest {} does not match the config's diff_id {diff_id}",
            l.digest, summary.input.diff_id
        )));
    }
    std::fs::remove_file(&src_path)?;
    say("uploading");
    let uploaded = ctx
        .dst
        .put_blob(&out_path, &summary.blob.digest, summary.blob.size, None)
        .await?;
    if let Some(b) = &bar {
        b.finish_with_message(format!("done ({} -> {} bytes)", l.size, summary.blob.size));
    }
    let mut desc = Descriptor::new(MEDIA_TYPE, &summary.blob.digest, summary.blob.size);
    desc.annotations = summary.annotations.clone();
    Ok((
        vec![desc],
        LayerSummary {
            source_digest: l.digest.clone(),
            source_size: l.size,
            target_digest: summary.blob.digest,
            target_size: summary.blob.size,
            disk_digest: summary.blob.disk_digest.clone(),
            uploaded_bytes: uploaded,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}

/// Downloads layer `i` into a new scratch directory (verified against its digest by the store);
/// returns the directory, the file and the layer's progress bar.
async fn download_layer(
    ctx: &Ctx<'_>,
    i: usize,
    l: &Descriptor,
) -> Result<(tempfile::TempDir, PathBuf, Option<indicatif::ProgressBar>), ImageError> {
    let bar = ctx.bar(i, &l.digest);
    if let Some(b) = &bar {
        b.set_message("downloading");
    }
    let dir = tempfile::tempdir_in(&ctx.opts.work_dir)?;
    let src_path = dir.path().join("layer");
    ctx.src
        .blob_to_file(l, &src_path)
        .await
        .map_err(|e| ImageError(format!("layer {i} ({}): {e}", l.digest)))?;
    Ok((dir, src_path, bar))
}

/// Indexes one original layer (`lazyblk index`): pushes its metadata blob and span blob; the layer
/// itself is neither copied nor changed.
async fn index_one(
    ctx: &Ctx<'_>,
    i: usize,
    l: &Descriptor,
    diff_id: &str,
    span_size: u64,
) -> Result<(Vec<Descriptor>, LayerSummary), ImageError> {
    let started = Instant::now();
    let bar = ctx.bar(i, &l.digest);
    let say = |m: &str| {
        if let Some(b) = &bar {
            b.set_message(m.to_string());
        }
    };
    say("downloading and indexing");
    let dir = tempfile::tempdir_in(&ctx.opts.work_dir)?;
    let (blob_path, spans_path) = (dir.path().join("meta.lazyblk"), dir.path().join("spans"));
    let opts = crate::original::IndexOptions {
        chunk_shift: ctx.opts.layer.chunk_shift,
        span_size,
        threads: ctx.opts.layer.threads,
        max_entries: ctx.opts.layer.max_entries,
        metadata_region_bytes: ctx.opts.layer.metadata_region_bytes,
        // `copy_blob` checks the blob's size and digest, and nothing built is used unless it did:
        // the decoder thread need not hash the blob a second time.
        proven_source_digest: Some(
            lazyblk_image_format::parse_digest(&l.digest)
                .map_err(|e| ImageError(format!("layer {i}: {e}")))?,
        ),
    };
    // The layer is indexed as it arrives (never stored): the download, the decoder and the tar
    // parser run at once. Nothing built is used unless the download then proves the blob's digest.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let download = ctx.src.copy_blob(l, BlobSink::Channel(tx));
    let (bp, pp) = (blob_path.clone(), spans_path.clone());
    let index = tokio::task::spawn_blocking(move || {
        crate::original::index_layer(ChannelReader::new(rx), &bp, &pp, &opts)
            .map_err(|e| e.to_string())
    });
    let (downloaded, indexed) = futures::join!(download, index);
    let indexed = indexed.map_err(|e| ImageError(e.to_string()))?;
    let layer_err = |e: String| ImageError(format!("layer {i} ({}): {e}", l.digest));
    let summary = match (downloaded, indexed) {
        (Ok(()), Ok(s)) => s,
        (Ok(()), Err(e)) => return Err(layer_err(e)),
        // The indexer stopped reading: its reason is the one to tell.
        (Err(d), Err(e)) if d.0.contains(READER_STOPPED) => return Err(layer_err(e)),
        (Err(d), _) => return Err(layer_err(d.0)),
    };
    if summary.input.diff_id != diff_id || summary.input.digest != l.digest {
        return Err(ImageError(format!(
            "layer {i} ({}): the blob read has digest {} and diff_id {}; the manifest and config say {} and {diff_id}",
            l.digest, summary.input.digest, summary.input.diff_id, l.digest
        )));
    }
    say("uploading");
    let mut uploaded = ctx
        .dst
        .put_blob(&blob_path, &summary.blob.digest, summary.blob.size, None)
        .await?;
    uploaded += ctx
        .dst
        .put_blob(&spans_path, &summary.spans.digest, summary.spans.size, None)
        .await?;
    if let Some(b) = &bar {
        b.finish_with_message(format!(
            "done ({} -> {} + {} bytes of index)",
            l.size, summary.blob.size, summary.spans.size
        ));
    }
    let mut desc = Descriptor::new(MEDIA_TYPE, &summary.blob.digest, summary.blob.size);
    desc.annotations = summary.annotations.clone();
    let spans = Descriptor::new(
        crate::original::SPANS_MEDIA_TYPE,
        &summary.spans.digest,
        summary.spans.size,
    );
    Ok((
        vec![desc, spans],
        LayerSummary {
            source_digest: l.digest.clone(),
            source_size: l.size,
            target_digest: summary.blob.digest,
            target_size: summary.blob.size + summary.spans.size,
            disk_digest: summary.blob.disk_digest.clone(),
            uploaded_bytes: uploaded,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}

/// Finds the lazyblk referrer artifact of each image manifest of `image` (the lookup side of
/// `--referrer`): the Referrers API when the registry has it, else the `sha256-<hex>` tag.
pub async fn find_referrers(
    image: &ImageRef,
    registry: &RegistryOptions,
) -> Result<Vec<(String, Option<String>, Manifest)>, ImageError> {
    let store = image.store(registry, false)?;
    let subjects: Vec<(String, Option<String>)> = image_manifests(&*store, image)
        .await?
        .into_iter()
        .map(|d| (d.digest, d.platform.map(|p| p.name())))
        .collect();
    let mut out = Vec::new();
    for (subject, platform) in subjects {
        for (digest, man) in referrer_manifests(&*store, &subject, LAZYBLK_ARTIFACT).await? {
            out.push((digest, platform.clone(), man));
        }
    }
    Ok(out)
}

/// The image manifests `image` names in `store`: the manifest itself, or each manifest of an index
/// (with its platform).
pub async fn image_manifests(
    store: &dyn ImageStore,
    image: &ImageRef,
) -> Result<Vec<Descriptor>, ImageError> {
    let top = store
        .get_manifest(image.reference())
        .await?
        .ok_or_else(|| ImageError(format!("{image}: not found")))?;
    Ok(
        match parse_document(&top.bytes, &top.media_type).map_err(ImageError)? {
            Document::Manifest(_) => vec![Descriptor::new(
                &top.media_type,
                &top.digest,
                top.bytes.len() as u64,
            )],
            Document::Index(ix) => ix.manifests,
        },
    )
}

/// The referrers of manifest `subject` with artifact type `artifact_type`: from the Referrers API when
/// the store has it, else from the `sha256-<hex>` fallback tag. Each is fetched, parsed, and kept only
/// if its `subject` really is `subject`.
pub async fn referrer_manifests(
    store: &dyn ImageStore,
    subject: &str,
    artifact_type: &str,
) -> Result<Vec<(String, Manifest)>, ImageError> {
    let index = match store.referrers(subject).await? {
        Some(ix) => Some(ix),
        None => match store.get_manifest(&fallback_tag(subject)).await? {
            Some(m) => serde_json::from_slice::<ImageIndex>(&m.bytes).ok(),
            None => None,
        },
    };
    let mut out = Vec::new();
    for d in index.map(|i| i.manifests).unwrap_or_default() {
        if d.artifact_type.as_deref() != Some(artifact_type) {
            continue;
        }
        let m = store
            .get_manifest(&d.digest)
            .await?
            .ok_or_else(|| ImageError(format!("referrer {} missing", d.digest)))?;
        let Document::Manifest(man) = parse_document(&m.bytes, OCI_MANIFEST).map_err(ImageError)?
        else {
            continue;
        };
        if man.subject.as_ref().map(|s| s.digest.as_str()) == Some(subject) {
            out.push((d.digest.clone(), *man));
        }
    }
    Ok(out)
}

/// Pushes `man` (an artifact manifest with a `subject`) by digest and, when the store has no
/// Referrers API, records it in the subject's fallback tag. Returns the artifact's digest.
pub async fn push_referrer(dst: &dyn ImageStore, man: &Manifest) -> Result<String, ImageError> {
    let subject = man
        .subject
        .as_ref()
        .ok_or_else(|| ImageError("a referrer needs a subject".into()))?;
    let bytes = serde_json::to_vec(man).expect("manifest serialises");
    let digest = sha256_str(&bytes);
    if !dst.put_manifest(&digest, &bytes, OCI_MANIFEST).await? {
        add_to_fallback_tag(dst, &subject.digest, man, &digest, bytes.len() as u64).await?;
    }
    Ok(digest)
}

/// Scratch directory default: under the system temp dir.
pub fn default_work_dir() -> PathBuf {
    std::env::temp_dir().join(format!("lazyblk-convert-{}", std::process::id()))
}

/// A blocking reader over the chunks a [`BlobSink::Channel`] receives (end of stream when the
/// sender is dropped).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl ChannelReader {
    fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}
