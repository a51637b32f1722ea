//! `lazyblk relayout`: a new image whose lazyblk layers keep the chunks a startup trace lists right
//! before their index, so a node fetches the index and the startup set with one range request.
//!
//! Only the layer blobs change (same virtual disks, same chunk digests, new offsets and index
//! digests); the disk digests, so the config, its diff IDs and the chain IDs, stay the same.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use lazyblk_image_format::{
    digest_string, parse_digest, relayout, Index, IndexLimits, RelayoutSummary,
};
use serde::Serialize;

use super::Trace;
use crate::convert::{ANNOTATION_PREFIX, MEDIA_TYPE};
use crate::fetch::registry::RegistryOptions;
use crate::image::convert::{convert_image, sha256_str, ImageConvertOptions, ImageSummary};
use crate::image::oci::{parse_document, Document, OCI_MANIFEST};
use crate::image::{ImageError, ImageRef};

/// Annotation: start of the blob's startup region.
pub const STARTUP_OFFSET: &str = "startup-offset";

/// What happened to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct RelaidLayer {
    /// Source layer digest.
    pub source_digest: String,
    /// New layer digest (the same when the layer was copied as is).
    pub target_digest: String,
    /// Stored chunks moved into the startup region (0: copied as is).
    pub startup_chunks: u64,
    /// Bytes of the startup region.
    pub startup_bytes: u64,
}

/// What `relayout_image` did.
#[derive(Debug, Clone, Serialize)]
pub struct RelayoutReport {
    /// Where the new image went.
    pub target: String,
    /// Its manifest digest.
    pub manifest_digest: String,
    /// Per layer.
    pub layers: Vec<RelaidLayer>,
}

/// Relays out the lazyblk layers of image manifest `src` that `trace` has entries for and pushes
/// the result as `dst`. Other layers and the config are copied (cross-repository mounts when both
/// are in one registry).
pub async fn relayout_image(
    src: &ImageRef,
    dst: &ImageRef,
    trace: &Trace,
    registry: &RegistryOptions,
    work_dir: &Path,
) -> Result<RelayoutReport, ImageError> {
    let from = src.store(registry, false)?;
    let to = dst.store(registry, true)?;
    let top = from
        .get_manifest(src.reference())
        .await?
        .ok_or_else(|| ImageError(format!("{src}: not found")))?;
    let Document::Manifest(mut man) =
        parse_document(&top.bytes, &top.media_type).map_err(ImageError)?
    else {
        return Err(ImageError(format!(
            "{src} is an index: relay out one platform's manifest (REPO@sha256:...)"
        )));
    };
    let traced = man
        .layers
        .iter()
        .filter(|l| {
            l.media_type == MEDIA_TYPE
                && l.annotations
                    .get(&format!("{ANNOTATION_PREFIX}index-digest"))
                    .and_then(|d| trace.chunks_for(d))
                    .is_some()
        })
        .count();
    if traced == 0 {
        return Err(ImageError(format!(
            "the trace names none of {src}'s lazyblk layers (it was recorded with another image, or \
             another conversion of it: chunk size, level and metadata region change the layers)"
        )));
    }
    let mount_from = match (from.registry_repo(), to.registry_repo()) {
        (Some((r1, repo)), Some((r2, _))) if r1 == r2 => Some(repo),
        _ => None,
    };
    std::fs::create_dir_all(work_dir)?;
    let dir = tempfile::tempdir_in(work_dir)?;
    // Config.
    let config = from.get_small_blob(&man.config).await?;
    to.put_blob_bytes(config, &man.config.digest).await?;
    let mut layers = Vec::new();
    for (i, l) in man.layers.iter_mut().enumerate() {
        let old = dir.path().join(format!("layer{i}"));
        let key = |k: &str| format!("{ANNOTATION_PREFIX}{k}");
        let chunks = (l.media_type == MEDIA_TYPE)
            .then(|| l.annotations.get(&key("index-digest")))
            .flatten()
            .and_then(|d| trace.chunks_for(d));
        let Some(chunks) = chunks else {
            // Copied as is: present already or mounted from the source repository, else through a file.
            let mounted = match mount_from.as_deref() {
                Some(m) => to.put_blob(&old, &l.digest, l.size, Some(m)).await.is_ok(),
                None => false,
            };
            if !mounted {
                from.blob_to_file(l, &old).await?;
                to.put_blob(&old, &l.digest, l.size, None).await?;
                std::fs::remove_file(&old)?;
            }
            layers.push(RelaidLayer {
                source_digest: l.digest.clone(),
                target_digest: l.digest.clone(),
                startup_chunks: 0,
                startup_bytes: 0,
            });
            continue;
        };
        from.blob_to_file(l, &old)
            .await
            .map_err(|e| ImageError(format!("layer {i} ({}): {e}", l.digest)))?;
        let new = dir.path().join(format!("layer{i}.relaid"));
        let (old2, new2, ann, chunks) = (
            old.clone(),
            new.clone(),
            l.annotations.clone(),
            chunks.to_vec(),
        );
        let s = tokio::task::spawn_blocking(move || relayout_file(&old2, &new2, &ann, &chunks))
            .await
            .map_err(|e| ImageError(e.to_string()))?
            .map_err(|e| ImageError(format!("layer {i} ({}): {e}", l.digest)))?;
        let digest = digest_string(&s.blob.blob_digest);
        to.put_blob(&new, &digest, s.blob.blob_size, None).await?;
        let source = std::mem::replace(&mut l.digest, digest.clone());
        l.size = s.blob.blob_size;
        let b = &s.blob;
        for (k, v) in [
            ("index-offset", b.index_offset.to_string()),
            ("index-length", b.index_length.to_string()),
            ("index-digest", digest_string(&b.index_digest)),
            (STARTUP_OFFSET, s.startup_offset.to_string()),
        ] {
            l.annotations.insert(key(k), v);
        }
        layers.push(RelaidLayer {
            source_digest: source,
            target_digest: digest,
            startup_chunks: s.startup_chunks,
            startup_bytes: b.index_offset - s.startup_offset,
        });
        std::fs::remove_file(&old)?;
        std::fs::remove_file(&new)?;
    }
    man.media_type = Some(OCI_MANIFEST.into());
    let bytes = serde_json::to_vec(&man).expect("manifest serialises");
    to.put_manifest(dst.reference(), &bytes, OCI_MANIFEST)
        .await?;
    Ok(RelayoutReport {
        target: dst.to_string(),
        manifest_digest: sha256_str(&bytes),
        layers,
    })
}

