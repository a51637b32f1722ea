//! Extended attributes: in-inode storage and shared attribute blocks, with the hashes e2fsck checks.

use std::collections::BTreeMap;

use super::{Ext4Error, BLOCK_SIZE};

/// Magic number of an attribute block header and of the in-inode attribute area.
pub const XATTR_MAGIC: u32 = 0xEA02_0000;
const ENTRY_HEADER: usize = 16;
const BLOCK_HEADER: usize = 32;

/// One attribute, its namespace already split off into `index`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct XattrEntry {
    /// ext4 name index (1 user, 4 trusted, 6 security, ...).
    pub index: u8,
    /// Name without the namespace prefix.
    pub name: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
}

/// Name prefixes ext4 stores as an index byte. POSIX ACLs (indexes 2 and 3, empty names) are
/// converted to ext4's own value encoding ([`super::acl`]).
const PREFIXES: &[(&[u8], u8)] = &[(b"user.", 1), (b"trusted.", 4), (b"security.", 6)];

/// The POSIX ACL attributes and their ext4 name indexes.
const ACLS: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
];

/// Splits full attribute names into ext4 entries, sorted the way ext4 requires in attribute blocks
/// (index, name length, name). Attributes ext4 cannot store are returned as the second value, with
/// why.
pub fn to_entries(
    xattrs: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> (Vec<XattrEntry>, Vec<(Vec<u8>, String)>) {
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for (full, value) in xattrs {
        if let Some((_, index)) = ACLS.iter().find(|(n, _)| full.as_slice() == *n) {
            match super::acl::parse_xattr(value) {
                Ok(acl) => entries.push(XattrEntry {
                    index: *index,
                    name: Vec::new(),
                    value: super::acl::to_ext4(&acl),
                }),
                Err(e) => skipped.push((full.clone(), format!("invalid POSIX ACL: {e}"))),
            }
            continue;
        }
        match PREFIXES
            .iter()
            .find(|(p, _)| full.starts_with(p) && full.len() > p.len())
        {
            Some((p, index)) if full.len() - p.len() <= 255 => entries.push(XattrEntry {
                index: *index,
                name: full[p.len()..].to_vec(),
                value: value.clone(),
            }),
            _ => skipped.push((full.clone(), "unsupported namespace".to_string())),
        }
    }
    entries.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    (entries, skipped)
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn entry_len(e: &XattrEntry) -> usize {
    pad4(ENTRY_HEADER + e.name.len())
}

/// The hash e2fsck verifies for each entry (name bytes as signed chars, like e2fsprogs and older kernels;
/// identical for ASCII names).
pub fn entry_hash(e: &XattrEntry) -> u32 {
    let mut hash: u32 = 0;
    for &c in &e.name {
        hash = (hash << 5) ^ (hash >> 27) ^ (c as i8 as i32 as u32);
    }
    if !e.value.is_empty() {
        let mut padded = e.value.clone();
        padded.resize(pad4(e.value.len()), 0);
        for w in padded.chunks_exact(4) {
            let v = u32::from_le_bytes(w.try_into().expect("4 bytes"));
            hash = (hash << 16) ^ (hash >> 16) ^ v;
        }
    }
    hash
}

/// Lays out entries in `area` (entries from `entries_at`, values packed downwards from the end);
/// value offsets are relative to `offs_base`. Returns false if they do not fit.
fn layout(
    area: &mut [u8],
    entries_at: usize,
    offs_base: usize,
    entries: &[XattrEntry],
    hashes: bool,
) -> bool {
    let names: usize = entries.iter().map(entry_len).sum();
    let values: usize = entries.iter().map(|e| pad4(e.value.len())).sum();
    // entries + 4-byte terminator + values must fit
    if entries_at + names + 4 + values > area.len() {
        return false;
    }
    let mut at = entries_at;
    let mut value_end = area.len();
    for e in entries {
        let offs = if e.value.is_empty() {
            0
        } else {
            value_end -= pad4(e.value.len());
            area[value_end..value_end + e.value.len()].copy_from_slice(&e.value);
            value_end - offs_base
        };
        area[at] = e.name.len() as u8;
        area[at + 1] = e.index;
        area[at + 2..at + 4].copy_from_slice(&(offs as u16).to_le_bytes());
        area[at + 4..at + 8].copy_from_slice(&0u32.to_le_bytes());
        area[at + 8..at + 12].copy_from_slice(&(e.value.len() as u32).to_le_bytes());
        let h = if hashes { entry_hash(e) } else { 0 };
        area[at + 12..at + 16].copy_from_slice(&h.to_le_bytes());
        area[at + ENTRY_HEADER..at + ENTRY_HEADER + e.name.len()].copy_from_slice(&e.name);
        at += entry_len(e);
    }
    true
}

/// Encodes `entries` into the in-inode area (`area` is everything after `i_extra_isize`). Returns false
/// (and leaves `area` zeroed) when they do not fit.
pub fn encode_in_inode(area: &mut [u8], entries: &[XattrEntry]) -> bool {
    if entries.is_empty() || area.len() < 8 {
        return entries.is_empty();
    }
    area.fill(0);
    area[0..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
    if !layout(area, 4, 4, entries, true) {
        area.fill(0);
        return false;
    }
    true
}

/// Encodes `entries` as an attribute block referenced by `refcount` inodes.
pub fn encode_block(entries: &[XattrEntry], refcount: u32) -> Result<Vec<u8>, Ext4Error> {
    let mut b = vec![0u8; BLOCK_SIZE];
    if !layout(&mut b, BLOCK_HEADER, 0, entries, true) {
        let total: usize = entries
            .iter()
            .map(|e| entry_len(e) + pad4(e.value.len()))
            .sum();
        return Err(Ext4Error::Unsupported(format!(
            "extended attributes need {total} bytes; ext4 without ea_inode stores at most one block"
        )));
    }
    b[0..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&refcount.to_le_bytes());
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    let mut hash: u32 = 0;
    for e in entries {
        hash = (hash << 16) ^ (hash >> 16) ^ entry_hash(e);
    }
    b[12..16].copy_from_slice(&hash.to_le_bytes());
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &[u8])]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        kv.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn split_and_sort() {
        let acl = super::super::acl::to_xattr(
            &super::super::acl::parse_text("u::rwx,g::r-x,o::---").unwrap(),
        );
        let (e, skipped) = to_entries(&map(&[
            ("user.zz", b"1"),
            ("trusted.overlay.opaque", b"y"),
            ("user.a", b"2"),
            ("system.posix_acl_access", b"x"),
            ("system.posix_acl_default", &acl),
            ("weird.ns", b""),
        ]));
        let names: Vec<_> = e
            .iter()
            .map(|e| (e.index, String::from_utf8(e.name.clone()).unwrap()))
            .collect();
        assert_eq!(
            names,
            vec![
                (1, "a".into()),
                (1, "zz".into()),
                (3, "".into()),
                (4, "overlay.opaque".into())
            ]
        );
        assert_eq!(skipped.len(), 2);
        assert!(skipped
            .iter()
            .any(|(_, why)| why.contains("invalid POSIX ACL")));
    }

    #[test]
    fn in_inode_fits_small_and_refuses_big() {
        let mut area = [0u8; 96];
        let (e, _) = to_entries(&map(&[("trusted.overlay.opaque", b"y")]));
        assert!(encode_in_inode(&mut area, &e));
        assert_eq!(&area[0..4], &XATTR_MAGIC.to_le_bytes());
        let (big, _) = to_entries(&map(&[("user.big", &[7u8; 200])]));
        assert!(!encode_in_inode(&mut area, &big));
        assert!(area.iter().all(|&b| b == 0));
        let blk = encode_block(&big, 3).unwrap();
        assert_eq!(u32::from_le_bytes(blk[4..8].try_into().unwrap()), 3);
        let (huge, _) = to_entries(&map(&[("user.huge", &[7u8; 5000])]));
        assert!(encode_block(&huge, 1).is_err());
    }
}
