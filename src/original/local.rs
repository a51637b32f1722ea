//! A local copy of an original layer blob, downloaded start to end at the link's speed.
//!
//! An original-image index serves file data by decoding spans of the layer's own compressed stream,
//! and proving the index needs one pass that decodes the whole layer (see [`super::verify`]): CPU
//! work, far slower than the link on a small node. Done straight from the registry, that pass keeps
//! the registry a runtime dependency for as long as the CPU takes. Instead the compressed blob is
//! first copied to the node's cache directory as fast as the fill scheduler allows (demand reads
//! first, [`FillGate`]); spans the copy holds are read from the file, verified bytes that demand
//! reads had to fetch from the registry go into the copy (its download skips them), and the proving
//! pass reads the file.
//!
//! The copy is never trusted: whatever is read from it goes through the same per-span (or per-piece)
//! SHA-256 check as bytes from the registry, and the proving pass checks the whole layer's digest.
//! A check that fails on bytes from the copy discards the copy, and reads go to the registry again.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::fetch::fill::{FillGate, LayerActivity};
use crate::fetch::remote::{FetchError, RangeReader};
use crate::fetch::BoxFuture;

/// Bytes per download request (a quarter while demand reads run, see [`FillGate::batch_bytes`]).
const PIECE: u64 = 4 << 20;
/// Download requests in flight per layer (hides a round trip between pieces).
const DEPTH: usize = 2;
/// Tries per piece before the download fails.
const TRIES: u32 = 6;

/// See the module docs.
pub struct LocalCopy {
    remote: Arc<dyn RangeReader>,
    path: PathBuf,
    file: Arc<File>,
    /// The layer's size, once the download has started (`u64::MAX` before).
    size: AtomicU64,
    /// The byte ranges in the file (the download's, and verified bytes demand reads fetched ahead
    /// of it).
    have: std::sync::Mutex<Ranges>,
    /// Cleared for good when the copy is discarded.
    usable: AtomicBool,
    downloaded: AtomicU64,
}

