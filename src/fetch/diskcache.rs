//! A persistent, content-addressed cache of stored chunks, shared by every layer on a node.
//!
//! Entries are keyed by the SHA-256 of the stored (compressed) chunk bytes, so identical chunks of
//! different layers and images are fetched once. They live as records in a few large **pack files**
//! (`packs/<pid>-<start>-<n>.pack`), not one file per chunk: a 12 GB image is ~48,000 chunks, and a
//! file each cost a create, a write and a rename per chunk (on a busy file system the inode
//! allocation alone was most of the daemon's CPU in a cold start) and as many inodes.
//!
//! - A process appends only to packs it created (named by its pid and start time), at 4 KiB-aligned
//!   offsets reserved under a lock and written outside it. A record is a 64-byte header (magic,
//!   digest, length) followed by the stored bytes. An entry becomes visible once its write returned.
//! - Every read re-verifies the digest (the caller's decoder does), so a torn, punched or corrupted
//!   record is dropped and refetched, never served.
//! - Eviction (least recently used, over a byte bound counted in whole aligned records) punches the
//!   record out of its pack (`FALLOC_FL_PUNCH_HOLE`), which returns its blocks to the file system; a
//!   pack with no records left is deleted once its writer is gone or is this process.
//! - On open, every pack is scanned (holes skipped with `SEEK_DATA`) and its records adopted; a tail
//!   cut short by a crash ends the scan of that pack. Files of the old one-file-per-chunk layout
//!   (`xx/<digest>`) are moved into a pack, verified, and removed.
//!
//! Other processes may share the directory: each sees the packs present when it opened plus its own.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lazyblk_image_format::{sha256, Digest};
use lru::LruCache;

use crate::process::ProcessId;

/// Records start at multiples of this, so a punched record frees whole blocks and a scan finds the
/// next header at an aligned offset.
const ALIGN: u64 = 4096;
/// Magic, digest (32), stored length (u32 LE), then zeros.
const HEADER_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"LZBCHNK1";
/// A pack is closed for appends past this size; the next record starts a new one.
const PACK_BYTES: u64 = 256 << 20;
/// Longest record a scan accepts (a chunk's stored bytes are far smaller); a longer length is not a
/// header.
const MAX_RECORD: u64 = 64 << 20;
const PACK_DIR: &str = "packs";

/// Bytes a record of `len` stored bytes takes in its pack: what the cache's bound counts.
pub fn record_bytes(len: usize) -> u64 {
    (HEADER_LEN + len as u64).div_ceil(ALIGN) * ALIGN
}

/// The cache directory and its accounting.
pub struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    pack_bytes: u64,
    me: ProcessId,
    state: Mutex<State>,
    compactor: Mutex<()>,
}

/// Where a record is: its pack, the offset of its header, its stored length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    pack: u32,
    offset: u64,
    len: u32,
}

struct Pack {
    file: Arc<File>,
    path: PathBuf,
    /// The process that appends to it (this one, or one that was running when it was adopted).
    writer: ProcessId,
    /// Records of it in the map, and their bytes.
    records: usize,
    live: u64,
    /// Appends reserved in it and not yet in the map.
    writing: usize,
}

struct State {
    lru: LruCache<Digest, Entry>,
    total: u64,
    packs: HashMap<u32, Pack>,
    next_id: u32,
    /// The pack this process appends to, and its end.
    current: Option<(u32, u64)>,
    seq: u64,
}

/// Work decided under the lock and done after it: holes to punch, packs to delete.
#[derive(Default)]
struct Cleanup {
    punch: Vec<(Arc<File>, u64, u64)>,
    delete: Vec<PathBuf>,
}

impl Cleanup {
    fn run(self) {
        for (file, offset, len) in self.punch {
            punch(&file, offset, len);
        }
        for path in self.delete {
            let _ = fs::remove_file(path);
        }
    }
}

