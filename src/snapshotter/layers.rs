//! Remote layers on block devices, attached by the node daemon (`lazyblk daemon`) through its control
//! socket: no process and no argv per layer. The daemon mounts each ext4 read-only under
//! `ROOT/layers/<id>`; the snapshotter is only the control plane, so restarting it never interrupts a
//! device, and the daemon resumes its devices after its own restart.
//!
//! Concurrency: one lock per layer, never the snapshot store's. An attach is single-flight per layer;
//! a release re-checks, under the same per-layer lock, that nothing uses the layer any more, so it
//! cannot race a new `Prepare` of an image that shares it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::device::mountinfo::is_mountpoint;
use crate::device::Backend;
use crate::node::proto::{DetachRequest, ListRequest};
use crate::node::spec::{IndexRef, RegistrySpec, SPEC_VERSION};
use crate::node::{api, LayerSpec};

use super::store::Remote;

/// How remote layers are attached.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// The lazyblk binary (to start a daemon when none runs).
    pub exe: PathBuf,
    /// Where layers are mounted (`<dir>/<id>`).
    pub mount_dir: PathBuf,
    /// The daemon's run directory.
    pub run_dir: PathBuf,
    /// The daemon's chunk cache (when this process starts it).
    pub cache_dir: PathBuf,
    /// Device backend.
    pub backend: Backend,
    /// Registry access for the layers.
    pub registry: RegistrySpec,
    /// Fetch every attached layer completely in the background.
    pub fill: bool,
    /// Attach a layer when a pull records it (in the background), not when its first container's
    /// mount asks for it.
    pub attach_on_pull: bool,
    /// How long an unused layer stays attached.
    pub grace: Duration,
    /// Start `lazyblk daemon` for the run dir if none answers (else a missing daemon is an error;
    /// under systemd the daemon has its own unit).
    pub start_daemon: bool,
}

/// The attached remote layers.
pub struct Layers {
    opts: LayerOptions,
    rt: tokio::runtime::Handle,
    /// Snapshot id → device, for layers attached by this process or found attached at start.
    attached: Mutex<HashMap<u64, String>>,
    /// One lock per layer: attach and release of the same layer never overlap.
    locks: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    client: tokio::sync::Mutex<Option<api::Client>>,
}

impl Layers {
    /// Connects to (or starts) the node daemon and finds the layers that are already attached.
    pub fn new(opts: LayerOptions, rt: tokio::runtime::Handle) -> std::io::Result<Layers> {
        crate::process::private_dir(&opts.mount_dir)?;
        crate::process::private_dir(&opts.run_dir)?;
        crate::process::private_dir(&opts.cache_dir)?;
        let layers = Layers {
            opts,
            rt,
            attached: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            client: tokio::sync::Mutex::new(None),
        };
        let listed = layers.rt.block_on(async {
            let mut c = layers.client().await?;
            c.list(ListRequest {})
                .await
                .map(|r| r.into_inner().layers)
                .map_err(|e| std::io::Error::other(e.message().to_string()))
        })?;
        let mut attached = layers.attached.lock().expect("layers lock");
        for l in listed {
            if let Ok(rel) = std::path::Path::new(&l.mount).strip_prefix(&layers.opts.mount_dir) {
                if let Ok(id) = rel.to_string_lossy().parse::<u64>() {
                    attached.insert(id, l.device.clone());
                }
            }
        }
        drop(attached);
        Ok(layers)
    }

