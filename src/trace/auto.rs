//! Startup traces recorded without being asked: the first container a node starts from an image
//! that has no shipped trace leaves the chunks its layers were read, in order, in
//! `DIR/sha256-<hex>.trace` (the image's manifest digest), with the image reference beside it in
//! `DIR/sha256-<hex>.image`. `lazyblk trace recorded` lists them and `lazyblk trace push IMAGE FILE`
//! ships one, so every other node prefetches what that start read.
//!
//! There is no readiness signal on a node, so the recording ends when the image's layers have had
//! no new first read for [`RecordLimits::idle`] after the container's first read, or after
//! [`RecordLimits::max`] in all. Reading past readiness only makes the trace longer (prefetch of
//! chunks the app reads later); a trace never changes what is served: every chunk stays verified.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::record::{collect, count_first_reads, now_ms, Window};
use super::Trace;

/// When a recording ends, and how many recorded traces a node keeps.
#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    /// No new first read of the image's layers for this long (after the container's first) ends it.
    pub idle: Duration,
    /// The longest recording.
    pub max: Duration,
    /// Recorded traces kept; the oldest go first.
    pub keep: usize,
    /// How often the access logs are looked at.
    pub poll: Duration,
    /// Recordings at once (each reads every access log of the node per poll); first starts beyond
    /// this are not recorded.
    pub concurrent: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            idle: Duration::from_secs(5),
            max: Duration::from_secs(60),
            keep: 64,
            poll: Duration::from_millis(500),
            concurrent: 4,
        }
    }
}

/// Records one startup trace per image manifest, in the background.
#[derive(Debug, Clone)]
pub struct AutoRecorder {
    dir: PathBuf,
    run_dir: PathBuf,
    limits: RecordLimits,
    /// Manifests being recorded now.
    active: Arc<Mutex<HashSet<String>>>,
}

/// A trace this node recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The image the container was started from (as pulled).
    pub image: String,
    /// `sha256:<hex>` of its (platform) manifest.
    pub manifest: String,
    /// The trace file.
    pub path: PathBuf,
    /// Layers read.
    pub layers: usize,
    /// Chunks in the trace.
    pub chunks: usize,
}

/// `sha256-<hex>` for a well-formed `sha256:<hex>` digest, else `None` (labels are untrusted text).
fn file_stem(manifest: &str) -> Option<String> {
    lazyblk_image_format::parse_digest(manifest).ok()?;
    Some(manifest.replacen(':', "-", 1))
}

impl AutoRecorder {
    /// Records into `dir` (made 0700) from the access logs the devices publish under `run_dir`.
    pub fn new(dir: PathBuf, run_dir: PathBuf, limits: RecordLimits) -> std::io::Result<Self> {
        crate::process::private_dir(&dir)?;
        Ok(AutoRecorder {
            dir,
            run_dir,
            limits,
            active: Arc::default(),
        })
    }

    /// Where the trace of `manifest` is (or would be) kept.
    pub fn path_of(&self, manifest: &str) -> Option<PathBuf> {
        Some(self.dir.join(format!("{}.trace", file_stem(manifest)?)))
    }

    /// Starts recording a container start of `image` (manifest `manifest`) whose layers have the
    /// index digests `layers`, unless this node has a trace of that manifest or is recording it.
    /// Returns whether a recording began.
    pub fn begin(
        &self,
        image: &str,
        manifest: &str,
        layers: HashSet<String>,
        rt: &tokio::runtime::Handle,
    ) -> bool {
        let Some(path) = self.path_of(manifest) else {
            return false;
        };
        if layers.is_empty() || path.exists() {
            return false;
        }
        {
            let mut active = self.active.lock().expect("recorder lock");
            if active.contains(manifest) {
                return false;
            }
            if active.len() >= self.limits.concurrent {
                tracing::info!(
                    image,
                    manifest,
                    recording = active.len(),
                    "not recording this start: as many recordings as allowed run already"
                );
                return false;
            }
            active.insert(manifest.to_string());
        }
        tracing::info!(
            image,
            manifest,
            "recording the startup trace of a first start"
        );
        let me = self.clone();
        let (image, manifest) = (image.to_string(), manifest.to_string());
        rt.spawn(async move {
            match me.record(&image, &layers, &path).await {
                Ok(Some(t)) => tracing::info!(
                    image,
                    manifest,
                    layers = t.layers.len(),
                    chunks = t.chunk_count(),
                    path = %path.display(),
                    "startup trace recorded; ship it to other nodes with `lazyblk trace push IMAGE FILE`"
                ),
                Ok(None) => tracing::info!(
                    image,
                    manifest,
                    "no read of the image's layers while recording; no trace kept"
                ),
                Err(e) => {
                    tracing::warn!(image, manifest, error = %e, "recording a startup trace failed")
                }
            }
            me.active.lock().expect("recorder lock").remove(&manifest);
        });
        true
    }