impl DiskCache {
    /// Opens (creating, mode 0700) a cache under `dir` bounded to `max_bytes`. Existing packs are
    /// scanned and their records adopted, oldest pack first; files of the old one-file-per-chunk
    /// layout are moved into a pack.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<DiskCache> {
        DiskCache::open_with_pack_size(dir, max_bytes, PACK_BYTES)
    }

    fn open_with_pack_size(dir: &Path, max_bytes: u64, pack_bytes: u64) -> io::Result<DiskCache> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [dir.to_path_buf(), dir.join(PACK_DIR)] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            max_bytes,
            pack_bytes,
            me: ProcessId::current(),
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                total: 0,
                packs: HashMap::new(),
                next_id: 0,
                current: None,
                seq: 0,
            }),
            compactor: Mutex::new(()),
        };
        cache.adopt_packs()?;
        cache.migrate_one_file_per_chunk()?;
        if cache.evict() {
            cache.compact();
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("cache lock")
    }

    fn adopt_packs(&self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut found = Vec::new();
        for e in fs::read_dir(self.dir.join(PACK_DIR))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(writer) = name.strip_suffix(".pack").and_then(parse_pack_name) else {
                continue;
            };
            found.push((e.metadata()?.mtime(), e.path(), writer));
        }
        found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (_, path, writer) in found {
            let file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "disk cache pack unreadable; skipped");
                    continue;
                }
            };
            let records = scan(&file)?;
            let writer_alive = writer == self.me || writer.alive();
            let file = Arc::new(file);
            let mut cleanup = Cleanup::default();
            {
                let mut s = self.lock();
                let id = s.next_id;
                s.next_id += 1;
                let (mut adopted, mut live) = (0, 0);
                for (offset, d, len) in records {
                    if s.lru.contains(&d) {
                        if !writer_alive {
                            cleanup
                                .punch
                                .push((file.clone(), offset, record_bytes(len as usize)));
                        }
                        continue;
                    }
                    s.lru.put(
                        d,
                        Entry {
                            pack: id,
                            offset,
                            len,
                        },
                    );
                    s.total += record_bytes(len as usize);
                    live += record_bytes(len as usize);
                    adopted += 1;
                }
                if adopted == 0 && !writer_alive {
                    cleanup.delete.push(path);
                } else {
                    s.packs.insert(
                        id,
                        Pack {
                            file,
                            path,
                            writer,
                            records: adopted,
                            live,
                            writing: 0,
                        },
                    );
                }
            }
            cleanup.run();
        }
        Ok(())
    }

    /// Moves entries of the layout before packs (`xx/<digest>`, one file per chunk) into a pack,
    /// oldest first, each verified against its name; removes those files and a dead writer's
    /// `*.tmp` files (a live process of an older version may still be writing its own).
    fn migrate_one_file_per_chunk(&self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut old = Vec::new();
        for sub in fs::read_dir(&self.dir)? {
            let sub = sub?;
            let name = sub.file_name().to_string_lossy().into_owned();
            if name.len() != 2 || hex::decode(&name).is_err() || !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".tmp") {
                    // `<digest>.<pid>-<n>.tmp`
                    let pid = stem
                        .rsplit('.')
                        .next()
                        .and_then(|p| p.split('-').next())
                        .and_then(|p| p.parse::<u32>().ok());
                    if !pid.is_some_and(|p| p != self.me.pid && crate::process::pid_alive(p)) {
                        let _ = fs::remove_file(f.path());
                    }
                    continue;
                }
                let mut d = [0u8; 32];
                if name.len() == 64 && hex::decode_to_slice(&name, &mut d).is_ok() {
                    old.push((f.metadata()?.mtime(), d, f.path()));
                }
            }
        }
        if old.is_empty() {
            return Ok(());
        }
        old.sort();
        let (mut moved, mut dropped) = (0, 0);
        for (_, d, path) in &old {
            match fs::read(path) {
                Ok(data) if &sha256(&data) == d => {
                    self.put(d, &data)?;
                    moved += 1;
                }
                _ => dropped += 1,
            }
            let _ = fs::remove_file(path);
            if let Some(parent) = path.parent() {
                let _ = fs::remove_dir(parent); // only once empty
            }
        }
        tracing::info!(
            moved,
            dropped,
            "disk cache: one-file-per-chunk entries moved into packs"
        );
        Ok(())
    }

    /// Bytes currently cached (whole aligned records, headers included).
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    fn locate(&self, d: &Digest) -> Option<(Entry, Arc<File>)> {
        let s = self.lock();
        let e = *s.lru.peek(d)?;
        let file = s.packs.get(&e.pack)?.file.clone();
        Some((e, file))
    }

    /// True if `d` is cached (without reading it): known here, its pack still linked, and its
    /// record not punched out (by another process sharing the cache). A pack removed behind the
    /// cache's back (a cleanup, an operator) is forgotten, so a layer is never called complete — and
    /// the registry never called unneeded — on chunks that are gone.
    pub fn contains(&self, d: &Digest) -> bool {
        let Some((e, file)) = self.locate(d) else {
            return false;
        };
        if !linked(&file) {
            let mut s = self.lock();
            if s.packs
                .get(&e.pack)
                .is_some_and(|p| Arc::ptr_eq(&p.file, &file))
            {
                self.pack_gone(&mut s, e.pack);
            }
            return false;
        }
        if seek_data(&file, e.offset) == Some(e.offset) {
            return true;
        }
        self.forget(d, e);
        false
    }

    /// The stored bytes with digest `d`, verified; `None` if absent or damaged (damaged records are
    /// removed).
    pub fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        self.get_decoded(d, |data| {
            if &sha256(&data) == d {
                Ok(data)
            } else {
                Err("the record does not match its digest")
            }
        })
    }

    /// The entry with digest `d` passed through `decode`, which must verify the digest itself (the
    /// engine's chunk decoder does: the bytes are hashed once, not once here and again there); `None`
    /// if absent or if `decode` rejects it (the record is then removed, like a damaged one in
    /// [`DiskCache::get`]).
    pub fn get_decoded<T, E: std::fmt::Display>(
        &self,
        d: &Digest,
        decode: impl FnOnce(Vec<u8>) -> Result<T, E>,
    ) -> Option<T> {
        let (e, file) = self.locate(d)?;
        let mut data = vec![0u8; e.len as usize];
        if let Err(err) = file.read_exact_at(&mut data, e.offset + HEADER_LEN) {
            tracing::warn!(offset = e.offset, error = %err, "disk cache record unreadable; removed");
            self.forget(d, e);
            return None;
        }
        match decode(data) {
            Ok(v) => {
                self.lock().lru.get(d);
                Some(v)
            }
            Err(err) => {
                tracing::warn!(offset = e.offset, error = %err, "disk cache record rejected; removed");
                self.forget(d, e);
                None
            }
        }
    }

    /// Stores `data`, whose SHA-256 the caller has verified to be `d`.
    pub fn put(&self, d: &Digest, data: &[u8]) -> io::Result<()> {
        if self.contains(d) {
            return Ok(());
        }
        self.append(d, data, None)?;
        if self.evict() {
            self.compact();
        }
        Ok(())
    }

    /// Appends a record of `data` to this process's pack and maps `d` to it: a new entry, or (`moved`)
    /// the new place of the record `moved`, if `d` is still there.
    fn append(&self, d: &Digest, data: &[u8], moved: Option<Entry>) -> io::Result<()> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&l| l > 0 && u64::from(l) <= MAX_RECORD)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a {}-byte chunk does not fit a disk cache record",
                        data.len()
                    ),
                )
            })?;
        let rec = record_bytes(data.len());
        let (pack, file, offset) = self.reserve(rec)?;
        let written = file
            .write_all_at(&header(d, len), offset)
            .and_then(|_| file.write_all_at(data, offset + HEADER_LEN));
        let new = Entry { pack, offset, len };
        let mut cleanup = Cleanup::default();
        let result = {
            let mut s = self.lock();
            let Some(p) = s.packs.get_mut(&pack) else {
                // The pack was deleted behind the cache's back meanwhile: the record is lost.
                return Err(written.err().unwrap_or_else(|| {
                    io::Error::other("the disk cache pack was removed while being written")
                }));
            };
            p.writing -= 1;
            let wanted = match moved {
                None => !s.lru.contains(d), // else another writer of the same chunk was first
                Some(old) => s.lru.peek(d) == Some(&old), // else evicted or rejected meanwhile
            };
            match written {
                Ok(()) if wanted => {
                    let p = s.packs.get_mut(&pack).expect("checked");
                    p.records += 1;
                    p.live += rec;
                    if let Some(old) = moved {
                        *s.lru.peek_mut(d).expect("checked") = new;
                        if let Some(p) = s.packs.get_mut(&old.pack) {
                            p.records -= 1;
                            p.live -= rec;
                            cleanup.punch.push((p.file.clone(), old.offset, rec));
                        }
                        self.drop_if_empty(&mut s, old.pack, &mut cleanup);
                    } else {
                        s.lru.put(*d, new);
                        s.total += rec;
                    }
                    Ok(())
                }
                Ok(()) => {
                    cleanup.punch.push((file, offset, rec));
                    self.drop_if_empty(&mut s, pack, &mut cleanup);
                    Ok(())
                }
                Err(e) => {
                    // A failed write (disk full, say) leaves nothing behind.
                    cleanup.punch.push((file, offset, rec));
                    self.drop_if_empty(&mut s, pack, &mut cleanup);
                    Err(e)
                }
            }
        };
        cleanup.run();
        result
    }

    /// Moves the records left in mostly evicted packs into the current one and deletes those packs,
    /// so the number of packs (and open files) stays within `4 × bound / pack size + 1` however long
    /// the cache lives: a pack is compacted once its records fill a quarter of it or less. At most
    /// a quarter of a pack is rewritten per three quarters evicted. One compactor at a time.
    fn compact(&self) {
        let Ok(_one) = self.compactor.try_lock() else {
            return;
        };
        loop {
            let (id, records): (u32, Vec<(Digest, Entry)>) = {
                let s = self.lock();
                let current = s.current.map(|(c, _)| c);
                let Some(id) = s
                    .packs
                    .iter()
                    .filter(|(id, p)| {
                        Some(**id) != current && p.writing == 0 && p.live * 4 <= self.pack_bytes
                    })
                    .find(|(_, p)| p.writer == self.me || !p.writer.alive())
                    .map(|(id, _)| *id)
                else {
                    return;
                };
                let records = s
                    .lru
                    .iter()
                    .filter(|(_, e)| e.pack == id)
                    .map(|(d, e)| (*d, *e))
                    .collect();
                (id, records)
            };
            if records.is_empty() {
                // Only its deletion was left to do (an adopted pack of a process gone since).
                let mut cleanup = Cleanup::default();
                self.drop_if_empty(&mut self.lock(), id, &mut cleanup);
                if cleanup.delete.is_empty() {
                    return;
                }
                cleanup.run();
                continue;
            }
            for (d, e) in records {
                let Some((_, file)) = self.locate(&d) else {
                    continue;
                };
                let mut data = vec![0u8; e.len as usize];
                let read = file.read_exact_at(&mut data, e.offset + HEADER_LEN);
                if read.is_err() || sha256(&data) != d {
                    tracing::warn!(
                        offset = e.offset,
                        "disk cache record damaged; removed while compacting"
                    );
                    self.forget(&d, e);
                    continue;
                }
                if let Err(err) = self.append(&d, &data, Some(e)) {
                    tracing::warn!(error = %err, "disk cache compaction stopped");
                    return;
                }
            }
        }
    }

    /// Reserves `rec` bytes at the end of this process's current pack (a new one past the pack size).
    fn reserve(&self, rec: u64) -> io::Result<(u32, Arc<File>, u64)> {
        let mut cleanup = Cleanup::default();
        let mut s = self.lock();
        if let Some((id, _)) = s.current {
            let file = &s.packs.get(&id).expect("the current pack").file;
            if !linked(file) {
                // Deleted behind the cache's back (its directory emptied): start a new one.
                self.pack_gone(&mut s, id);
            }
        }
        let full = match s.current {
            Some((_, end)) => end > 0 && end + rec > self.pack_bytes,
            None => true,
        };
        if full {
            if let Some((old, _)) = s.current.take() {
                self.drop_if_empty(&mut s, old, &mut cleanup);
            }
            use std::os::unix::fs::OpenOptionsExt;
            // The next free name (this process may have opened the cache before).
            let mut made_dir = false;
            let (file, path) = loop {
                let n = s.seq;
                s.seq += 1;
                let path = self
                    .dir
                    .join(PACK_DIR)
                    .join(format!("{}-{}-{n}.pack", self.me.pid, self.me.start));
                match fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                {
                    Ok(f) => break (f, path),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) if e.kind() == io::ErrorKind::NotFound && !made_dir => {
                        // The directory was removed behind the cache's back: make it again.
                        use std::os::unix::fs::DirBuilderExt;
                        fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o700)
                            .create(self.dir.join(PACK_DIR))?;
                        made_dir = true;
                    }
                    Err(e) => return Err(e),
                }
            };
            let id = s.next_id;
            s.next_id += 1;
            s.packs.insert(
                id,
                Pack {
                    file: Arc::new(file),
                    path,
                    writer: self.me,
                    records: 0,
                    live: 0,
                    writing: 0,
                },
            );
            s.current = Some((id, 0));
        }
        let (id, end) = s.current.expect("a current pack");
        s.current = Some((id, end + rec));
        let p = s.packs.get_mut(&id).expect("the current pack");
        p.writing += 1;
        let file = p.file.clone();
        drop(s);
        cleanup.run();
        Ok((id, file, end))
    }

    /// Removes `d` if it is still the record `at` (not one put again since), punching it out.
    fn forget(&self, d: &Digest, at: Entry) {
        let mut cleanup = Cleanup::default();
        {
            let mut s = self.lock();
            if s.lru.peek(d) != Some(&at) {
                return;
            }
            s.lru.pop(d);
            self.release(&mut s, at, &mut cleanup);
        }
        cleanup.run();
    }

    /// Accounts a record gone from the map and schedules its hole (and its pack's removal).
    fn release(&self, s: &mut State, e: Entry, cleanup: &mut Cleanup) {
        let rec = record_bytes(e.len as usize);
        s.total -= rec;
        if let Some(p) = s.packs.get_mut(&e.pack) {
            p.records -= 1;
            p.live -= rec;
            cleanup.punch.push((p.file.clone(), e.offset, rec));
            self.drop_if_empty(s, e.pack, cleanup);
        }
    }

    /// Forgets a pack deleted behind the cache's back and every record in it (its file is closed,
    /// so its space goes back to the file system).
    fn pack_gone(&self, s: &mut State, id: u32) {
        let gone: Vec<(Digest, Entry)> = s
            .lru
            .iter()
            .filter(|(_, e)| e.pack == id)
            .map(|(d, e)| (*d, *e))
            .collect();
        for (d, e) in &gone {
            s.lru.pop(d);
            s.total -= record_bytes(e.len as usize);
        }
        if s.current.is_some_and(|(c, _)| c == id) {
            s.current = None;
        }
        if let Some(p) = s.packs.remove(&id) {
            tracing::warn!(pack = %p.path.display(), records = gone.len(), "disk cache pack removed behind the cache's back; its records are forgotten");
        }
    }

    /// Deletes a pack nobody appends to any more once it holds no records.
    fn drop_if_empty(&self, s: &mut State, id: u32, cleanup: &mut Cleanup) {
        let Some(p) = s.packs.get(&id) else { return };
        let appending = s.current.is_some_and(|(c, _)| c == id);
        if p.records > 0 || p.writing > 0 || appending {
            return;
        }
        if p.writer != self.me && p.writer.alive() {
            return; // another live process may still append to it
        }
        let p = s.packs.remove(&id).expect("checked above");
        cleanup.delete.push(p.path);
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

    /// Evicts least recently used records beyond the bound; true if any went.
    fn evict(&self) -> bool {
        if self.lock().total <= self.max_bytes {
            return false;
        }
        let pinned = self.pinned();
        let mut cleanup = Cleanup::default();
        let mut evicted = false;
        {
            let mut s = self.lock();
            let mut skipped = Vec::new();
            while s.total > self.max_bytes {
                match s.lru.pop_lru() {
                    Some((d, e)) if pinned.contains(&d) => skipped.push((d, e)),
                    Some((_, e)) => {
                        self.release(&mut s, e, &mut cleanup);
                        evicted = true;
                    }
                    None => break,
                }
            }
            // Pinned entries stay, as the least recently used again.
            let rest: Vec<_> = std::iter::from_fn(|| s.lru.pop_lru()).collect();
            for (d, e) in skipped.into_iter().chain(rest) {
                s.lru.put(d, e);
            }
        }
        cleanup.run();
        evicted
    }
}

