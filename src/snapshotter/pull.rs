//! `lazyblk pull`: what `ctr-remote rpull` does, through containerd's gRPC API. containerd 1.6/1.7's
//! own pull never passes layer annotations to a snapshotter, so this resolves the image itself, writes
//! the index/manifest/config into containerd's content store, prepares every layer through containerd's
//! snapshot service with the labels that let the lazyblk snapshotter take remote layers without a
//! download (it answers AlreadyExists), unpacks ordinary layers with containerd's diff service, and
//! records the image. Everything happens under a lease, so garbage collection cannot race the pull;
//! the content carries the `containerd.io/gc.ref.*` labels that keep it and its snapshots alive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tonic::transport::Channel;
use tonic::Request;

use super::proto::content::{content_client::ContentClient, WriteAction, WriteContentRequest};
use super::proto::diff::{diff_client::DiffClient, ApplyRequest};
use super::proto::images::{
    images_client::ImagesClient, CreateImageRequest, Image, UpdateImageRequest,
};
use super::proto::leases::{leases_client::LeasesClient, CreateRequest, DeleteRequest};
use super::proto::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
    StatSnapshotRequest,
};
use super::proto::types;
use super::service::{
    LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_REMOTE, LABEL_TARGET, LAZYBLK_PREFIX,
};
use crate::fetch::registry::RegistryOptions;
use crate::image::oci::{parse_document, Descriptor, Document, Manifest};
use crate::image::ImageRef;

/// What to pull and where.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Image reference.
    pub reference: String,
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// Snapshotter name in containerd's config.
    pub snapshotter: String,
    /// Platform (`os/arch`) to pick from an index.
    pub platform: String,
    /// Registry access.
    pub registry: RegistryOptions,
}

/// What a pull did.
#[derive(Debug, Default)]
pub struct PullReport {
    /// Layers taken as remote lazyblk layers (no download).
    pub remote_layers: usize,
    /// Layers downloaded and unpacked by containerd.
    pub unpacked_layers: usize,
    /// Layers whose snapshot already existed.
    pub existing_layers: usize,
    /// The image's top chain ID.
    pub chain_id: String,
}

/// Connects to containerd's unix socket.
pub async fn connect(path: &Path) -> Result<Channel> {
    let path = path.to_path_buf();
    let p = path.clone();
    tonic::transport::Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to containerd at {}", path.display()))
}

struct Ctx {
    ns: String,
    lease: String,
    channel: Channel,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.ns.parse().expect("ascii namespace"),
        );
        if !self.lease.is_empty() {
            md.insert("containerd-lease", self.lease.parse().expect("ascii lease"));
        }
        r
    }
}

fn sha256(b: &[u8]) -> String {
    lazyblk_image_format::digest_string(&lazyblk_image_format::sha256(b))
}

/// containerd's chain IDs: `chain(1) = diff(1)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Writes `data` into the content store (no-op if present), with `labels`.
async fn put_content(
    ctx: &Ctx,
    digest: &str,
    data: &[u8],
    labels: HashMap<String, String>,
) -> Result<()> {
    let mut client = ContentClient::new(ctx.channel.clone());
    let total = data.len() as i64;
    let r#ref = format!("lazyblk-pull-{digest}");
    let mut msgs = Vec::new();
    const PIECE: usize = 1 << 20;
    let mut off = 0usize;
    loop {
        let end = (off + PIECE).min(data.len());
        msgs.push(WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: r#ref.clone(),
            total,
            expected: digest.to_string(),
            offset: off as i64,
            data: data[off..end].to_vec(),
            labels: HashMap::new(),
        });
        off = end;
        if off >= data.len() {
            break;
        }
    }
    msgs.push(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref,
        total,
        expected: digest.to_string(),
        offset: total,
        data: Vec::new(),
        labels: labels.clone(),
    });
    let resp = client.write(ctx.req(futures::stream::iter(msgs))).await;
    match resp {
        Ok(r) => {
            // Drain the response stream so errors in it surface.
            let mut s = r.into_inner();
            while let Some(m) = s.message().await.transpose() {
                m.with_context(|| format!("writing {digest} to containerd's content store"))?;
            }
            Ok(())
        }
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            // Present already: make sure it carries our labels.
            use super::proto::content::{Info, UpdateRequest};
            client
                .update(ctx.req(UpdateRequest {
                    info: Some(Info {
                        digest: digest.to_string(),
                        size: total,
                        created_at: None,
                        updated_at: None,
                        labels: labels.clone(),
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
                    }),
                }))
                .await
                .with_context(|| format!("labelling {digest}"))?;
            Ok(())
        }
        Err(s) => Err(anyhow!(
            "writing {digest} to containerd's content store: {s}"
        )),
    }
}

