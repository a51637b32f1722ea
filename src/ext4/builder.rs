//! Streams file data into the image, then lays out and writes all metadata.

use std::collections::HashMap;
use std::io::{self, Read};

use lazyblk_image_format::is_all_zero;

use super::dir::{build_dir_blocks, build_htree_dir, file_type};
use super::disk::{self, InodeFields, SuperblockParams, EXTENTS_FL, INDEX_FL};
use super::extent::{self, MAX_EXTENT_LEN};
use super::tree::{display, Extent, Meta, NodeId, NodeKind, Tree, ROOT};
use super::xattr;
use super::*;

/// Identity of the filesystem, derived by the caller from the layer's content so images are reproducible.
#[derive(Debug, Clone, Default)]
pub struct FinishOptions {
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Directory hash seed.
    pub hash_seed: [u8; 16],
    /// Volume label (truncated to 16 bytes).
    pub label: String,
}

/// What was built.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Ext4Summary {
    /// Image size in bytes.
    pub image_size: u64,
    /// Total blocks.
    pub blocks: u64,
    /// Blocks holding file data.
    pub data_blocks: u64,
    /// Blocks holding metadata (directories, trees, attributes, bitmaps, inode tables).
    pub metadata_blocks: u64,
    /// Inodes in use (including the reserved ones).
    pub inodes_used: u32,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Devices, FIFOs and whiteouts.
    pub special: u64,
    /// Extended attributes that ext4 cannot store here and were dropped.
    pub dropped_xattrs: u64,
}

/// Builds one ext4 image into a [`BlockSink`].
pub struct Ext4Builder<S: BlockSink> {
    sink: S,
    tree: Tree,
    next_block: u64,
    buf: Vec<u8>,
}

const READ_BUF: usize = 1 << 20;

impl<S: BlockSink> Ext4Builder<S> {
    /// Starts an empty image.
    pub fn new(sink: S) -> Self {
        Ext4Builder {
            sink,
            tree: Tree::new(),
            next_block: DATA_START_BLOCK,
            buf: vec![0u8; READ_BUF],
        }
    }

    /// Blocks of file data written so far.
    pub fn data_blocks(&self) -> u64 {
        self.next_block - DATA_START_BLOCK
    }