/// `<pid>-<start>-<n>`: the process that writes the pack.
fn parse_pack_name(stem: &str) -> Option<ProcessId> {
    let mut parts = stem.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u64>().ok()?;
    Some(ProcessId { pid, start })
}

fn header(d: &Digest, len: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..40].copy_from_slice(d);
    h[40..44].copy_from_slice(&len.to_le_bytes());
    h
}

fn parse_header(h: &[u8; HEADER_LEN as usize]) -> Option<(Digest, u32)> {
    if &h[..8] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(h[40..44].try_into().expect("4 bytes"));
    if len == 0 || u64::from(len) > MAX_RECORD {
        return None;
    }
    Some((h[8..40].try_into().expect("32 bytes"), len))
}

/// The records of a pack: (header offset, digest, stored length). Holes (punched records) are
/// skipped; a record running past the end (a crash mid-append) ends the scan.
fn scan(file: &File) -> io::Result<Vec<(u64, Digest, u32)>> {
    let size = file.metadata()?.len();
    let mut out = Vec::new();
    let mut off = 0;
    let mut h = [0u8; HEADER_LEN as usize];
    while off + HEADER_LEN <= size {
        match seek_data(file, off) {
            Some(data) => off = data.div_ceil(ALIGN) * ALIGN,
            None => break,
        }
        if off + HEADER_LEN > size {
            break;
        }
        file.read_exact_at(&mut h, off)?;
        match parse_header(&h) {
            Some((d, len)) if off + HEADER_LEN + u64::from(len) <= size => {
                out.push((off, d, len));
                off += record_bytes(len as usize);
            }
            Some(_) => break,
            None => off += ALIGN,
        }
    }
    Ok(out)
}

