//! Directory blocks: linear (one block or a chain of them) and hashed (htree: a `dx_root` block, an
//! optional level of `dx_node` blocks, then leaf blocks in hash order), so a lookup in a directory of
//! tens of thousands of entries reads two or three blocks instead of all of them.

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

/// One directory entry to write: inode, name, file type.
pub type DirEntry<'a> = (u32, &'a [u8], u8);

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
        last_entry = Some(push_entry(&mut out, ino, name, ft));
    }
    close_block(&mut out, block_start, last_entry);
    out
}

/// Appends one entry (its minimal `rec_len`) to `out`; returns where it starts.
fn push_entry(out: &mut Vec<u8>, ino: u32, name: &[u8], ft: u8) -> usize {
    let len = rec_len(name.len());
    let at = out.len();
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.push(name.len() as u8);
    out.push(ft);
    out.extend_from_slice(name);
    out.resize(at + len, 0);
    at
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

/// Largest entry count of a dx_root block (4 KiB block, 32 bytes of headers).
const ROOT_LIMIT: usize = (BLOCK_SIZE - 32) / 8;
/// Largest entry count of a dx_node block (8 bytes of fake entry).
const NODE_LIMIT: usize = (BLOCK_SIZE - 8) / 8;

/// ext4's directory hash, half-MD4 with signed characters (the superblock says "signed hash"),
/// keyed with `seed` (the superblock's `s_hash_seed`). Returns the major hash (low bit clear).
pub fn half_md4_hash(name: &[u8], seed: &[u8; 16]) -> u32 {
    let mut buf = [0x67452301u32, 0xefcdab89, 0x98badcfe, 0x10325476];
    let s: [u32; 4] =
        std::array::from_fn(|i| u32::from_le_bytes(seed[i * 4..i * 4 + 4].try_into().expect("4")));
    if s.iter().any(|&w| w != 0) {
        buf = s;
    }
    let mut p = name;
    let mut len = name.len() as isize;
    while len > 0 {
        let input = str2hashbuf(p, len as usize, 8);
        half_md4_transform(&mut buf, &input);
        len -= 32;
        p = &p[p.len().min(32)..];
    }
    let mut hash = buf[1] & !1;
    // The kernel reserves the last value for end-of-directory.
    if hash == 0x7fff_ffff << 1 {
        hash = (0x7fff_ffff - 1) << 1;
    }
    hash
}

fn str2hashbuf(msg: &[u8], len: usize, num: usize) -> [u32; 8] {
    let mut out = [0u32; 8];
    let mut pad = (len as u32) | ((len as u32) << 8);
    pad |= pad << 16;
    let mut val = pad;
    let take = len.min(num * 4);
    let mut k = 0usize;
    for (i, &b) in msg[..take].iter().enumerate() {
        let c = b as i8 as i32 as u32; // signed char, as the superblock's hash flag says
        val = c.wrapping_add(val << 8);
        if i % 4 == 3 {
            out[k] = val;
            k += 1;
            val = pad;
        }
    }
    if k < num {
        out[k] = val;
        k += 1;
    }
    while k < num {
        out[k] = pad;
        k += 1;
    }
    out
}

fn half_md4_transform(buf: &mut [u32; 4], x: &[u32; 8]) {
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let (mut a, mut b, mut c, mut d) = (buf[0], buf[1], buf[2], buf[3]);
    macro_rules! round {
        ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a.wrapping_add($f($b, $c, $d)).wrapping_add($x);
            $a = $a.rotate_left($s);
        };
    }
    round!(f, a, b, c, d, x[0], 3);
    round!(f, d, a, b, c, x[1], 7);
    round!(f, c, d, a, b, x[2], 11);
    round!(f, b, c, d, a, x[3], 19);
    round!(f, a, b, c, d, x[4], 3);
    round!(f, d, a, b, c, x[5], 7);
    round!(f, c, d, a, b, x[6], 11);
    round!(f, b, c, d, a, x[7], 19);
    round!(g, a, b, c, d, x[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, x[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[6].wrapping_add(K2), 13);
    round!(h, a, b, c, d, x[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, x[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[4].wrapping_add(K3), 15);
    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// Builds a hashed (htree) directory: block 0 the `dx_root` (with `.` and `..`), then, for large
/// directories, one level of `dx_node` blocks, then the leaves, each a linear block of entries whose
/// hashes lie in its range. Returns `None` when the entries fit one linear block (ext4 indexes only
/// larger directories) or would need more than two index levels (then the linear form is used).
pub fn build_htree_dir(
    self_ino: u32,
    parent_ino: u32,
    entries: &[(u32, &[u8], u8)],
    seed: &[u8; 16],
) -> Option<Vec<u8>> {
    let linear_bytes: usize = 24
        + entries
            .iter()
            .map(|(_, n, _)| rec_len(n.len()))
            .sum::<usize>();
    if linear_bytes <= BLOCK_SIZE {
        return None;
    }
    let mut hashed: Vec<(u32, &DirEntry)> = entries
        .iter()
        .map(|e| (half_md4_hash(e.1, seed), e))
        .collect();
    hashed.sort_by(|a, b| (a.0, a.1 .1).cmp(&(b.0, b.1 .1)));
    // Leaves: (first hash, with the continuation bit when it continues the previous leaf's hash).
    let mut leaves: Vec<Vec<u8>> = Vec::new();
    let mut starts: Vec<u32> = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut last_at: Option<usize> = None;
    let mut prev_hash: Option<u32> = None;
    for (hash, &(ino, name, ft)) in &hashed {
        let len = rec_len(name.len());
        if cur.is_empty() || cur.len() + len > BLOCK_SIZE {
            if !cur.is_empty() {
                close_block(&mut cur, 0, last_at);
                leaves.push(std::mem::take(&mut cur));
            }
            let continues = prev_hash == Some(*hash);
            starts.push(if continues { hash | 1 } else { *hash });
        }
        last_at = Some(push_entry(&mut cur, ino, name, ft));
        prev_hash = Some(*hash);
    }
    close_block(&mut cur, 0, last_at);
    leaves.push(cur);
    let n = leaves.len();
    let levels = if n <= ROOT_LIMIT {
        0
    } else if n <= ROOT_LIMIT * NODE_LIMIT {
        1
    } else {
        return None;
    };
    let put_entries = |blk: &mut [u8], at: usize, limit: usize, items: &[(u32, u32)]| {
        blk[at..at + 2].copy_from_slice(&(limit as u16).to_le_bytes());
        blk[at + 2..at + 4].copy_from_slice(&(items.len() as u16).to_le_bytes());
        blk[at + 4..at + 8].copy_from_slice(&items[0].1.to_le_bytes());
        for (i, &(hash, block)) in items.iter().enumerate().skip(1) {
            let o = at + i * 8;
            blk[o..o + 4].copy_from_slice(&hash.to_le_bytes());
            blk[o + 4..o + 8].copy_from_slice(&block.to_le_bytes());
        }
    };
    let mut root = vec![0u8; BLOCK_SIZE];
    let dirent = |b: &mut [u8], at: usize, ino: u32, rl: u16, name: &[u8]| {
        b[at..at + 4].copy_from_slice(&ino.to_le_bytes());
        b[at + 4..at + 6].copy_from_slice(&rl.to_le_bytes());
        b[at + 6] = name.len() as u8;
        b[at + 7] = file_type::DIR;
        b[at + 8..at + 8 + name.len()].copy_from_slice(name);
    };
    dirent(&mut root, 0, self_ino, 12, b".");
    dirent(&mut root, 12, parent_ino, (BLOCK_SIZE - 12) as u16, b"..");
    root[28] = 1; // hash version: half_md4 (signedness from the superblock)
    root[29] = 8; // info length
    root[30] = levels;
    let mut out = Vec::with_capacity((2 + n + n / NODE_LIMIT) * BLOCK_SIZE);
    if levels == 0 {
        let items: Vec<(u32, u32)> = starts
            .iter()
            .enumerate()
            .map(|(i, &h)| (h, 1 + i as u32))
            .collect();
        put_entries(&mut root, 32, ROOT_LIMIT, &items);
        out.extend_from_slice(&root);
    } else {
        let nodes = n.div_ceil(NODE_LIMIT);
        let first_leaf = 1 + nodes as u32;
        let mut root_items = Vec::with_capacity(nodes);
        let mut node_blocks = Vec::with_capacity(nodes);
        for k in 0..nodes {
            let range = k * NODE_LIMIT..((k + 1) * NODE_LIMIT).min(n);
            let items: Vec<(u32, u32)> = range
                .clone()
                .map(|i| (starts[i], first_leaf + i as u32))
                .collect();
            let mut node = vec![0u8; BLOCK_SIZE];
            node[4..6].copy_from_slice(&(BLOCK_SIZE as u16).to_le_bytes());
            put_entries(&mut node, 8, NODE_LIMIT, &items);
            root_items.push((starts[range.start], 1 + k as u32));
            node_blocks.push(node);
        }
        put_entries(&mut root, 32, ROOT_LIMIT, &root_items);
        out.extend_from_slice(&root);
        for nb in node_blocks {
            out.extend_from_slice(&nb);
        }
    }
    for l in leaves {
        out.extend_from_slice(&l);
    }
    Some(out)
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
    fn hash_matches_e2fsprogs() {
        // What `debugfs -R "dx_hash -h half_md4 -s SEED NAME"` (e2fsprogs 1.47) prints.
        let zero = [0u8; 16];
        assert_eq!(half_md4_hash(b"lost+found", &zero), 0x591de422);
        assert_eq!(
            half_md4_hash(b"a-rather-long-file-name-over-32-bytes-long.txt", &zero),
            0xf22fc980
        );
        assert_eq!(half_md4_hash(b"f000123", &[7u8; 16]), 0xacf53fa6);
    }

    #[test]
    fn htree_layout() {
        let names: Vec<Vec<u8>> = (0..30_000)
            .map(|i| format!("f{i:06}").into_bytes())
            .collect();
        let entries: Vec<(u32, &[u8], u8)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (100 + i as u32, n.as_slice(), file_type::REG))
            .collect();
        let b = build_htree_dir(12, 2, &entries, &[7u8; 16]).unwrap();
        assert_eq!(&b[28..31], &[1, 8, 0]);
        let count = u16::from_le_bytes([b[34], b[35]]) as usize;
        assert_eq!(b.len() / BLOCK_SIZE, 1 + count);
        // Every leaf entry hashes into its leaf's range.
        let starts: Vec<u32> = (0..count)
            .map(|i| {
                if i == 0 {
                    0
                } else {
                    u32::from_le_bytes(b[32 + i * 8..36 + i * 8].try_into().unwrap()) & !1
                }
            })
            .collect();
        let mut seen = 0;
        for (i, leaf) in b[BLOCK_SIZE..].chunks(BLOCK_SIZE).enumerate() {
            for (_, name) in parse(leaf) {
                let h = half_md4_hash(&name, &[7u8; 16]);
                assert!(h >= starts[i], "leaf {i}");
                if i + 1 < count {
                    assert!(h <= starts[i + 1]);
                }
                seen += 1;
            }
        }
        assert_eq!(seen, 30_000);
        assert!(build_htree_dir(12, 2, &entries[..10], &[7u8; 16]).is_none());
    }

    #[test]
    fn empty_dir_is_one_block() {
        let b = build_dir_blocks(2, 2, &[]);
        assert_eq!(b.len(), BLOCK_SIZE);
        assert_eq!(parse(&b).len(), 2);
    }
}