/// `lazyblk convert SRC DST --trace FILE`: converts `src` (one platform) into a scratch OCI layout
/// under the work directory, then pushes its relayout with `trace` as `dst`, so only the relaid image
/// is pushed. Refused before anything is pushed when the conversion has several platforms (a trace is
/// one platform's) or the trace names none of the converted layers (it must come from the same
/// conversion: the same source and options give the same layers).
pub async fn convert_relaid(
    src: &ImageRef,
    dst: &ImageRef,
    trace: &Trace,
    opts: &ImageConvertOptions,
) -> Result<(ImageSummary, RelayoutReport), ImageError> {
    if opts.referrer || opts.index_spans.is_some() {
        return Err(ImageError(
            "a trace lays out a new image: not with --referrer or an original-image index".into(),
        ));
    }
    std::fs::create_dir_all(&opts.work_dir)?;
    let scratch = tempfile::tempdir_in(&opts.work_dir)?;
    let staged = ImageRef::Layout {
        path: scratch.path().join("converted"),
        reference: "converted".into(),
    };
    let summary = convert_image(src, Some(&staged), opts).await?;
    let [only] = summary.manifests.as_slice() else {
        return Err(ImageError(format!(
            "{src} has {} platforms and a trace is one platform's: pass --platform OS/ARCH",
            summary.manifests.len()
        )));
    };
    let converted = ImageRef::Layout {
        path: scratch.path().join("converted"),
        reference: only.target_digest.clone(),
    };
    let report = relayout_image(
        &converted,
        dst,
        trace,
        &opts.registry,
        &scratch.path().join("relayout"),
    )
    .await?;
    Ok((summary, report))
}

/// Relays out the blob file `old` (its index checked against the descriptor's `index-digest`
/// annotation) into `new`.
fn relayout_file(
    old: &Path,
    new: &Path,
    annotations: &BTreeMap<String, String>,
    chunks: &[u64],
) -> Result<RelayoutSummary, String> {
    let get = |k: &str| {
        annotations
            .get(&format!("{ANNOTATION_PREFIX}{k}"))
            .ok_or_else(|| format!("annotation {ANNOTATION_PREFIX}{k} missing"))
    };
    let num = |k: &str| -> Result<u64, String> {
        get(k)?
            .parse()
            .map_err(|_| format!("annotation {ANNOTATION_PREFIX}{k} is not a number"))
    };
    let (offset, length) = (num("index-offset")?, num("index-length")?);
    let digest = parse_digest(get("index-digest")?).map_err(|e| e.to_string())?;
    let f = std::fs::File::open(old).map_err(|e| e.to_string())?;
    let limits = IndexLimits::default();
    if length > limits.max_index_len {
        return Err(format!("index of {length} bytes is over the limit"));
    }
    let mut ib = vec![0u8; length as usize];
    f.read_exact_at(&mut ib, offset)
        .map_err(|e| format!("reading the index: {e}"))?;
    let index = Index::parse_verified(&ib, &digest, limits).map_err(|e| e.to_string())?;
    let out = std::io::BufWriter::new(std::fs::File::create(new).map_err(|e| e.to_string())?);
    let (out, s) = relayout(
        &index,
        chunks,
        |_, e| {
            let mut b = vec![0u8; e.stored_len as usize];
            f.read_exact_at(&mut b, e.offset)?;
            Ok(b)
        },
        out,
    )
    .map_err(|e| e.to_string())?;
    out.into_inner()
        .map_err(|e| e.to_string())?
        .sync_all()
        .map_err(|e| e.to_string())?;
    // The config's diff IDs (disk digests) stay valid only if the disk is the same.
    if s.blob.disk_digest != index.disk_digest() {
        return Err("relayout changed the disk (its disk digest); refusing".into());
    }
    Ok(s)
}