    /// A connected client (connecting, or starting the daemon, on first use or after a failure).
    async fn client(&self) -> std::io::Result<api::Client> {
        let mut c = self.client.lock().await;
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let run_dir = &self.opts.run_dir;
        let mut got = api::connect(run_dir).await;
        if got.is_none() && self.opts.start_daemon {
            self.start_daemon()?;
            let started = std::time::Instant::now();
            while got.is_none() && started.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got = api::connect(run_dir).await;
            }
        }
        let client = got.ok_or_else(|| {
            std::io::Error::other(format!(
                "no lazyblk daemon answers on {} (start lazyblk-daemon.service)",
                api::socket_path(run_dir).display()
            ))
        })?;
        *c = Some(client.clone());
        Ok(client)
    }

    /// `lazyblk daemon` for the run dir, in its own session (it outlives the snapshotter).
    fn start_daemon(&self) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.opts.run_dir.join("daemon.log"))?;
        let mut cmd = std::process::Command::new(&self.opts.exe);
        cmd.arg("daemon")
            .arg("--run-dir")
            .arg(&self.opts.run_dir)
            .arg("--cache-dir")
            .arg(&self.opts.cache_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        if let Ok(filter) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        } else {
            cmd.args(["--log", "info"]);
        }
        // SAFETY: setsid only detaches the child from our session, so it outlives us.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        std::thread::spawn(move || child.wait());
        tracing::info!(run_dir = %self.opts.run_dir.display(), "started lazyblk daemon");
        Ok(())
    }

    /// The mount point of layer `id`.
    pub fn mountpoint(&self, id: u64) -> PathBuf {
        self.opts.mount_dir.join(id.to_string())
    }

    fn layer_lock(&self, id: u64) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .expect("layers lock")
            .entry(id)
            .or_default()
            .clone()
    }

    /// Makes sure layer `id` is attached and mounted; returns its mount point. Never returns a
    /// directory that is not the layer's mount. Blocking (runs on the blocking pool).
    pub fn ensure(&self, id: u64, remote: &Remote) -> std::io::Result<PathBuf> {
        let lock = self.layer_lock(id);
        let _one = lock.lock().expect("layer lock");
        let mnt = self.mountpoint(id);
        if is_mountpoint(&mnt) {
            return Ok(mnt);
        }
        let spec = LayerSpec {
            version: SPEC_VERSION,
            source: remote.source.clone(),
            index: Some(IndexRef {
                offset: remote.index_offset,
                length: remote.index_length,
                digest: remote.index_digest.clone(),
            }),
            index_digest: None,
            startup_offset: remote.startup_offset,
            prefetch_trace: remote.trace.clone().filter(|t| t.exists()),
            fill: self.opts.fill,
            backend: self.opts.backend,
            mount: Some(mnt.clone()),
            registry: self.opts.registry.clone(),
            read_deadline_secs: 0.0,
            readahead_chunks: None,
            ublk_queues: 0,
            ublk_depth: 0,
            original: remote.original.clone(),
        };
        let st = self.rt.block_on(async {
            let mut c = self.client().await?;
            // Run-time credentials (a pull secret the CRI proxy saw) go to the daemon with each
            // attach: a restarted daemon has them again before it serves the layer.
            if let Ok(b) = crate::fetch::registry::BlobRef::parse(&remote.source) {
                if let Some((creds, ttl)) =
                    crate::fetch::keychain::global().get_with_ttl(&b.registry, &b.repository)
                {
                    api::put_credentials(&mut c, &b.registry, &b.repository, &creds, ttl)
                        .await
                        .map_err(|e| {
                            std::io::Error::other(format!(
                                "handing credentials for {}/{} to the node daemon: {}",
                                b.registry,
                                b.repository,
                                e.message()
                            ))
                        })?;
                }
            }
            match api::attach(&mut c, &spec).await {
                Ok(st) => Ok(st),
                Err(e) => {
                    if matches!(
                        e.code(),
                        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable
                    ) {
                        // The connection may have broken (daemon restarted): reconnect next time.
                        *self.client.lock().await = None;
                    }
                    Err(std::io::Error::other(format!(
                        "attaching {}: {}",
                        remote.source,
                        e.message()
                    )))
                }
            }
        })?;
        if !is_mountpoint(&mnt) {
            return Err(std::io::Error::other(format!(
                "{} attached but {} is not mounted",
                st.device,
                mnt.display()
            )));
        }
        tracing::info!(layer = %remote.source, device = %st.device, mount = %mnt.display(), "remote layer attached");
        self.attached
            .lock()
            .expect("layers lock")
            .insert(id, st.device);
        Ok(mnt)
    }

    /// The disk digest ([`lazyblk_image_format::Index::disk_digest`]) of a remote layer, from its
    /// index fetched with one range request and verified against the descriptor's index digest; the
    /// index must also agree with the descriptor's `image-size`. Blocking.
    pub fn disk_digest(&self, remote: &Remote) -> std::io::Result<String> {
        let digest = lazyblk_image_format::parse_digest(&remote.index_digest)
            .map_err(|e| std::io::Error::other(format!("index digest: {e}")))?;
        let index = self
            .rt
            .block_on(crate::fetch::source::fetch_index(
                &remote.source,
                remote.index_offset,
                remote.index_length,
                digest,
                &self.opts.registry.options(),
            ))
            .map_err(|e| std::io::Error::other(format!("index of {}: {e}", remote.source)))?;
        if index.image_size() != remote.image_size {
            return Err(std::io::Error::other(format!(
                "index of {}: disk of {} bytes, but the descriptor says image-size {}",
                remote.source,
                index.image_size(),
                remote.image_size
            )));
        }
        Ok(lazyblk_image_format::digest_string(&index.disk_digest()))
    }

    /// Ids of the layers attached now.
    pub fn attached_ids(&self) -> Vec<u64> {
        self.attached
            .lock()
            .expect("layers lock")
            .keys()
            .copied()
            .collect()
    }

    /// The configured grace period.
    pub fn grace(&self) -> Duration {
        self.opts.grace
    }

    /// Whether pulls attach the layers they record.
    pub fn attach_on_pull(&self) -> bool {
        self.opts.attach_on_pull
    }

    /// The runtime attaches run on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// Unmounts and detaches layer `id` if `still_unused()` says so under the layer's lock (so a
    /// concurrent Prepare either sees the layer gone and attaches it again, or keeps it). A busy
    /// mount is left attached.
    pub fn release(&self, id: u64, still_unused: impl FnOnce() -> bool) -> std::io::Result<()> {
        let lock = self.layer_lock(id);
        let _one = lock.lock().expect("layer lock");
        if !still_unused() {
            return Ok(());
        }
        let Some(device) = self.attached.lock().expect("layers lock").get(&id).cloned() else {
            return Ok(());
        };
        self.rt.block_on(async {
            let mut c = self.client().await?;
            c.detach(DetachRequest {
                device: device.clone(),
            })
            .await
            .map(|_| ())
            .or_else(|e| match e.code() {
                // Already gone (detached by hand): nothing left to do.
                tonic::Code::NotFound => Ok(()),
                _ => Err(std::io::Error::other(format!(
                    "detaching {device}: {}",
                    e.message()
                ))),
            })
        })?;
        self.attached.lock().expect("layers lock").remove(&id);
        let _ = std::fs::remove_dir(self.mountpoint(id));
        tracing::info!(%device, "remote layer detached");
        Ok(())
    }
}
