//! A persistent, content-addressed cache of stored chunks, shared by every layer on a node.
//!
//! Files are named by the SHA-256 of the stored (compressed) chunk bytes, so identical chunks of
//! different layers and images are fetched once. Writes go to a temporary file renamed into place; every
//! read re-verifies the digest, so a torn or corrupted file is deleted and refetched, never served. The
//! total size is bounded; the least recently used files are evicted.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lazyblk_image_format::{sha256, Digest};
use lru::LruCache;

/// The cache directory and its accounting.
pub struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

struct State {
    lru: LruCache<Digest, u64>,
    total: u64,
}

impl DiskCache {
    /// Opens (creating, mode 0700) a cache under `dir` bounded to `max_bytes`. Leftover temporary files
    /// of a crashed writer are removed; existing entries are adopted oldest first.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<DiskCache> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut entries = Vec::new();
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".tmp") {
                    // `<digest>.<pid>-<n>.tmp`: only a writer that is gone leaves its file behind;
                    // another live process sharing the cache may be writing this one.
                    let pid = stem
                        .rsplit('.')
                        .next()
                        .and_then(|p| p.split('-').next())
                        .and_then(|p| p.parse::<u32>().ok());
                    let live = pid.is_some_and(|p| {
                        p != std::process::id() && Path::new(&format!("/proc/{p}")).exists()
                    });
                    if !live {
                        let _ = fs::remove_file(f.path());
                    }
                    continue;
                }
                let mut d = [0u8; 32];
                if name.len() != 64 || hex::decode_to_slice(&name, &mut d).is_err() {
                    continue;
                }
                let md = f.metadata()?;
                entries.push((md.mtime(), d, md.len()));
            }
        }
        entries.sort();
        let mut state = State {
            lru: LruCache::unbounded(),
            total: 0,
        };
        for (_, d, len) in entries {
            state.lru.put(d, len);
            state.total += len;
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
        };
        cache.evict();
        Ok(cache)
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let h = hex::encode(d);
        self.dir.join(&h[..2]).join(h)
    }

    /// Bytes currently cached.
    pub fn total_bytes(&self) -> u64 {
        self.state.lock().expect("cache lock").total
    }

    /// True if `d` is cached (without reading it): known here and its file still there. A file
    /// removed behind the cache's back (a cleanup, an operator) is forgotten, so a layer is never
    /// called complete — and the registry never called unneeded — on chunks that are gone.
    pub fn contains(&self, d: &Digest) -> bool {
        if !self.state.lock().expect("cache lock").lru.contains(d) {
            return false;
        }
        if self.path(d).exists() {
            return true;
        }
        self.forget(d);
        false
    }

    /// The stored bytes with digest `d`, verified; `None` if absent or damaged (damaged files are removed).
    pub fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        self.get_decoded(d, |data| {
            if &sha256(&data) == d {
                Ok(data)
            } else {
                Err("the file does not match its digest")
            }
        })
    }

    /// The entry with digest `d` passed through `decode`, which must verify the digest itself (the
    /// engine's chunk decoder does: the bytes are hashed once, not once here and again there); `None`
    /// if absent or if `decode` rejects it (the entry is then removed, like a damaged one in
    /// [`DiskCache::get`]).
    pub fn get_decoded<T, E: std::fmt::Display>(
        &self,
        d: &Digest,
        decode: impl FnOnce(Vec<u8>) -> Result<T, E>,
    ) -> Option<T> {
        if !self.state.lock().expect("cache lock").lru.contains(d) {
            return None;
        }
        let path = self.path(d);
        let Ok(data) = fs::read(&path) else {
            self.forget(d);
            return None;
        };
        match decode(data) {
            Ok(v) => {
                self.state.lock().expect("cache lock").lru.get(d);
                Some(v)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "disk cache entry rejected; removed");
                self.forget(d);
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `data`, whose SHA-256 the caller has verified to be `d`.
    pub fn put(&self, d: &Digest, data: &[u8]) -> io::Result<()> {
        if self.contains(d) {
            return Ok(());
        }
        let path = self.path(d);
        fs::create_dir_all(path.parent().expect("fanout dir"))?;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{n}.tmp", std::process::id()));
        let written = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(data))
            .and_then(|_| fs::rename(&tmp, &path));
        if let Err(e) = written {
            // A failed write (disk full, say) leaves nothing behind.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        {
            let mut s = self.state.lock().expect("cache lock");
            if s.lru.put(*d, data.len() as u64).is_none() {
                s.total += data.len() as u64;
            }
        }
        self.evict();
        Ok(())
    }

    fn forget(&self, d: &Digest) {
        let mut s = self.state.lock().expect("cache lock");
        if let Some(len) = s.lru.pop(d) {
            s.total -= len;
        }
    }

    /// Pins `digests` (the chunks of a fully cached layer in use) against eviction by any process
    /// sharing this directory, for as long as the calling process lives or until
    /// [`DiskCache::unpin`]. Returns the pin file.
    pub fn pin(&self, name: &str, digests: impl Iterator<Item = Digest>) -> io::Result<PathBuf> {
        let dir = self.dir.join("pins");
        fs::create_dir_all(&dir)?;
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(80)
            .collect();
        let path = dir.join(format!("{}-{safe}.pin", std::process::id()));
        let body: String = digests.map(|d| hex::encode(d) + "\n").collect();
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, body)?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Removes a pin made by [`DiskCache::pin`].
    pub fn unpin(path: &Path) {
        let _ = fs::remove_file(path);
    }

    /// Digests pinned by live processes (pins of dead ones are ignored and removed).
    fn pinned(&self) -> std::collections::HashSet<Digest> {
        let mut out = std::collections::HashSet::new();
        let Ok(rd) = fs::read_dir(self.dir.join("pins")) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_suffix(".pin")
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !crate::process::pid_alive(pid) {
                let _ = fs::remove_file(e.path());
                continue;
            }
            for line in fs::read_to_string(e.path()).unwrap_or_default().lines() {
                let mut d = [0u8; 32];
                if hex::decode_to_slice(line.trim(), &mut d).is_ok() {
                    out.insert(d);
                }
            }
        }
        out
    }

    fn evict(&self) {
        if self.state.lock().expect("cache lock").total <= self.max_bytes {
            return;
        }
        let pinned = self.pinned();
        let mut skipped = Vec::new();
        loop {
            let victim = {
                let mut s = self.state.lock().expect("cache lock");
                if s.total <= self.max_bytes {
                    break;
                }
                match s.lru.pop_lru() {
                    Some((d, len)) if pinned.contains(&d) => {
                        skipped.push((d, len));
                        continue;
                    }
                    Some((d, len)) => {
                        s.total -= len;
                        d
                    }
                    None => break,
                }
            };
            let _ = fs::remove_file(self.path(&victim));
        }
        // Pinned entries stay, as the least recently used again.
        let mut s = self.state.lock().expect("cache lock");
        let rest: Vec<_> = std::iter::from_fn(|| s.lru.pop_lru()).collect();
        for (d, len) in skipped.into_iter().chain(rest) {
            s.lru.put(d, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_chunks_survive_eviction_while_their_process_lives() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 250).unwrap();
        let (a, b) = (vec![1u8; 100], vec![2u8; 100]);
        let (da, db) = (sha256(&a), sha256(&b));
        c.put(&da, &a).unwrap();
        c.put(&db, &b).unwrap();
        let pin = c.pin("layer a", [da].into_iter()).unwrap();
        // A pin of a dead process is ignored (and cleaned up).
        std::fs::write(
            dir.path().join("pins/999999999-x.pin"),
            hex::encode(db) + "\n",
        )
        .unwrap();
        let e = vec![3u8; 100];
        c.put(&sha256(&e), &e).unwrap(); // over budget: b (unpinned) goes, a (oldest but pinned) stays
        assert!(c.get(&da).is_some());
        assert!(c.get(&db).is_none());
        assert!(!dir.path().join("pins/999999999-x.pin").exists());
        DiskCache::unpin(&pin);
        for k in 4..6u8 {
            let f = vec![k; 100];
            c.put(&sha256(&f), &f).unwrap();
        }
        assert!(
            c.get(&da).is_none(),
            "unpinned: evicted like any other entry"
        );
        assert!(c.total_bytes() <= 250);
    }

    #[test]
    fn a_file_removed_behind_its_back_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let a = vec![7u8; 100];
        c.put(&sha256(&a), &a).unwrap();
        assert!(c.contains(&sha256(&a)));
        std::fs::remove_file(c.path(&sha256(&a))).unwrap();
        assert!(!c.contains(&sha256(&a)));
        assert_eq!(c.total_bytes(), 0);
    }

    #[test]
    fn verifies_evicts_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 250).unwrap();
        let a = vec![1u8; 100];
        let b = vec![2u8; 100];
        let e = vec![3u8; 100];
        c.put(&sha256(&a), &a).unwrap();
        c.put(&sha256(&b), &b).unwrap();
        assert_eq!(c.get(&sha256(&a)).unwrap(), a); // a is now most recent
        c.put(&sha256(&e), &e).unwrap(); // evicts b
        assert!(c.get(&sha256(&b)).is_none());
        assert_eq!(c.total_bytes(), 200);
        // Torn/corrupted file: detected and removed, never returned.
        let p = c.path(&sha256(&a));
        fs::write(&p, &a[..50]).unwrap();
        assert!(c.get(&sha256(&a)).is_none());
        assert!(!p.exists());
        // A leftover temp file of a dead writer is cleaned, a live process's (pid 1) is not;
        // entries are adopted on reopen.
        let dead = c.path(&sha256(&e)).with_extension("4194305-0.tmp");
        let live = c.path(&sha256(&e)).with_extension("1-0.tmp");
        fs::write(&dead, b"junk").unwrap();
        fs::write(&live, b"being written").unwrap();
        drop(c);
        let c = DiskCache::open(dir.path(), 250).unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
        assert_eq!(c.get(&sha256(&e)).unwrap(), e);
        assert_eq!(c.total_bytes(), 100);
    }

    #[test]
    fn get_decoded_serves_what_its_decoder_accepts_and_removes_what_it_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let a = vec![5u8; 100];
        let d = sha256(&a);
        c.put(&d, &a).unwrap();
        let check = |b: Vec<u8>| {
            if sha256(&b) == d {
                Ok(b.len())
            } else {
                Err("digest mismatch")
            }
        };
        assert_eq!(c.get_decoded(&d, check), Some(100));
        // A damaged file: the decoder's verdict removes it.
        fs::write(c.path(&d), &a[..60]).unwrap();
        assert_eq!(c.get_decoded(&d, check), None);
        assert!(!c.path(&d).exists());
        assert!(!c.contains(&d));
        assert_eq!(c.total_bytes(), 0);
        // Absent: the decoder is not called.
        assert_eq!(
            c.get_decoded(&d, |_| -> Result<(), &str> { panic!("called") }),
            None
        );
    }
}
