//! Shipping traces with images: an OCI artifact (artifact type [`TRACE_MEDIA_TYPE`]) whose subject
//! is the image manifest and whose one layer is the trace JSON. The image and its layers are not
//! changed; registries without the Referrers API get the `sha256-<hex>` tag-schema fallback.

use bytes::Bytes;

use super::{Trace, TRACE_MEDIA_TYPE};
use crate::fetch::registry::RegistryOptions;
use crate::image::convert::{image_manifests, push_referrer, referrer_manifests, sha256_str};
use crate::image::oci::{Descriptor, Manifest, EMPTY_JSON, OCI_EMPTY, OCI_MANIFEST};
use crate::image::store::ImageStore;
use crate::image::{ImageError, ImageRef};

/// Annotation on a trace artifact: how many chunks it lists.
pub const CHUNKS_ANNOTATION: &str = "io.lazyblk.trace.chunks";

/// Pushes `trace` as a referrer of every image manifest `image` names (the manifest itself, or each
/// manifest of an index: a trace only matches layers by index digest, so extra entries are inert).
/// Returns `(subject, artifact)` digests.
pub async fn push_trace(
    image: &ImageRef,
    trace: &Trace,
    registry: &RegistryOptions,
) -> Result<Vec<(String, String)>, ImageError> {
    let store = image.store(registry, true)?;
    let subjects = image_manifests(&*store, image).await?;
    let body = Bytes::from(trace.to_bytes());
    let body_digest = sha256_str(&body);
    store.put_blob_bytes(body.clone(), &body_digest).await?;
    let empty = sha256_str(EMPTY_JSON);
    store
        .put_blob_bytes(Bytes::from_static(EMPTY_JSON), &empty)
        .await?;
    let mut out = Vec::new();
    for s in subjects {
        let mut man = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            artifact_type: Some(TRACE_MEDIA_TYPE.into()),
            config: Descriptor::new(OCI_EMPTY, &empty, EMPTY_JSON.len() as u64),
            layers: vec![Descriptor::new(
                TRACE_MEDIA_TYPE,
                &body_digest,
                body.len() as u64,
            )],
            subject: Some(Descriptor::new(&s.media_type, &s.digest, s.size)),
            annotations: Default::default(),
        };
        man.annotations
            .insert(CHUNKS_ANNOTATION.into(), trace.chunk_count().to_string());
        let d = push_referrer(&*store, &man).await?;
        out.push((s.digest, d));
    }
    Ok(out)
}

/// The trace shipped for image manifest `manifest` in `store`, if any (the last one pushed). A
/// trace that is present but malformed is an error, so callers can log it.
pub async fn find_trace(
    store: &dyn ImageStore,
    manifest: &str,
) -> Result<Option<Trace>, ImageError> {
    let found = referrer_manifests(store, manifest, TRACE_MEDIA_TYPE).await?;
    let Some((digest, man)) = found.into_iter().last() else {
        return Ok(None);
    };
    let layer = man
        .layers
        .iter()
        .find(|l| l.media_type == TRACE_MEDIA_TYPE)
        .ok_or_else(|| ImageError(format!("trace artifact {digest} has no trace layer")))?;
    let bytes = store.get_small_blob(layer).await?;
    Trace::parse(&bytes)
        .map(Some)
        .map_err(|e| ImageError(format!("trace artifact {digest}: {e}")))
}

/// [`find_trace`] for `REGISTRY/REPO` (any tag) and a manifest digest.
pub async fn find_trace_for(
    image_ref: &str,
    manifest: &str,
    registry: &RegistryOptions,
) -> Result<Option<Trace>, ImageError> {
    let ImageRef::Registry {
        registry: host,
        repository,
        ..
    } = ImageRef::parse(image_ref)?
    else {
        return Err(ImageError(format!("{image_ref}: not a registry image")));
    };
    let subject = ImageRef::Registry {
        registry: host,
        repository,
        reference: manifest.to_string(),
    };
    let store = subject.store(registry, false)?;
    find_trace(&*store, manifest).await
}
