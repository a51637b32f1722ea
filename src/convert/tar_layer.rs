//! Applies the entries of an OCI layer tar to an [`Ext4Builder`], with OCI whiteout semantics.

use std::io::Read;

use super::tar_reader::{EntryKind, TarEntry, TarReader, TarStreamError};
use crate::ext4::tree::display;
use crate::ext4::{clean_path, BlockSink, Ext4Builder, Ext4Error, Meta, NodeKind};

/// Prefix of OCI whiteout entries.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// A tar problem, located.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// More entries than the converter accepts (each costs memory until the image is written).
    #[error("tar: more than {limit} entries (raise --max-entries if the layer really has that many; about 0.6 KiB of memory each)")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// The tar stream itself is malformed or truncated.
    #[error(transparent)]
    Stream(#[from] TarStreamError),
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
    /// `trusted.overlay.*` / `user.overlay.*` attributes found in PAX headers and dropped.
    pub dropped_overlay_xattrs: u64,
}

/// Attribute prefixes overlayfs interprets (opaque, redirect, metacopy, origin...). A layer's tar
/// never sets them: the converter drops them (with a warning) so an image cannot steer overlayfs
/// outside OCI semantics; opaque directories come from `.wh..wh..opq` markers only.
pub const OVERLAY_XATTR_PREFIXES: &[&[u8]] = &[b"trusted.overlay.", b"user.overlay."];

/// Reads every entry of `tar` into `builder`; returns the stats and the reader (positioned after the
/// end-of-archive marker).
pub fn apply_tar<S: BlockSink, R: Read>(
    tar: R,
    builder: &mut Ext4Builder<S>,
    max_entries: u64,
) -> Result<(TarStats, R), TarError> {
    let mut reader = TarReader::new(tar);
    let mut stats = TarStats::default();
    let mut i = 0u64;
    while let Some(e) = reader.next_entry()? {
        stats.entries += 1;
        if stats.entries > max_entries {
            return Err(TarError::TooManyEntries { limit: max_entries });
        }
        let (offset, name) = (e.offset, e.path.clone());
        apply_entry(e, &mut reader, builder, &mut stats).map_err(|err| match err {
            // The data of a file ended early, or the stream beneath failed: a stream error.
            Ext4Error::Truncated { .. } => TarError::Stream(TarStreamError::Truncated {
                offset: reader.position(),
                what: "file data",
            }),
            Ext4Error::Source(source) => TarError::Stream(TarStreamError::Io {
                offset: reader.position(),
                source,
            }),
            source => TarError::Entry {
                entry: i,
                name: String::from_utf8_lossy(&name).into_owned(),
                offset,
                source,
            },
        })?;
        i += 1;
    }
    Ok((stats, reader.into_inner()))
}

fn apply_entry<S: BlockSink, R: Read>(
    e: TarEntry,
    reader: &mut TarReader<R>,
    builder: &mut Ext4Builder<S>,
    stats: &mut TarStats,
) -> Result<(), Ext4Error> {
    let path = clean_path(&e.path)?;
    let mut xattrs = e.xattrs;
    xattrs.retain(|name, _| {
        let overlay = OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p));
        if overlay {
            stats.dropped_overlay_xattrs += 1;
            let shown = display(&path);
            tracing::warn!(path = %shown, xattr = %String::from_utf8_lossy(name), "dropped an overlayfs attribute from the tar (a layer does not drive overlayfs; OCI whiteouts do)");
        }
        !overlay
    });
    let meta = Meta {
        perm: (e.mode & 0o7777) as u16,
        uid: id32(e.uid, "uid", &path)?,
        gid: id32(e.gid, "gid", &path)?,
        mtime: e.mtime,
        xattrs,
    };

    // OCI whiteouts.
    if let Some(base) = path.last() {
        if base.as_slice() == OPAQUE_MARKER {
            stats.opaque_dirs += 1;
            return builder.set_opaque(&path[..path.len() - 1]);
        }
        if base.starts_with(b".wh..wh.") {
            return Ok(()); // aufs bookkeeping (.wh..wh.plnk and friends): containerd ignores these too
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(Ext4Error::Path {
                    path: display(&path),
                    reason: format!(
                        "whiteout of {:?} (a whiteout names one entry of its directory)",
                        String::from_utf8_lossy(hidden)
                    ),
                });
            }
            let mut target = path[..path.len() - 1].to_vec();
            target.push(hidden.to_vec());
            stats.whiteouts += 1;
            let wmeta = Meta {
                perm: 0,
                xattrs: Default::default(),
                ..meta
            };
            builder.add(&target, NodeKind::CharDev { major: 0, minor: 0 }, wmeta)?;
            return Ok(());
        }
    }

    match e.kind {
        EntryKind::File => {
            let origin = reader.origin();
            builder.add_file_from(&path, meta, e.size, &mut reader.data(), Some(&origin))?;
        }
        EntryKind::Dir => {
            builder.add(&path, NodeKind::empty_dir(), meta)?;
        }
        EntryKind::Symlink => {
            builder.add(&path, NodeKind::Symlink { target: e.link }, meta)?;
        }
        EntryKind::HardLink => {
            let target = clean_path(&e.link)?;
            stats.hardlinks += 1;
            builder.link(&path, &target)?;
        }
        EntryKind::CharDev => {
            let node = NodeKind::CharDev {
                major: e.dev_major,
                minor: e.dev_minor,
            };
            builder.add(&path, node, meta)?;
        }
        EntryKind::BlockDev => {
            let node = NodeKind::BlockDev {
                major: e.dev_major,
                minor: e.dev_minor,
            };
            builder.add(&path, node, meta)?;
        }
        EntryKind::Fifo => {
            builder.add(&path, NodeKind::Fifo, meta)?;
        }
    }
    Ok(())
}

fn id32(v: u64, what: &str, path: &[Vec<u8>]) -> Result<u32, Ext4Error> {
    u32::try_from(v).map_err(|_| Ext4Error::Path {
        path: display(path),
        reason: format!("{what} {v} does not fit in 32 bits"),
    })
}
