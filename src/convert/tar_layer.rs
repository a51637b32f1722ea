//! Applies the entries of an OCI layer tar to an [`Ext4Builder`], with OCI whiteout semantics.

use std::collections::BTreeMap;
use std::io::Read;

use crate::ext4::tree::display;
use crate::ext4::{clean_path, BlockSink, Ext4Builder, Ext4Error, Meta, NodeKind, Timestamp};

/// Prefix of OCI whiteout entries.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// A tar problem, located.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The tar stream itself is malformed or truncated.
    #[error("tar: entry #{entry} (header at byte {offset}): {source}")]
    Stream {
        /// Entry number (0-based).
        entry: u64,
        /// Offset of the entry's header in the tar stream.
        offset: u64,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An entry the image cannot contain.
    #[error("tar: entry #{entry} {name:?} (header at byte {offset}): {source}")]
    Entry {
        /// Entry number (0-based).
        entry: u64,
        /// Its name as written in the tar.
        name: String,
        /// Offset of the entry's header.
        offset: u64,
        /// What was wrong.
        source: Ext4Error,
    },
}

/// Counts of what the tar held.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct TarStats {
    /// Entries read.
    pub entries: u64,
    /// Whiteouts converted to 0:0 character devices.
    pub whiteouts: u64,
    /// Opaque markers converted to `trusted.overlay.opaque`.
    pub opaque_dirs: u64,
    /// Hard links.
    pub hardlinks: u64,
}

/// Reads every entry of `tar` into `builder`.
pub fn apply_tar<S: BlockSink, R: Read>(
    tar: R,
    builder: &mut Ext4Builder<S>,
) -> Result<TarStats, TarError> {
    let mut archive = tar::Archive::new(tar);
    let mut stats = TarStats::default();
    let mut last_offset = 0u64;
    let entries = archive.entries().map_err(|e| TarError::Stream {
        entry: 0,
        offset: 0,
        source: e,
    })?;
    for (i, entry) in entries.enumerate() {
        let i = i as u64;
        let mut entry = entry.map_err(|e| TarError::Stream {
            entry: i,
            offset: last_offset,
            source: e,
        })?;
        let offset = entry.raw_header_position();
        last_offset = offset + 512 + entry.size().next_multiple_of(512);
        let name_bytes = entry.path_bytes().into_owned();
        let located = |source: Ext4Error| TarError::Entry {
            entry: i,
            name: String::from_utf8_lossy(&name_bytes).into_owned(),
            offset,
            source,
        };
        stats.entries += 1;
        apply_entry(&mut entry, &name_bytes, builder, &mut stats).map_err(|e| match e {
            EntryError::Io(source) => TarError::Stream {
                entry: i,
                offset,
                source,
            },
            EntryError::Ext4(Ext4Error::Io(source))
                if source.kind() != std::io::ErrorKind::Other =>
            {
                TarError::Stream {
                    entry: i,
                    offset,
                    source,
                }
            }
            EntryError::Ext4(e) => located(e),
        })?;
    }
    Ok(stats)
}

enum EntryError {
    Io(std::io::Error),
    Ext4(Ext4Error),
}

impl From<Ext4Error> for EntryError {
    fn from(e: Ext4Error) -> Self {
        EntryError::Ext4(e)
    }
}

impl From<std::io::Error> for EntryError {
    fn from(e: std::io::Error) -> Self {
        EntryError::Io(e)
    }
}