    /// Adds a regular file, reading exactly `size` bytes of content from `data`. All-zero blocks become
    /// holes.
    pub fn add_file(
        &mut self,
        path: &[Vec<u8>],
        meta: Meta,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<NodeId, Ext4Error> {
        self.add_file_from(path, meta, size, data, None)
    }

    /// [`Ext4Builder::add_file`], telling the sink where each written run of data lies in the tar
    /// stream ([`BlockSink::write_file_data`]).
    pub fn add_file_from(
        &mut self,
        path: &[Vec<u8>],
        meta: Meta,
        size: u64,
        data: &mut dyn Read,
        origin: Option<&dyn DataOrigin>,
    ) -> Result<NodeId, Ext4Error> {
        let mut extents: Vec<Extent> = Vec::new();
        let mut logical: u64 = 0;
        let mut remaining = size;
        if size.div_ceil(BLOCK_SIZE as u64) > u32::MAX as u64 {
            return Err(Ext4Error::Unsupported(format!(
                "{}: file of {size} bytes is too large for ext4",
                display(path)
            )));
        }
        while remaining > 0 {
            let want = remaining.min(READ_BUF as u64) as usize;
            read_full(data, &mut self.buf[..want]).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => Ext4Error::Truncated {
                    path: display(path),
                    got: size - remaining,
                    size,
                },
                _ => Ext4Error::Source(e),
            })?;
            let nblk = want.div_ceil(BLOCK_SIZE);
            self.buf[want..nblk * BLOCK_SIZE].fill(0);
            let mut i = 0;
            while i < nblk {
                if is_all_zero(&self.buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]) {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < nblk && !is_all_zero(&self.buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE]) {
                    j += 1;
                }
                let n = (j - i) as u64;
                if self.next_block + n > MAX_BLOCKS / 2 {
                    return Err(Ext4Error::Unsupported(
                        "layer too large for one ext4 image (8 TiB of data)".into(),
                    ));
                }
                // The file's own bytes of these blocks (the tail of its last block is zeros the sink
                // already has), split where their origin in the tar changes.
                let real = (j * BLOCK_SIZE).min(want);
                let mut at = i * BLOCK_SIZE;
                while at < real {
                    let logical_byte = logical * BLOCK_SIZE as u64 + at as u64;
                    let (from, run) = match origin {
                        Some(o) => o.origin(logical_byte),
                        None => (None, u64::MAX),
                    };
                    let end = real.min(at.saturating_add(run.clamp(1, usize::MAX as u64) as usize));
                    let disk = self.next_block * BLOCK_SIZE as u64 + (at - i * BLOCK_SIZE) as u64;
                    match (from, origin.is_some()) {
                        // A hole of a sparse file inside a written block: zeros the sink has.
                        (None, true) => {}
                        (from, _) => self.sink.write_file_data(disk, &self.buf[at..end], from)?,
                    }
                    at = end;
                }
                push_extent(&mut extents, logical + i as u64, self.next_block, n);
                self.next_block += n;
                i = j;
            }
            logical += nblk as u64;
            remaining -= want as u64;
        }
        self.tree
            .insert(path, NodeKind::File { size, extents }, meta)
    }

    /// Adds a directory, symlink, device or FIFO (not a regular file: see [`Ext4Builder::add_file`]).
    pub fn add(
        &mut self,
        path: &[Vec<u8>],
        kind: NodeKind,
        meta: Meta,
    ) -> Result<NodeId, Ext4Error> {
        if let NodeKind::Symlink { target } = &kind {
            if target.is_empty() || target.len() >= BLOCK_SIZE || target.contains(&0) {
                return Err(Ext4Error::Path {
                    path: display(path),
                    reason: format!(
                        "symlink target of {} bytes is not storable (1..4095, no NUL)",
                        target.len()
                    ),
                });
            }
        }
        debug_assert!(!matches!(kind, NodeKind::File { .. }));
        self.tree.insert(path, kind, meta)
    }

    /// Adds a hard link at `path` to `target` (both cleaned paths inside the layer).
    pub fn link(&mut self, path: &[Vec<u8>], target: &[Vec<u8>]) -> Result<NodeId, Ext4Error> {
        self.tree.link(path, target)
    }

    /// Marks a directory opaque for overlayfs (`trusted.overlay.opaque=y`).
    pub fn set_opaque(&mut self, path: &[Vec<u8>]) -> Result<(), Ext4Error> {
        self.tree.set_opaque(path)
    }

    /// Writes all metadata and the head of the image; returns the sink and a summary.
    pub fn finish(mut self, opts: &FinishOptions) -> Result<(S, Ext4Summary), Ext4Error> {
        let tree = std::mem::take(&mut self.tree);
        let data_end = self.next_block;
        let mut summary = Ext4Summary {
            data_blocks: data_end - DATA_START_BLOCK,
            ..Default::default()
        };

        // 1. Inode numbers, breadth first so each directory's entries get neighbouring numbers.
        let numbering = number_inodes(&tree);
        let n_inodes = FIRST_INO - 1 + numbering.order.len() as u32; // highest inode number in use

        // 2. Metadata area: directories, slow symlinks, attribute blocks, extent trees, right after data.
        let meta_start = data_end;
        let mut area = MetaArea {
            start: meta_start,
            bytes: Vec::new(),
        };
        let mut inodes = vec![0u8; n_inodes as usize * INODE_SIZE];
        let mut xattr_blocks: HashMap<Vec<u8>, (u64, u32)> = HashMap::new();
        let mut dir_count_per_ino: Vec<(u32, bool)> = Vec::with_capacity(numbering.order.len() + 1);
        let all: Vec<(u32, NodeId)> = std::iter::once((ROOT_INO, ROOT))
            .chain(
                numbering
                    .order
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| (FIRST_INO + i as u32, id)),
            )
            .collect();
        for &(ino, id) in &all {
            let node = tree.node(id);
            let mut f = InodeFields {
                uid: node.meta.uid,
                gid: node.meta.gid,
                time: node.meta.mtime,
                links: numbering.links[id].min(u16::MAX as u32) as u16,
                ..Default::default()
            };
            let perm = node.meta.perm & 0o7777;
            let mut blocks_owned: u64 = 0;
            let mut xattrs = node.meta.xattrs.clone();
            match &node.kind {
                NodeKind::File { size, extents } => {
                    summary.files += 1;
                    f.mode = 0o100000 | perm;
                    f.size = *size;
                    f.flags = EXTENTS_FL;
                    blocks_owned = extents.iter().map(|e| e.len as u64).sum::<u64>();
                    blocks_owned += set_extents(&mut f, &mut area, extents);
                }
                NodeKind::Dir { children, opaque } => {
                    summary.dirs += 1;
                    f.mode = 0o040000 | perm;
                    if *opaque {
                        xattrs.insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
                    }
                    let parent = if id == ROOT {
                        ROOT_INO
                    } else {
                        numbering.parent_ino[id]
                    };
                    let mut entries = Vec::with_capacity(children.len());
                    let mut subdirs = 0u32;
                    for (name, &child) in children {
                        let ft = match &tree.node(child).kind {
                            NodeKind::File { .. } => file_type::REG,
                            NodeKind::Dir { .. } => {
                                subdirs += 1;
                                file_type::DIR
                            }
                            NodeKind::Symlink { .. } => file_type::SYMLINK,
                            NodeKind::CharDev { .. } => file_type::CHR,
                            NodeKind::BlockDev { .. } => file_type::BLK,
                            NodeKind::Fifo => file_type::FIFO,
                        };
                        entries.push((numbering.ino[child], name.as_slice(), ft));
                    }
                    let links = 2 + subdirs as u64;
                    f.links = if links > 65000 { 1 } else { links as u16 };
                    // Directories of more than one block are hashed, as mke2fs/e2fsck -D make them.
                    let (content, flags) =
                        match build_htree_dir(ino, parent, &entries, &opts.hash_seed) {
                            Some(c) => (c, EXTENTS_FL | INDEX_FL),
                            None => (build_dir_blocks(ino, parent, &entries), EXTENTS_FL),
                        };
                    let n = (content.len() / BLOCK_SIZE) as u64;
                    let at = area.push(&content);
                    f.size = content.len() as u64;
                    f.flags = flags;
                    blocks_owned = n + set_extents(&mut f, &mut area, &extent::contiguous(at, n));
                    dir_count_per_ino.push((ino, true));
                }
                NodeKind::Symlink { target } => {
                    summary.symlinks += 1;
                    f.mode = 0o120000 | 0o777;
                    f.size = target.len() as u64;
                    if target.len() < 60 {
                        f.i_block[..target.len()].copy_from_slice(target);
                    } else {
                        let mut blk = target.clone();
                        blk.resize(BLOCK_SIZE, 0);
                        let at = area.push(&blk);
                        f.flags = EXTENTS_FL;
                        blocks_owned =
                            1 + set_extents(&mut f, &mut area, &extent::contiguous(at, 1));
                    }
                }
                NodeKind::CharDev { major, minor } => {
                    summary.special += 1;
                    f.mode = 0o020000 | perm;
                    f.i_block = disk::device_i_block(*major, *minor);
                }
                NodeKind::BlockDev { major, minor } => {
                    summary.special += 1;
                    f.mode = 0o060000 | perm;
                    f.i_block = disk::device_i_block(*major, *minor);
                }
                NodeKind::Fifo => {
                    summary.special += 1;
                    f.mode = 0o010000 | perm;
                }
            }
            let raw = &mut inodes[(ino as usize - 1) * INODE_SIZE..ino as usize * INODE_SIZE];
            let (entries, skipped) = xattr::to_entries(&xattrs);
            for (name, why) in skipped {
                summary.dropped_xattrs += 1;
                tracing::warn!(path = %path_of(&tree, &numbering, id), xattr = %String::from_utf8_lossy(&name), reason = %why, "extended attribute not stored");
            }
            if !xattr::encode_in_inode(&mut raw[128 + EXTRA_ISIZE..], &entries) {
                let encoded = xattr::encode_block(&entries, 0).map_err(|e| Ext4Error::Path {
                    path: path_of(&tree, &numbering, id),
                    reason: e.to_string(),
                })?;
                let slot = xattr_blocks.entry(encoded).or_insert((0, 0));
                if slot.1 == 0 {
                    slot.0 = area.reserve(1);
                }
                slot.1 += 1;
                f.xattr_block = slot.0;
                blocks_owned += 1;
            }
            f.sectors = blocks_owned * (BLOCK_SIZE as u64 / 512);
            disk::inode(raw, &f);
        }
        for (content, (block, refs)) in &xattr_blocks {
            let mut b = content.clone();
            b[4..8].copy_from_slice(&refs.to_le_bytes());
            area.write(*block, &b);
        }
        let area_blocks = area.blocks();

        // 3. Groups: bitmaps and inode tables follow the metadata area.
        let geo = Geometry::solve(meta_start + area_blocks, n_inodes)?;
        let bitmap_start = meta_start + area_blocks;
        let ibitmap_start = bitmap_start + geo.groups;
        let itable_start = ibitmap_start + geo.groups;
        let itable_blocks = geo.inodes_per_group as u64 * INODE_SIZE as u64 / BLOCK_SIZE as u64;
        let meta_end = itable_start + geo.groups * itable_blocks;
        let total = geo.blocks;
        summary.metadata_blocks = meta_end - meta_start;
        summary.inodes_used = n_inodes;

        // 4. Block bitmap: head, reachable file data, all metadata.
        let gdt_blocks = (geo.groups * 32).div_ceil(BLOCK_SIZE as u64);
        let mut used = Bitmap::new(total);
        used.set_range(0, 1 + gdt_blocks);
        for &(_, id) in &all {
            if let NodeKind::File { extents, .. } = &tree.node(id).kind {
                for e in extents {
                    used.set_range(e.physical, e.physical + e.len as u64);
                }
            }
        }
        used.set_range(meta_start, meta_end);

        // 5. Write metadata area, bitmaps, inode tables.
        self.sink
            .write_at(meta_start * BLOCK_SIZE as u64, &area.bytes)?;
        let mut group_free_blocks = Vec::with_capacity(geo.groups as usize);
        for g in 0..geo.groups {
            let mut blk = vec![0u8; BLOCK_SIZE];
            let first = g * BLOCKS_PER_GROUP;
            let mut free = 0u16;
            for i in 0..BLOCKS_PER_GROUP {
                let b = first + i;
                if b >= total || used.get(b) {
                    blk[(i / 8) as usize] |= 1 << (i % 8);
                } else {
                    free += 1;
                }
            }
            group_free_blocks.push(free);
            self.sink
                .write_at((bitmap_start + g) * BLOCK_SIZE as u64, &blk)?;
        }
        let ipg = geo.inodes_per_group;
        let mut group_free_inodes = Vec::with_capacity(geo.groups as usize);
        let mut group_dirs = vec![0u16; geo.groups as usize];
        for &(ino, _) in &dir_count_per_ino {
            group_dirs[((ino - 1) / ipg) as usize] += 1;
        }
        for g in 0..geo.groups {
            let mut blk = vec![0u8; BLOCK_SIZE];
            let mut free = 0u16;
            for i in 0..(BLOCK_SIZE as u32 * 8) {
                let ino = g as u32 * ipg + i + 1;
                if i >= ipg || ino <= n_inodes {
                    blk[(i / 8) as usize] |= 1 << (i % 8);
                } else {
                    free += 1;
                }
            }
            group_free_inodes.push(free);
            self.sink
                .write_at((ibitmap_start + g) * BLOCK_SIZE as u64, &blk)?;
        }
        let table_bytes = ipg as usize * INODE_SIZE;
        for g in 0..geo.groups as usize {
            let lo = (g * table_bytes).min(inodes.len());
            let hi = ((g + 1) * table_bytes).min(inodes.len());
            if hi > lo {
                let at = (itable_start + g as u64 * itable_blocks) * BLOCK_SIZE as u64;
                self.sink.write_at(at, &inodes[lo..hi])?;
            }
        }

        // 6. The head: superblock and group descriptors.
        let free_blocks: u64 = group_free_blocks.iter().map(|&f| f as u64).sum();
        let free_inodes: u64 = group_free_inodes.iter().map(|&f| f as u64).sum();
        let mut label = [0u8; 16];
        let l = opts.label.as_bytes();
        label[..l.len().min(16)].copy_from_slice(&l[..l.len().min(16)]);
        let sb = disk::superblock(&SuperblockParams {
            inodes_count: ipg * geo.groups as u32,
            blocks_count: total as u32,
            free_blocks: free_blocks as u32,
            free_inodes: free_inodes as u32,
            inodes_per_group: ipg,
            uuid: opts.uuid,
            hash_seed: opts.hash_seed,
            label,
        });
        let mut gdt = vec![0u8; (gdt_blocks as usize) * BLOCK_SIZE];
        for g in 0..geo.groups as usize {
            let d = disk::group_desc(
                (bitmap_start + g as u64) as u32,
                (ibitmap_start + g as u64) as u32,
                (itable_start + g as u64 * itable_blocks) as u32,
                group_free_blocks[g],
                group_free_inodes[g],
                group_dirs[g],
            );
            gdt[g * 32..(g + 1) * 32].copy_from_slice(&d);
        }
        self.sink.write_at(1024, &sb)?;
        self.sink.write_at(BLOCK_SIZE as u64, &gdt)?;
        self.sink.set_size(total * BLOCK_SIZE as u64)?;
        summary.blocks = total;
        summary.image_size = total * BLOCK_SIZE as u64;
        Ok((self.sink, summary))
    }
}

