//! The snapshotter's metadata: every snapshot (key, kind, parent, labels, times, usage, remote layer),
//! kept in memory and written through to an embedded transactional database (redb) on every change, so
//! a crash loses nothing that was acknowledged.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("snapshot database: {0}")]
    Db(String),
    /// A record could not be decoded.
    #[error("snapshot database: record {key:?} is corrupt: {cause}")]
    Corrupt {
        /// Its key.
        key: String,
        /// Why.
        cause: String,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Snapshot kinds, numbered as in containerd's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable.
    Active,
    /// Immutable, can be a parent.
    Committed,
}

impl Kind {
    /// containerd's enum value.
    pub fn proto(self) -> i32 {
        match self {
            Kind::View => 1,
            Kind::Active => 2,
            Kind::Committed => 3,
        }
    }
}

/// Where a remote (lazyblk) layer comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// `REGISTRY/REPO@sha256:DIGEST` of the converted layer blob.
    pub source: String,
    /// Trusted index location (from the descriptor's annotations).
    pub index_offset: u64,
    /// Index length.
    pub index_length: u64,
    /// Index digest, chained to the manifest.
    pub index_digest: String,
    /// ext4 image size in bytes (reported as the snapshot's usage).
    pub image_size: u64,
    /// Start of the blob's startup region (annotation `startup-offset`), if it has one.
    #[serde(default)]
    pub startup_offset: Option<u64>,
    /// The image's startup trace, replayed when the layer is attached (if one was shipped).
    #[serde(default)]
    pub trace: Option<std::path::PathBuf>,
    /// An original-image index: the original layer and span table its file data is read through.
    #[serde(default)]
    pub original: Option<crate::original::OriginalRef>,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Internal id (names its directories).
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent key ("" for none).
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time (seconds, nanoseconds since the epoch).
    pub created: (i64, i32),
    /// Last update time.
    pub updated: (i64, i32),
    /// Bytes and inodes, measured at commit (never by walking a lazily mounted filesystem).
    pub usage: (i64, i64),
    /// Set for remote layers.
    pub remote: Option<Remote>,
}

/// Current time as (seconds, nanos).
pub fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

/// The store.
pub struct Store {
    db: redb::Database,
    snaps: BTreeMap<String, Snapshot>,
    next_id: u64,
}

impl Store {
    /// Opens (or creates) the database at `path` and loads every record.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = redb::Database::create(path).map_err(db_err)?;
        {
            let w = db.begin_write().map_err(db_err)?;
            w.open_table(SNAPSHOTS).map_err(db_err)?;
            w.open_table(META).map_err(db_err)?;
            w.commit().map_err(db_err)?;
        }
        let mut snaps = BTreeMap::new();
        let next_id;
        {
            let r = db.begin_read().map_err(db_err)?;
            let t = r.open_table(SNAPSHOTS).map_err(db_err)?;
            for row in t.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let s: Snapshot =
                    serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                        key: k.value().to_string(),
                        cause: e.to_string(),
                    })?;
                snaps.insert(k.value().to_string(), s);
            }
            let m = r.open_table(META).map_err(db_err)?;
            next_id = m
                .get("next_id")
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(1);
        }
        Ok(Store { db, snaps, next_id })
    }

    /// A snapshot by key.
    pub fn get(&self, key: &str) -> Option<&Snapshot> {
        self.snaps.get(key)
    }

    /// Every snapshot.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.snaps.iter()
    }

    /// Whether any snapshot has `key` as its parent.
    pub fn has_children(&self, key: &str) -> bool {
        self.snaps.values().any(|s| s.parent == key)
    }

    /// The chain of committed ancestors of `parent`, nearest first.
    pub fn chain(&self, parent: &str) -> Vec<(String, Snapshot)> {
        let mut out = Vec::new();
        let mut p = parent.to_string();
        while !p.is_empty() {
            match self.snaps.get(&p) {
                Some(s) => {
                    out.push((p.clone(), s.clone()));
                    p = s.parent.clone();
                }
                None => break,
            }
        }
        out
    }

    /// Allocates an id (persisted with the next write).
    pub fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Inserts or replaces `key` (and renames: removes `old` in the same transaction).
    pub fn put(&mut self, key: &str, s: Snapshot, old: Option<&str>) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(SNAPSHOTS).map_err(db_err)?;
            if let Some(o) = old {
                t.remove(o).map_err(db_err)?;
            }
            let v = serde_json::to_vec(&s).expect("snapshot serialises");
            t.insert(key, v.as_slice()).map_err(db_err)?;
            let mut m = w.open_table(META).map_err(db_err)?;
            m.insert("next_id", self.next_id).map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        if let Some(o) = old {
            self.snaps.remove(o);
        }
        self.snaps.insert(key.to_string(), s);
        Ok(())
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &str) -> Result<Option<Snapshot>, StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(SNAPSHOTS).map_err(db_err)?;
            t.remove(key).map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        Ok(self.snaps.remove(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, kind: Kind, parent: &str) -> Snapshot {
        Snapshot {
            id,
            kind,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created: now(),
            updated: now(),
            usage: (0, 0),
            remote: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_renames_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let mut s = Store::open(&path).unwrap();
            let a = s.alloc_id();
            s.put("a", snap(a, Kind::Committed, ""), None).unwrap();
            let b = s.alloc_id();
            s.put("active-b", snap(b, Kind::Active, "a"), None).unwrap();
            let mut c = s.get("active-b").unwrap().clone();
            c.kind = Kind::Committed;
            s.put("b", c, Some("active-b")).unwrap();
            assert!(s.has_children("a"));
        }
        let mut s = Store::open(&path).unwrap();
        assert!(s.get("active-b").is_none());
        assert_eq!(s.get("b").unwrap().kind, Kind::Committed);
        assert_eq!(
            s.chain("b")
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        // Ids keep counting after a restart.
        assert_eq!(s.alloc_id(), 3);
        s.remove("b").unwrap();
        assert!(!s.has_children("a"));
    }
}
