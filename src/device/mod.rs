//! Exposing a layer as a kernel block device.
//!
//! Backends: `ublk` (`ublk_drv` through libublk, with user recovery), `nbd` (the kernel NBD driver
//! connected over generic netlink to lazyblk's own NBD server on socketpairs) and `loop` (a loop device
//! over a one-file FUSE export of the virtual disk; works on any kernel with loop and FUSE, but a
//! crashed server breaks it). `auto` picks ublk, then nbd, then loop.

pub mod fuse_file;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod nbd_kernel;
pub mod netlink;
pub mod ublk;

use mount::detach_quietly;
pub use mount::{mount_ext4_ro, umount, LAYER_MOUNT_DATA, LAYER_MOUNT_FLAGS};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fetch::BlockSource;
use fuse_file::{DiskFs, DISK_NAME};
use loopdev::LoopDevice;
pub use ublk::UblkOptions;

/// Which kernel interface carries the block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The best one available.
    Auto,
    /// ublk (`ublk_drv`).
    Ublk,
    /// Kernel NBD (`nbd`).
    Nbd,
    /// loop over a FUSE-exported file.
    Loop,
}

/// What the running kernel offers.
pub fn probe() -> (bool, bool, bool) {
    let ublk = Path::new("/dev/ublk-control").exists();
    let nbd = Path::new("/sys/module/nbd").exists();
    let lp = Path::new("/dev/loop-control").exists() && Path::new("/dev/fuse").exists();
    (ublk, nbd, lp)
}

/// Picks the backend for `wanted`, or explains what is missing.
pub fn choose(wanted: Backend) -> Result<Backend, String> {
    let (ublk, nbd, lp) = probe();
    let missing = |what: &str, module: &str| {
        let others: Vec<&str> = [("ublk", ublk), ("nbd", nbd), ("loop", lp)]
            .iter()
            .filter(|(n, ok)| *ok && *n != what)
            .map(|(n, _)| *n)
            .collect();
        format!(
            "the {what} backend needs the {module} kernel module, which is not loaded here{}",
            if others.is_empty() {
                String::new()
            } else {
                format!("; --backend {} would work", others.join(" or --backend "))
            }
        )
    };
    match wanted {
        Backend::Ublk if ublk => Ok(Backend::Ublk),
        Backend::Ublk => Err(missing("ublk", "ublk_drv (/dev/ublk-control)")),
        Backend::Nbd if nbd => Ok(Backend::Nbd),
        Backend::Nbd => Err(missing("nbd", "nbd")),
        Backend::Loop if lp => Ok(Backend::Loop),
        Backend::Loop => Err(missing("loop", "loop (and fuse)")),
        Backend::Auto if ublk => Ok(Backend::Ublk),
        Backend::Auto if nbd => Ok(Backend::Nbd),
        Backend::Auto if lp => {
            tracing::info!(
                ublk,
                nbd,
                "using the loop backend (FUSE in the data path; see docs/operations.md)"
            );
            Ok(Backend::Loop)
        }
        Backend::Auto => {
            Err("no usable backend: need the ublk_drv or nbd module, or loop and fuse".into())
        }
    }
}

/// Persisted description of an attached device (for `lazyblk ls`, `detach`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// `/dev/loopN`.
    pub device: String,
    /// Backend.
    pub backend: Backend,
    /// The layer source.
    pub source: String,
    /// Disk size in bytes.
    pub size: u64,
    /// Serving process.
    pub pid: u32,
    /// The serving process's start time (see [`crate::process::ProcessId`]; 0 in old state files).
    #[serde(default)]
    pub pid_start: u64,
    /// Where the ext4 is mounted, if `--mount` was given.
    pub mount: Option<PathBuf>,
    /// How the source was opened (opaque to this module; the node keeps its layer spec here).
    #[serde(default)]
    pub source_args: serde_json::Value,
    /// The loop backend's work directory (its FUSE export), for removing an orphan.
    #[serde(default)]
    pub work: Option<PathBuf>,
    /// Written before the device was created and not yet finished (attached and mounted): a server
    /// found dead in this state died half way, and the attach is rolled back.
    #[serde(default)]
    pub attaching: bool,
    /// The mount helper of an attach in progress (see [`mount`]): a restarted daemon rolling the
    /// attach back waits for it before it removes the mount.
    #[serde(default)]
    pub mounter: Option<crate::process::ProcessId>,
}

