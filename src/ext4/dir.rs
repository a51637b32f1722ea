//! Linear directory blocks.

use super::BLOCK_SIZE;

/// ext4 directory entry file types.
pub mod file_type {
    /// Regular file.
    pub const REG: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHR: u8 = 3;
    /// Block device.
    pub const BLK: u8 = 4;
    /// FIFO.
    pub const FIFO: u8 = 5;
    /// Symbolic link.
    pub const SYMLINK: u8 = 7;
}

fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Builds the blocks of a directory: `.`, `..`, then `entries` (inode, name, file type) in the given
/// order. Entries never span blocks; the last entry of each block takes up the rest of it.
pub fn build_dir_blocks(self_ino: u32, parent_ino: u32, entries: &[(u32, &[u8], u8)]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(BLOCK_SIZE);
    let mut block_start = 0usize;
    let mut last_entry: Option<usize> = None;
    let dot: [(u32, &[u8], u8); 2] = [
        (self_ino, b".", file_type::DIR),
        (parent_ino, b"..", file_type::DIR),
    ];
    for &(ino, name, ft) in dot.iter().chain(entries.iter()) {
        let len = rec_len(name.len());
        if out.len() + len > block_start + BLOCK_SIZE {
            close_block(&mut out, block_start, last_entry);
            block_start = out.len();
        }
        let at = out.len();
        out.extend_from_slice(&ino.to_le_bytes());
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.push(name.len() as u8);
        out.push(ft);
        out.extend_from_slice(name);
        out.resize(at + len, 0);
        last_entry = Some(at);
    }
    close_block(&mut out, block_start, last_entry);
    out
}

/// Stretches the last entry of the block that starts at `block_start` to the end of the block.
fn close_block(out: &mut Vec<u8>, block_start: usize, last_entry: Option<usize>) {
    let end = block_start + BLOCK_SIZE;
    if let Some(at) = last_entry.filter(|&a| a >= block_start) {
        let len = (end - at) as u16;
        out[at + 4..at + 6].copy_from_slice(&len.to_le_bytes());
    }
    out.resize(end, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses blocks back into (inode, name) pairs, checking rec_len chains cover every block exactly.
    fn parse(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        for blk in b.chunks(BLOCK_SIZE) {
            let mut at = 0;
            while at < BLOCK_SIZE {
                let ino = u32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
                let rl = u16::from_le_bytes(blk[at + 4..at + 6].try_into().unwrap()) as usize;
                let nl = blk[at + 6] as usize;
                assert!(rl >= 8 + nl && rl.is_multiple_of(4));
                v.push((ino, blk[at + 8..at + 8 + nl].to_vec()));
                at += rl;
            }
            assert_eq!(at, BLOCK_SIZE);
        }
        v
    }

    #[test]
    fn many_entries_span_blocks() {
        let names: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("file-{i:05}-with-a-longer-name").into_bytes())
            .collect();
        let entries: Vec<(u32, &[u8], u8)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (100 + i as u32, n.as_slice(), file_type::REG))
            .collect();
        let b = build_dir_blocks(12, 2, &entries);
        assert!(b.len() > BLOCK_SIZE && b.len().is_multiple_of(BLOCK_SIZE));
        let parsed = parse(&b);
        assert_eq!(parsed.len(), 2002);
        assert_eq!(parsed[0], (12, b".".to_vec()));
        assert_eq!(parsed[1], (2, b"..".to_vec()));
        assert_eq!(parsed[2001].1, names[1999]);
    }

    #[test]
    fn empty_dir_is_one_block() {
        let b = build_dir_blocks(2, 2, &[]);
        assert_eq!(b.len(), BLOCK_SIZE);
        assert_eq!(parse(&b).len(), 2);
    }
}
