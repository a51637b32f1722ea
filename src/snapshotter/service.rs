//! `containerd.services.snapshots.v1.Snapshots`, served to containerd as a proxy plugin.
//!
//! Local snapshots work like containerd's overlayfs snapshotter (`ROOT/snapshots/<id>/{fs,work}`;
//! active snapshots are overlay mounts over their parents, or a bind mount without parents), so
//! ordinary layers are unpacked by containerd into them. A Prepare whose labels carry
//! `containerd.io/snapshot.ref` and the lazyblk layer annotations (forwarded by containerd's unpacker
//! from the descriptor, plus the CRI image-ref/layer-digest labels) records the layer as committed under
//! that name with a remote marker and answers AlreadyExists, so containerd skips the download; the
//! layer's block device is attached (and its ext4 mounted read-only) when a snapshot on top of it
//! needs its mounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use super::filters::{Fields, Filters};
use super::layers::Layers;
use super::proto::snapshots as pb;
use super::proto::types::Mount;
use super::store::{now, Kind, Remote, Snapshot, Store, StoreError};
use crate::trace::auto::AutoRecorder;

/// Label naming the committed snapshot a Prepare targets (containerd's remote-snapshot protocol).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// Image reference label (set by CRI and by `lazyblk pull`).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Layer digest label (set by CRI and by `lazyblk pull`).
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Prefix of the converter's layer annotations.
pub const LAZYBLK_PREFIX: &str = "containerd.io/snapshot/lazyblk/";
/// Manifest digest label (set by CRI, containerd 2's transfer service and `lazyblk pull`).
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Label lazyblk puts on the snapshots it serves remotely (value: the layer blob it reads).
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/lazyblk.remote";

/// How long a startup-trace lookup (found or not) is reused.
const TRACE_LOOKUP_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Label on snapshots recorded from a `--referrer` artifact: the `REGISTRY/REPO` it was found in.
pub const LABEL_PUBLISHER: &str = "containerd.io/snapshot/lazyblk.publisher";

/// Whether `--referrer` artifacts are used at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferrerMode {
    /// Never: original images are unpacked by containerd.
    Off,
    /// Artifacts found in the image's own repository (Referrers API or tag fallback there).
    SameRepository,
}

/// Which referrer artifacts the snapshotter accepts (docs/operations.md, "Trust model").
#[derive(Debug, Clone)]
pub struct ReferrerPolicy {
    /// Off, or the image's own repository.
    pub mode: ReferrerMode,
    /// When not empty: only images in repositories matching one of these (`REGISTRY/REPO`, or a
    /// prefix ending in `*`).
    pub publishers: Vec<String>,
}

impl ReferrerPolicy {
    /// Whether artifacts of images in `repo` (`REGISTRY/REPO`) are accepted.
    pub fn accepts(&self, repo: &str) -> bool {
        self.mode != ReferrerMode::Off
            && (self.publishers.is_empty()
                || self.publishers.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => repo.starts_with(prefix),
                    None => repo == p,
                }))
    }
}

/// Finds what images' referrer artifacts add: lazyblk layers for ordinary image layers (`--referrer`
/// conversions) and startup traces (`lazyblk trace push`).
pub struct ReferrerLookup {
    rt: tokio::runtime::Handle,
    registry: crate::fetch::registry::RegistryOptions,
    policy: ReferrerPolicy,
    /// `REGISTRY/REPO@manifest` → (original layer digest → lazyblk layer source), negative results
    /// included. Keyed by repository: the same manifest in another repository is another publisher.
    cache: Mutex<std::collections::HashMap<String, std::collections::HashMap<String, Remote>>>,
    /// Where fetched traces are kept (`None`: traces are not looked up).
    trace_dir: Option<PathBuf>,
    /// `REGISTRY/REPO@manifest` → its trace file and when it was looked up (negative results
    /// included; both expire after [`TRACE_LOOKUP_TTL`] so a trace pushed later is found).
    traces: Mutex<std::collections::HashMap<String, (std::time::Instant, Option<PathBuf>)>>,
}

