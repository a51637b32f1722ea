//! The in-memory tree of one layer: what the ext4 image will contain, built entry by entry with the path
//! semantics of containerd's `archive.Apply` (names cleaned inside the root, later entries replace
//! earlier ones, directories merge).

use std::collections::BTreeMap;

use super::Ext4Error;

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;

/// The root directory's node id.
pub const ROOT: NodeId = 0;

/// Longest name ext4 stores in a directory entry.
pub const MAX_NAME_LEN: usize = 255;

/// Most hard links ext4 allows to one file.
pub const MAX_LINKS: u32 = 65000;

/// A timestamp with nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    /// Seconds since the Unix epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nanos: u32,
}

/// Ownership, permissions, times and extended attributes of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (also used for atime, ctime and crtime: the image is reproducible).
    pub mtime: Timestamp,
    /// Extended attributes, full names (`user.foo`) → values.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Meta {
    /// Metadata for a directory the layer implies but does not list (like containerd's `MkdirAll`).
    pub fn implicit_dir() -> Meta {
        Meta {
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: BTreeMap::new(),
        }
    }
}

/// One extent of a regular file's data: `len` blocks at logical block `logical` stored at `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First logical block of the file.
    pub logical: u32,
    /// Number of blocks (at most 32768).
    pub len: u16,
    /// First physical block on the disk.
    pub physical: u64,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file whose data blocks are already written.
    File {
        /// Size in bytes.
        size: u64,
        /// Allocated runs of blocks (holes are not allocated).
        extents: Vec<Extent>,
    },
    /// A directory.
    Dir {
        /// Entries by name.
        children: BTreeMap<Vec<u8>, NodeId>,
        /// Marked opaque by an OCI `.wh..wh..opq` entry.
        opaque: bool,
    },
    /// A symbolic link.
    Symlink {
        /// Link target, stored verbatim.
        target: Vec<u8>,
    },
    /// A character device (a 0:0 one is an overlayfs whiteout).
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

impl NodeKind {
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self, NodeKind::Dir { .. })
    }

    /// An empty, non-opaque directory.
    pub fn empty_dir() -> NodeKind {
        NodeKind::Dir {
            children: BTreeMap::new(),
            opaque: false,
        }
    }
}

/// A file, directory or other object; hard links share one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub kind: NodeKind,
    /// Its metadata.
    pub meta: Meta,
    /// Number of directory entries that name it (0 once replaced or removed).
    pub links: u32,
}

