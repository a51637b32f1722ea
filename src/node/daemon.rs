//! [`Node`]: every layer of a node served from one process, with one memory budget, one disk cache,
//! one fill scheduler and one registry session per repository; devices resumed after a restart from
//! local state alone.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lazyblk_image_format::{parse_digest, Index, IndexLimits};

use super::events::{kind, Events};
use super::proto::LayerStatus;
use super::spec::LayerSpec;
use crate::device::{self, Attachment, Backend, DeviceOptions, DeviceState, UblkOptions};
use crate::fetch::diskcache::DiskCache;
use crate::fetch::engine::ReadErrorHook;
use crate::fetch::metrics::Metrics;
use crate::fetch::registry::Sessions;
use crate::fetch::source::{open_source_in, range_reader_in};
use crate::fetch::{BlockSource, Engine, EngineOptions, FillGate, MemCache, SourceOptions};
use crate::original::OriginalLayer;

/// Node-wide settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Device state, the control socket, published access logs.
    pub run_dir: PathBuf,
    /// Persistent chunk cache shared by every layer (none: memory only).
    pub cache_dir: Option<PathBuf>,
    /// Disk cache bound for the whole node, MiB.
    pub cache_size_mib: u64,
    /// Memory budget for decoded chunks for the whole node, MiB.
    pub memory_mib: u64,
    /// Default read deadline.
    pub read_deadline: Duration,
    /// Range requests in flight per layer.
    pub parallel_fetches: usize,
    /// Default largest readahead window, chunks.
    pub readahead_chunks: u64,
    /// Fill batches in flight on the node.
    pub fill_concurrency: usize,
    /// Fill batches in flight on the node while a demand read runs (0: fills pause).
    pub fill_busy_concurrency: usize,
    /// Node-wide fill bandwidth, MiB/s (0: unlimited).
    pub fill_rate_mib: u64,
    /// Stored bytes after each demand read a fill takes first (0: blob order only).
    pub fill_follow_bytes: u64,
    /// Loop devices read their FUSE export with direct I/O (else buffered).
    pub loop_direct_io: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            run_dir: PathBuf::from("/run/lazyblk"),
            cache_dir: None,
            cache_size_mib: 10240,
            memory_mib: 64,
            read_deadline: Duration::from_secs(30),
            parallel_fetches: 8,
            readahead_chunks: 32,
            fill_concurrency: 4,
            fill_busy_concurrency: 4,
            fill_rate_mib: 0,
            fill_follow_bytes: 0,
            loop_direct_io: true,
        }
    }
}

/// Why an operation of the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// No such device.
    #[error("{0}")]
    NotFound(String),
    /// The device is in use (its mount is busy) or in a state that forbids the operation.
    #[error("{0}")]
    Busy(String),
    /// Opening the source, the device or the mount failed.
    #[error("{0}")]
    Failed(String),
}

/// A layer served by this node.
struct Served {
    spec: LayerSpec,
    engine: Engine,
    attachment: Attachment,
    health: Arc<Health>,
    background: Option<tokio::task::JoinHandle<()>>,
    /// The reader of an original-image index's layer blob.
    original: Option<Arc<OriginalLayer>>,
}

/// What failed reads left behind, for `ls` and events.
#[derive(Default)]
struct Health {
    device: OnceLock<String>,
    last_error: Mutex<Option<String>>,
}

/// A device of the run directory that this node should serve but does not yet.
struct Pending {
    state: DeviceState,
    reason: String,
    attempts: u32,
    next: Instant,
    /// No retry will help (loop devices, records without a spec).
    permanent: bool,
}

/// The node (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NodeConfig,
    rt: tokio::runtime::Handle,
    disk: Option<Arc<DiskCache>>,
    memory: Arc<MemCache>,
    fill: Arc<FillGate>,
    sessions: Sessions,
    served: Mutex<BTreeMap<String, Served>>,
    attaching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pending: Mutex<BTreeMap<String, Pending>>,
    events: Events,
    /// Local copies of original layers being filled (with a disk cache only).
    copies: Option<crate::original::local::CopyDir>,
}

/// `RUN_DIR/devices/<dev>.index`: the verified index, so a restart needs no registry.
fn index_file(run_dir: &Path, device: &str) -> PathBuf {
    run_dir
        .join("devices")
        .join(format!("{}.index", device.trim_start_matches("/dev/")))
}