    /// First reads of `layers` published so far (the logs are read on the blocking pool).
    async fn reads(&self, layers: &HashSet<String>) -> usize {
        let (run_dir, layers) = (self.run_dir.clone(), layers.clone());
        tokio::task::spawn_blocking(move || count_first_reads(&run_dir, &layers))
            .await
            .unwrap_or(0)
    }

    async fn record(
        &self,
        image: &str,
        layers: &HashSet<String>,
        path: &Path,
    ) -> std::io::Result<Option<Trace>> {
        let start_ms = now_ms();
        let started = Instant::now();
        let before = self.reads(layers).await;
        let (mut seen, mut changed) = (before, Instant::now());
        loop {
            tokio::time::sleep(self.limits.poll).await;
            let n = self.reads(layers).await;
            if n != seen {
                (seen, changed) = (n, Instant::now());
            }
            if (seen > before && changed.elapsed() >= self.limits.idle)
                || started.elapsed() >= self.limits.max
            {
                break;
            }
        }
        if seen == before {
            return Ok(None);
        }
        let end_ms = now_ms();
        // Let every publisher write what it saw up to now.
        tokio::time::sleep(super::publish::PUBLISH_INTERVAL * 3).await;
        let window = Window {
            start_ms,
            end_ms,
            only_after_start: false,
        };
        // Reading the logs, writing (fsync) and pruning are file work: on the blocking pool.
        let (me, layers, path, image) = (
            self.clone(),
            layers.clone(),
            path.to_path_buf(),
            image.to_string(),
        );
        tokio::task::spawn_blocking(move || me.keep(window, &layers, &path, &image))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Writes the trace of `layers` in `window` to `path` (and the image beside it), then prunes.
    fn keep(
        &self,
        window: Window,
        layers: &HashSet<String>,
        path: &Path,
        image: &str,
    ) -> std::io::Result<Option<Trace>> {
        let mut trace = collect(&self.run_dir, window)?;
        trace.layers.retain(|l| layers.contains(&l.index_digest));
        if trace.layers.is_empty() {
            return Ok(None);
        }
        // (Created 0600, like every file write_atomic makes.)
        crate::process::write_atomic(path, &trace.to_bytes())?;
        crate::process::write_atomic(&path.with_extension("image"), image.as_bytes())?;
        self.prune();
        Ok(Some(trace))
    }

    /// Keeps the newest [`RecordLimits::keep`] traces.
    fn prune(&self) {
        let Ok(mut all) = list(&self.dir) else {
            return;
        };
        if all.len() <= self.limits.keep {
            return;
        }
        let age = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH)
        };
        all.sort_by_key(|r| std::cmp::Reverse(age(&r.path)));
        for r in &all[self.limits.keep..] {
            let _ = std::fs::remove_file(&r.path);
            let _ = std::fs::remove_file(r.path.with_extension("image"));
        }
    }
}