impl ReferrerLookup {
    /// A lookup using `registry` options on runtime `rt`.
    pub fn new(
        rt: tokio::runtime::Handle,
        registry: crate::fetch::registry::RegistryOptions,
        policy: ReferrerPolicy,
    ) -> ReferrerLookup {
        ReferrerLookup {
            rt,
            registry,
            policy,
            cache: Mutex::new(std::collections::HashMap::new()),
            trace_dir: None,
            traces: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Also looks up startup traces, keeping them in `dir`.
    pub fn with_traces(mut self, dir: PathBuf) -> ReferrerLookup {
        self.trace_dir = Some(dir);
        self
    }

    /// The startup trace shipped for image manifest `manifest` (fetched once, kept as a file), if
    /// any. Lookup failures are logged and mean "no trace": prefetch is an optimisation.
    fn trace(&self, image_ref: &str, manifest: &str) -> Option<PathBuf> {
        let dir = self.trace_dir.as_ref()?;
        let (registry, repository) = registry_repo(image_ref)?;
        let repo = format!("{registry}/{repository}");
        lazyblk_image_format::parse_digest(manifest).ok()?;
        let key = format!("{repo}@{manifest}");
        if let Some((at, t)) = self.traces.lock().expect("traces lock").get(&key) {
            if at.elapsed() < TRACE_LOOKUP_TTL {
                return t.clone();
            }
        }
        let found = self.rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                crate::trace::registry::find_trace_for(image_ref, manifest, &self.registry),
            )
            .await
        });
        let path = match found {
            Ok(Ok(Some(trace))) => {
                let name = hex::encode(lazyblk_image_format::sha256(key.as_bytes()));
                let path = dir.join(format!("{name}.json"));
                let tmp = path.with_extension("tmp");
                match std::fs::create_dir_all(dir)
                    .and_then(|_| std::fs::write(&tmp, trace.to_bytes()))
                    .and_then(|_| std::fs::rename(&tmp, &path))
                {
                    Ok(()) => {
                        tracing::info!(
                            image = image_ref,
                            manifest,
                            chunks = trace.chunk_count(),
                            "startup trace found"
                        );
                        Some(path)
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot keep the startup trace");
                        None
                    }
                }
            }
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::warn!(image = image_ref, manifest, error = %e, "startup trace lookup failed; no prefetch");
                None
            }
            Err(_) => {
                tracing::warn!(
                    image = image_ref,
                    manifest,
                    "startup trace lookup timed out; no prefetch"
                );
                None
            }
        };
        self.traces
            .lock()
            .expect("traces lock")
            .insert(key, (std::time::Instant::now(), path.clone()));
        path
    }

    /// The lazyblk layer converted from `layer_digest` of image manifest `manifest`, if a referrer
    /// artifact of that manifest has one. Lookup failures are logged and mean "no".
    fn find(&self, image_ref: &str, manifest: &str, layer_digest: &str) -> Option<Remote> {
        let (registry, repository) = registry_repo(image_ref)?;
        let publisher = format!("{registry}/{repository}");
        if !self.policy.accepts(&publisher) {
            return None;
        }
        let key = format!("{publisher}@{manifest}");
        if let Some(m) = self.cache.lock().expect("referrers lock").get(&key) {
            return m.get(layer_digest).cloned();
        }
        let subject = crate::image::ImageRef::Registry {
            registry: registry.clone(),
            repository: repository.clone(),
            reference: manifest.to_string(),
        };
        let found = self.rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::image::convert::find_referrers(&subject, &self.registry),
            )
            .await
        });
        let mut map: std::collections::HashMap<String, Remote> = std::collections::HashMap::new();
        let mut conflicting = std::collections::HashSet::new();
        match found {
            Ok(Ok(artifacts)) => {
                for (_, _, man) in artifacts {
                    for l in &man.layers {
                        let labels: BTreeMap<String, String> = l.annotations.clone();
                        let Some(src) = labels.get(&format!("{LAZYBLK_PREFIX}source-digest"))
                        else {
                            continue;
                        };
                        let mut with_ref = labels.clone();
                        with_ref.insert(LABEL_IMAGE_REF.into(), image_ref.to_string());
                        with_ref.insert(LABEL_LAYER_DIGEST.into(), l.digest.clone());
                        if let Ok(Some(r)) = remote_from_labels(&with_ref) {
                            // Two artifacts that disagree about a layer: neither is used (no
                            // "last one wins" an attacker could order).
                            match map.get(src) {
                                Some(old) if old.index_digest != r.index_digest => {
                                    conflicting.insert(src.clone());
                                }
                                _ => {
                                    map.insert(src.clone(), r);
                                }
                            }
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(image = image_ref, manifest, error = %e, "referrer lookup failed; unpacking normally");
                return None;
            }
            Err(_) => {
                tracing::warn!(
                    image = image_ref,
                    manifest,
                    "referrer lookup timed out; unpacking normally"
                );
                return None;
            }
        }
        for c in &conflicting {
            tracing::warn!(image = image_ref, manifest, layer = %c, "referrer artifacts disagree about this layer; unpacking it normally");
            map.remove(c);
        }
        tracing::info!(
            image = image_ref,
            manifest,
            layers = map.len(),
            "lazyblk referrer layers"
        );
        let r = map.get(layer_digest).cloned();
        self.cache.lock().expect("referrers lock").insert(key, map);
        r
    }
}

/// How long a layer a pull attached waits for its first container before it counts as unused (the
/// grace period, meant for layers containers have stopped using, is often short; a pull is followed
/// by its container within seconds, or its image is pre-pulled and filled meanwhile).
pub const PULLED_LAYER_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// The service state.
pub struct Snapshotter {
    root: PathBuf,
    store: Mutex<Store>,
    layers: Layers,
    referrers: Option<ReferrerLookup>,
    /// Records the startup trace of an image's first container when none was shipped.
    recorder: Option<AutoRecorder>,
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        tracing::error!(error = %e, "snapshot store");
        Status::internal(e.to_string())
    }
}