impl Node {
    /// A node on `rt` (which must outlive it).
    pub fn new(cfg: NodeConfig, rt: tokio::runtime::Handle) -> Result<Node, NodeError> {
        crate::process::private_dir(&cfg.run_dir)
            .map_err(|e| NodeError::Failed(format!("{}: {e}", cfg.run_dir.display())))?;
        let disk = match &cfg.cache_dir {
            Some(d) => {
                crate::process::private_dir(d)
                    .map_err(|e| NodeError::Failed(format!("{}: {e}", d.display())))?;
                Some(Arc::new(
                    DiskCache::open(d, cfg.cache_size_mib << 20).map_err(|e| {
                        NodeError::Failed(format!("opening cache {}: {e}", d.display()))
                    })?,
                ))
            }
            None => None,
        };
        // Local copies of original layers take at most half the disk cache's bound, beside it.
        let copies = match &cfg.cache_dir {
            Some(d) => Some(
                crate::original::local::CopyDir::open(
                    &d.join("originals"),
                    (cfg.cache_size_mib << 20) / 2,
                )
                .map_err(|e| {
                    NodeError::Failed(format!("{}: {e}", d.join("originals").display()))
                })?,
            ),
            None => None,
        };
        Ok(Node {
            inner: Arc::new(Inner {
                memory: MemCache::new(cfg.memory_mib.max(1) << 20),
                fill: Arc::new(FillGate::new(
                    cfg.fill_concurrency,
                    cfg.fill_busy_concurrency,
                    (cfg.fill_rate_mib > 0).then_some(cfg.fill_rate_mib << 20),
                )),
                cfg,
                rt,
                disk,
                sessions: Sessions::default(),
                served: Mutex::new(BTreeMap::new()),
                attaching: Mutex::new(HashMap::new()),
                pending: Mutex::new(BTreeMap::new()),
                events: Events::default(),
                copies,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.cfg
    }

    /// The event log.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// The node-wide memory cache.
    pub fn memory(&self) -> &Arc<MemCache> {
        &self.inner.memory
    }

    /// The node-wide disk cache.
    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.inner.disk.as_ref()
    }

    /// Registry sessions open now.
    pub fn sessions(&self) -> usize {
        self.inner.sessions.len()
    }

    /// Per-layer metrics of the layers served now: (device, layer, index digest, metrics).
    pub fn layer_metrics(&self) -> Vec<(String, String, String, Arc<Metrics>)> {
        self.inner
            .served
            .lock()
            .expect("served lock")
            .iter()
            .map(|(dev, s)| {
                (
                    dev.clone(),
                    s.engine.name().to_string(),
                    s.engine.index_digest(),
                    s.engine.metrics(),
                )
            })
            .collect()
    }

    /// Devices waiting to be resumed.
    pub fn pending_count(&self) -> usize {
        self.inner.pending.lock().expect("pending lock").len()
    }

    fn engine_options(&self, spec: &LayerSpec, health: &Arc<Health>) -> EngineOptions {
        let cfg = &self.inner.cfg;
        let events = Arc::downgrade(&self.inner);
        let h = health.clone();
        let hook: ReadErrorHook = Arc::new(move |layer, err| {
            let (offset, msg) = match err {
                crate::fetch::ReadError::Fetch { offset, .. } => (*offset, err.to_string()),
                crate::fetch::ReadError::OutOfRange { offset, .. } => (*offset, err.to_string()),
            };
            *h.last_error.lock().expect("health lock") = Some(msg.clone());
            if let Some(inner) = events.upgrade() {
                let dev = h.device.get().cloned().unwrap_or_default();
                inner
                    .events
                    .emit(kind::READ_ERROR, &dev, layer, offset, msg);
            }
        });
        EngineOptions {
            mem_cache_bytes: self.inner.memory.capacity(),
            memory: Some(self.inner.memory.clone()),
            disk_cache: self.inner.disk.clone(),
            read_deadline: if spec.read_deadline_secs > 0.0 {
                Duration::from_secs_f64(spec.read_deadline_secs)
            } else {
                cfg.read_deadline
            },
            max_parallel_fetches: cfg.parallel_fetches,
            readahead_chunks: spec.readahead_chunks.unwrap_or(cfg.readahead_chunks),
            fill_gate: Some(self.inner.fill.clone()),
            fill_follow_bytes: cfg.fill_follow_bytes,
            on_read_error: Some(hook),
            ..EngineOptions::default()
        }
    }

    /// How to open `spec`'s source, and the reader of its original layer blob (an original-image
    /// index; with a local copy when it is filled and the node has a disk cache).
    fn source_options(
        &self,
        spec: &LayerSpec,
        health: &Arc<Health>,
    ) -> Result<(SourceOptions, Option<Arc<OriginalLayer>>), NodeError> {
        let index = match &spec.index {
            Some(i) => Some((
                i.offset,
                i.length,
                parse_digest(&i.digest)
                    .map_err(|e| NodeError::Invalid(format!("index digest: {e}")))?,
            )),
            None => None,
        };
        let trusted = spec
            .index_digest
            .as_deref()
            .map(parse_digest)
            .transpose()
            .map_err(|e| NodeError::Invalid(format!("index digest: {e}")))?;
        let mut opts = SourceOptions {
            registry: spec.registry.options(),
            trusted_index_digest: trusted.or(index.map(|i| i.2)),
            index,
            startup_offset: spec.startup_offset,
            engine: self.engine_options(spec, health),
        };
        let mut original = None;
        if let Some(o) = &spec.original {
            let copy = match (&self.inner.copies, spec.fill) {
                (Some(c), true) => Some(c.new_path()),
                _ => None,
            };
            let layer = crate::original::original_layer(
                o,
                &opts,
                Some(&self.inner.sessions),
                copy.as_deref(),
            )
            .map_err(|e| NodeError::Invalid(format!("original layer: {e}")))?;
            opts.engine.external = Some(layer.clone());
            original = Some(layer);
        }
        Ok((opts, original))
    }

    /// The single-flight gate of a spec key (attach and detach of one layer never overlap).
    fn gate(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .attaching
            .lock()
            .expect("attaching lock")
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Attaches a layer and returns once its device is ready (and mounted, if asked). The same spec
    /// key (source, index digest, mount) attached twice, even concurrently, is one device.
    pub async fn attach(&self, mut spec: LayerSpec) -> Result<LayerStatus, NodeError> {
        spec.backend = device::choose(spec.backend).map_err(NodeError::Invalid)?;
        let key = spec.key();
        let gate = self.gate(&key);
        let _one = gate.lock().await;
        if let Some(st) = self.find_by_key(&key) {
            return Ok(st);
        }
        let health = Arc::new(Health::default());
        let started = std::time::Instant::now();
        let (opts, original) = self.source_options(&spec, &health)?;
        let engine = open_source_in(&spec.source, &opts, Some(&self.inner.sessions))
            .await
            .map_err(|e| {
                NodeError::Failed(format!(
                    "opening {}: {e}",
                    crate::fetch::source::shown(&spec.source)
                ))
            })?;
        let opened = started.elapsed();
        let me = self.clone();
        let (spec2, engine2) = (spec.clone(), engine.clone());
        let attachment = tokio::task::spawn_blocking(move || me.attach_device(&spec2, &engine2))
            .await
            .map_err(|e| NodeError::Failed(format!("attach task: {e}")))??;
        // Where an attach's time goes (issue 15: what a container's start waits for).
        tracing::info!(
            device = %attachment.state().device,
            open_seconds = opened.as_secs_f64(),
            device_seconds = (started.elapsed() - opened).as_secs_f64(),
            "layer attached"
        );
        self.adopted(spec, engine, attachment, health, original, kind::ATTACHED)
    }

    /// Creates the device for an open engine (blocking: device setup and mount).
    fn attach_device(&self, spec: &LayerSpec, engine: &Engine) -> Result<Attachment, NodeError> {
        let run_dir = &self.inner.cfg.run_dir;
        let source: Arc<dyn BlockSource> = Arc::new(engine.clone());
        let rt = self.inner.rt.clone();
        let name = engine.name().to_string();
        let mount = spec.mount.as_deref();
        let defaults = UblkOptions::default();
        let opts = DeviceOptions {
            ublk: UblkOptions {
                queues: if spec.ublk_queues > 0 {
                    spec.ublk_queues
                } else {
                    defaults.queues
                },
                depth: if spec.ublk_depth > 0 {
                    spec.ublk_depth
                } else {
                    defaults.depth
                },
                ..defaults
            },
            // The engine answers EIO at its own deadline first; the kernel's timeout is the backstop.
            nbd_timeout_secs: (self.engine_deadline(spec).as_secs() + 30).max(30),
            loop_direct_io: self.inner.cfg.loop_direct_io,
        };
        let r = Attachment::attach(spec.backend, source, rt, &name, run_dir, mount, &opts);
        r.map_err(|e| {
            NodeError::Failed(format!(
                "attaching {} with the {:?} backend: {e}",
                crate::fetch::source::shown(&spec.source),
                spec.backend
            ))
        })
    }

    fn engine_deadline(&self, spec: &LayerSpec) -> Duration {
        if spec.read_deadline_secs > 0.0 {
            Duration::from_secs_f64(spec.read_deadline_secs)
        } else {
            self.inner.cfg.read_deadline
        }
    }

    /// Records a device now served by this process: state (spec + verified index, atomically),
    /// published access log, background work, event.
    fn adopted(
        &self,
        spec: LayerSpec,
        engine: Engine,
        mut attachment: Attachment,
        health: Arc<Health>,
        original: Option<Arc<OriginalLayer>>,
        event: &str,
    ) -> Result<LayerStatus, NodeError> {
        let device = attachment.state().device.clone();
        let _ = health.device.set(device.clone());
        let run_dir = &self.inner.cfg.run_dir;
        let mut persist = || -> std::io::Result<()> {
            crate::process::write_atomic(
                &index_file(run_dir, &device),
                &engine.index().to_bytes(),
            )?;
            attachment.set_source_args(serde_json::json!({ "layer": spec }))
        };
        if let Err(e) = persist() {
            let _ = attachment.detach();
            return Err(NodeError::Failed(format!(
                "{device}: recording its state: {e}"
            )));
        }
        // Counters for `lazyblk ls` without a daemon (a foreground attach), rewritten when they change.
        attachment.publish_stats(engine.metrics(), &self.inner.rt);
        let file = attachment.side_file(crate::trace::publish::ACCESS_SUFFIX);
        let task =
            crate::trace::publish::spawn_publisher(engine.clone(), file.clone(), &self.inner.rt);
        attachment.keep_publisher(task, file);
        let background = self.spawn_background(&spec, &engine, &device, original.clone());
        self.inner.events.emit(
            event,
            &device,
            engine.name(),
            0,
            spec.mount
                .as_ref()
                .map(|m| format!("mounted on {}", m.display()))
                .unwrap_or_default(),
        );
        tracing::info!(%device, layer = %engine.name(), event, "layer served");
        let served = Served {
            spec,
            engine,
            attachment,
            health,
            background,
            original,
        };
        let st = status_of(&device, &served);
        self.inner
            .served
            .lock()
            .expect("served lock")
            .insert(device, served);
        Ok(st)
    }

    /// Trace replay first, then (if asked) the background fill through the node's scheduler; a layer
    /// complete in the disk cache is pinned while served.
    fn spawn_background(
        &self,
        spec: &LayerSpec,
        engine: &Engine,
        device: &str,
        original: Option<Arc<OriginalLayer>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let chunks = spec.prefetch_trace.as_deref().and_then(|p| {
            match crate::trace::Trace::read_file(p) {
                Ok(t) => t.chunks_for(&engine.index_digest()).map(<[u64]>::to_vec),
                Err(e) => {
                    tracing::warn!(trace = %p.display(), error = %e, "ignoring the prefetch trace");
                    None
                }
            }
        });
        if chunks.is_none() && !spec.fill {
            return None;
        }
        let (e, fill, node, device) = (
            engine.clone(),
            spec.fill,
            Arc::downgrade(&self.inner),
            device.to_string(),
        );
        // An original-image index fills its file data by copying the original layer to the node at
        // the link's speed, then streaming the copy once, which also proves the index against it.
        let original = original.filter(|_| spec.fill).map(|l| {
            let digest = spec
                .original
                .as_ref()
                .and_then(|o| o.layer_digest().map(str::to_string));
            (l, digest)
        });
        Some(self.inner.rt.spawn(async move {
            if let Some(chunks) = chunks {
                let s = e.replay(&chunks).await;
                tracing::info!(layer = %e.name(), wanted = s.wanted, fetched = s.fetched, failed = s.failed, "startup trace replayed");
            }
            if !fill {
                return;
            }
            if let Some((layer, digest)) = original {
                let Some(n) = node.upgrade() else { return };
                let copy = copy_original(&n, &e, &layer).await;
                drop(n);
                let r = crate::original::fill_and_verify(&e, &layer, digest.as_deref()).await;
                // Its file data is in the chunk cache now (or the copy failed the proof): the copy's
                // disk goes back.
                if let Some(c) = layer.local_copy() {
                    c.release();
                }
                drop(copy);
                let Some(node) = node.upgrade() else { return };
                match r {
                    Ok(v) => {
                        tracing::info!(layer = %e.name(), layer_digest = %v.layer_digest, diff_id = %v.diff_id, disk = %v.disk_digest, chunks = v.chunks_filled, seconds = v.seconds, "original layer verified: the index is this layer's disk");
                        node.events.emit(
                            kind::VERIFIED,
                            &device,
                            e.name(),
                            0,
                            format!("{} (diff ID {})", v.layer_digest, v.diff_id),
                        );
                    }
                    Err(err) => {
                        tracing::error!(layer = %e.name(), error = %err, "original layer verification failed");
                        node.events
                            .emit(kind::VERIFY_FAILED, &device, e.name(), 0, err);
                    }
                }
            }
            let r = e.background_fill(None).await;
            let Some(node) = node.upgrade() else { return };
            match r {
                Ok(()) => {
                    let pin = e.pin_if_filled();
                    node.events.emit(
                        kind::FILL_COMPLETE,
                        &device,
                        e.name(),
                        0,
                        pin.map(|p| format!("pinned ({})", p.display()))
                            .unwrap_or_default(),
                    );
                }
                Err(err) => {
                    tracing::error!(layer = %e.name(), error = %err, "background fill stopped");
                    node.events
                        .emit(kind::FILL_FAILED, &device, e.name(), 0, err);
                }
            }
        }))
    }

    fn find_by_key(&self, key: &str) -> Option<LayerStatus> {
        let served = self.inner.served.lock().expect("served lock");
        let (dev, s) = served.iter().find(|(_, s)| s.spec.key() == key)?;
        if let Some(m) = &s.spec.mount {
            if !device::mountinfo::is_mountpoint(m) {
                return None;
            }
        }
        Some(status_of(dev, s))
    }

    /// Detaches `device` (or the device mounted at that path). A busy mount is refused and the
    /// device stays as it is.
    pub async fn detach(&self, device: &str) -> Result<(), NodeError> {
        let want = device.trim_start_matches("/dev/").to_string();
        let found = {
            let served = self.inner.served.lock().expect("served lock");
            served
                .iter()
                .find(|(d, s)| {
                    d.trim_start_matches("/dev/") == want
                        || s.spec.mount.as_deref() == Some(Path::new(device))
                })
                .map(|(d, s)| (d.clone(), s.spec.key()))
        };
        let Some((dev, key)) = found else {
            return self.detach_unserved(&want).await;
        };
        let gate = self.gate(&key);
        let _one = gate.lock().await;
        let forget_gate = || {
            // The map keeps one gate per key; drop it when nobody else holds or waits on it (checked
            // under the map's lock, through which every other user must go to get it).
            let mut map = self.inner.attaching.lock().expect("attaching lock");
            if Arc::strong_count(&gate) == 2 {
                map.remove(&key);
            }
        };
        let Some(mut s) = self.inner.served.lock().expect("served lock").remove(&dev) else {
            return Ok(());
        };
        let r = tokio::task::spawn_blocking(move || {
            let r = s.attachment.detach();
            (s, r)
        })
        .await
        .map_err(|e| NodeError::Failed(format!("detach task: {e}")))?;
        let (s, res) = r;
        match res {
            Ok(()) => {
                if let Some(b) = &s.background {
                    b.abort();
                }
                let _ = std::fs::remove_file(index_file(&self.inner.cfg.run_dir, &dev));
                self.inner
                    .events
                    .emit(kind::DETACHED, &dev, s.engine.name(), 0, String::new());
                forget_gate();
                Ok(())
            }
            Err(e) => {
                let busy = e.raw_os_error() == Some(libc::EBUSY)
                    || e.kind() == std::io::ErrorKind::ResourceBusy;
                let msg = format!("{dev}: {e}");
                self.inner
                    .served
                    .lock()
                    .expect("served lock")
                    .insert(dev, s);
                Err(if busy {
                    NodeError::Busy(msg)
                } else {
                    NodeError::Failed(msg)
                })
            }
        }
    }

    /// Detaches a device of the run dir that this process does not serve: a dead one is removed
    /// (held reads fail with EIO); a live one belongs to another process (a foreground attach).
    async fn detach_unserved(&self, want: &str) -> Result<(), NodeError> {
        let run_dir = self.inner.cfg.run_dir.clone();
        let Some((state, alive)) = device::list(&run_dir)
            .into_iter()
            .find(|(s, _)| s.device.trim_start_matches("/dev/") == want)
        else {
            return Err(NodeError::NotFound(format!(
                "{want} is not attached by lazyblk (see lazyblk ls)"
            )));
        };
        if alive {
            return Err(NodeError::Busy(format!(
                "{} is served by process {} (a foreground `lazyblk attach`); stop that process",
                state.device, state.pid
            )));
        }
        self.inner
            .pending
            .lock()
            .expect("pending lock")
            .remove(&state.device);
        let dev = state.device.clone();
        tokio::task::spawn_blocking(move || device::remove_orphan(&state, &run_dir))
            .await
            .map_err(|e| NodeError::Failed(format!("detach task: {e}")))?
            .map_err(|e| NodeError::Failed(format!("{dev}: {e}")))?;
        self.inner.events.emit(
            kind::DETACHED,
            &dev,
            "",
            0,
            "removed (its server was gone)".into(),
        );
        Ok(())
    }

    /// Every device of the run dir: served here, waiting to be resumed, dead, or served elsewhere.
    pub fn list(&self) -> Vec<LayerStatus> {
        let mut out: BTreeMap<String, LayerStatus> = self
            .inner
            .served
            .lock()
            .expect("served lock")
            .iter()
            .map(|(d, s)| (d.clone(), status_of(d, s)))
            .collect();
        let pending = self.inner.pending.lock().expect("pending lock");
        for (state, alive) in device::list(&self.inner.cfg.run_dir) {
            if out.contains_key(&state.device) {
                continue;
            }
            let (st, reason) = match (alive, pending.get(&state.device)) {
                (true, _) => ("serving", format!("served by process {}", state.pid)),
                (false, Some(p)) if p.permanent => ("dead", p.reason.clone()),
                (false, Some(p)) => (
                    "recovering",
                    format!("attempt {}: {}", p.attempts, p.reason),
                ),
                (false, None) => ("dead", "its server is gone".to_string()),
            };
            out.insert(
                state.device.clone(),
                LayerStatus {
                    device: state.device.clone(),
                    backend: format!("{:?}", state.backend).to_lowercase(),
                    source: state.source.clone(),
                    size: state.size,
                    mount: state
                        .mount
                        .as_ref()
                        .map(|m| m.display().to_string())
                        .unwrap_or_default(),
                    pid: state.pid,
                    state: st.into(),
                    reason,
                    depends_on_registry: true,
                    ..LayerStatus::default()
                },
            );
        }
        out.into_values().collect()
    }

    /// The devices this process serves now.
    fn served_devices(&self) -> Vec<String> {
        self.inner
            .served
            .lock()
            .expect("served lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Finds devices of the run dir whose server is gone and resumes them (ublk user recovery, NBD
    /// reconfigure) from their persisted spec and index, without the registry. Devices that cannot
    /// be resumed yet are kept pending and retried with backoff by [`Node::retry_pending`].
    pub async fn recover(&self) {
        let served = self.served_devices();
        for (state, alive) in device::list(&self.inner.cfg.run_dir) {
            if alive || served.contains(&state.device) {
                continue;
            }
            let mut pending = self.inner.pending.lock().expect("pending lock");
            pending.entry(state.device.clone()).or_insert(Pending {
                state,
                reason: "not tried yet".into(),
                attempts: 0,
                next: Instant::now(),
                permanent: false,
            });
        }
        self.retry_pending(true).await;
    }

    /// Retries the pending devices that are due (all of them with `now`).
    pub async fn retry_pending(&self, now: bool) {
        let due: Vec<DeviceState> = {
            let pending = self.inner.pending.lock().expect("pending lock");
            pending
                .values()
                .filter(|p| !p.permanent && (now || p.next <= Instant::now()))
                .map(|p| p.state.clone())
                .collect()
        };
        for state in due {
            let dev = state.device.clone();
            match self.resume(state).await {
                Ok(()) => {
                    self.inner
                        .pending
                        .lock()
                        .expect("pending lock")
                        .remove(&dev);
                }
                Err((reason, permanent)) => {
                    let mut pending = self.inner.pending.lock().expect("pending lock");
                    if let Some(p) = pending.get_mut(&dev) {
                        p.attempts += 1;
                        let backoff = Duration::from_secs(1 << p.attempts.min(6));
                        p.next = Instant::now() + backoff;
                        p.permanent = permanent;
                        if p.reason != reason || p.attempts == 1 {
                            tracing::error!(device = %dev, attempt = p.attempts, error = %reason, permanent, "cannot resume the device");
                        }
                        p.reason = reason.clone();
                        self.inner
                            .events
                            .emit(kind::RECOVERY_FAILED, &dev, "", 0, reason);
                    }
                }
            }
        }
    }

    /// Resumes one device; the error says why and whether retrying can help.
    async fn resume(&self, state: DeviceState) -> Result<(), (String, bool)> {
        if state.backend == Backend::Loop {
            return Err((
                "a loop device dies with its server (its FUSE export is gone): detach it and \
                 attach the layer again"
                    .into(),
                true,
            ));
        }
        let spec_json = serde_json::to_vec(&state.source_args["layer"]).unwrap_or_default();
        let spec = LayerSpec::from_json(&spec_json);
        let index = index_file(&self.inner.cfg.run_dir, &state.device);
        if state.attaching || spec.is_err() || !index.exists() {
            // Its server died half way through the attach (or the record predates layer specs):
            // nothing can resume it and no caller was told it exists. Roll it back.
            return self.roll_back(state).await;
        }
        let spec = spec.expect("checked above");
        let health = Arc::new(Health::default());
        let (opts, original) = self
            .source_options(&spec, &health)
            .map_err(|e| (e.to_string(), true))?;
        let engine = self
            .engine_from_state(&spec, &state, opts)
            .map_err(|e| (e, true))?;
        let me = self.clone();
        let (engine2, run_dir) = (engine.clone(), self.inner.cfg.run_dir.clone());
        let attachment = tokio::task::spawn_blocking(move || {
            let source: Arc<dyn BlockSource> = Arc::new(engine2);
            Attachment::adopt(state, source, me.inner.rt.clone(), &run_dir)
        })
        .await
        .map_err(|e| (format!("resume task: {e}"), false))?
        .map_err(|e| (e.to_string(), false))?;
        self.adopted(spec, engine, attachment, health, original, kind::RECOVERED)
            .map(|_| ())
            .map_err(|e| (e.to_string(), false))
    }

    /// Removes a half-attached device (and its mount, if it got one) and its state.
    async fn roll_back(&self, state: DeviceState) -> Result<(), (String, bool)> {
        let dev = state.device.clone();
        let run_dir = self.inner.cfg.run_dir.clone();
        tokio::task::spawn_blocking(move || device::remove_orphan(&state, &run_dir))
            .await
            .map_err(|e| (format!("roll-back task: {e}"), false))?
            .map_err(|e| (format!("rolling back a half-done attach: {e}"), false))?;
        tracing::warn!(device = %dev, "rolled back an attach its server did not finish");
        self.inner.events.emit(
            kind::ROLLED_BACK,
            &dev,
            "",
            0,
            "its server died during the attach".into(),
        );
        Ok(())
    }

    /// The engine of a device being resumed: its persisted index, verified again against the
    /// spec's digest; no network.
    fn engine_from_state(
        &self,
        spec: &LayerSpec,
        state: &DeviceState,
        opts: SourceOptions,
    ) -> Result<Engine, String> {
        let path = index_file(&self.inner.cfg.run_dir, &state.device);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let digest = opts
            .trusted_index_digest
            .unwrap_or_else(|| lazyblk_image_format::sha256(&bytes));
        let index = Index::parse_verified(&bytes, &digest, IndexLimits::default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if index.image_size() != state.size {
            return Err(format!(
                "{}: the index describes {} bytes, the device has {}",
                path.display(),
                index.image_size(),
                state.size
            ));
        }
        let remote = range_reader_in(&spec.source, &opts, Some(&self.inner.sessions))
            .map_err(|e| e.to_string())?;
        Ok(Engine::from_index(
            remote,
            index,
            opts.engine,
            Arc::new(Metrics::default()),
        ))
    }

    /// Runs [`Node::retry_pending`] every second until the node is dropped.
    pub fn spawn_recovery_loop(&self) -> tokio::task::JoinHandle<()> {
        let node = Arc::downgrade(&self.inner);
        self.inner.rt.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(inner) = node.upgrade() else { return };
                Node { inner }.retry_pending(false).await;
            }
        })
    }

    /// Detaches every device served here (the foreground `attach` exiting). Errors are returned
    /// after trying all of them.
    pub async fn detach_all(&self) -> Result<(), NodeError> {
        let devs = self.served_devices();
        let mut first = None;
        for d in devs {
            if let Err(e) = self.detach(&d).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Downloads `layer`'s local copy (if it has one and it fits the node's budget) through the fill
/// scheduler; the reservation is held until the copy is released.
async fn copy_original(
    node: &Inner,
    e: &Engine,
    layer: &OriginalLayer,
) -> Option<crate::original::local::Reservation> {
    let copy = layer.local_copy()?;
    let size = match layer.table().await {
        Ok(t) => t.source_size,
        Err(err) => {
            tracing::warn!(layer = %e.name(), error = %err, "no span table: not copying the original layer");
            copy.release();
            return None;
        }
    };
    let Some(r) = node.copies.as_ref().and_then(|c| c.reserve(size)) else {
        tracing::info!(layer = %e.name(), bytes = size, "no room for a local copy of the original layer: it fills from the registry");
        copy.release();
        return None;
    };
    let started = Instant::now();
    // On the bulk lane, like the fill: a demand read never shares a connection with the copy.
    let download = copy.download(size, Some((&node.fill, e.activity())));
    match crate::fetch::lane::bulk(download).await {
        Ok(()) => {
            tracing::info!(layer = %e.name(), bytes = size, seconds = started.elapsed().as_secs_f64(), "original layer copied to the node");
            Some(r)
        }
        Err(err) => {
            tracing::warn!(layer = %e.name(), error = %err, "copying the original layer failed: it fills from the registry");
            copy.release();
            None
        }
    }
}

fn status_of(device: &str, s: &Served) -> LayerStatus {
    use std::sync::atomic::Ordering::Relaxed;
    let m = s.engine.metrics();
    let st = s.attachment.state();
    let fill = m.fill_ratio();
    LayerStatus {
        device: device.to_string(),
        backend: format!("{:?}", s.spec.backend).to_lowercase(),
        source: s.spec.source.clone(),
        size: st.size,
        mount: st
            .mount
            .as_ref()
            .map(|m| m.display().to_string())
            .unwrap_or_default(),
        pid: st.pid,
        state: "serving".into(),
        reason: String::new(),
        fill,
        reads: m.reads.load(Relaxed),
        read_errors: m.read_errors.load(Relaxed),
        fetched_bytes: m.fetched_bytes.load(Relaxed) + s.engine.external_fetched_bytes(),
        original_source: s
            .spec
            .original
            .as_ref()
            .map(|o| o.source.clone())
            .unwrap_or_default(),
        trace_prefetched: m.trace_prefetched.load(Relaxed),
        startup_region: m.startup_region_chunks.load(Relaxed),
        last_error: s
            .health
            .last_error
            .lock()
            .expect("health lock")
            .clone()
            .unwrap_or_default(),
        depends_on_registry: fill < 1.0
            && !Path::new(&s.spec.source).exists()
            && !s.original.as_ref().is_some_and(|o| o.is_local()),
        index_digest: s.engine.index_digest(),
    }
}
