//! On-disk encodings of the superblock, group descriptors and inodes (little-endian, ext4 layout).

use super::tree::Timestamp;

/// `s_feature_compat`: extended attributes.
pub const COMPAT_EXT_ATTR: u32 = 0x0008;
/// `s_feature_compat`: hashed (htree) directories.
pub const COMPAT_DIR_INDEX: u32 = 0x0020;
/// `s_feature_compat`: superblock backups only in `s_backup_bgs` (none here).
pub const COMPAT_SPARSE_SUPER2: u32 = 0x0200;
/// `s_feature_incompat`: file type in directory entries.
pub const INCOMPAT_FILETYPE: u32 = 0x0002;
/// `s_feature_incompat`: extent-mapped files.
pub const INCOMPAT_EXTENTS: u32 = 0x0040;
/// `s_feature_incompat`: bitmaps and inode tables anywhere (here: all after the data).
pub const INCOMPAT_FLEX_BG: u32 = 0x0200;
/// `s_feature_ro_compat`: sparse superblock backups.
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
/// `s_feature_ro_compat`: files over 2 GiB.
pub const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
/// `s_feature_ro_compat`: more than 65000 subdirectories.
pub const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
/// `s_feature_ro_compat`: large inodes with nanosecond times.
pub const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;

/// Inode flag: the directory is hashed (htree).
pub const INDEX_FL: u32 = 0x1000;
/// Inode flag: the inode uses extents.
pub const EXTENTS_FL: u32 = 0x0008_0000;