fn ts((s, n): (i64, i32)) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: s,
        nanos: n,
    })
}

fn info(key: &str, s: &Snapshot) -> pb::Info {
    pb::Info {
        name: key.to_string(),
        parent: s.parent.clone(),
        kind: s.kind.proto(),
        created_at: ts(s.created),
        updated_at: ts(s.updated),
        labels: s.labels.clone().into_iter().collect(),
    }
}

struct Named<'a>(&'a str, &'a Snapshot);

impl Fields for Named<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "name" => Some(self.0.to_string()),
            [f] if f == "parent" => Some(self.1.parent.clone()),
            [f] if f == "kind" => Some(
                match self.1.kind {
                    Kind::View => "view",
                    Kind::Active => "active",
                    Kind::Committed => "committed",
                }
                .to_string(),
            ),
            [l, rest @ ..] if l == "labels" && !rest.is_empty() => {
                self.1.labels.get(&rest.join(".")).cloned()
            }
            _ => None,
        }
    }
}

/// (registry, repository) of a registry image reference (None for an OCI layout or a bad one).
fn registry_repo(image_ref: &str) -> Option<(String, String)> {
    match crate::image::ImageRef::parse(image_ref) {
        Ok(crate::image::ImageRef::Registry {
            registry,
            repository,
            ..
        }) => Some((registry, repository)),
        _ => None,
    }
}

/// The remote layer described by Prepare labels, if they describe one.
pub fn remote_from_labels(labels: &BTreeMap<String, String>) -> Result<Option<Remote>, Status> {
    let get = |k: &str| labels.get(&format!("{LAZYBLK_PREFIX}{k}"));
    let Some(index_digest) = get("index-digest") else {
        return Ok(None);
    };
    let bad = |what: &str| Status::invalid_argument(format!("lazyblk layer labels: {what}"));
    let num = |k: &str| -> Result<u64, Status> {
        get(k)
            .ok_or_else(|| bad(&format!("{LAZYBLK_PREFIX}{k} missing")))?
            .parse()
            .map_err(|_| bad(&format!("{LAZYBLK_PREFIX}{k} is not a number")))
    };
    let image_ref = labels.get(LABEL_IMAGE_REF).ok_or_else(|| {
        bad(&format!(
            "{LABEL_IMAGE_REF} missing (pull with `lazyblk pull`, or CRI with snapshot annotations)"
        ))
    })?;
    let digest = labels
        .get(LABEL_LAYER_DIGEST)
        .ok_or_else(|| bad(&format!("{LABEL_LAYER_DIGEST} missing")))?;
    let (registry, repository) = registry_repo(image_ref).ok_or_else(|| {
        bad(&format!(
            "image ref {image_ref:?} is not a registry reference"
        ))
    })?;
    lazyblk_image_format::parse_digest(digest).map_err(|e| bad(&e.to_string()))?;
    // An original-image index (`lazyblk index`): file data comes from the original layer blob, in
    // the same repository, through the span table.
    let original = match get("spans-digest") {
        None => None,
        Some(spans) => {
            let source = get("source-digest")
                .ok_or_else(|| bad(&format!("{LAZYBLK_PREFIX}source-digest missing")))?;
            for d in [spans, source] {
                lazyblk_image_format::parse_digest(d).map_err(|e| bad(&e.to_string()))?;
            }
            let table_digest = get("spans-table-digest")
                .ok_or_else(|| bad(&format!("{LAZYBLK_PREFIX}spans-table-digest missing")))?;
            lazyblk_image_format::parse_digest(table_digest).map_err(|e| bad(&e.to_string()))?;
            Some(crate::original::OriginalRef {
                source: format!("{registry}/{repository}@{source}"),
                spans: format!("{registry}/{repository}@{spans}"),
                table_offset: num("spans-table-offset")?,
                table_length: num("spans-table-length")?,
                table_digest: table_digest.clone(),
            })
        }
    };
    // The bound form of an index: the layer descriptor is the original blob; `index-blob` names
    // the metadata blob.
    let blob = match get("index-blob") {
        Some(b) => {
            lazyblk_image_format::parse_digest(b).map_err(|e| bad(&e.to_string()))?;
            if original.is_none() {
                return Err(bad("index-blob without spans-digest"));
            }
            b
        }
        None => digest,
    };
    Ok(Some(Remote {
        source: format!("{registry}/{repository}@{blob}"),
        index_offset: num("index-offset")?,
        index_length: num("index-length")?,
        index_digest: index_digest.clone(),
        image_size: num("image-size")?,
        startup_offset: match get("startup-offset") {
            Some(_) => Some(num("startup-offset")?),
            None => None,
        },
        trace: None,
        original,
    }))
}

/// The chain ID of committed snapshot `name`: the target it was recorded under (remote layers), else
/// the last `/`-separated part of its name (containerd names the snapshots it commits
/// `NAMESPACE/ID/CHAIN_ID` in a proxy snapshotter).
fn chain_id_of(store: &Store, name: &str) -> Option<String> {
    let s = store.get(name)?;
    let chain = s
        .labels
        .get(LABEL_TARGET)
        .map(String::as_str)
        .unwrap_or_else(|| name.rsplit('/').next().unwrap_or(name));
    lazyblk_image_format::parse_digest(chain).ok()?;
    Some(chain.to_string())
}