/// The first offset at or after `off` that is not in a hole; `None` past the last data. A file
/// system without `SEEK_DATA` reports `off` itself.
fn seek_data(file: &File, off: u64) -> Option<u64> {
    // SAFETY: lseek on an fd this file owns; no pointers.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r >= 0 {
        return Some(r as u64);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        _ => Some(off),
    }
}

/// The pack still has a name (was not deleted behind the cache's back).
fn linked(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata().is_ok_and(|m| m.nlink() > 0)
}

/// Returns a record's blocks to the file system. Where holes cannot be punched, its header is
/// zeroed instead, so no scan adopts it again; its space comes back when its pack is deleted.
fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on an fd this file owns; no pointers.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let err = io::Error::last_os_error();
        WARNED.call_once(|| {
            tracing::warn!(error = %err, "disk cache: cannot punch holes; evicted records keep their space until their pack is deleted");
        });
        let _ = file.write_all_at(&[0u8; HEADER_LEN as usize], offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one 100-byte entry costs against the bound.
    const R: u64 = ALIGN;

    fn packs(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir.join(PACK_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// Overwrites the stored bytes of `d`'s record in place.
    fn damage(c: &DiskCache, d: &Digest, bytes: &[u8]) {
        let (e, file) = c.locate(d).unwrap();
        file.write_all_at(bytes, e.offset + HEADER_LEN).unwrap();
    }

    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn records_take_whole_aligned_blocks() {
        assert_eq!(record_bytes(1), ALIGN);
        assert_eq!(record_bytes((ALIGN - HEADER_LEN) as usize), ALIGN);
        assert_eq!(record_bytes((ALIGN - HEADER_LEN + 1) as usize), 2 * ALIGN);
        assert_eq!(record_bytes(256 << 10), (256 << 10) + ALIGN);
    }

    #[test]
    fn pinned_chunks_survive_eviction_while_their_process_lives() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 2 * R + R / 2).unwrap();
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
        assert!(c.total_bytes() <= 2 * R + R / 2);
    }

    #[test]
    fn a_pack_removed_behind_its_back_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let a = vec![7u8; 100];
        c.put(&sha256(&a), &a).unwrap();
        assert!(c.contains(&sha256(&a)));
        for p in packs(dir.path()) {
            fs::remove_file(p).unwrap();
        }
        assert!(!c.contains(&sha256(&a)));
        assert_eq!(c.total_bytes(), 0);
    }

    #[test]
    fn a_cache_directory_emptied_behind_its_back_heals() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (vec![7u8; 100], vec![8u8; 100]);
        c.put(&sha256(&a), &a).unwrap();
        // What a `rm -rf cache/*` beside a running daemon does: the packs and their directory go.
        fs::remove_dir_all(dir.path().join(PACK_DIR)).unwrap();
        c.put(&sha256(&b), &b).unwrap();
        assert!(c.contains(&sha256(&b)), "new records go to a new pack");
        assert_eq!(c.get(&sha256(&b)).unwrap(), b);
        assert!(
            !c.contains(&sha256(&a)),
            "records of the removed pack are forgotten"
        );
        assert_eq!(c.total_bytes(), R);
        assert_eq!(packs(dir.path()).len(), 1);
        // And again, with the pack removed but its directory kept.
        for p in packs(dir.path()) {
            fs::remove_file(p).unwrap();
        }
        c.put(&sha256(&a), &a).unwrap();
        assert!(c.contains(&sha256(&a)));
        assert!(!c.contains(&sha256(&b)));
        assert_eq!(c.total_bytes(), R);
        drop(c);
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(c.get(&sha256(&a)).unwrap(), a);
    }

    #[test]
    fn a_record_punched_by_another_process_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (vec![7u8; 100], vec![8u8; 100]);
        c.put(&sha256(&a), &a).unwrap();
        c.put(&sha256(&b), &b).unwrap();
        let (e, file) = c.locate(&sha256(&a)).unwrap();
        punch(&file, e.offset, R);
        assert!(!c.contains(&sha256(&a)));
        assert!(c.contains(&sha256(&b)));
        assert_eq!(c.get(&sha256(&b)).unwrap(), b);
        assert_eq!(c.total_bytes(), R);
    }

    #[test]
    fn verifies_evicts_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 2 * R + 50).unwrap();
        let a = vec![1u8; 100];
        let b = vec![2u8; 100];
        let e = vec![3u8; 100];
        let f = vec![4u8; 100];
        c.put(&sha256(&a), &a).unwrap();
        c.put(&sha256(&b), &b).unwrap();
        assert_eq!(c.get(&sha256(&a)).unwrap(), a); // a is now most recent
        c.put(&sha256(&e), &e).unwrap(); // evicts b
        assert!(c.get(&sha256(&b)).is_none());
        assert_eq!(c.total_bytes(), 2 * R);
        // A corrupted record: detected and removed, never returned.
        damage(&c, &sha256(&a), b"garbage");
        assert!(c.get(&sha256(&a)).is_none());
        assert!(!c.contains(&sha256(&a)));
        c.put(&sha256(&f), &f).unwrap();
        // A crash mid-append: a header whose bytes never all arrived ends the pack's scan.
        let pack = packs(dir.path()).pop().unwrap();
        let end = fs::metadata(&pack).unwrap().len().div_ceil(ALIGN) * ALIGN;
        let torn = fs::OpenOptions::new().write(true).open(&pack).unwrap();
        torn.write_all_at(&header(&sha256(&[9u8; 5000]), 5000), end)
            .unwrap();
        torn.write_all_at(&[9u8; 100], end + HEADER_LEN).unwrap();
        drop(c);
        // Reopened: e and f adopted, a (punched) and b (evicted) and the torn record not.
        let c = DiskCache::open(dir.path(), 2 * R + 50).unwrap();
        assert_eq!(c.get(&sha256(&e)).unwrap(), e);
        assert_eq!(c.get(&sha256(&f)).unwrap(), f);
        for gone in [&a, &b, &vec![9u8; 5000]] {
            assert!(!c.contains(&sha256(gone)));
        }
        assert_eq!(c.total_bytes(), 2 * R);
        // New records go to a new pack; the eviction g causes leaves the old pack a quarter full or
        // less, so its last record moves to the new one and it is deleted.
        let old = packs(dir.path());
        let g = vec![5u8; 100];
        c.put(&sha256(&g), &g).unwrap();
        let now = packs(dir.path());
        assert_eq!(now.len(), 1);
        assert_ne!(now, old);
        assert_eq!(c.get(&sha256(&g)).unwrap(), g);
        assert_eq!(c.get(&sha256(&f)).unwrap(), f);
        assert!(!c.contains(&sha256(&e)), "e was the least recently used");
    }

    #[test]
    fn evicted_records_return_their_blocks_and_empty_packs_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 100 << 10;
        let rec = record_bytes(chunk);
        // Packs of 4 records, a bound of 6: 40 puts go through 10 packs.
        let c = DiskCache::open_with_pack_size(dir.path(), 6 * rec, 4 * rec).unwrap();
        let data: Vec<Vec<u8>> = (0..40u8).map(|k| vec![k; chunk]).collect();
        for d in &data {
            c.put(&sha256(d), d).unwrap();
        }
        assert_eq!(c.total_bytes(), 6 * rec);
        for (k, d) in data.iter().enumerate() {
            assert_eq!(c.contains(&sha256(d)), k >= 34, "entry {k}");
        }
        // Packs whose records were all evicted are gone; the rest hold no more than their records.
        let left = packs(dir.path());
        assert!(left.len() <= 3, "{left:?}");
        let on_disk: u64 = left.iter().map(|p| allocated(p)).sum();
        assert!(
            on_disk <= 6 * rec,
            "{on_disk} bytes allocated for {}",
            6 * rec
        );
        // What a restart adopts is what was there.
        drop(c);
        let c = DiskCache::open_with_pack_size(dir.path(), 6 * rec, 4 * rec).unwrap();
        assert_eq!(c.total_bytes(), 6 * rec);
        for d in &data[34..] {
            assert_eq!(c.get(&sha256(d)).as_ref(), Some(d));
        }
    }

    #[test]
    fn packs_stay_few_however_long_old_records_stay_hot() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 10 << 10;
        let rec = record_bytes(chunk);
        let (pack, bound) = (32 * rec, 32 * rec);
        let c = DiskCache::open_with_pack_size(dir.path(), bound, pack).unwrap();
        let mk = |k: u32| {
            let mut v = vec![(k % 251) as u8; chunk];
            v[..4].copy_from_slice(&k.to_le_bytes());
            v
        };
        // Every 32nd chunk stays hot (read after every put) for the next 16 packs' worth: without
        // compaction each would hold its pack in place, 16 packs for 16 records.
        let mut hot: std::collections::VecDeque<Vec<u8>> = Default::default();
        for k in 0..1000u32 {
            let d = mk(k);
            c.put(&sha256(&d), &d).unwrap();
            if k % 32 == 0 {
                hot.push_back(d);
                if hot.len() > 16 {
                    hot.pop_front();
                }
            }
            for h in &hot {
                assert_eq!(c.get(&sha256(h)).as_ref(), Some(h), "chunk {k}");
            }
        }
        let n = packs(dir.path()).len() as u64;
        assert!(n <= 4 * bound / pack + 1, "{n} packs");
        assert!(c.total_bytes() <= bound);
        let on_disk: u64 = packs(dir.path()).iter().map(|p| allocated(p)).sum();
        assert!(on_disk <= bound + rec, "{on_disk} bytes allocated");
        drop(c);
        let c = DiskCache::open_with_pack_size(dir.path(), bound, pack).unwrap();
        for h in &hot {
            assert_eq!(c.get(&sha256(h)).as_ref(), Some(h));
        }
    }

    #[test]
    fn concurrent_writers_of_the_same_and_different_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(DiskCache::open_with_pack_size(dir.path(), 1 << 30, 8 * R).unwrap());
        let data: Vec<Vec<u8>> = (0..32u8).map(|k| vec![k; 3000]).collect();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (c, data) = (c.clone(), &data);
                s.spawn(move || {
                    for i in 0..data.len() {
                        let d = &data[(i + t * 5) % data.len()];
                        c.put(&sha256(d), d).unwrap();
                    }
                });
            }
        });
        assert_eq!(c.total_bytes(), 32 * R);
        for d in &data {
            assert_eq!(c.get(&sha256(d)).as_ref(), Some(d));
        }
        // A chunk written twice by racing writers keeps one record: the other was punched out.
        let on_disk: u64 = packs(dir.path()).iter().map(|p| allocated(p)).sum();
        assert!(
            on_disk <= 32 * R,
            "{on_disk} bytes allocated for 32 records"
        );
        drop(c);
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(c.total_bytes(), 32 * R);
    }

    #[test]
    fn one_file_per_chunk_entries_move_into_a_pack() {
        let dir = tempfile::tempdir().unwrap();
        let good = vec![1u8; 100];
        let bad = vec![2u8; 100];
        let put_old = |name: &str, data: &[u8]| {
            let sub = dir.path().join(&name[..2]);
            fs::create_dir_all(&sub).unwrap();
            fs::write(sub.join(name), data).unwrap();
        };
        let (dg, db) = (hex::encode(sha256(&good)), hex::encode(sha256(&bad)));
        put_old(&dg, &good);
        put_old(&db, &bad[..50]); // torn
                                  // A dead writer's temporary file goes, a live process's (pid 1) stays.
        put_old(&format!("{dg}.4194305-0.tmp"), b"junk");
        put_old(&format!("{dg}.1-0.tmp"), b"being written");
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(c.get(&sha256(&good)).unwrap(), good);
        assert!(!c.contains(&sha256(&bad)));
        assert_eq!(c.total_bytes(), R);
        assert!(!dir.path().join(&dg[..2]).join(&dg).exists());
        assert!(!dir.path().join(&db[..2]).join(&db).exists());
        assert!(!dir
            .path()
            .join(&dg[..2])
            .join(format!("{dg}.4194305-0.tmp"))
            .exists());
        assert!(dir
            .path()
            .join(&dg[..2])
            .join(format!("{dg}.1-0.tmp"))
            .exists());
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
        // A damaged record: the decoder's verdict removes it.
        damage(&c, &d, &[0u8; 40]);
        assert_eq!(c.get_decoded(&d, check), None);
        assert!(!c.contains(&d));
        assert_eq!(c.total_bytes(), 0);
        // Absent: the decoder is not called.
        assert_eq!(
            c.get_decoded(&d, |_| -> Result<(), &str> { panic!("called") }),
            None
        );
    }
}