/// Everything the superblock says that depends on the image.
#[derive(Debug, Clone)]
pub struct SuperblockParams {
    /// Total inodes (`inodes_per_group * groups`).
    pub inodes_count: u32,
    /// Total blocks.
    pub blocks_count: u32,
    /// Free blocks.
    pub free_blocks: u32,
    /// Free inodes.
    pub free_inodes: u32,
    /// Inodes per group.
    pub inodes_per_group: u32,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Directory hash seed.
    pub hash_seed: [u8; 16],
    /// Volume label.
    pub label: [u8; 16],
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Encodes the 1024-byte superblock.
pub fn superblock(p: &SuperblockParams) -> [u8; 1024] {
    let mut b = [0u8; 1024];
    put32(&mut b, 0x00, p.inodes_count);
    put32(&mut b, 0x04, p.blocks_count);
    put32(&mut b, 0x0C, p.free_blocks);
    put32(&mut b, 0x10, p.free_inodes);
    put32(&mut b, 0x14, 0); // first data block (4 KiB blocks)
    put32(&mut b, 0x18, 2); // log block size: 1024 << 2
    put32(&mut b, 0x1C, 2); // log cluster size
    put32(&mut b, 0x20, super::BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x24, super::BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x28, p.inodes_per_group);
    put16(&mut b, 0x36, 0xFFFF); // max mount count: -1
    put16(&mut b, 0x38, 0xEF53); // magic
    put16(&mut b, 0x3A, 1); // state: clean
    put16(&mut b, 0x3C, 1); // errors: continue
    put32(&mut b, 0x4C, 1); // dynamic revision
    put32(&mut b, 0x54, super::FIRST_INO);
    put16(&mut b, 0x58, super::INODE_SIZE as u16);
    put32(
        &mut b,
        0x5C,
        COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | COMPAT_SPARSE_SUPER2,
    );
    put32(
        &mut b,
        0x60,
        INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG,
    );
    put32(
        &mut b,
        0x64,
        RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE,
    );
    b[0x68..0x78].copy_from_slice(&p.uuid);
    b[0x78..0x88].copy_from_slice(&p.label);
    b[0xEC..0xFC].copy_from_slice(&p.hash_seed);
    b[0xFC] = 1; // default hash: half_md4
    put16(&mut b, 0x15C, super::EXTRA_ISIZE as u16); // min extra isize
    put16(&mut b, 0x15E, super::EXTRA_ISIZE as u16); // want extra isize
    put32(&mut b, 0x160, 0x1); // flags: signed directory hash
    b[0x174] = 4; // log groups per flex
                  // s_backup_bgs (0x24C) stay 0: with sparse_super2 there are no superblock backups.
    b
}

/// Encodes one 32-byte group descriptor.
pub fn group_desc(
    block_bitmap: u32,
    inode_bitmap: u32,
    inode_table: u32,
    free_blocks: u16,
    free_inodes: u16,
    dirs: u16,
) -> [u8; 32] {
    let mut b = [0u8; 32];
    put32(&mut b, 0x00, block_bitmap);
    put32(&mut b, 0x04, inode_bitmap);
    put32(&mut b, 0x08, inode_table);
    put16(&mut b, 0x0C, free_blocks);
    put16(&mut b, 0x0E, free_inodes);
    put16(&mut b, 0x10, dirs);
    b
}

/// The fields of one inode.
#[derive(Debug, Clone)]
pub struct InodeFields {
    /// Type and permission bits.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Time used for atime, ctime, mtime and crtime.
    pub time: Timestamp,
    /// Link count.
    pub links: u16,
    /// Allocated 512-byte sectors (data, tree and attribute blocks).
    pub sectors: u64,
    /// Inode flags.
    pub flags: u32,
    /// The 60-byte block map / extent root / fast symlink / device number.
    pub i_block: [u8; 60],
    /// Attribute block, or 0.
    pub xattr_block: u64,
}

impl Default for InodeFields {
    fn default() -> Self {
        InodeFields {
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            time: Timestamp::default(),
            links: 0,
            sectors: 0,
            flags: 0,
            i_block: [0; 60],
            xattr_block: 0,
        }
    }
}

/// Splits a timestamp into ext4's 32-bit seconds and the `_extra` word (epoch bits + nanoseconds),
/// clamped to the representable range (1901..2446).
pub fn encode_time(t: Timestamp) -> (u32, u32) {
    let secs = t
        .secs
        .clamp(i32::MIN as i64, (1i64 << 34) + i32::MIN as i64 - 1);
    let epoch = ((secs - (secs as i32 as i64)) >> 32) as u32 & 3;
    (secs as i32 as u32, epoch | (t.nanos.min(999_999_999) << 2))
}

/// Encodes an inode into `b` (the full on-disk inode, `INODE_SIZE` bytes, zeroed by the caller; the
/// in-inode attribute area after `EXTRA_ISIZE` is filled separately).
pub fn inode(b: &mut [u8], f: &InodeFields) {
    let (secs, extra) = encode_time(f.time);
    put16(b, 0x00, f.mode);
    put16(b, 0x02, f.uid as u16);
    put32(b, 0x04, f.size as u32);
    put32(b, 0x08, secs); // atime
    put32(b, 0x0C, secs); // ctime
    put32(b, 0x10, secs); // mtime
    put16(b, 0x18, f.gid as u16);
    put16(b, 0x1A, f.links);
    put32(b, 0x1C, f.sectors as u32);
    put32(b, 0x20, f.flags);
    b[0x28..0x64].copy_from_slice(&f.i_block);
    put32(b, 0x68, f.xattr_block as u32);
    put32(b, 0x6C, (f.size >> 32) as u32);
    put16(b, 0x74, (f.sectors >> 32) as u16);
    put16(b, 0x76, (f.xattr_block >> 32) as u16);
    put16(b, 0x78, (f.uid >> 16) as u16);
    put16(b, 0x7A, (f.gid >> 16) as u16);
    put16(b, 0x80, super::EXTRA_ISIZE as u16);
    put32(b, 0x84, extra); // ctime extra
    put32(b, 0x88, extra); // mtime extra
    put32(b, 0x8C, extra); // atime extra
    put32(b, 0x90, secs); // crtime
    put32(b, 0x94, extra);
}

/// Encodes a device number into `i_block` the way Linux does (old format when it fits, else new).
pub fn device_i_block(major: u32, minor: u32) -> [u8; 60] {
    let mut ib = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut ib, 0, (major << 8) | minor);
    } else {
        let v = (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12);
        put32(&mut ib, 4, v);
    }
    ib
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_the_epoch_bits() {
        assert_eq!(encode_time(Timestamp { secs: 0, nanos: 5 }), (0, 20));
        let (s, x) = encode_time(Timestamp {
            secs: 1i64 << 32,
            nanos: 0,
        });
        assert_eq!((s, x & 3), (0, 1));
        let (s, x) = encode_time(Timestamp { secs: -1, nanos: 0 });
        assert_eq!((s, x & 3), (u32::MAX, 0));
    }

    #[test]
    fn device_numbers() {
        assert_eq!(&device_i_block(1, 3)[0..4], &0x0103u32.to_le_bytes());
        let ib = device_i_block(259, 70000);
        assert_eq!(&ib[0..4], &[0; 4]);
        assert_eq!(
            u32::from_le_bytes(ib[4..8].try_into().unwrap()),
            (70000 & 0xff) | (259 << 8) | ((70000 & !0xff) << 12)
        );
    }
}