/// Reads exactly `buf.len()` bytes (like `read_exact`, but retrying on `Interrupted` explicitly).
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<()> {
    r.read_exact(buf)
}

fn push_extent(extents: &mut Vec<Extent>, logical: u64, physical: u64, mut n: u64) {
    let (mut logical, mut physical) = (logical, physical);
    if let Some(last) = extents.last_mut() {
        if last.logical as u64 + last.len as u64 == logical
            && last.physical + last.len as u64 == physical
        {
            let room = (MAX_EXTENT_LEN - last.len as u32) as u64;
            let take = room.min(n);
            // MAX_EXTENT_LEN (32768) fits in u16 because ee_len's top bit is only set for unwritten extents.
            last.len = (last.len as u64 + take) as u16;
            logical += take;
            physical += take;
            n -= take;
        }
    }
    while n > 0 {
        let take = n.min(MAX_EXTENT_LEN as u64);
        extents.push(Extent {
            logical: logical as u32,
            len: take as u16,
            physical,
        });
        logical += take;
        physical += take;
        n -= take;
    }
}

/// Builds the extent tree of an inode, allocating tree blocks in `area`; returns how many it used.
fn set_extents(f: &mut InodeFields, area: &mut MetaArea, extents: &[Extent]) -> u64 {
    let need = extent::blocks_needed(extents.len());
    let first = if need > 0 { area.reserve(need) } else { 0 };
    let (ib, blocks) = extent::build(extents, first);
    if need > 0 {
        area.write(first, &blocks);
    }
    f.i_block = ib;
    need
}