/// Refuses to commit converted layer `source` (disk digest `disk`) under chain ID `target` unless the
/// chain ID commits to that disk: `target == disk` for a base layer, else
/// `target == sha256(PARENT_CHAIN + " " + disk)` (containerd's chain-ID rule with the disk digest as
/// the diff ID; docs/format.md, "Diff IDs and chain IDs"). Without this, an image could claim a
/// popular base layer's diff ID for its own disk and every later image with that base on the node
/// would run the impostor's files.
fn check_chain(
    store: &Store,
    parent: &str,
    target: &str,
    disk: &str,
    source: &str,
) -> Result<(), Status> {
    let expected = if parent.is_empty() {
        disk.to_string()
    } else {
        let p = chain_id_of(store, parent).ok_or_else(|| {
            Status::failed_precondition(format!(
                "lazyblk layer {source}: parent snapshot {parent} has no chain ID"
            ))
        })?;
        lazyblk_image_format::digest_string(&lazyblk_image_format::sha256(
            format!("{p} {disk}").as_bytes(),
        ))
    };
    if expected != target {
        tracing::error!(
            layer = source,
            target,
            disk,
            parent,
            "chain ID does not name the lazyblk disk; refused"
        );
        return Err(Status::failed_precondition(format!(
            "lazyblk layer {source}: the image's chain ID {target} does not commit to this layer's disk \
             (disk digest {disk}, expected chain ID {expected}); a lazyblk layer's diff ID in the image \
             config must be its disk digest — refusing (re-convert with this lazyblk)"
        )));
    }
    Ok(())
}

/// Bytes (allocated blocks) and inodes under `dir`, not crossing mounts.
fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let dev = top.dev();
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev || !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() as i64 * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

fn opt_str(s: &str) -> String {
    s.replace(',', "\\,")
}

impl Snapshotter {
    /// Opens the state under `root`.
    pub fn open(
        root: &Path,
        layers: Layers,
        referrers: Option<ReferrerLookup>,
    ) -> Result<Snapshotter, StoreError> {
        // 0700 like ROOT itself: snapshots hold images' files, setuid ones included.
        crate::process::private_dir(root)
            .and_then(|_| crate::process::private_dir(&root.join("snapshots")))
            .map_err(|e| StoreError::Db(e.to_string()))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        Ok(Snapshotter {
            root: root.to_path_buf(),
            store: Mutex::new(store),
            layers,
            referrers,
            recorder: None,
        })
    }

    /// Also records a startup trace of the first container of each image that has no shipped
    /// trace (`lazyblk trace recorded` lists them).
    pub fn with_recorder(mut self, recorder: AutoRecorder) -> Snapshotter {
        self.recorder = Some(recorder);
        self
    }

    /// Starts recording the startup of a container over `parents` (top layer first) if its image
    /// came with no trace: the image and manifest are the top remote layer's pull labels, the
    /// layers every remote layer of the chain.
    fn record_first_start(&self, parents: &[(String, Snapshot)]) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let remotes: Vec<(&Snapshot, &Remote)> = parents
            .iter()
            .filter_map(|(_, p)| p.remote.as_ref().map(|r| (p, r)))
            .collect();
        if remotes.is_empty() || remotes.iter().any(|(_, r)| r.trace.is_some()) {
            return;
        }
        let Some((image, manifest)) = remotes.iter().find_map(|(p, _)| {
            Some((
                p.labels.get(LABEL_IMAGE_REF)?,
                p.labels.get(LABEL_MANIFEST_DIGEST)?,
            ))
        }) else {
            return;
        };
        let layers = remotes
            .iter()
            .map(|(_, r)| r.index_digest.clone())
            .collect();
        recorder.begin(image, manifest, layers, self.layers.runtime());
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The directory a committed snapshot contributes as a lower layer (attaching remote layers).
    fn lower(&self, key: &str, s: &Snapshot) -> Result<PathBuf, Status> {
        match &s.remote {
            Some(r) => self.layers.ensure(s.id, r).map_err(|e| {
                tracing::error!(snapshot = key, layer = %r.source, error = %e, "remote layer unavailable");
                Status::unavailable(format!("remote layer {} ({key}): {e}", r.source))
            }),
            None => Ok(self.dir(s.id).join("fs")),
        }
    }

    /// A snapshot and the committed chain under it (a short read of the store).
    #[allow(clippy::type_complexity)]
    fn chain_of(
        &self,
        store: &Store,
        key: &str,
    ) -> Result<(Snapshot, Vec<(String, Snapshot)>), Status> {
        let s = store
            .get(key)
            .ok_or_else(|| Status::not_found(format!("snapshot {key}")))?
            .clone();
        let parents = if s.kind == Kind::Committed {
            store.chain(key)
        } else {
            store.chain(&s.parent)
        };
        Ok((s, parents))
    }

