//! Remote layers on block devices: each is served by its own `lazyblk attach --daemon` process (own
//! session), which mounts the ext4 read-only under `ROOT/layers/<id>`. The snapshotter is only the
//! control plane: restarting it never interrupts a device, and a `lazyblk recover --watch` supervisor
//! (started by the snapshotter) takes over any device whose server dies.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::device::mountinfo::is_mountpoint;
use crate::device::{list, Backend};

use super::store::Remote;

/// How remote layers are attached.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// The lazyblk binary.
    pub exe: PathBuf,
    /// Where layers are mounted (`<dir>/<id>`).
    pub mount_dir: PathBuf,
    /// `--run-dir` of the serving processes.
    pub run_dir: PathBuf,
    /// Shared chunk cache.
    pub cache_dir: PathBuf,
    /// Device backend.
    pub backend: Backend,
    /// Extra `attach` arguments (registry access: --plain-http, --hosts-dir, --docker-config; fill).
    pub attach_args: Vec<String>,
    /// How long an unused layer stays attached.
    pub grace: Duration,
}

/// The attached remote layers.
pub struct Layers {
    opts: LayerOptions,
    /// Snapshot id → device, for layers attached by this process or found attached at start.
    attached: Mutex<HashMap<u64, String>>,
}

impl Layers {
    /// Finds the layers that are already attached (after a restart) and starts the recovery
    /// supervisor.
    pub fn new(opts: LayerOptions) -> std::io::Result<Layers> {
        std::fs::create_dir_all(&opts.mount_dir)?;
        std::fs::create_dir_all(&opts.run_dir)?;
        std::fs::create_dir_all(&opts.cache_dir)?;
        let mut attached = HashMap::new();
        for (state, _alive) in list(&opts.run_dir) {
            let Some(m) = &state.mount else { continue };
            if let Ok(rel) = m.strip_prefix(&opts.mount_dir) {
                if let Ok(id) = rel.to_string_lossy().parse::<u64>() {
                    attached.insert(id, state.device.clone());
                }
            }
        }
        let layers = Layers {
            opts,
            attached: Mutex::new(attached),
        };
        layers.start_supervisor();
        Ok(layers)
    }

    /// `lazyblk recover --watch` in its own session: it takes over devices whose server died (and
    /// exits at once if another one already holds the run directory's lock).
    fn start_supervisor(&self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(self.opts.run_dir.join("recover.log"));
        let mut cmd = std::process::Command::new(&self.opts.exe);
        cmd.args(["recover", "--watch", "--run-dir"])
            .arg(&self.opts.run_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if let Ok(l) = log {
            cmd.stderr(l);
        }
        // SAFETY: setsid only detaches the child from our session, so it outlives us.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut c) => {
                std::thread::spawn(move || c.wait());
            }
            Err(e) => tracing::error!(error = %e, "cannot start the recovery supervisor"),
        }
    }

    /// The mount point of layer `id`.
    pub fn mountpoint(&self, id: u64) -> PathBuf {
        self.opts.mount_dir.join(id.to_string())
    }

    /// Makes sure layer `id` is attached and mounted; returns its mount point. Never returns a
    /// directory that is not the layer's mount.
    pub fn ensure(&self, id: u64, remote: &Remote) -> std::io::Result<PathBuf> {
        let mnt = self.mountpoint(id);
        if is_mountpoint(&mnt) {
            return Ok(mnt);
        }
        std::fs::create_dir_all(&mnt)?;
        let mut cmd = std::process::Command::new(&self.opts.exe);
        cmd.arg("attach");
        if let Some(t) = remote.trace.as_ref().filter(|t| t.exists()) {
            cmd.arg("--prefetch-trace").arg(t);
        }
        if let Some(s) = remote.startup_offset {
            cmd.args(["--startup-offset", &s.to_string()]);
        }
        let out = cmd
            .arg(&remote.source)
            .args(["--index-offset", &remote.index_offset.to_string()])
            .args(["--index-length", &remote.index_length.to_string()])
            .args(["--index-digest", &remote.index_digest])
            .arg("--cache-dir")
            .arg(&self.opts.cache_dir)
            .arg("--backend")
            .arg(format!("{:?}", self.opts.backend).to_lowercase())
            .arg("--mount")
            .arg(&mnt)
            .arg("--run-dir")
            .arg(&self.opts.run_dir)
            .arg("--daemon")
            .args(&self.opts.attach_args)
            .stdin(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "attaching {}: {}",
                remote.source,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !is_mountpoint(&mnt) {
            return Err(std::io::Error::other(format!(
                "{device} attached but {} is not mounted",
                mnt.display()
            )));
        }
        tracing::info!(layer = %remote.source, %device, mount = %mnt.display(), "remote layer attached");
        self.attached
            .lock()
            .expect("layers lock")
            .insert(id, device);
        Ok(mnt)
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

    /// Unmounts and detaches layer `id` (its serving process exits).
    pub fn release(&self, id: u64) -> std::io::Result<()> {
        let Some(device) = self.attached.lock().expect("layers lock").remove(&id) else {
            return Ok(());
        };
        let out = std::process::Command::new(&self.opts.exe)
            .arg("detach")
            .arg(&device)
            .arg("--run-dir")
            .arg(&self.opts.run_dir)
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "detaching {device}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let _ = std::fs::remove_dir(self.mountpoint(id));
        tracing::info!(%device, "remote layer detached");
        Ok(())
    }
}