/// The whole layer tree.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    /// A tree with just an implicit root directory.
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node {
                kind: NodeKind::empty_dir(),
                meta: Meta::implicit_dir(),
                links: 1,
            }],
        }
    }

    /// All nodes, including unreachable (replaced) ones.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// One node.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Inserts `kind` with `meta` at `path` (already cleaned). A later entry replaces an earlier one at the
    /// same path, except that a directory over a directory keeps its children and takes the new metadata.
    /// Missing parent directories are created; a parent that is not a directory is an error.
    pub fn insert(
        &mut self,
        path: &[Vec<u8>],
        kind: NodeKind,
        meta: Meta,
    ) -> Result<NodeId, Ext4Error> {
        let Some((name, parents)) = path.split_last() else {
            // The root itself ("./" in most layers): only a directory may stand there.
            if !kind.is_dir() {
                return Err(Ext4Error::Path {
                    path: "/".into(),
                    reason: "the layer root can only be a directory".into(),
                });
            }
            self.nodes[ROOT].meta = meta;
            return Ok(ROOT);
        };
        let parent = self.make_parents(parents)?;
        if let Some(&existing) = self.children(parent).get(name) {
            if kind.is_dir() && self.nodes[existing].kind.is_dir() {
                self.nodes[existing].meta = meta;
                return Ok(existing);
            }
            self.unlink(parent, name);
        }
        let id = self.nodes.len();
        self.nodes.push(Node {
            kind,
            meta,
            links: 1,
        });
        self.children_mut(parent).insert(name.clone(), id);
        Ok(id)
    }

    /// Adds a hard link at `path` to the existing non-directory at `target`.
    pub fn link(&mut self, path: &[Vec<u8>], target: &[Vec<u8>]) -> Result<NodeId, Ext4Error> {
        let target_id = self.lookup(target).ok_or_else(|| Ext4Error::Path {
            path: display(path),
            reason: format!("hard link target {} is not in this layer", display(target)),
        })?;
        if self.nodes[target_id].kind.is_dir() {
            return Err(Ext4Error::Path {
                path: display(path),
                reason: format!("hard link target {} is a directory", display(target)),
            });
        }
        let Some((name, parents)) = path.split_last() else {
            return Err(Ext4Error::Path {
                path: "/".into(),
                reason: "the layer root cannot be a hard link".into(),
            });
        };
        let parent = self.make_parents(parents)?;
        match self.children(parent).get(name) {
            Some(&existing) if existing == target_id => return Ok(target_id),
            Some(_) => self.unlink(parent, name),
            None => {}
        }
        if self.nodes[target_id].links >= MAX_LINKS {
            return Err(Ext4Error::Path {
                path: display(path),
                reason: format!("more than {MAX_LINKS} hard links to {}", display(target)),
            });
        }
        self.nodes[target_id].links += 1;
        self.children_mut(parent).insert(name.clone(), target_id);
        Ok(target_id)
    }

    /// Marks the directory at `path` opaque (creating it if needed).
    pub fn set_opaque(&mut self, path: &[Vec<u8>]) -> Result<(), Ext4Error> {
        let dir = self.make_parents(path)?;
        if let NodeKind::Dir { opaque, .. } = &mut self.nodes[dir].kind {
            *opaque = true;
        }
        Ok(())
    }

    /// The node at `path`, without following symlinks.
    pub fn lookup(&self, path: &[Vec<u8>]) -> Option<NodeId> {
        let mut cur = ROOT;
        for c in path {
            match &self.nodes[cur].kind {
                NodeKind::Dir { children, .. } => cur = *children.get(c)?,
                _ => return None,
            }
        }
        Some(cur)
    }

    /// Walks/creates the directories of `path`. Symlinks are never followed: a parent that is a symlink
    /// would let an entry land outside the place its name says, so it is rejected.
    fn make_parents(&mut self, path: &[Vec<u8>]) -> Result<NodeId, Ext4Error> {
        let mut cur = ROOT;
        for (i, c) in path.iter().enumerate() {
            let next = self.children(cur).get(c).copied();
            cur = match next {
                Some(id) => match &self.nodes[id].kind {
                    NodeKind::Dir { .. } => id,
                    NodeKind::Symlink { .. } => {
                        return Err(Ext4Error::Path {
                            path: display(&path[..=i]),
                            reason: "a parent directory is a symlink in this layer; \
                                     entries through symlinks are refused"
                                .into(),
                        })
                    }
                    _ => {
                        return Err(Ext4Error::Path {
                            path: display(&path[..=i]),
                            reason: "a parent directory is not a directory".into(),
                        })
                    }
                },
                None => {
                    let id = self.nodes.len();
                    self.nodes.push(Node {
                        kind: NodeKind::empty_dir(),
                        meta: Meta::implicit_dir(),
                        links: 1,
                    });
                    self.children_mut(cur).insert(c.clone(), id);
                    id
                }
            };
        }
        Ok(cur)
    }

    fn children(&self, dir: NodeId) -> &BTreeMap<Vec<u8>, NodeId> {
        match &self.nodes[dir].kind {
            NodeKind::Dir { children, .. } => children,
            _ => unreachable!("make_parents only returns directories"),
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, NodeId> {
        match &mut self.nodes[dir].kind {
            NodeKind::Dir { children, .. } => children,
            _ => unreachable!("make_parents only returns directories"),
        }
    }

    /// Removes `name` from `dir`, dropping the node (and a directory's subtree) once nothing names it.
    fn unlink(&mut self, dir: NodeId, name: &[u8]) {
        let Some(id) = self.children_mut(dir).remove(name) else {
            return;
        };
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            let n = &mut self.nodes[id];
            n.links -= 1;
            if n.links == 0 {
                if let NodeKind::Dir { children, .. } = &mut n.kind {
                    stack.extend(std::mem::take(children).into_values());
                }
            }
        }
    }
}