/// A kernel block device serving a [`BlockSource`]: the one seam over the ublk, kernel NBD and loop
/// backends. Requests, errno mapping and the memory-cache fast path live behind `BlockSource`
/// (`read_now_into` first, then `read_at`), shared by all three.
pub trait Device: Send {
    /// `/dev/...`.
    fn path(&self) -> String;
    /// Stops serving and removes the device; I/O the kernel still holds fails with EIO.
    fn remove(self: Box<Self>) -> std::io::Result<()>;
    /// A directory of files the device needs while it exists (the loop backend's FUSE export).
    fn work_dir(&self) -> Option<PathBuf> {
        None
    }
}

/// How a new device is set up.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// ublk queues and depth.
    pub ublk: ublk::UblkOptions,
    /// NBD: the kernel's request and dead-connection timeout, seconds.
    pub nbd_timeout_secs: u64,
    /// Loop: read the FUSE export with direct I/O (see [`loopdev::LoopDevice::attach`]).
    pub loop_direct_io: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            ublk: ublk::UblkOptions::default(),
            nbd_timeout_secs: 60,
            loop_direct_io: true,
        }
    }
}

impl Device for ublk::UblkDevice {
    fn path(&self) -> String {
        ublk::UblkDevice::path(self)
    }
    fn remove(self: Box<Self>) -> std::io::Result<()> {
        self.delete()
    }
}

impl Device for nbd_kernel::KernelNbd {
    fn path(&self) -> String {
        nbd_kernel::KernelNbd::path(self)
    }
    fn remove(self: Box<Self>) -> std::io::Result<()> {
        self.disconnect()
    }
}

/// The loop backend: a read-only loop device over the one file of a FUSE export.
struct LoopExport {
    lo: Option<LoopDevice>,
    fuse: Option<fuser::BackgroundSession>,
    work: PathBuf,
}

impl LoopExport {
    fn create(
        source: Arc<dyn BlockSource>,
        rt: tokio::runtime::Handle,
        run_dir: &Path,
        direct_io: bool,
    ) -> std::io::Result<LoopExport> {
        use std::os::unix::fs::DirBuilderExt;
        // One work dir per device: a daemon serves many loop devices, each with its own FUSE export.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let work = run_dir.join(format!("loop-{}-{seq}", std::process::id()));
        if std::fs::symlink_metadata(&work).is_ok() {
            return Err(std::io::Error::other(format!(
                "{} exists (left by a crashed server?)",
                work.display()
            )));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(work.join("fuse"))?;
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("lazyblk".into()),
            fuser::MountOption::Subtype("lazyblk".into()),
        ];
        // One FUSE thread per device: its reads are answered from tokio tasks, so it never waits.
        cfg.n_threads = Some(1);
        let fuse = fuser::spawn_mount(DiskFs::new(source, rt), work.join("fuse"), &cfg)?;
        let mut export = LoopExport {
            lo: None,
            fuse: Some(fuse),
            work,
        };
        let lo = LoopDevice::attach(&export.work.join("fuse").join(DISK_NAME), direct_io)?;
        if direct_io && !lo.direct_io() {
            tracing::info!(device = %lo.path().display(), "the kernel refused direct I/O on the FUSE export: this loop device reads it buffered, one request at a time");
        }
        export.lo = Some(lo);
        Ok(export)
    }
}

impl Drop for LoopExport {
    /// Ends the FUSE session and makes sure its mount is gone: fuser's own unmount fails with EBUSY
    /// while the loop device (still mounted by someone) holds the file, and a FUSE mount whose
    /// server has gone would stay behind, answering ENOTCONN. Detached lazily instead, the loop
    /// device's reads fail with EIO once this process is gone, and nothing is left mounted.
    fn drop(&mut self) {
        drop(self.lo.take());
        drop(self.fuse.take());
        let fuse = self.work.join("fuse");
        detach_quietly(&fuse);
        let _ = std::fs::remove_dir(&fuse);
        let _ = std::fs::remove_dir(&self.work);
    }
}