/// The growing run of metadata blocks after the file data.
struct MetaArea {
    start: u64,
    bytes: Vec<u8>,
}

impl MetaArea {
    fn blocks(&self) -> u64 {
        (self.bytes.len() / BLOCK_SIZE) as u64
    }
    /// Appends whole blocks; returns the first block number.
    fn push(&mut self, content: &[u8]) -> u64 {
        debug_assert_eq!(content.len() % BLOCK_SIZE, 0);
        let at = self.start + self.blocks();
        self.bytes.extend_from_slice(content);
        at
    }
    fn reserve(&mut self, n: u64) -> u64 {
        let at = self.start + self.blocks();
        self.bytes
            .resize(self.bytes.len() + n as usize * BLOCK_SIZE, 0);
        at
    }
    fn write(&mut self, block: u64, content: &[u8]) {
        let off = (block - self.start) as usize * BLOCK_SIZE;
        self.bytes[off..off + content.len()].copy_from_slice(content);
    }
}

struct Numbering {
    /// Non-root nodes in inode order (inode `FIRST_INO + i`).
    order: Vec<NodeId>,
    /// Inode number per node id (0 if unreachable).
    ino: Vec<u32>,
    /// Parent directory inode per directory node id.
    parent_ino: Vec<u32>,
    /// Reachable directory entries per node id.
    links: Vec<u32>,
    /// One name per node id, for error messages: (parent node, name).
    name: Vec<Option<(NodeId, Vec<u8>)>>,
}