/// Cleans a tar entry name into components, like containerd: `.` and empty components vanish, `..`
/// climbs but never above the root, leading `/` is ignored. Names with NUL or longer than 255 bytes are
/// errors.
pub fn clean_path(raw: &[u8]) -> Result<Vec<Vec<u8>>, Ext4Error> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            _ => {
                if c.contains(&0) {
                    return Err(Ext4Error::Path {
                        path: String::from_utf8_lossy(raw).into_owned(),
                        reason: "name contains a NUL byte".into(),
                    });
                }
                if c.len() > MAX_NAME_LEN {
                    return Err(Ext4Error::Path {
                        path: String::from_utf8_lossy(raw).into_owned(),
                        reason: format!("a path component is {} bytes (ext4 allows 255)", c.len()),
                    });
                }
                out.push(c.to_vec());
            }
        }
    }
    Ok(out)
}

/// `/a/b/c` for error messages.
pub fn display(path: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for c in path {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<Vec<u8>> {
        clean_path(s.as_bytes()).unwrap()
    }

    fn file() -> NodeKind {
        NodeKind::File {
            size: 0,
            extents: vec![],
        }
    }

    #[test]
    fn cleaning_stays_inside_the_root() {
        assert_eq!(p("./a//b/./c/"), p("a/b/c"));
        assert_eq!(p("../../etc/passwd"), p("etc/passwd"));
        assert_eq!(p("/abs/../x"), p("x"));
        assert_eq!(p("a/../../.."), Vec::<Vec<u8>>::new());
        assert!(clean_path(&[b'a'; 256]).is_err());
        assert!(clean_path(b"a\0b").is_err());
    }

    #[test]
    fn replace_merge_and_links() {
        let mut t = Tree::new();
        let m = Meta::implicit_dir();
        let d = t.insert(&p("d"), NodeKind::empty_dir(), m.clone()).unwrap();
        let f = t.insert(&p("d/f"), file(), m.clone()).unwrap();
        // dir over dir keeps children
        let mut m2 = m.clone();
        m2.perm = 0o700;
        assert_eq!(t.insert(&p("d"), NodeKind::empty_dir(), m2).unwrap(), d);
        assert_eq!(t.lookup(&p("d/f")), Some(f));
        assert_eq!(t.node(d).meta.perm, 0o700);
        // hard link, then replace the original name: the link keeps the node alive
        t.link(&p("h"), &p("d/f")).unwrap();
        assert_eq!(t.node(f).links, 2);
        let f2 = t.insert(&p("d/f"), file(), m.clone()).unwrap();
        assert_ne!(f2, f);
        assert_eq!(t.node(f).links, 1);
        assert_eq!(t.lookup(&p("h")), Some(f));
        // file over dir drops the subtree
        t.insert(&p("d"), file(), m.clone()).unwrap();
        assert_eq!(t.node(f2).links, 0);
        assert_eq!(t.node(d).links, 0);
        // errors
        assert!(t.link(&p("x"), &p("missing")).is_err());
        assert!(t.insert(&p("d/under-a-file"), file(), m.clone()).is_err());
        t.insert(
            &p("s"),
            NodeKind::Symlink {
                target: b"/etc".to_vec(),
            },
            m.clone(),
        )
        .unwrap();
        assert!(t.insert(&p("s/passwd"), file(), m.clone()).is_err());
        assert!(t.insert(&[], file(), m).is_err());
    }
}
