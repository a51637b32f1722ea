//! Building test layers with the `tar` crate.
#![allow(dead_code)]

use tar::{EntryType, Header};

/// A tar under construction with full control over headers and PAX records.
pub struct LayerTar {
    b: tar::Builder<Vec<u8>>,
}

/// Owner, permissions and time of an entry.
#[derive(Clone, Copy)]
pub struct M {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

pub const DEF: M = M {
    mode: 0o644,
    uid: 0,
    gid: 0,
    mtime: 1_600_000_000,
};
pub const DIR: M = M {
    mode: 0o755,
    uid: 0,
    gid: 0,
    mtime: 1_600_000_100,
};

impl Default for LayerTar {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerTar {
    pub fn new() -> Self {
        LayerTar {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, m: M, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(m.mode);
        h.set_uid(m.uid);
        h.set_gid(m.gid);
        h.set_mtime(m.mtime);
        h.set_size(size);
        h
    }

    /// PAX records for the next entry.
    pub fn pax(&mut self, kv: &[(&str, &[u8])]) -> &mut Self {
        self.b
            .append_pax_extensions(kv.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    pub fn file(&mut self, path: &str, m: M, data: &[u8]) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, m, data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A regular file whose content comes from a reader (for big files).
    pub fn file_from(&mut self, path: &str, m: M, size: u64, r: impl std::io::Read) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, m, size);
        self.b.append_data(&mut h, path, r).unwrap();
        self
    }

    pub fn dir(&mut self, path: &str, m: M) -> &mut Self {
        let mut h = Self::header(EntryType::Directory, m, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Symlink, M { mode: 0o777, ..DEF }, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Link, DEF, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: EntryType,
        major: u32,
        minor: u32,
        m: M,
    ) -> &mut Self {
        let mut h = Self::header(kind, m, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    /// Appends a raw header with the name bytes written verbatim (no validation by the tar crate).
    pub fn raw(&mut self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8]) -> &mut Self {
        let mut h = Self::header(kind, DEF, data.len() as u64);
        {
            let g = h.as_gnu_mut().unwrap();
            g.name = [0; 100];
            g.name[..name.len()].copy_from_slice(name);
            g.linkname = [0; 100];
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}