fn number_inodes(tree: &Tree) -> Numbering {
    let n = tree.nodes().len();
    let mut num = Numbering {
        order: Vec::new(),
        ino: vec![0; n],
        parent_ino: vec![0; n],
        links: vec![0; n],
        name: vec![None; n],
    };
    num.ino[ROOT] = ROOT_INO;
    num.links[ROOT] = 1;
    let mut queue = std::collections::VecDeque::from([ROOT]);
    while let Some(dir) = queue.pop_front() {
        let NodeKind::Dir { children, .. } = &tree.node(dir).kind else {
            continue;
        };
        for (name, &child) in children {
            num.links[child] += 1;
            if num.ino[child] != 0 {
                continue;
            }
            num.ino[child] = FIRST_INO + num.order.len() as u32;
            num.order.push(child);
            num.name[child] = Some((dir, name.clone()));
            if tree.node(child).kind.is_dir() {
                num.parent_ino[child] = num.ino[dir];
                queue.push_back(child);
            }
        }
    }
    num
}

fn path_of(tree: &Tree, num: &Numbering, mut id: NodeId) -> String {
    let _ = tree;
    let mut parts = Vec::new();
    while let Some((parent, name)) = &num.name[id] {
        parts.push(name.clone());
        id = *parent;
    }
    parts.reverse();
    display(&parts)
}