impl Device for LoopExport {
    fn path(&self) -> String {
        self.lo
            .as_ref()
            .map(|l| l.path().display().to_string())
            .unwrap_or_default()
    }
    fn remove(mut self: Box<Self>) -> std::io::Result<()> {
        // Drop (FUSE session, mount, work dir) runs after.
        match self.lo.take() {
            Some(lo) => lo.detach(),
            None => Ok(()),
        }
    }
    fn work_dir(&self) -> Option<PathBuf> {
        Some(self.work.clone())
    }
}

/// Creates a `backend` device serving `source` (`backend` must be resolved, not `auto`).
pub fn create(
    backend: Backend,
    source: Arc<dyn BlockSource>,
    rt: tokio::runtime::Handle,
    run_dir: &Path,
    opts: &DeviceOptions,
    id: Option<u32>,
) -> std::io::Result<Box<dyn Device>> {
    Ok(match backend {
        Backend::Ublk => Box::new(ublk::UblkDevice::create(source, &rt, opts.ublk, id)?),
        Backend::Nbd => Box::new(nbd_kernel::KernelNbd::connect(
            source,
            &rt,
            2,
            opts.nbd_timeout_secs,
            id,
        )?),
        Backend::Loop => Box::new(LoopExport::create(
            source,
            rt,
            run_dir,
            opts.loop_direct_io,
        )?),
        Backend::Auto => return Err(std::io::Error::other("backend auto must be resolved first")),
    })
}

/// Takes over the device `state` describes, whose server died: ublk through user recovery (the
/// kernel reissues the reads it held), NBD through `NBD_CMD_RECONFIGURE`. A loop device cannot be
/// taken over: its FUSE export died with its server.
pub fn adopt(
    state: &DeviceState,
    source: Arc<dyn BlockSource>,
    rt: tokio::runtime::Handle,
) -> std::io::Result<Box<dyn Device>> {
    Ok(match state.backend {
        Backend::Ublk => Box::new(ublk::UblkDevice::recover(
            ublk_id(&state.device)?,
            source,
            &rt,
        )?),
        Backend::Nbd => Box::new(nbd_kernel::KernelNbd::reconnect(
            nbd_index(&state.device)?,
            source,
            &rt,
            2,
        )?),
        b => {
            return Err(std::io::Error::other(format!(
                "the {b:?} backend cannot be resumed"
            )))
        }
    })
}

/// A live attachment: a [`Device`], its mount and its state files; everything is undone on
/// [`Attachment::detach`] or drop.
pub struct Attachment {
    state: DeviceState,
    state_file: PathBuf,
    mounted: Option<PathBuf>,
    device: Option<Box<dyn Device>>,
    stats: Option<tokio::task::JoinHandle<()>>,
    /// Tasks publishing side files next to the state file (stopped, and the files removed, on detach).
    publishers: Vec<(tokio::task::JoinHandle<()>, PathBuf)>,
}