fn apply_entry<S: BlockSink, R: Read>(
    entry: &mut tar::Entry<'_, R>,
    name: &[u8],
    builder: &mut Ext4Builder<S>,
    stats: &mut TarStats,
) -> Result<(), EntryError> {
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    if matches!(
        kind,
        T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
    ) {
        return Ok(());
    }
    let path = clean_path(name)?;
    let meta = meta_of(entry)?;

    // OCI whiteouts.
    if let Some(base) = path.last() {
        if base.as_slice() == OPAQUE_MARKER {
            stats.opaque_dirs += 1;
            builder.set_opaque(&path[..path.len() - 1])?;
            return Ok(());
        }
        if base.starts_with(b".wh..wh.") {
            return Ok(()); // aufs bookkeeping (.wh..wh.plnk and friends): containerd ignores these too
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() {
                return Err(Ext4Error::Path {
                    path: display(&path),
                    reason: "whiteout without a name".into(),
                }
                .into());
            }
            let mut target = path[..path.len() - 1].to_vec();
            target.push(hidden.to_vec());
            stats.whiteouts += 1;
            let wmeta = Meta { perm: 0, ..meta };
            builder.add(&target, NodeKind::CharDev { major: 0, minor: 0 }, wmeta)?;
            return Ok(());
        }
    }

    match kind {
        T::Regular | T::Continuous | T::GNUSparse => {
            let size = entry.size();
            builder.add_file(&path, meta, size, entry)?;
        }
        T::Directory => {
            builder.add(&path, NodeKind::empty_dir(), meta)?;
        }
        T::Symlink => {
            let target = entry
                .link_name_bytes()
                .map(|c| c.into_owned())
                .unwrap_or_default();
            builder.add(&path, NodeKind::Symlink { target }, meta)?;
        }
        T::Link => {
            let target = entry
                .link_name_bytes()
                .map(|c| c.into_owned())
                .unwrap_or_default();
            let target = clean_path(&target)?;
            stats.hardlinks += 1;
            builder.link(&path, &target)?;
        }
        T::Char | T::Block => {
            let major = entry.header().device_major()?.unwrap_or(0);
            let minor = entry.header().device_minor()?.unwrap_or(0);
            let node = if kind == T::Char {
                NodeKind::CharDev { major, minor }
            } else {
                NodeKind::BlockDev { major, minor }
            };
            builder.add(&path, node, meta)?;
        }
        T::Fifo => {
            builder.add(&path, NodeKind::Fifo, meta)?;
        }
        other => {
            return Err(Ext4Error::Path {
                path: display(&path),
                reason: format!("unsupported tar entry type {:?}", other.as_byte() as char),
            }
            .into())
        }
    }
    Ok(())
}

/// Mode, owner, mtime (with PAX overrides: large ids, fractional times) and `SCHILY.xattr.*` attributes.
fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, EntryError> {
    let h = entry.header();
    let perm = (h.mode()? & 0o7777) as u16;
    let mut uid = h.uid()? as u32;
    let mut gid = h.gid()? as u32;
    let mut mtime = Timestamp {
        secs: h.mtime()? as i64,
        nanos: 0,
    };
    let mut xattrs = BTreeMap::new();
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.insert(name.to_vec(), value.to_vec());
            } else if key == b"uid" {
                uid = parse_id(value, "uid")?;
            } else if key == b"gid" {
                gid = parse_id(value, "gid")?;
            } else if key == b"mtime" {
                mtime = parse_pax_time(value)?;
            }
        }
    }
    Ok(Meta {
        perm,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

fn parse_id(v: &[u8], what: &str) -> Result<u32, std::io::Error> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad PAX {what} {:?}", String::from_utf8_lossy(v)),
            )
        })
}

/// Parses a PAX time: `[-]seconds[.fraction]`.
pub fn parse_pax_time(v: &[u8]) -> Result<Timestamp, std::io::Error> {
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad PAX mtime {:?}", String::from_utf8_lossy(v)),
        )
    };
    let s = std::str::from_utf8(v).map_err(|_| bad())?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let secs: i64 = whole.parse().map_err(|_| bad())?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += (d - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    Ok(if !neg {
        Timestamp { secs, nanos }
    } else if nanos == 0 {
        Timestamp {
            secs: -secs,
            nanos: 0,
        }
    } else {
        Timestamp {
            secs: -secs - 1,
            nanos: 1_000_000_000 - nanos,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"12.5").unwrap(),
            Timestamp {
                secs: 12,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            parse_pax_time(b"7").unwrap(),
            Timestamp { secs: 7, nanos: 0 }
        );
        assert_eq!(
            parse_pax_time(b"-1.25").unwrap(),
            Timestamp {
                secs: -2,
                nanos: 750_000_000
            }
        );
        assert_eq!(parse_pax_time(b"1.1234567891").unwrap().nanos, 123_456_789);
        assert!(parse_pax_time(b"x").is_err());
        assert!(parse_pax_time(b"1.2.3").is_err());
    }
}