    /// The mounts of snapshot `s` over `parents`, attaching remote layers as needed. Slow (network,
    /// devices): never called with the store lock held.
    fn mounts_from(
        &self,
        s: &Snapshot,
        parents: &[(String, Snapshot)],
    ) -> Result<Vec<Mount>, Status> {
        // Remote layers not attached yet are attached in parallel: an image's first container waits
        // for the slowest layer, not for the sum of them.
        let lowers = std::thread::scope(|sc| {
            let attaching: Vec<_> = parents
                .iter()
                .map(|(k, p)| sc.spawn(move || self.lower(k, p)))
                .collect();
            attaching
                .into_iter()
                .map(|h| h.join().expect("layer attach thread panicked"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let m = |ty: &str, source: &Path, options: Vec<String>| Mount {
            r#type: ty.to_string(),
            source: source.display().to_string(),
            target: String::new(),
            options,
        };
        let lowerdir = || {
            format!(
                "lowerdir={}",
                lowers
                    .iter()
                    .map(|p| opt_str(&p.display().to_string()))
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        Ok(match s.kind {
            Kind::Active if lowers.is_empty() => vec![m(
                "bind",
                &self.dir(s.id).join("fs"),
                vec!["rbind".into(), "rw".into()],
            )],
            Kind::Active => {
                let d = self.dir(s.id);
                vec![m(
                    "overlay",
                    Path::new("overlay"),
                    vec![
                        format!("workdir={}", opt_str(&d.join("work").display().to_string())),
                        format!("upperdir={}", opt_str(&d.join("fs").display().to_string())),
                        lowerdir(),
                    ],
                )]
            }
            _ if lowers.is_empty() => vec![m(
                "bind",
                &self.dir(s.id).join("fs"),
                vec!["rbind".into(), "ro".into()],
            )],
            _ if lowers.len() == 1 => {
                vec![m("bind", &lowers[0], vec!["rbind".into(), "ro".into()])]
            }
            _ => vec![m(
                "overlay",
                Path::new("overlay"),
                vec!["ro".into(), lowerdir()],
            )],
        })
    }

    /// The mounts of `key`: the store is read in one short transaction, layers attached after it.
    fn mounts_of(&self, key: &str) -> Result<Vec<Mount>, Status> {
        let (s, parents) = {
            let store = self.store.lock().expect("store lock");
            self.chain_of(&store, key)?
        };
        self.mounts_from(&s, &parents)
    }

    fn create(
        self: &Arc<Self>,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("empty snapshot key"));
        }
        // Network lookups first, with no lock held: other snapshots' calls never wait for them.
        let target = labels.get(LABEL_TARGET).cloned();
        let converted = remote_from_labels(&labels)?;
        let is_converted = converted.is_some();
        // The repository whose referrer artifact supplied the layer (None: a converted layer).
        let publisher = labels
            .get(LABEL_IMAGE_REF)
            .filter(|_| !is_converted)
            .and_then(|image| registry_repo(image))
            .map(|(registry, repository)| format!("{registry}/{repository}"));
        let remote = match converted {
            Some(r) => Some(r),
            // An ordinary layer: a `--referrer` artifact of its image may have a lazyblk version.
            None => match (
                &target,
                &self.referrers,
                labels.get(LABEL_IMAGE_REF),
                labels.get(LABEL_MANIFEST_DIGEST),
                labels.get(LABEL_LAYER_DIGEST),
            ) {
                (Some(_), Some(look), Some(image), Some(manifest), Some(layer)) => {
                    look.find(image, manifest, layer)
                }
                _ => None,
            },
        };
        let remote = match (&target, remote) {
            (Some(_), Some(mut remote)) => {
                if let (Some(look), Some(image), Some(manifest)) = (
                    &self.referrers,
                    labels.get(LABEL_IMAGE_REF),
                    labels.get(LABEL_MANIFEST_DIGEST),
                ) {
                    remote.trace = look.trace(image, manifest);
                }
                Some(remote)
            }
            _ => None,
        };
        // The layer's identity, from its verified index (one range request, no lock held).
        let disk = match &remote {
            Some(r) => Some(self.layers.disk_digest(r).map_err(|e| {
                tracing::error!(layer = %r.source, error = %e, "remote layer refused");
                Status::failed_precondition(format!("lazyblk layer {}: {e}", r.source))
            })?),
            None => None,
        };
        // One short store transaction: checks, then the record.
        let (s, parents) = {
            let mut store = self.store.lock().expect("store lock");
            if store.get(key).is_some() {
                return Err(Status::already_exists(format!(
                    "snapshot {key} already exists"
                )));
            }
            if !parent.is_empty() {
                match store.get(parent) {
                    None => return Err(Status::not_found(format!("parent snapshot {parent}"))),
                    Some(p) if p.kind != Kind::Committed => {
                        return Err(Status::failed_precondition(format!(
                            "parent {parent} is not committed"
                        )))
                    }
                    _ => {}
                }
            }
            // A chain ID that another repository's referrer artifact defined already is not shared
            // with this image (its artifact could not prove that disk): the layer is unpacked.
            let other_publisher = target.as_ref().and_then(|t| store.get(t)).is_some_and(|t| {
                t.labels.contains_key(LABEL_PUBLISHER)
                    && t.labels.get(LABEL_PUBLISHER) != publisher.as_ref()
            });
            if other_publisher && remote.is_some() {
                tracing::warn!(target = ?target, publisher = ?publisher, "chain defined by another repository's referrer artifact; unpacking this layer instead of sharing it");
            }
            let remote = remote.filter(|_| !other_publisher);
            if let (Some(target), Some(remote), Some(disk)) = (&target, remote, disk) {
                let target = target.as_str();
                if is_converted {
                    check_chain(&store, parent, target, &disk, &remote.source)?;
                }
                let mut labels = labels;
                labels.insert(LABEL_REMOTE.into(), remote.source.clone());
                if let Some(p) = &publisher {
                    labels.insert(LABEL_PUBLISHER.into(), p.clone());
                }
                if store.get(target).is_some() {
                    return Err(Status::already_exists(format!(
                        "target snapshot {target} exists"
                    )));
                }
                let id = store.alloc_id();
                let t = now();
                let usage = (remote.image_size as i64, 0);
                tracing::info!(target = %target, layer = %remote.source, "remote layer recorded");
                let attach = self
                    .layers
                    .attach_on_pull()
                    .then(|| (target.to_string(), id));
                store.put(
                    target,
                    Snapshot {
                        id,
                        kind: Kind::Committed,
                        parent: parent.to_string(),
                        labels,
                        created: t,
                        updated: t,
                        usage,
                        remote: Some(remote),
                    },
                    None,
                )?;
                drop(store);
                if let Some((key, id)) = attach {
                    self.attach_in_background(key, id);
                }
                return Err(Status::already_exists(format!(
                    "target snapshot {target} (remote lazyblk layer)"
                )));
            }
            let id = store.alloc_id();
            let d = self.dir(id);
            let mk = || -> std::io::Result<()> {
                std::fs::create_dir_all(d.join("fs"))?;
                if kind == Kind::Active {
                    std::fs::create_dir_all(d.join("work"))?;
                }
                Ok(())
            };
            mk().map_err(|e| Status::internal(format!("creating {}: {e}", d.display())))?;
            let t = now();
            store.put(
                key,
                Snapshot {
                    id,
                    kind,
                    parent: parent.to_string(),
                    labels,
                    created: t,
                    updated: t,
                    usage: (0, 0),
                    remote: None,
                },
                None,
            )?;
            self.chain_of(&store, key)?
        };
        // Slow work (attaching remote layers) after the transaction.
        let started = std::time::Instant::now();
        match self.mounts_from(&s, &parents) {
            Ok(m) => {
                // A container's root (an unpack's Prepare names its target chain instead).
                if kind == Kind::Active && target.is_none() {
                    // How long a container's start waited here (issue 15: what start costs).
                    tracing::info!(snapshot = %key, layers = parents.len(), seconds = started.elapsed().as_secs_f64(), "container root prepared");
                    self.record_first_start(&parents);
                }
                Ok(m)
            }
            Err(e) => {
                // Do not leave a snapshot whose layers could not be mounted.
                let _ = self.store.lock().expect("store lock").remove(key);
                let _ = std::fs::remove_dir_all(self.dir(s.id));
                Err(e)
            }
        }
    }

    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Status> {
        let mut store = self.store.lock().expect("store lock");
        if store.get(name).is_some() {
            return Err(Status::already_exists(format!(
                "snapshot {name} already exists"
            )));
        }
        let mut s = store
            .get(key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("snapshot {key}")))?;
        if s.kind != Kind::Active {
            return Err(Status::failed_precondition(format!("{key} is not active")));
        }
        s.usage = disk_usage(&self.dir(s.id).join("fs"));
        s.kind = Kind::Committed;
        s.labels.extend(labels);
        s.updated = now();
        store.put(name, s.clone(), Some(key))?;
        let _ = std::fs::remove_dir_all(self.dir(s.id).join("work"));
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), Status> {
        let mut store = self.store.lock().expect("store lock");
        let s = store
            .get(key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("snapshot {key}")))?;
        if store.has_children(key) {
            return Err(Status::failed_precondition(format!(
                "snapshot {key} has children"
            )));
        }
        store.remove(key)?;
        drop(store);
        if s.remote.is_some() {
            if let Err(e) = self.layers.release(s.id, || true) {
                tracing::error!(snapshot = key, error = %e, "detaching a removed layer");
            }
            let _ = std::fs::remove_dir(self.layers.mountpoint(s.id));
        } else {
            let d = self.dir(s.id);
            let trash = self.root.join("snapshots").join(format!("rm-{}", s.id));
            if std::fs::rename(&d, &trash).is_ok() {
                let _ = std::fs::remove_dir_all(&trash);
            }
        }
        Ok(())
    }

    /// Attaches a layer a pull has just recorded, in the background: its first container then finds
    /// it mounted (index fetched, device up, fill and trace prefetch running since the pull) instead
    /// of attaching it itself. A failure is only logged: that container's mount attaches again and
    /// reports it. A layer removed meanwhile is detached at once; one that no container uses within
    /// [`PULLED_LAYER_WAIT`] (or the grace period, if longer) is detached then, like any unused
    /// layer. Runs on the blocking pool and a timer: no thread waits.
    fn attach_in_background(self: &Arc<Self>, key: String, id: u64) {
        let me = self.clone();
        let rt = self.layers.runtime().clone();
        rt.clone().spawn_blocking(move || {
            let recorded = |me: &Snapshotter| {
                let store = me.store.lock().expect("store lock");
                store
                    .get(&key)
                    .filter(|s| s.id == id)
                    .and_then(|s| s.remote.clone())
            };
            let Some(remote) = recorded(&me) else {
                return; // removed before it could be attached
            };
            if let Err(e) = me.layers.ensure(id, &remote) {
                tracing::warn!(snapshot = %key, layer = %remote.source, error = %e, "attaching a pulled layer failed; its first container's mount attaches it again");
                return;
            }
            if recorded(&me).is_none() {
                // Removed while attaching (attach and release of a layer are serialised).
                if let Err(e) = me.layers.release(id, || recorded(&me).is_none()) {
                    tracing::error!(snapshot = %key, error = %e, "detaching a removed layer");
                }
                return;
            }
            let wait = me.layers.grace().max(PULLED_LAYER_WAIT);
            rt.spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = tokio::task::spawn_blocking(move || me.release_if_unused(id)).await;
            });
        });
    }