impl Attachment {
    /// Attaches `source` with `backend` under `run_dir`, optionally mounting the ext4 read-only.
    pub fn attach(
        backend: Backend,
        source: Arc<dyn BlockSource>,
        rt: tokio::runtime::Handle,
        name: &str,
        run_dir: &Path,
        mount: Option<&Path>,
        opts: &DeviceOptions,
    ) -> std::io::Result<Attachment> {
        let size = source.size();
        let me = crate::process::ProcessId::current();
        let state = |device: String, work: Option<PathBuf>, attaching: bool| DeviceState {
            device,
            backend,
            source: name.to_string(),
            size,
            pid: me.pid,
            pid_start: me.start,
            mount: mount.map(Path::to_path_buf),
            source_args: serde_json::Value::Null,
            work,
            attaching,
            mounter: None,
        };
        let dev = match backend {
            // ublk and NBD devices outlive their server: the state file that names the device is
            // written *before* it is created (marked attaching), so a crash at any point of the
            // attach leaves a record a restarted daemon rolls back. The number is chosen here.
            Backend::Ublk | Backend::Nbd => {
                let mut tried = 0;
                loop {
                    let id = free_device_number(backend, tried)?;
                    let intent = state(device_path(backend, id), None, true);
                    let file = state_file_path(run_dir, &intent.device);
                    std::fs::create_dir_all(run_dir.join("devices"))?;
                    crate::process::write_atomic(
                        &file,
                        &serde_json::to_vec_pretty(&intent).expect("state serialises"),
                    )?;
                    match create(backend, source.clone(), rt.clone(), run_dir, opts, Some(id)) {
                        Ok(d) => break d,
                        Err(e) if tried < 16 && in_use(&e) => {
                            let _ = std::fs::remove_file(&file);
                            tried += 1;
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&file);
                            return Err(e);
                        }
                    }
                }
            }
            _ => create(backend, source, rt, run_dir, opts, None)?,
        };
        let mut a = Attachment {
            state: state(dev.path(), dev.work_dir(), false),
            state_file: PathBuf::new(),
            mounted: None,
            device: Some(dev),
            stats: None,
            publishers: Vec::new(),
        };
        a.state.mount = None;
        a.finish(run_dir, mount)?;
        Ok(a)
    }

    /// Takes over the device of `state`, whose server died (see [`adopt`]). The mount (if any) was
    /// never lost and is left as it is.
    pub fn adopt(
        mut state: DeviceState,
        source: Arc<dyn BlockSource>,
        rt: tokio::runtime::Handle,
        run_dir: &Path,
    ) -> std::io::Result<Attachment> {
        let dev = adopt(&state, source, rt)?;
        let me = crate::process::ProcessId::current();
        state.pid = me.pid;
        state.pid_start = me.start;
        let mut a = Attachment {
            mounted: state.mount.clone(),
            state,
            state_file: PathBuf::new(),
            device: Some(dev),
            stats: None,
            publishers: Vec::new(),
        };
        a.finish(run_dir, None)?;
        Ok(a)
    }

    /// Keeps `RUN_DIR/devices/<dev>.stats.json` (fill, reads, errors; read by `lazyblk ls`) current.
    pub fn publish_stats(
        &mut self,
        metrics: Arc<crate::fetch::metrics::Metrics>,
        rt: &tokio::runtime::Handle,
    ) {
        let path = stats_path(&self.state_file);
        self.stats = Some(rt.spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut last: Option<Vec<u8>> = None;
            loop {
                let v = DeviceStats {
                    fill: metrics.fill_ratio(),
                    reads: metrics.reads.load(Relaxed),
                    read_errors: metrics.read_errors.load(Relaxed),
                    fetched_bytes: metrics.fetched_bytes.load(Relaxed),
                    trace_prefetched: metrics.trace_prefetched.load(Relaxed),
                    startup_region: metrics.startup_region_chunks.load(Relaxed),
                };
                let body = serde_json::to_vec(&v).expect("stats serialise");
                if last.as_ref() != Some(&body) {
                    let tmp = path.with_extension("tmp");
                    if std::fs::write(&tmp, &body).is_ok() {
                        let _ = std::fs::rename(&tmp, &path);
                    }
                    last = Some(body);
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }));
    }

    /// Records how the source was opened in the state file (opaque here; the node keeps its
    /// versioned layer spec there).
    pub fn set_source_args(&mut self, v: serde_json::Value) -> std::io::Result<()> {
        self.state.source_args = v;
        self.write_state()
    }

    fn write_state(&self) -> std::io::Result<()> {
        crate::process::write_atomic(
            &self.state_file,
            &serde_json::to_vec_pretty(&self.state).expect("state serialises"),
        )
    }

    /// Mounts (if asked) and records the state file.
    fn finish(&mut self, run_dir: &Path, mount: Option<&Path>) -> std::io::Result<()> {
        let a = self;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir.join("devices"))?;
        let dev_name = a.state.device.trim_start_matches("/dev/").to_string();
        a.state_file = run_dir.join("devices").join(format!("{dev_name}.json"));
        // Recorded before the mount, with the mount it is about to get and marked attaching until
        // it is there: a crash from here on leaves a record that names the device and its mount, so
        // a restarted daemon can roll the attach back.
        if let Some(dir) = mount {
            a.state.mount = Some(dir.to_path_buf());
            a.state.attaching = true;
        }
        a.write_state()?;
        if let Some(dir) = mount {
            let dev = PathBuf::from(&a.state.device);
            let r = mount::mount_layer(&dev, dir, |helper| {
                a.state.mounter = Some(helper);
                a.write_state()
            });
            a.state.mounter = None;
            if let Err(e) = r {
                a.state.mount = None;
                return Err(e);
            }
            a.mounted = Some(dir.to_path_buf());
            a.state.attaching = false;
            a.write_state()?;
        }
        Ok(())
    }

    /// The device state.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// `RUN_DIR/devices/<dev>.<suffix>`: a file published next to the state file.
    pub fn side_file(&self, suffix: &str) -> PathBuf {
        self.state_file.with_extension(suffix)
    }

    /// Keeps `task` (which publishes `file`) for the life of the attachment: on detach the task is
    /// stopped and the file removed.
    pub fn keep_publisher(&mut self, task: tokio::task::JoinHandle<()>, file: PathBuf) {
        self.publishers.push((task, file));
    }

    /// Unmounts, detaches the device, unmounts FUSE and removes the state. If the filesystem cannot
    /// be unmounted (busy: a container still uses it), nothing is torn down and the error comes back:
    /// a device is never deleted under a mount. After success the attachment is empty.
    pub fn detach(&mut self) -> std::io::Result<()> {
        if let Some(dir) = self.mounted.clone() {
            umount(&dir).map_err(|e| {
                std::io::Error::new(e.kind(), format!("unmounting {}: {e}", dir.display()))
            })?;
            self.mounted = None;
        }
        self.teardown()
    }

    fn teardown(&mut self) -> std::io::Result<()> {
        let mut first_err = None;
        if let Some(dir) = self.mounted.take() {
            if let Err(e) = umount(&dir) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(dev) = self.device.take() {
            if let Err(e) = dev.remove() {
                first_err.get_or_insert(e);
            }
        }
        if let Some(t) = self.stats.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(stats_path(&self.state_file));
        for (task, file) in self.publishers.drain(..) {
            task.abort();
            let _ = std::fs::remove_file(file);
        }
        let _ = std::fs::remove_file(&self.state_file);
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// Live counters of a device, published by its serving process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceStats {
    /// Fraction of the layer's stored chunks in the cache, 0..=1.
    pub fill: f64,
    /// Reads served.
    pub reads: u64,
    /// Reads answered with an error.
    pub read_errors: u64,
    /// Bytes fetched from the source.
    pub fetched_bytes: u64,
    /// Chunks fetched ahead of the workload by a startup-trace replay.
    #[serde(default)]
    pub trace_prefetched: u64,
    /// Chunks that arrived with the index in the blob's startup region.
    #[serde(default)]
    pub startup_region: u64,
}

fn stats_path(state_file: &Path) -> PathBuf {
    state_file.with_extension("stats.json")
}

/// The last counters a device's serving process published.
pub fn stats(run_dir: &Path, device: &str) -> Option<DeviceStats> {
    let f = run_dir
        .join("devices")
        .join(format!("{}.stats.json", device.trim_start_matches("/dev/")));
    serde_json::from_slice(&std::fs::read(f).ok()?).ok()
}

fn state_file_path(run_dir: &Path, device: &str) -> PathBuf {
    run_dir
        .join("devices")
        .join(format!("{}.json", device.trim_start_matches("/dev/")))
}

fn device_path(backend: Backend, id: u32) -> String {
    match backend {
        Backend::Ublk => format!("/dev/ublkb{id}"),
        _ => format!("/dev/nbd{id}"),
    }
}

/// Whether a device creation failed because the number was taken meanwhile.
fn in_use(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EEXIST))
        || e.to_string().contains("Device or resource busy")
        || e.to_string().contains("File exists")
}