/// The traces recorded in `dir`, by image. Unreadable entries are skipped with a log line.
pub fn list(dir: &Path) -> std::io::Result<Vec<Recorded>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".trace"))
        else {
            continue;
        };
        let manifest = stem.replacen('-', ":", 1);
        if lazyblk_image_format::parse_digest(&manifest).is_err() {
            continue;
        }
        let trace = match Trace::read_file(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping a recorded trace");
                continue;
            }
        };
        let image = std::fs::read_to_string(path.with_extension("image"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        out.push(Recorded {
            image,
            manifest,
            layers: trace.layers.len(),
            chunks: trace.chunk_count(),
            path,
        });
    }
    out.sort_by(|a, b| (&a.image, &a.manifest).cmp(&(&b.image, &b.manifest)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::engine::ChunkAccess;
    use crate::trace::publish::AccessFile;

    fn publish(run: &Path, dev: &str, digest: &str, chunks: &[u64]) {
        let f = AccessFile {
            index_digest: digest.into(),
            source: format!("src-{dev}"),
            opened_ms: now_ms(),
            accesses: chunks
                .iter()
                .map(|&chunk| ChunkAccess { chunk, ms: 0 })
                .collect(),
        };
        let p = run.join(format!("devices/{dev}.access.json"));
        std::fs::write(&p, serde_json::to_vec(&f).unwrap()).unwrap();
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn limits() -> RecordLimits {
        RecordLimits {
            idle: Duration::from_millis(300),
            max: Duration::from_secs(20),
            keep: 2,
            poll: Duration::from_millis(50),
            concurrent: 2,
        }
    }

    async fn wait_idle(r: &AutoRecorder) {
        while !r.active.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_start_leaves_its_layers_reads_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("devices")).unwrap();
        let r = AutoRecorder::new(d.path().join("rec"), run.clone(), limits()).unwrap();
        let (a, b, other) = (digest('a'), digest('b'), digest('c'));
        // Read at the pull (the mount), before the container starts.
        publish(&run, "loop1", &a, &[0]);
        let manifest = digest('d');
        let rt = tokio::runtime::Handle::current();
        let layers: HashSet<String> = [a.clone(), b.clone()].into();
        assert!(r.begin("reg/app:v1", &manifest, layers.clone(), &rt));
        assert!(
            !r.begin("reg/app:v1", &manifest, layers.clone(), &rt),
            "one recording per manifest"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        publish(&run, "loop1", &a, &[0, 5, 3]);
        publish(&run, "loop2", &b, &[9]);
        publish(&run, "loop3", &other, &[1, 2]);
        wait_idle(&r).await;
        let path = r.path_of(&manifest).unwrap();
        let t = Trace::read_file(&path).unwrap();
        assert_eq!(t.layers.len(), 2, "{t:?}");
        let la = t.layers.iter().find(|l| l.index_digest == a).unwrap();
        assert_eq!(la.chunks, vec![0, 5, 3]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let listed = list(&d.path().join("rec")).unwrap();
        assert_eq!(
            listed,
            vec![Recorded {
                image: "reg/app:v1".into(),
                manifest: manifest.clone(),
                path: path.clone(),
                layers: 2,
                chunks: 4,
            }]
        );
        // Recorded once: a later start of the same image records nothing.
        assert!(!r.begin("reg/app:v1", &manifest, layers.clone(), &rt));
        // At most `concurrent` recordings at once.
        assert!(r.begin("reg/a:1", &digest('1'), layers.clone(), &rt));
        assert!(r.begin("reg/b:1", &digest('2'), layers.clone(), &rt));
        assert!(!r.begin("reg/c:1", &digest('3'), layers.clone(), &rt));
        publish(&run, "loop2", &b, &[9, 10]);
        wait_idle(&r).await;
        assert!(
            r.begin("reg/c:1", &digest('3'), layers, &rt),
            "a slot is free again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_read_no_trace_and_old_traces_are_pruned() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("devices")).unwrap();
        let mut l = limits();
        l.max = Duration::from_millis(400);
        let r = AutoRecorder::new(d.path().join("rec"), run.clone(), l).unwrap();
        let rt = tokio::runtime::Handle::current();
        let a = digest('a');
        publish(&run, "loop1", &a, &[0, 1]);
        // Nothing read after the start: the recording gives up at `max` and keeps nothing.
        assert!(r.begin("reg/x:1", &digest('1'), [a.clone()].into(), &rt));
        wait_idle(&r).await;
        assert!(list(&d.path().join("rec")).unwrap().is_empty());
        // Labels are untrusted: a malformed manifest digest records nothing.
        assert!(!r.begin("reg/x:1", "sha256:../../etc", [a.clone()].into(), &rt));
        for (i, m) in ['2', '3', '4'].into_iter().enumerate() {
            assert!(r.begin("reg/x:1", &digest(m), [a.clone()].into(), &rt));
            tokio::time::sleep(Duration::from_millis(100)).await;
            let reads: Vec<u64> = (0..3 + i as u64).collect();
            publish(&run, "loop1", &a, &reads);
            wait_idle(&r).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left: Vec<String> = list(&d.path().join("rec"))
            .unwrap()
            .into_iter()
            .map(|r| r.manifest)
            .collect();
        assert_eq!(left, vec![digest('3'), digest('4')], "the oldest is pruned");
        assert!(!d
            .path()
            .join("rec/sha256-".to_string() + &"2".repeat(64) + ".image")
            .exists());
    }
}