fn to_proto(d: &Descriptor) -> types::Descriptor {
    types::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

/// Pulls `opts.reference` into containerd for the lazyblk snapshotter.
pub async fn pull(opts: &PullOptions) -> Result<PullReport> {
    let image = ImageRef::parse(&opts.reference).map_err(|e| anyhow!("{e}"))?;
    if !matches!(image, ImageRef::Registry { .. }) {
        bail!(
            "{}: lazyblk pull needs a registry reference",
            opts.reference
        );
    }
    let store = image
        .store(&opts.registry, false)
        .map_err(|e| anyhow!("{e}"))?;
    let top = store
        .get_manifest(image.reference())
        .await
        .map_err(|e| anyhow!("{e}"))?
        .ok_or_else(|| anyhow!("{}: no such image", opts.reference))?;
    let channel = connect(&opts.address).await?;
    let mut ctx = Ctx {
        ns: opts.namespace.clone(),
        lease: String::new(),
        channel,
    };
    // A lease for the duration of the pull (expires by itself if we die).
    let mut leases = LeasesClient::new(ctx.channel.clone());
    let expire =
        chrono_like_rfc3339(std::time::SystemTime::now() + std::time::Duration::from_secs(3600));
    let lease = leases
        .create(ctx.req(CreateRequest {
            id: format!("lazyblk-pull-{}", std::process::id()),
            labels: [("containerd.io/gc.expire".to_string(), expire)].into(),
        }))
        .await
        .context("creating a containerd lease")?
        .into_inner()
        .lease
        .map(|l| l.id)
        .unwrap_or_default();
    ctx.lease = lease.clone();
    let result = pull_leased(&ctx, opts, store.as_ref(), top).await;
    let _ = leases
        .delete(ctx.req(DeleteRequest {
            id: lease,
            sync: false,
        }))
        .await;
    result
}

async fn pull_leased(
    ctx: &Ctx,
    opts: &PullOptions,
    store: &dyn crate::image::store::ImageStore,
    top: crate::image::store::StoredManifest,
) -> Result<PullReport> {
    let (target, manifest_bytes, manifest_desc, index) =
        match parse_document(&top.bytes, &top.media_type).map_err(|e| anyhow!("{e}"))? {
            Document::Manifest(_) => {
                let d = Descriptor::new(&top.media_type, &top.digest, top.bytes.len() as u64);
                (d.clone(), top.bytes.clone(), d, None)
            }
            Document::Index(ix) => {
                let chosen = ix
                    .manifests
                    .iter()
                    .find(|d| {
                        d.platform
                            .as_ref()
                            .is_some_and(|p| p.name() == opts.platform)
                    })
                    .ok_or_else(|| {
                        anyhow!("{}: no manifest for {}", opts.reference, opts.platform)
                    })?
                    .clone();
                let m = store
                    .get_manifest(&chosen.digest)
                    .await
                    .map_err(|e| anyhow!("{e}"))?
                    .ok_or_else(|| {
                        anyhow!("{}: missing manifest {}", opts.reference, chosen.digest)
                    })?;
                let d = Descriptor::new(&top.media_type, &top.digest, top.bytes.len() as u64);
                (d, m.bytes, chosen, Some(top.bytes.clone()))
            }
        };
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("manifest {}", manifest_desc.digest))?;
    if sha256(&manifest_bytes) != manifest_desc.digest {
        bail!(
            "manifest {} does not match its digest",
            manifest_desc.digest
        );
    }
    let config = store
        .get_small_blob(&manifest.config)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let cfg: serde_json::Value = serde_json::from_slice(&config).context("image config")?;
    let diff_ids = crate::image::oci::diff_ids(&cfg);
    if diff_ids.len() != manifest.layers.len() {
        bail!(
            "config has {} diff_ids for {} layers",
            diff_ids.len(),
            manifest.layers.len()
        );
    }
    let chains = chain_ids(&diff_ids);
    let mut report = PullReport::default();
    let mut snaps = SnapshotsClient::new(ctx.channel.clone());
    let mut parent = String::new();
    let mut stored_layers = Vec::new();
    for (i, (layer, chain)) in manifest.layers.iter().zip(&chains).enumerate() {
        let exists = snaps
            .stat(ctx.req(StatSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: chain.clone(),
            }))
            .await
            .is_ok();
        if exists {
            report.existing_layers += 1;
            parent = chain.clone();
            continue;
        }
        let mut labels: HashMap<String, String> = layer
            .annotations
            .iter()
            .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_TARGET.into(), chain.clone());
        labels.insert(LABEL_IMAGE_REF.into(), opts.reference.clone());
        labels.insert(LABEL_LAYER_DIGEST.into(), layer.digest.clone());
        labels.insert(
            "containerd.io/snapshot/cri.manifest-digest".into(),
            manifest_desc.digest.clone(),
        );
        let key = format!("lazyblk-pull-{}-{chain}", std::process::id());
        let remote = layer
            .annotations
            .contains_key(&format!("{LAZYBLK_PREFIX}index-digest"));
        let prepared = snaps
            .prepare(ctx.req(PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent: parent.clone(),
                labels: labels.clone(),
            }))
            .await;
        match prepared {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                // Remote if the snapshotter says so (also for layers it found through a referrer).
                let info = snaps
                    .stat(ctx.req(StatSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        key: chain.clone(),
                    }))
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().info);
                if remote || info.is_some_and(|i| i.labels.contains_key(LABEL_REMOTE)) {
                    report.remote_layers += 1;
                } else {
                    report.existing_layers += 1;
                }
            }
            Err(s) => bail!("layer {i} ({}): prepare: {s}", layer.digest),
            Ok(resp) => {
                if remote {
                    tracing::warn!(layer = %layer.digest, "snapshotter did not take the lazyblk layer remotely; unpacking it instead is impossible (it is ext4, not tar)");
                    bail!(
                        "layer {i} ({}): the snapshotter {:?} did not accept the lazyblk layer (is it lazyblk?)",
                        layer.digest, opts.snapshotter
                    );
                }
                let mounts = resp.into_inner().mounts;
                // An ordinary layer: download it into the content store, let containerd apply it.
                let tmp = tempfile::NamedTempFile::new()?;
                store
                    .blob_to_file(layer, tmp.path())
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                let data = std::fs::read(tmp.path())?;
                put_content(ctx, &layer.digest, &data, HashMap::new()).await?;
                stored_layers.push(layer.digest.clone());
                let mut diff = DiffClient::new(ctx.channel.clone());
                diff.apply(ctx.req(ApplyRequest {
                    diff: Some(to_proto(layer)),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                }))
                .await
                .with_context(|| format!("layer {i} ({}): applying", layer.digest))?;
                snaps
                    .commit(ctx.req(CommitSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    }))
                    .await
                    .with_context(|| format!("layer {i} ({}): commit", layer.digest))?;
                report.unpacked_layers += 1;
            }
        }
        parent = chain.clone();
    }
    report.chain_id = parent.clone();
    // Content, children first, with the references that keep them (and the snapshots) alive.
    let gc_snap = format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter);
    put_content(
        ctx,
        &manifest.config.digest,
        &config,
        [(gc_snap, report.chain_id.clone())].into(),
    )
    .await?;
    let mut mlabels: HashMap<String, String> = [(
        "containerd.io/gc.ref.content.config".to_string(),
        manifest.config.digest.clone(),
    )]
    .into();
    for (i, l) in manifest.layers.iter().enumerate() {
        if stored_layers.contains(&l.digest) {
            mlabels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
    }
    put_content(ctx, &manifest_desc.digest, &manifest_bytes, mlabels).await?;
    if let Some(ix) = &index {
        put_content(
            ctx,
            &target.digest,
            ix,
            [(
                "containerd.io/gc.ref.content.m.0".to_string(),
                manifest_desc.digest.clone(),
            )]
            .into(),
        )
        .await?;
    }
    let mut images = ImagesClient::new(ctx.channel.clone());
    let img = Image {
        name: opts.reference.clone(),
        labels: HashMap::new(),
        target: Some(to_proto(&target)),
        created_at: None,
        updated_at: None,
    };
    let created = images
        .create(ctx.req(CreateImageRequest {
            image: Some(img.clone()),
            source_date_epoch: None,
        }))
        .await;
    match created {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            images
                .update(ctx.req(UpdateImageRequest {
                    image: Some(img),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                    source_date_epoch: None,
                }))
                .await
                .context("updating the image record")?;
        }
        Err(s) => bail!("creating the image record: {s}"),
    }
    Ok(report)
}

/// RFC 3339 UTC time (for lease expiry labels), without a date library.
fn chrono_like_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let d = vec!["sha256:a".to_string(), "sha256:b".to_string()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(c[1], sha256(b"sha256:a sha256:b"));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn rfc3339_dates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400 + 3661);
        assert_eq!(chrono_like_rfc3339(t), "2000-02-29T01:01:01Z");
        assert_eq!(
            chrono_like_rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00Z"
        );
    }
}