/// The `skip`-th unused device number of `backend` (ublk: no `/dev/ublkcN`; NBD: `/dev/nbdN` not
/// connected).
fn free_device_number(backend: Backend, skip: u32) -> std::io::Result<u32> {
    let mut skipped = 0;
    for n in 0..1024u32 {
        let free = match backend {
            Backend::Ublk => !Path::new(&format!("/dev/ublkc{n}")).exists(),
            _ => {
                // A number the kernel has no device for is free too: NBD_CMD_CONNECT creates it.
                match std::fs::read_to_string(format!("/sys/block/nbd{n}/size")) {
                    Ok(s) => {
                        s.trim() == "0" && !Path::new(&format!("/sys/block/nbd{n}/pid")).exists()
                    }
                    Err(_) => true,
                }
            }
        };
        if free {
            if skipped == skip {
                return Ok(n);
            }
            skipped += 1;
        }
    }
    Err(std::io::Error::other(format!(
        "no free {backend:?} device number"
    )))
}

/// `N` of `/dev/nbdN`.
pub fn nbd_index(device: &str) -> std::io::Result<u32> {
    device
        .trim_start_matches("/dev/nbd")
        .parse()
        .map_err(|_| std::io::Error::other(format!("{device} is not an NBD device")))
}

/// `N` of `/dev/ublkbN`.
pub fn ublk_id(device: &str) -> std::io::Result<u32> {
    device
        .trim_start_matches("/dev/ublkb")
        .parse()
        .map_err(|_| std::io::Error::other(format!("{device} is not a ublk device")))
}