    /// Remote layers attached but used by no active or view snapshot.
    fn unused_layers(&self) -> Vec<u64> {
        let store = self.store.lock().expect("store lock");
        let mut used = std::collections::HashSet::new();
        for (_, s) in store.all() {
            if s.kind != Kind::Committed {
                for (_, p) in store.chain(&s.parent) {
                    used.insert(p.id);
                }
            }
        }
        self.layers
            .attached_ids()
            .into_iter()
            .filter(|id| !used.contains(id))
            .collect()
    }

    /// Detaches layers nothing uses (after the grace period, if still unused).
    pub fn schedule_release(self: &Arc<Self>) {
        let me = self.clone();
        std::thread::spawn(move || {
            let first = me.unused_layers();
            if first.is_empty() {
                return;
            }
            std::thread::sleep(me.layers.grace());
            for id in first {
                me.release_if_unused(id);
            }
        });
    }

    /// Detaches layer `id` if no snapshot uses it, re-checked under the layer's lock (a Prepare
    /// since the caller looked keeps it). Failures are logged.
    fn release_if_unused(&self, id: u64) {
        if let Err(e) = self
            .layers
            .release(id, || self.unused_layers().contains(&id))
        {
            tracing::error!(layer = id, error = %e, "detaching an unused layer");
        }
    }