/// Group count, inodes per group and total blocks for an image whose metadata area ends at `fixed_end`.
struct Geometry {
    groups: u64,
    inodes_per_group: u32,
    blocks: u64,
}

impl Geometry {
    fn solve(fixed_end: u64, n_inodes: u32) -> Result<Geometry, Ext4Error> {
        let per_block = (BLOCK_SIZE / INODE_SIZE) as u64;
        let mut groups = 1u64;
        loop {
            let ipg = (n_inodes as u64)
                .div_ceil(groups)
                .max(per_block)
                .next_multiple_of(per_block);
            if ipg > BLOCKS_PER_GROUP {
                groups = (n_inodes as u64).div_ceil(BLOCKS_PER_GROUP);
                continue;
            }
            let itable = ipg * INODE_SIZE as u64 / BLOCK_SIZE as u64;
            let mut blocks = fixed_end + groups * (2 + itable);
            // Every group must hold at least a few blocks of the filesystem.
            blocks = blocks.max((groups - 1) * BLOCKS_PER_GROUP + 256);
            let need = blocks.div_ceil(BLOCKS_PER_GROUP);
            if need <= groups {
                if blocks > MAX_BLOCKS || groups > GDT_RESERVED_BLOCKS * (BLOCK_SIZE as u64 / 32) {
                    return Err(Ext4Error::Unsupported(format!(
                        "image of {blocks} blocks is too large"
                    )));
                }
                return Ok(Geometry {
                    groups,
                    inodes_per_group: ipg as u32,
                    blocks,
                });
            }
            groups = need;
        }
    }
}

struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }
    fn set_range(&mut self, from: u64, to: u64) {
        for b in from..to {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }
    fn get(&self, b: u64) -> bool {
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_split() {
        let mut v = Vec::new();
        push_extent(&mut v, 0, 100, 10);
        push_extent(&mut v, 10, 110, 5);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].len, 15);
        push_extent(&mut v, 20, 115, 1); // logical gap (hole)
        assert_eq!(v.len(), 2);
        let mut w = Vec::new();
        push_extent(&mut w, 0, 0, 70000);
        assert_eq!(w.iter().map(|e| e.len as u64).sum::<u64>(), 70000);
        assert!(w.iter().all(|e| e.len as u32 <= MAX_EXTENT_LEN));
    }

    #[test]
    fn geometry_grows_for_inodes() {
        let g = Geometry::solve(3000, 100).unwrap();
        assert_eq!(g.groups, 1);
        let g = Geometry::solve(3000, 100_000).unwrap();
        assert!(g.groups >= 4 && g.inodes_per_group as u64 * g.groups >= 100_000);
        assert!(g.blocks > (g.groups - 1) * BLOCKS_PER_GROUP);
    }
}
