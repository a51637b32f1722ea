//! The memory cache of decoded chunks, bounded in bytes and shared by every layer of a process.
//!
//! The page cache above each block device is the real cache of file data; this one only keeps hot
//! chunks decoded between the fetch and the kernel's own caching (readahead windows, a chunk read in
//! several 4 KiB requests, chunks a trace replay or the startup region brought in ahead of the
//! workload). So it is small (the node daemon's `--memory-mib`, default 64) and node-wide: one budget
//! whatever the number of layers. Keys are (layer, chunk); shards keep the lock short and uncontended.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;

/// At most this many shards; fewer when the budget is small, so that each shard can hold a few of
/// the largest chunks the format allows (4 MiB).
const MAX_SHARDS: u64 = 16;
const MIN_SHARD_BYTES: u64 = 16 << 20;

/// A byte-bounded LRU of decoded chunks keyed by (layer id, chunk number).
pub struct MemCache {
    shards: Vec<Mutex<Shard>>,
    capacity: u64,
    bytes: AtomicU64,
}

struct Shard {
    lru: LruCache<(u64, u64), Bytes>,
    bytes: u64,
    capacity: u64,
}

static NEXT_LAYER: AtomicU64 = AtomicU64::new(1);

impl MemCache {
    /// A cache holding at most `capacity` bytes of chunk data.
    pub fn new(capacity: u64) -> Arc<MemCache> {
        let n = (capacity / MIN_SHARD_BYTES).clamp(1, MAX_SHARDS);
        let per = (capacity / n).max(1);
        Arc::new(MemCache {
            shards: (0..n)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::unbounded(),
                        bytes: 0,
                        capacity: per,
                    })
                })
                .collect(),
            capacity,
            bytes: AtomicU64::new(0),
        })
    }

    /// A process-unique id for a new layer's keys.
    pub fn new_layer_id() -> u64 {
        NEXT_LAYER.fetch_add(1, Relaxed)
    }

    fn shard(&self, layer: u64, chunk: u64) -> &Mutex<Shard> {
        let h =
            layer.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ chunk.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        &self.shards[(h >> 32) as usize % self.shards.len()]
    }

    /// The configured budget in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// The chunk, if cached (and marks it recently used).
    pub fn get(&self, layer: u64, chunk: u64) -> Option<Bytes> {
        self.shard(layer, chunk)
            .lock()
            .expect("memcache lock")
            .lru
            .get(&(layer, chunk))
            .cloned()
    }

    /// Whether the chunk is cached (without touching its recency).
    pub fn contains(&self, layer: u64, chunk: u64) -> bool {
        self.shard(layer, chunk)
            .lock()
            .expect("memcache lock")
            .lru
            .contains(&(layer, chunk))
    }

    /// Caches a chunk, evicting the least recently used ones of its shard to stay in budget. A chunk
    /// larger than a shard's share is not cached (shards hold at least 16 MiB unless the whole budget
    /// is smaller).
    pub fn put(&self, layer: u64, chunk: u64, data: Bytes) {
        let len = data.len() as u64;
        let mut s = self.shard(layer, chunk).lock().expect("memcache lock");
        if len > s.capacity {
            return;
        }
        if let Some(old) = s.lru.put((layer, chunk), data) {
            s.bytes -= old.len() as u64;
            self.bytes.fetch_sub(old.len() as u64, Relaxed);
        }
        s.bytes += len;
        self.bytes.fetch_add(len, Relaxed);
        while s.bytes > s.capacity {
            let Some((_, old)) = s.lru.pop_lru() else {
                break;
            };
            s.bytes -= old.len() as u64;
            self.bytes.fetch_sub(old.len() as u64, Relaxed);
        }
    }

    /// Drops every chunk of `layer` (when it is detached).
    pub fn forget_layer(&self, layer: u64) {
        for shard in &self.shards {
            let mut s = shard.lock().expect("memcache lock");
            let keys: Vec<_> = s
                .lru
                .iter()
                .filter(|((l, _), _)| *l == layer)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(old) = s.lru.pop(&k) {
                    s.bytes -= old.len() as u64;
                    self.bytes.fetch_sub(old.len() as u64, Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_budget_and_evicts_least_recent() {
        let c = MemCache::new(16 * 4096);
        for i in 0..1000 {
            c.put(1, i, Bytes::from(vec![0u8; 1024]));
            assert!(c.bytes() <= c.capacity());
        }
        // The newest chunks are there, the oldest are gone.
        assert!(c.get(1, 999).is_some());
        assert!(c.get(1, 0).is_none());
        let held = c.bytes();
        assert!(held > c.capacity() / 2, "held {held}");
    }

    #[test]
    fn layers_do_not_collide_and_forget_drops_one_layer() {
        let c = MemCache::new(1 << 20);
        c.put(1, 5, Bytes::from_static(b"one"));
        c.put(2, 5, Bytes::from_static(b"two"));
        assert_eq!(c.get(1, 5).unwrap(), Bytes::from_static(b"one"));
        c.forget_layer(1);
        assert!(!c.contains(1, 5));
        assert_eq!(c.get(2, 5).unwrap(), Bytes::from_static(b"two"));
        assert_eq!(c.bytes(), 3);
    }

    #[test]
    fn oversized_chunks_are_not_cached_and_small_budgets_still_hold_big_chunks() {
        let c = MemCache::new(50);
        c.put(1, 1, Bytes::from(vec![0u8; 100]));
        assert_eq!(c.bytes(), 0);
        // 16 MiB in one shard: a 4 MiB chunk fits.
        let c = MemCache::new(16 << 20);
        c.put(1, 1, Bytes::from(vec![0u8; 4 << 20]));
        assert_eq!(c.bytes(), 4 << 20);
    }
}