    fn update(&self, info: pb::Info, paths: Vec<String>) -> Result<pb::Info, Status> {
        let mut store = self.store.lock().expect("store lock");
        let key = info.name.clone();
        let mut s = store
            .get(&key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("snapshot {key}")))?;
        let paths = if paths.is_empty() {
            vec!["labels".to_string()]
        } else {
            paths
        };
        for p in paths {
            if p == "labels" {
                s.labels = info.labels.clone().into_iter().collect();
            } else if let Some(l) = p.strip_prefix("labels.") {
                match info.labels.get(l) {
                    Some(v) => {
                        s.labels.insert(l.to_string(), v.clone());
                    }
                    None => {
                        s.labels.remove(l);
                    }
                }
            } else {
                return Err(Status::invalid_argument(format!(
                    "cannot update field {p:?} of a snapshot"
                )));
            }
        }
        s.updated = now();
        store.put(&key, s.clone(), None)?;
        Ok(self::info(&key, &s))
    }

    /// Removes directories and mounts no snapshot owns (after crashes mid-operation).
    fn cleanup(&self) -> Result<(), Status> {
        let store = self.store.lock().expect("store lock");
        let ids: std::collections::HashSet<String> =
            store.all().map(|(_, s)| s.id.to_string()).collect();
        drop(store);
        if let Ok(rd) = std::fs::read_dir(self.root.join("snapshots")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !ids.contains(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }
}

/// The tonic service (every call runs on the blocking pool: it touches the disk and may attach).
#[derive(Clone)]
pub struct Service(pub Arc<Snapshotter>);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("snapshotter task: {e}")))?
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let s = self.0.clone();
        let mounts =
            blocking(move || s.create(Kind::Active, &r.key, &r.parent, labels(r.labels))).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        r: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let s = self.0.clone();
        let mounts =
            blocking(move || s.create(Kind::View, &r.key, &r.parent, labels(r.labels))).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        r: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = r.into_inner();
        let s = self.0.clone();
        let mounts = blocking(move || s.mounts_of(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        let s = self.0.clone();
        blocking(move || s.commit(&r.name, &r.key, labels(r.labels))).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        let s = self.0.clone();
        blocking(move || s.remove(&r.key)).await?;
        self.0.schedule_release();
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = r.into_inner().key;
        let store = self.0.store.lock().expect("store lock");
        let s = store
            .get(&key)
            .ok_or_else(|| Status::not_found(format!("snapshot {key}")))?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(&key, s)),
        }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = self.0.clone();
        let info = blocking(move || s.update(i, paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info),
        }))
    }

    type ListStream =
        futures::stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let f = Filters::parse(&r.into_inner().filters).map_err(Status::invalid_argument)?;
        let store = self.0.store.lock().expect("store lock");
        let infos: Vec<pb::Info> = store
            .all()
            .filter(|(k, s)| f.matches(&Named(k, s)))
            .map(|(k, s)| info(k, s))
            .collect();
        let pages: Vec<_> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(futures::stream::iter(pages)))
    }

    async fn usage(
        &self,
        r: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = r.into_inner().key;
        let s = self.0.clone();
        let (size, inodes) = blocking(move || {
            let (kind, id, usage) = {
                let store = s.store.lock().expect("store lock");
                let snap = store
                    .get(&key)
                    .ok_or_else(|| Status::not_found(format!("snapshot {key}")))?;
                (snap.kind, snap.id, snap.usage)
            };
            Ok(match kind {
                // The writable upper directory is local: measure it now (outside the lock).
                Kind::Active => disk_usage(&s.dir(id).join("fs")),
                _ => usage,
            })
        })
        .await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let s = self.0.clone();
        blocking(move || s.cleanup()).await?;
        self.0.schedule_release();
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let d = format!("sha256:{}", "a".repeat(64));
        let mut l: BTreeMap<String, String> = [
            (format!("{LAZYBLK_PREFIX}index-digest"), d.clone()),
            (format!("{LAZYBLK_PREFIX}index-offset"), "1000".into()),
            (format!("{LAZYBLK_PREFIX}index-length"), "112".into()),
            (format!("{LAZYBLK_PREFIX}image-size"), "4096".into()),
            (LABEL_IMAGE_REF.into(), "127.0.0.1:5000/app:v1".into()),
            (LABEL_LAYER_DIGEST.into(), d),
        ]
        .into_iter()
        .collect();
        for (k, v) in extra {
            l.insert(format!("{LAZYBLK_PREFIX}{k}"), v.to_string());
        }
        l
    }

    #[test]
    fn chain_ids_must_commit_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("m.redb")).unwrap();
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let chain = |p: &str, x: &str| {
            lazyblk_image_format::digest_string(&lazyblk_image_format::sha256(
                format!("{p} {x}").as_bytes(),
            ))
        };
        let snap = |labels: BTreeMap<String, String>| Snapshot {
            id: 1,
            kind: Kind::Committed,
            parent: String::new(),
            labels,
            created: (0, 0),
            updated: (0, 0),
            usage: (0, 0),
            remote: None,
        };
        // A base layer: its chain ID is its disk digest, nothing else.
        check_chain(&store, "", &d('a'), &d('a'), "s").unwrap();
        let e = check_chain(&store, "", &d('b'), &d('a'), "s").unwrap_err();
        assert!(e.message().contains("does not commit"), "{}", e.message());
        // Over a parent containerd committed (named NAMESPACE/ID/CHAIN_ID).
        let parent = format!("default/3/{}", d('c'));
        store.put(&parent, snap(BTreeMap::new()), None).unwrap();
        check_chain(&store, &parent, &chain(&d('c'), &d('a')), &d('a'), "s").unwrap();
        assert!(check_chain(&store, &parent, &chain(&d('d'), &d('a')), &d('a'), "s").is_err());
        // Over a remote parent recorded under its target.
        let remote_parent = d('e');
        store
            .put(
                &remote_parent,
                snap([(LABEL_TARGET.to_string(), d('e'))].into()),
                None,
            )
            .unwrap();
        check_chain(
            &store,
            &remote_parent,
            &chain(&d('e'), &d('a')),
            &d('a'),
            "s",
        )
        .unwrap();
        // A parent whose name holds no chain ID is refused, not guessed.
        store
            .put("default/4/tmp", snap(BTreeMap::new()), None)
            .unwrap();
        assert!(check_chain(&store, "default/4/tmp", &d('a'), &d('a'), "s").is_err());
    }

    #[test]
    fn remote_layers_from_labels_with_and_without_a_startup_region() {
        let r = remote_from_labels(&labels(&[])).unwrap().unwrap();
        assert_eq!(r.index_offset, 1000);
        assert_eq!(r.startup_offset, None);
        assert!(r.source.starts_with("127.0.0.1:5000/app@sha256:"));
        let r = remote_from_labels(&labels(&[("startup-offset", "600")]))
            .unwrap()
            .unwrap();
        assert_eq!(r.startup_offset, Some(600));
        let e = remote_from_labels(&labels(&[("startup-offset", "soon")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("startup-offset"), "{}", e.message());
        assert!(remote_from_labels(&BTreeMap::new()).unwrap().is_none());
    }
}
