//! POSIX ACLs: from the Linux xattr form (`system.posix_acl_access` / `_default` values, what tar's
//! `SCHILY.xattr.` records and `getxattr` carry) and from the text form (`SCHILY.acl.access`, what GNU
//! tar `--acls` writes) to ext4's on-disk form (name index 2 / 3, empty name), checked the way the
//! kernel's `posix_acl_valid` checks them so an image cannot store an ACL the kernel then refuses.
//!
//! Linux xattr form: `u32 version = 2`, then 8-byte entries `u16 tag, u16 perm, u32 id`.
//! ext4 form (`fs/ext4/acl.h`): `u32 version = 1`, then per entry `u16 tag, u16 perm` and, for named
//! users and groups only, `u32 id`. All little-endian.

/// `ACL_USER_OBJ`, `ACL_USER`, `ACL_GROUP_OBJ`, `ACL_GROUP`, `ACL_MASK`, `ACL_OTHER`.
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

const XATTR_VERSION: u32 = 2;
const EXT4_VERSION: u32 = 1;

/// One ACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AclEntry {
    /// Tag (`USER_OBJ` …).
    pub tag: u16,
    /// `rwx` bits.
    pub perm: u16,
    /// User or group id (named entries only; 0 otherwise).
    pub id: u32,
}

/// Parses the Linux xattr form.
pub fn parse_xattr(v: &[u8]) -> Result<Vec<AclEntry>, String> {
    if v.len() < 4 || (v.len() - 4) & 7 != 0 {
        return Err(format!("ACL of {} bytes is not 4 + 8n", v.len()));
    }
    let version = u32::from_le_bytes(v[0..4].try_into().expect("4 bytes"));
    if version != XATTR_VERSION {
        return Err(format!("ACL version {version}, not {XATTR_VERSION}"));
    }
    let entries: Vec<AclEntry> = v[4..]
        .chunks_exact(8)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            AclEntry {
                tag,
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: if matches!(tag, USER | GROUP) {
                    u32::from_le_bytes(e[4..8].try_into().expect("4 bytes"))
                } else {
                    0
                },
            }
        })
        .collect();
    validate(&entries)?;
    Ok(entries)
}

/// The Linux xattr form of `entries` (sorted as the kernel keeps them).
pub fn to_xattr(entries: &[AclEntry]) -> Vec<u8> {
    let mut out = XATTR_VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        let id = if matches!(e.tag, USER | GROUP) {
            e.id
        } else {
            u32::MAX // ACL_UNDEFINED_ID, what the kernel reports for unnamed entries
        };
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// The ext4 on-disk form of a (valid) ACL.
pub fn to_ext4(entries: &[AclEntry]) -> Vec<u8> {
    let mut out = EXT4_VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        if matches!(e.tag, USER | GROUP) {
            out.extend_from_slice(&e.id.to_le_bytes());
        }
    }
    out
}

/// Parses the text form (`user::rwx,user:1000:r--,group::r-x,mask::r-x,other::r--`; entries split
/// by `,` or newlines, `#` comments; qualifiers must be numeric ids, or a name followed by the id as
/// GNU tar's `--numeric-owner`-less output has it). Sorted and validated.
pub fn parse_text(s: &str) -> Result<Vec<AclEntry>, String> {
    let mut entries = Vec::new();
    for raw in s.split([',', '\n']) {
        let item = raw.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        let parts: Vec<&str> = item.split(':').collect();
        if parts.len() < 3 {
            return Err(format!("ACL entry {item:?} is not TAG:QUALIFIER:PERMS"));
        }
        let (tag, qual, perms) = (parts[0], parts[1], parts[2]);
        let named = !qual.is_empty();
        let tag = match (tag, named) {
            ("user" | "u", false) => USER_OBJ,
            ("user" | "u", true) => USER,
            ("group" | "g", false) => GROUP_OBJ,
            ("group" | "g", true) => GROUP,
            ("mask" | "m", false) => MASK,
            ("other" | "o", false) => OTHER,
            _ => return Err(format!("ACL entry {item:?}: unknown tag")),
        };
        let id = if named {
            match qual.parse::<u32>() {
                Ok(id) => id,
                // `user:alice:rw-:1000`: the id GNU tar appends after the name.
                Err(_) => parts
                    .get(3)
                    .and_then(|n| n.parse::<u32>().ok())
                    .ok_or_else(|| {
                        format!("ACL entry {item:?} names {qual:?} without a numeric id")
                    })?,
            }
        } else {
            0
        };
        let mut perm = 0u16;
        for (i, c) in perms.chars().enumerate() {
            perm |= match (i, c) {
                (0, 'r') => 4,
                (1, 'w') => 2,
                (2, 'x') => 1,
                (_, '-') if i < 3 => 0,
                _ => return Err(format!("ACL entry {item:?}: bad permissions {perms:?}")),
            };
        }
        entries.push(AclEntry { tag, perm, id });
    }
    entries.sort();
    validate(&entries)?;
    Ok(entries)
}

