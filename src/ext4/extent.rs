//! Extent trees: up to four extents live in the inode, more get leaf (and index) blocks.

use super::tree::Extent;
use super::BLOCK_SIZE;

const MAGIC: u16 = 0xF30A;
/// Entries that fit in the inode's `i_block`.
pub const IN_INODE: usize = 4;
/// Entries that fit in one tree block: (4096 - 12) / 12.
pub const PER_BLOCK: usize = (BLOCK_SIZE - 12) / 12;
/// Longest initialized extent.
pub const MAX_EXTENT_LEN: u32 = 32768;

/// Number of tree blocks an extent list of `n` entries needs.
pub fn blocks_needed(n: usize) -> u64 {
    let mut total = 0u64;
    let mut level = n;
    while level > IN_INODE {
        level = level.div_ceil(PER_BLOCK);
        total += level as u64;
    }
    total
}

fn header(buf: &mut [u8], entries: usize, max: usize, depth: u16) {
    buf[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    buf[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
    buf[4..6].copy_from_slice(&(max as u16).to_le_bytes());
    buf[6..8].copy_from_slice(&depth.to_le_bytes());
    buf[8..12].copy_from_slice(&0u32.to_le_bytes());
}

fn put_leaf(buf: &mut [u8], e: &Extent) {
    buf[0..4].copy_from_slice(&e.logical.to_le_bytes());
    buf[4..6].copy_from_slice(&e.len.to_le_bytes());
    buf[6..8].copy_from_slice(&((e.physical >> 32) as u16).to_le_bytes());
    buf[8..12].copy_from_slice(&(e.physical as u32).to_le_bytes());
}

fn put_index(buf: &mut [u8], logical: u32, child: u64) {
    buf[0..4].copy_from_slice(&logical.to_le_bytes());
    buf[4..8].copy_from_slice(&(child as u32).to_le_bytes());
    buf[8..10].copy_from_slice(&((child >> 32) as u16).to_le_bytes());
    buf[10..12].copy_from_slice(&0u16.to_le_bytes());
}

/// Builds the tree for `extents` (sorted by logical block). Tree blocks are numbered from `first_block`
/// and returned concatenated, [`blocks_needed`] of them; the return value's first part is `i_block`.
pub fn build(extents: &[Extent], first_block: u64) -> ([u8; 60], Vec<u8>) {
    let mut i_block = [0u8; 60];
    if extents.len() <= IN_INODE {
        header(&mut i_block, extents.len(), IN_INODE, 0);
        for (i, e) in extents.iter().enumerate() {
            put_leaf(&mut i_block[12 + 12 * i..], e);
        }
        return (i_block, Vec::new());
    }
    let mut blocks: Vec<u8> = Vec::new();
    let mut next = first_block;
    // Level 0: leaves. `level` holds (first logical block, tree block number) of each node built.
    let mut level: Vec<(u32, u64)> = Vec::new();
    for group in extents.chunks(PER_BLOCK) {
        let mut b = vec![0u8; BLOCK_SIZE];
        header(&mut b, group.len(), PER_BLOCK, 0);
        for (i, e) in group.iter().enumerate() {
            put_leaf(&mut b[12 + 12 * i..], e);
        }
        blocks.extend_from_slice(&b);
        level.push((group[0].logical, next));
        next += 1;
    }
    let mut depth = 1u16;
    while level.len() > IN_INODE {
        let mut up = Vec::new();
        for group in level.chunks(PER_BLOCK) {
            let mut b = vec![0u8; BLOCK_SIZE];
            header(&mut b, group.len(), PER_BLOCK, depth);
            for (i, &(logical, child)) in group.iter().enumerate() {
                put_index(&mut b[12 + 12 * i..], logical, child);
            }
            blocks.extend_from_slice(&b);
            up.push((group[0].0, next));
            next += 1;
        }
        level = up;
        depth += 1;
    }
    header(&mut i_block, level.len(), IN_INODE, depth);
    for (i, &(logical, child)) in level.iter().enumerate() {
        put_index(&mut i_block[12 + 12 * i..], logical, child);
    }
    (i_block, blocks)
}

/// Extents for `blocks` contiguous blocks at `physical`, split at the extent length limit.
pub fn contiguous(physical: u64, blocks: u64) -> Vec<Extent> {
    let mut v = Vec::new();
    let mut done = 0u64;
    while done < blocks {
        let len = (blocks - done).min(MAX_EXTENT_LEN as u64);
        v.push(Extent {
            logical: done as u32,
            len: len as u16,
            physical: physical + done,
        });
        done += len;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(blocks_needed(4), 0);
        assert_eq!(blocks_needed(5), 1);
        assert_eq!(blocks_needed(340 * 4), 4);
        assert_eq!(blocks_needed(340 * 4 + 1), 5 + 1);
        let ext: Vec<Extent> = (0..2000)
            .map(|i| Extent {
                logical: i * 2,
                len: 1,
                physical: 5000 + i as u64 * 2,
            })
            .collect();
        let (ib, blocks) = build(&ext, 100);
        assert_eq!(blocks.len() as u64 / BLOCK_SIZE as u64, blocks_needed(2000));
        assert_eq!(u16::from_le_bytes([ib[6], ib[7]]), 2, "depth");
        assert_eq!(contiguous(10, 70000).len(), 3);
    }
}