impl LocalCopy {
    /// An empty copy of `remote` in a new file `path` (mode 0600; removed when the copy is dropped).
    pub fn create(remote: Arc<dyn RangeReader>, path: &Path) -> std::io::Result<LocalCopy> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(LocalCopy {
            remote,
            path: path.to_path_buf(),
            file: Arc::new(file),
            size: AtomicU64::new(u64::MAX),
            have: std::sync::Mutex::new(Ranges::default()),
            usable: AtomicBool::new(true),
            downloaded: AtomicU64::new(0),
        })
    }

    /// Whether `range` can be read from the file.
    pub fn covers(&self, range: &Range<u64>) -> bool {
        self.usable.load(Relaxed) && self.have.lock().expect("ranges lock").covers(range)
    }

    /// Whether the whole layer is in the file.
    pub fn complete(&self) -> bool {
        let size = self.size.load(Relaxed);
        size != u64::MAX && self.covers(&(0..size))
    }

    /// Bytes this copy downloaded.
    pub fn downloaded_bytes(&self) -> u64 {
        self.downloaded.load(Relaxed)
    }

    /// Reads `range` from the file (the caller checked [`LocalCopy::covers`]).
    pub async fn read_local(&self, range: Range<u64>) -> Result<Bytes, FetchError> {
        let (file, path) = (self.file.clone(), self.path.display().to_string());
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map(|_| Bytes::from(buf))
                .map_err(|e| FetchError::transient("io", format!("{path}: reading {range:?}: {e}")))
        })
        .await
        .map_err(|e| FetchError::permanent("internal", format!("read task: {e}")))?
    }

    /// Forgets the copy (bytes from it failed a check, or the disk failed): reads go to the
    /// registry from now on, and the file is emptied.
    pub fn discard(&self, why: &str) {
        if self.usable.load(Relaxed) {
            tracing::warn!(layer = %self.remote.describe(), file = %self.path.display(), reason = why, "discarding the local copy of an original layer");
        }
        self.release();
    }

    /// Empties the copy and stops serving from it, quietly (its layer is complete in the disk cache,
    /// or there is no room for it).
    pub fn release(&self) {
        self.usable.store(false, Relaxed);
        self.have.lock().expect("ranges lock").clear();
        let _ = self.file.set_len(0);
    }

    /// Keeps `bytes` (verified bytes of `range` a demand read fetched from the registry) in the copy,
    /// in the background, so that the download does not fetch them again.
    pub fn offer(self: &Arc<Self>, range: Range<u64>, bytes: Bytes) {
        if !self.usable.load(Relaxed) || self.covers(&range) {
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if me.usable.load(Relaxed)
                && me.file.write_all_at(&bytes, range.start).is_ok()
                && me.usable.load(Relaxed)
            {
                me.have.lock().expect("ranges lock").insert(range);
            }
        });
    }

    /// The next range from `at` that is not in the file yet, at most `len` bytes and not past `size`.
    fn next_gap(&self, at: u64, len: u64, size: u64) -> Option<Range<u64>> {
        let have = self.have.lock().expect("ranges lock");
        let start = have.end_of_run(at);
        (start < size).then(|| start..(start + len).min(size).min(have.next_start(start)))
    }

    /// Downloads the layer (`size` bytes, from the verified span table) into the file, in order, a
    /// piece at a time through `gate` (as a fill of the layer whose demand reads are `layer`),
    /// skipping what demand reads brought already. Returns when the copy is complete, or the first
    /// piece that failed for good.
    pub async fn download(
        &self,
        size: u64,
        gate: Option<(&FillGate, &LayerActivity)>,
    ) -> Result<(), String> {
        use futures::StreamExt;
        self.size.store(size, Relaxed);
        let mut next = 0;
        let mut running = futures::stream::FuturesOrdered::new();
        loop {
            while running.len() < DEPTH {
                let len = gate.map_or(PIECE, |(g, _)| g.batch_bytes(PIECE));
                let Some(r) = self.next_gap(next, len, size) else {
                    break;
                };
                next = r.end;
                running.push_back(self.piece(r, gate));
            }
            let Some(done) = running.next().await else {
                return Ok(());
            };
            let (r, bytes) = done?;
            if !self.usable.load(Relaxed) {
                return Err("the local copy was discarded".into());
            }
            let file = self.file.clone();
            let at = r.start;
            tokio::task::spawn_blocking(move || file.write_all_at(&bytes, at))
                .await
                .map_err(|e| format!("write task: {e}"))?
                .map_err(|e| {
                    self.discard("write failed");
                    format!("{}: writing {r:?}: {e}", self.path.display())
                })?;
            self.have.lock().expect("ranges lock").insert(r);
        }
    }

    async fn piece(
        &self,
        r: Range<u64>,
        gate: Option<(&FillGate, &LayerActivity)>,
    ) -> Result<(Range<u64>, Bytes), String> {
        let mut tries = 0;
        loop {
            let _permit = match gate {
                Some((g, layer)) => Some(g.admit(r.end - r.start, layer).await),
                None => None,
            };
            let res = self.remote.read_range(r.clone()).await;
            drop(_permit);
            match res {
                Ok(b) if b.len() as u64 == r.end - r.start => {
                    self.downloaded.fetch_add(b.len() as u64, Relaxed);
                    return Ok((r, b));
                }
                Ok(b) => {
                    return Err(format!(
                        "{}: {} bytes for bytes {}..{}",
                        self.remote.describe(),
                        b.len(),
                        r.start,
                        r.end
                    ))
                }
                Err(e) if e.retryable && tries + 1 < TRIES => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

impl Drop for LocalCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Disjoint, non-adjacent byte ranges (start → end), merged on insert.
#[derive(Debug, Default)]
struct Ranges(std::collections::BTreeMap<u64, u64>);

impl Ranges {
    fn covers(&self, r: &Range<u64>) -> bool {
        r.is_empty()
            || self
                .0
                .range(..=r.start)
                .next_back()
                .is_some_and(|(_, &e)| e >= r.end)
    }

    fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // Merge with every range that overlaps or touches [start, end].
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let touching: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in touching {
            let e = self.0.remove(&s).expect("listed");
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// `at`, or the end of the range holding it.
    fn end_of_run(&self, at: u64) -> u64 {
        match self.0.range(..=at).next_back() {
            Some((_, &e)) if e > at => e,
            _ => at,
        }
    }

    /// The start of the first range after `at` (`u64::MAX` if none).
    fn next_start(&self, at: u64) -> u64 {
        self.0.range(at + 1..).next().map_or(u64::MAX, |(&s, _)| s)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The directory of a node's local copies and their disk budget: copies are transient (a layer's is
/// released once its proving pass has put its file data in the chunk cache), and together they never
/// hold more than the budget; a layer that does not fit fills from the registry as before.
pub struct CopyDir {
    dir: PathBuf,
    free: Arc<std::sync::Mutex<u64>>,
    next: AtomicU64,
}

/// Bytes of a [`CopyDir`]'s budget held by one copy until dropped.
pub struct Reservation {
    free: Arc<std::sync::Mutex<u64>>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        *self.free.lock().expect("copy budget lock") += self.bytes;
    }
}

impl CopyDir {
    /// Opens (creating, mode 0700) `dir` with `budget` bytes, removing copies a dead process (or an
    /// earlier run of this one's pid) left.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<CopyDir> {
        crate::process::private_dir(dir)?;
        for f in std::fs::read_dir(dir)?.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let live = pid.is_some_and(|p| p != std::process::id() && crate::process::pid_alive(p));
            if !live {
                let _ = std::fs::remove_file(f.path());
            }
        }
        Ok(CopyDir {
            dir: dir.to_path_buf(),
            free: Arc::new(std::sync::Mutex::new(budget)),
            next: AtomicU64::new(0),
        })
    }

    /// A new file name for a copy (the directory is made again, 0700, if someone removed it from
    /// the cache directory: an operator clearing the cache).
    pub fn new_path(&self) -> PathBuf {
        if !self.dir.is_dir() && self.dir.parent().is_some_and(Path::is_dir) {
            let _ = crate::process::private_dir(&self.dir);
        }
        let n = self.next.fetch_add(1, Relaxed);
        self.dir.join(format!("{}-{n}.blob", std::process::id()))
    }

    /// Takes `bytes` of the budget, if they are free.
    pub fn reserve(&self, bytes: u64) -> Option<Reservation> {
        let mut free = self.free.lock().expect("copy budget lock");
        if *free < bytes {
            return None;
        }
        *free -= bytes;
        Some(Reservation {
            free: self.free.clone(),
            bytes,
        })
    }
}

/// The copy as a range reader of the file alone (for the proving pass, once it is complete).
pub struct LocalFile(pub Arc<LocalCopy>);

impl RangeReader for LocalFile {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            if !self.0.covers(&range) {
                return Err(FetchError::permanent(
                    "io",
                    format!("{}: {range:?} is not in the local copy", self.describe()),
                ));
            }
            self.0.read_local(range).await
        })
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, FetchError>> {
        let s = self.0.size.load(Relaxed);
        Box::pin(async move {
            if s == u64::MAX {
                return Err(FetchError::permanent(
                    "io",
                    "the local copy has no size yet",
                ));
            }
            Ok(s)
        })
    }

    fn describe(&self) -> String {
        format!("{} (local copy)", self.0.remote.describe())
    }

    fn distrust(&self) {
        self.0.discard("its bytes failed verification");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::remote::FileRange;

    fn blob(dir: &Path, n: usize) -> (Arc<dyn RangeReader>, Vec<u8>) {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let p = dir.join("blob");
        std::fs::write(&p, &data).unwrap();
        (Arc::new(FileRange::open(&p).unwrap()), data)
    }

    #[tokio::test]
    async fn a_download_copies_the_blob_in_order_and_reads_come_from_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, data) = blob(tmp.path(), (9 << 20) + 123);
        let copy = Arc::new(LocalCopy::create(remote, &tmp.path().join("copy")).unwrap());
        assert!(!copy.covers(&(0..1)));
        let gate = FillGate::new(2, 1, None);
        copy.download(data.len() as u64, Some((&gate, &LayerActivity::default())))
            .await
            .unwrap();
        assert!(copy.complete());
        assert_eq!(copy.downloaded_bytes(), data.len() as u64);
        let r = (5 << 20) - 7..(5 << 20) + 1000;
        let local = LocalFile(copy.clone());
        assert_eq!(
            local.read_range(r.clone()).await.unwrap(),
            data[r.start as usize..r.end as usize]
        );
        assert_eq!(local.size().await.unwrap(), data.len() as u64);
        // Distrusted (a span from it failed its digest): emptied, and nothing is read from it.
        local.distrust();
        assert!(!copy.complete() && !copy.covers(&(0..1)));
        assert!(local.read_range(0..1).await.is_err());
        assert_eq!(std::fs::metadata(tmp.path().join("copy")).unwrap().len(), 0);
        drop(local);
        drop(copy);
        assert!(!tmp.path().join("copy").exists());
    }

    #[test]
    fn ranges_merge_and_report_gaps() {
        let mut r = Ranges::default();
        r.insert(10..20);
        r.insert(30..40);
        assert!(r.covers(&(12..20)) && !r.covers(&(15..25)) && !r.covers(&(0..1)));
        assert_eq!(
            (r.end_of_run(0), r.end_of_run(10), r.end_of_run(20)),
            (0, 20, 20)
        );
        assert_eq!(
            (r.next_start(0), r.next_start(20), r.next_start(30)),
            (10, 30, u64::MAX)
        );
        r.insert(20..30); // touching both: one range
        assert_eq!(r.0.len(), 1);
        assert!(r.covers(&(10..40)));
        r.insert(5..50);
        assert_eq!(r.0.iter().collect::<Vec<_>>(), vec![(&5, &50)]);
        r.insert(60..70);
        r.insert(0..1);
        assert_eq!(r.0.len(), 3);
    }

    #[tokio::test]
    async fn the_download_skips_what_demand_reads_brought() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, data) = blob(tmp.path(), 10 << 20);
        let copy = Arc::new(LocalCopy::create(remote, &tmp.path().join("copy")).unwrap());
        // A demand read fetched (and verified) 1 MiB in the middle, ahead of the download.
        let mid = (5 << 20)..(6 << 20);
        copy.offer(
            mid.clone(),
            Bytes::copy_from_slice(&data[mid.start as usize..mid.end as usize]),
        );
        for _ in 0..200 {
            if copy.covers(&mid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(copy.covers(&mid));
        copy.download(data.len() as u64, None).await.unwrap();
        assert!(copy.complete());
        assert_eq!(copy.downloaded_bytes(), data.len() as u64 - (1 << 20));
        assert_eq!(std::fs::read(tmp.path().join("copy")).unwrap(), data);
    }

    #[test]
    fn the_budget_is_shared_and_given_back_and_stale_copies_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("originals");
        std::fs::create_dir(&dir).unwrap();
        // A copy of a process that is gone (pid 0 never names a process of ours).
        std::fs::write(dir.join("0-3.blob"), b"old").unwrap();
        let copies = CopyDir::open(&dir, 100).unwrap();
        assert!(!dir.join("0-3.blob").exists());
        let (a, b) = (copies.new_path(), copies.new_path());
        assert_ne!(a, b);
        let r = copies.reserve(60).unwrap();
        assert!(copies.reserve(50).is_none());
        drop(r);
        assert!(copies.reserve(100).is_some());
    }

    #[tokio::test]
    async fn a_short_source_fails_the_download_naming_the_range() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, data) = blob(tmp.path(), 1000);
        let copy = LocalCopy::create(remote, &tmp.path().join("copy")).unwrap();
        // The table claims more than the blob holds.
        let e = copy
            .download(data.len() as u64 + 10, None)
            .await
            .unwrap_err();
        assert!(e.contains("blob"), "{e}");
        assert!(!copy.complete());
    }
}