/// The kernel's rules (`posix_acl_valid`): tags in order, one USER_OBJ, GROUP_OBJ and OTHER, named
/// entries with strictly increasing ids, a MASK when there are named entries, perms within rwx.
fn validate(entries: &[AclEntry]) -> Result<(), String> {
    let mut last: Option<&AclEntry> = None;
    let count = |t: u16| entries.iter().filter(|e| e.tag == t).count();
    for e in entries {
        if ![USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&e.tag) {
            return Err(format!("ACL tag {:#x} unknown", e.tag));
        }
        if e.perm & !7 != 0 {
            return Err(format!("ACL permissions {:#o} beyond rwx", e.perm));
        }
        if let Some(l) = last {
            let ordered =
                l.tag < e.tag || (l.tag == e.tag && matches!(e.tag, USER | GROUP) && l.id < e.id);
            if !ordered {
                return Err("ACL entries out of order or repeated".into());
            }
        }
        last = Some(e);
    }
    for (t, name) in [
        (USER_OBJ, "user::"),
        (GROUP_OBJ, "group::"),
        (OTHER, "other::"),
    ] {
        if count(t) != 1 {
            return Err(format!("ACL needs exactly one {name} entry"));
        }
    }
    if count(USER) + count(GROUP) > 0 && count(MASK) != 1 {
        return Err("ACL with named entries needs a mask".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_xattr_and_ext4_forms() {
        let e = parse_text(
            "user::rwx,group::r-x,other::r--,user:1000:rw-,mask::rwx,group:alice:r--:2000",
        )
        .unwrap();
        assert_eq!(
            e,
            [
                AclEntry {
                    tag: USER_OBJ,
                    perm: 7,
                    id: 0
                },
                AclEntry {
                    tag: USER,
                    perm: 6,
                    id: 1000
                },
                AclEntry {
                    tag: GROUP_OBJ,
                    perm: 5,
                    id: 0
                },
                AclEntry {
                    tag: GROUP,
                    perm: 4,
                    id: 2000
                },
                AclEntry {
                    tag: MASK,
                    perm: 7,
                    id: 0
                },
                AclEntry {
                    tag: OTHER,
                    perm: 4,
                    id: 0
                },
            ]
        );
        let x = to_xattr(&e);
        assert_eq!(x.len(), 4 + 6 * 8);
        assert_eq!(parse_xattr(&x).unwrap(), e);
        let d = to_ext4(&e);
        // Four short entries (4 bytes), two named ones (8 bytes).
        assert_eq!(d.len(), 4 + 4 * 4 + 2 * 8);
        assert_eq!(&d[0..4], &1u32.to_le_bytes());
        assert_eq!(&d[8..16], &[2, 0, 6, 0, 0xe8, 3, 0, 0]);
    }

    #[test]
    fn invalid_acls_are_refused() {
        for bad in [
            "user::rwx,other::r--",                                   // no group::
            "user::rwx,group::r-x,other::r--,user:5:r--",             // named without mask
            "user::rwx,user::r--,group::r-x,other::r--",              // two user::
            "user::rwz,group::r-x,other::r--",                        // bad perm
            "user:bob:rw-,user::rwx,group::r-x,mask::rwx,other::---", // name without id
            "wheel::rwx",
        ] {
            assert!(parse_text(bad).is_err(), "{bad}");
        }
        assert!(parse_xattr(&[2, 0, 0, 0, 1]).is_err());
        let mut unsorted = to_xattr(&parse_text("user::rwx,group::r-x,other::r--").unwrap());
        unsorted[0] = 1; // version 1 is the ext4 form, not the xattr form
        assert!(parse_xattr(&unsorted).is_err());
        // Named users out of id order.
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, id) in [
            (USER_OBJ, 0),
            (USER, 9),
            (USER, 3),
            (GROUP_OBJ, 0),
            (MASK, 0),
            (OTHER, 0),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&7u16.to_le_bytes());
            v.extend_from_slice(&(id as u32).to_le_bytes());
        }
        assert!(parse_xattr(&v).is_err());
    }
}