/// Every recorded device under `run_dir`, with whether its serving process is alive.
pub fn list(run_dir: &Path) -> Vec<(DeviceState, bool)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(run_dir.join("devices")) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(".json") || name.ends_with(".stats.json") {
            continue;
        }
        let Ok(b) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(s) = serde_json::from_slice::<DeviceState>(&b) else {
            continue;
        };
        let alive = crate::process::ProcessId {
            pid: s.pid,
            start: s.pid_start,
        }
        .alive();
        out.push((s, alive));
    }
    out.sort_by(|a, b| a.0.device.cmp(&b.0.device));
    out
}

/// Removes a device nobody serves, so that reads it holds fail with EIO instead of waiting for a
/// recovery that will not come (a loop device over a dead FUSE export already fails them), with its
/// mount (detached lazily) and its state files.
pub fn remove_orphan(s: &DeviceState, run_dir: &Path) -> std::io::Result<()> {
    // A mount helper still running for a dead server finishes once the device below it is stopped
    // (its I/O fails) or answers again; it is waited for, so that a mount it makes late is removed.
    let detach_mount = || {
        if let Some(dir) = &s.mount {
            if let Some(helper) = s.mounter {
                if !mount::wait_for_mounter(helper, std::time::Duration::from_secs(30)) {
                    tracing::warn!(device = %s.device, pid = helper.pid, "the mount helper of a dead server is still running");
                }
            }
            detach_quietly(dir);
        }
    };
    let r = match s.backend {
        // A device that never got created (a crash right after its state was recorded): nothing to do.
        Backend::Ublk if !Path::new(&format!("/dev/ublkc{}", ublk_id(&s.device)?)).exists() => {
            detach_mount();
            Ok(())
        }
        Backend::Ublk => ublk::delete_orphan(ublk_id(&s.device)?, detach_mount)
            .map_err(|e| std::io::Error::other(format!("deleting {}: {e}", s.device))),
        Backend::Nbd
            if std::fs::read_to_string(format!("/sys/block/nbd{}/size", nbd_index(&s.device)?))
                .is_ok_and(|v| v.trim() == "0") =>
        {
            detach_mount();
            Ok(())
        }
        Backend::Nbd => {
            let r = nbd_kernel::disconnect_index(nbd_index(&s.device)?)
                .map_err(|e| std::io::Error::other(format!("disconnecting {}: {e}", s.device)));
            detach_mount();
            r
        }
        _ => {
            detach_mount();
            // The loop device clears itself once its last user (the mount) is gone; the dead FUSE
            // export under it is unmounted lazily.
            if let Some(work) = &s.work {
                let fuse = work.join("fuse");
                detach_quietly(&fuse);
                let _ = std::fs::remove_dir(&fuse);
                let _ = std::fs::remove_dir(work);
            }
            Ok(())
        }
    };
    let dev = s.device.trim_start_matches("/dev/");
    let dir = run_dir.join("devices");
    for suffix in ["json", "stats.json", "access.json", "index"] {
        let _ = std::fs::remove_file(dir.join(format!("{dev}.{suffix}")));
    }
    r
}
