//! A streaming reader for OCI layer tars (ustar, GNU and PAX), written for untrusted input.
//!
//! Why not the `tar` crate: it splits PAX records on newlines, so binary extended attributes (a
//! `security.capability` value containing 0x0a) are rejected, and it reads PAX headers of any size into
//! memory. Here PAX records are parsed by their length prefix, every metadata block (PAX, GNU long
//! names) is bounded before it is read, and every error names the entry's byte offset.

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::ext4::Timestamp;

const BLOCK: usize = 512;

/// Parsed PAX records, key → value, in order.
pub type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;
/// Largest PAX header or GNU long name accepted (Linux xattr values are at most 64 KiB each).
pub const MAX_META_LEN: u64 = 4 << 20;

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file (`0`, NUL or `7`).
    File,
    /// Hard link (`1`).
    HardLink,
    /// Symbolic link (`2`).
    Symlink,
    /// Character device (`3`).
    CharDev,
    /// Block device (`4`).
    BlockDev,
    /// Directory (`5`).
    Dir,
    /// FIFO (`6`).
    Fifo,
}

/// One entry's header, with PAX and GNU extensions applied.
#[derive(Debug, Clone)]
pub struct TarEntry {
    /// Kind.
    pub kind: EntryKind,
    /// Name as stored (not cleaned).
    pub path: Vec<u8>,
    /// Link target for symlinks and hard links.
    pub link: Vec<u8>,
    /// Mode bits from the header.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Data size in bytes (for a sparse file, its real size: the data reader expands the holes).
    pub size: u64,
    /// A GNU sparse file (old GNU `S` entry or PAX 0.0/0.1/1.0).
    pub sparse: bool,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// `SCHILY.xattr.*` attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Byte offset of the entry's own header in the tar stream.
    pub offset: u64,
}

/// A malformed or unreadable tar stream.
#[derive(Debug, thiserror::Error)]
pub enum TarStreamError {
    /// Reading failed (including a bad compressed stream underneath).
    #[error("tar: reading at byte {offset}: {source}")]
    Io {
        /// Position in the tar stream.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// The stream ended inside a header or an entry's data.
    #[error("tar: truncated at byte {offset} ({what})")]
    Truncated {
        /// Position in the tar stream.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A header that is not valid.
    #[error("tar: header at byte {offset}: {reason}")]
    BadHeader {
        /// Position of the header.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Reads entries one by one; [`TarReader::data`] reads the current entry's content.
pub struct TarReader<R> {
    r: R,
    pos: u64,
    /// Unread data + padding of the current entry.
    remaining: u64,
    padding: u64,
    done: bool,
    /// A byte read ahead by the end-of-stream check.
    peeked: Option<u8>,
    /// The current entry is a sparse file: its expansion.
    sparse: Option<super::tar_sparse::Cursor>,
}

impl<R: Read> TarReader<R> {
    /// Starts reading `r`.
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            pos: 0,
            remaining: 0,
            padding: 0,
            done: false,
            peeked: None,
            sparse: None,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The rest of the stream (after the end-of-archive marker).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// Where the current entry's content lies in the tar stream (call before reading it).
    pub fn origin(&self) -> EntryOrigin {
        let mut stored = self.pos;
        EntryOrigin {
            start: self.pos,
            segments: self.sparse.as_ref().map(|c| {
                c.map()
                    .segments
                    .iter()
                    .map(|&(off, len)| {
                        let s = (off, len, stored);
                        stored += len;
                        s
                    })
                    .collect()
            }),
        }
    }

    /// Reads the content of the current entry.
    pub fn data(&mut self) -> EntryData<'_, R> {
        EntryData { t: self }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), TarStreamError> {
        let mut got = 0;
        if let (Some(b), false) = (self.peeked, buf.is_empty()) {
            buf[0] = b;
            self.peeked = None;
            got = 1;
        }
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(TarStreamError::Truncated {
                        offset: self.pos + got as u64,
                        what,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(TarStreamError::Io {
                        offset: self.pos + got as u64,
                        source: e,
                    })
                }
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, mut n: u64, what: &'static str) -> Result<(), TarStreamError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..k], what)?;
            n -= k as u64;
        }
        Ok(())
    }

    /// True if the stream has no more bytes (checked by reading one byte into `peeked`).
    fn at_eof(&mut self) -> Result<bool, TarStreamError> {
        let mut one = [0u8; 1];
        loop {
            match self.r.read(&mut one) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    self.peeked = Some(one[0]);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarStreamError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
    }

    /// Reads a metadata entry's (PAX, long name) data, bounded.
    fn read_meta(&mut self, size: u64, offset: u64) -> Result<Vec<u8>, TarStreamError> {
        if size > MAX_META_LEN {
            return Err(TarStreamError::BadHeader {
                offset,
                reason: format!(
                    "metadata entry of {size} bytes exceeds the {MAX_META_LEN}-byte limit"
                ),
            });
        }
        let mut v = vec![0u8; size as usize];
        self.read_exact(&mut v, "extended header data")?;
        self.skip(pad(size), "extended header padding")?;
        Ok(v)
    }

    /// The next entry, or `None` at the end of the archive. Unread data of the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarStreamError> {
        if self.done {
            return Ok(None);
        }
        let rest = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        self.sparse = None;
        self.skip(rest, "entry data")?;

        let mut pax: Option<PaxRecords> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let offset = self.pos;
            let mut h = [0u8; BLOCK];
            // A stream that ends cleanly between entries is accepted, like Go's archive/tar (containerd).
            if pax.is_none() && long_name.is_none() && long_link.is_none() && self.at_eof()? {
                self.done = true;
                return Ok(None);
            }
            self.read_exact(&mut h, "header")?;
            if h.iter().all(|&b| b == 0) {
                // End of archive (one or two zero blocks; what follows is not ours to judge).
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(bad(
                        offset,
                        "archive ends after an extended header with no entry",
                    ));
                }
                self.done = true;
                return Ok(None);
            }
            check_checksum(&h, offset)?;
            let size = number(&h[124..136], offset, "size")?;
            let typeflag = h[156];
            match typeflag {
                b'x' => {
                    if pax.is_some() {
                        return Err(bad(offset, "two PAX headers for one entry"));
                    }
                    let data = self.read_meta(size, offset)?;
                    pax = Some(parse_pax(&data, offset)?);
                    continue;
                }
                b'g' => {
                    // Global PAX headers carry archive-wide defaults (comments, mostly); ignored like
                    // containerd does.
                    self.read_meta(size, offset)?;
                    continue;
                }
                b'L' => {
                    let mut v = self.read_meta(size, offset)?;
                    trim_nul(&mut v);
                    long_name = Some(v);
                    continue;
                }
                b'K' => {
                    let mut v = self.read_meta(size, offset)?;
                    trim_nul(&mut v);
                    long_link = Some(v);
                    continue;
                }
                _ => {}
            }
            let kind = match typeflag {
                b'0' | 0 | b'7' => EntryKind::File,
                b'1' => EntryKind::HardLink,
                b'2' => EntryKind::Symlink,
                b'3' => EntryKind::CharDev,
                b'4' => EntryKind::BlockDev,
                b'5' => EntryKind::Dir,
                b'6' => EntryKind::Fifo,
                b'S' => EntryKind::File,
                t => {
                    return Err(bad(
                        offset,
                        &format!("unsupported entry type {:?}", t as char),
                    ))
                }
            };
            let ustar = &h[257..263] == b"ustar\0";
            let mut path = cstr(&h[0..100]).to_vec();
            if ustar && h[345] != 0 {
                let mut p = cstr(&h[345..500]).to_vec();
                p.push(b'/');
                p.extend_from_slice(&path);
                path = p;
            }
            if let Some(n) = long_name {
                path = n;
            }
            let mut link = cstr(&h[157..257]).to_vec();
            if let Some(l) = long_link {
                link = l;
            }
            let mut e = TarEntry {
                kind,
                path,
                link,
                mode: number(&h[100..108], offset, "mode")? as u32,
                uid: number(&h[108..116], offset, "uid")?,
                gid: number(&h[116..124], offset, "gid")?,
                mtime: Timestamp {
                    secs: signed_number(&h[136..148], offset, "mtime")?,
                    nanos: 0,
                },
                size,
                sparse: false,
                dev_major: 0,
                dev_minor: 0,
                xattrs: BTreeMap::new(),
                offset,
            };
            if matches!(kind, EntryKind::CharDev | EntryKind::BlockDev) {
                e.dev_major = u32::try_from(number(&h[329..337], offset, "devmajor")?)
                    .map_err(|_| bad(offset, "device major out of range"))?;
                e.dev_minor = u32::try_from(number(&h[337..345], offset, "devminor")?)
                    .map_err(|_| bad(offset, "device minor out of range"))?;
            }
            let mut pax_sparse = None;
            if let Some(records) = pax {
                pax_sparse = apply_pax(&mut e, records, offset)?;
            }
            // Like Go's archive/tar (and so containerd), only regular files have data: the size field of
            // header-only types (links, devices, directories, FIFOs) is ignored.
            if e.kind == EntryKind::File {
                self.remaining = e.size;
                self.padding = pad(e.size);
            } else {
                e.size = 0;
            }
            let map = if typeflag == b'S' {
                Some(self.old_gnu_sparse(&h, offset)?)
            } else if let Some(p) = pax_sparse {
                Some(self.pax_sparse(p, offset)?)
            } else {
                None
            };
            if let Some(map) = map {
                map.validate(self.remaining)
                    .map_err(|why| bad(offset, &why))?;
                e.size = map.real_size;
                e.sparse = true;
                self.sparse = Some(map.cursor());
            }
            return Ok(Some(e));
        }
    }
}

impl<R: Read> TarReader<R> {
    /// The map of an old GNU `S` entry: four segments in the header, 21 more per extension block
    /// while `isextended` says so; the real size at byte 483.
    fn old_gnu_sparse(
        &mut self,
        h: &[u8; BLOCK],
        offset: u64,
    ) -> Result<super::tar_sparse::SparseMap, TarStreamError> {
        let mut segments = Vec::new();
        let take = |seg: &mut Vec<(u64, u64)>, area: &[u8]| -> Result<(), TarStreamError> {
            for e in area.chunks_exact(24) {
                if e[0] == 0 {
                    break;
                }
                let off = number(&e[0..12], offset, "sparse offset")?;
                let len = number(&e[12..24], offset, "sparse length")?;
                seg.push((off, len));
            }
            Ok(())
        };
        take(&mut segments, &h[386..482])?;
        let real_size = number(&h[483..495], offset, "sparse real size")?;
        let mut extended = h[482] != 0;
        while extended {
            if segments.len() > super::tar_sparse::MAX_SEGMENTS {
                return Err(bad(offset, "sparse map too long"));
            }
            let mut x = [0u8; BLOCK];
            self.read_exact(&mut x, "sparse extension header")?;
            take(&mut segments, &x[..504])?;
            extended = x[504] != 0;
        }
        Ok(super::tar_sparse::SparseMap {
            real_size,
            segments,
        })
    }

    /// The map of a PAX sparse file; for 1.0 it is read from the start of the entry's data.
    fn pax_sparse(
        &mut self,
        p: PaxSparse,
        offset: u64,
    ) -> Result<super::tar_sparse::SparseMap, TarStreamError> {
        let real_size = p
            .real_size
            .ok_or_else(|| bad(offset, "PAX sparse file without GNU.sparse.size/realsize"))?;
        if p.major == Some(1) {
            let mut remaining = self.remaining;
            let mut read_block = || -> Result<[u8; BLOCK], String> {
                if remaining < BLOCK as u64 {
                    return Err("sparse map runs past the entry's data".into());
                }
                let mut b = [0u8; BLOCK];
                self.read_exact(&mut b, "sparse map")
                    .map_err(|e| e.to_string())?;
                remaining -= BLOCK as u64;
                Ok(b)
            };
            let (segments, blocks) = super::tar_sparse::parse_map_blocks(&mut read_block)
                .map_err(|why| bad(offset, &why))?;
            self.remaining -= blocks * BLOCK as u64;
            return Ok(super::tar_sparse::SparseMap {
                real_size,
                segments,
            });
        }
        if p.offsets.len() != p.lengths.len() {
            return Err(bad(
                offset,
                "GNU.sparse.offset and numbytes records do not pair up",
            ));
        }
        let mut segments = p.map;
        segments.extend(p.offsets.into_iter().zip(p.lengths));
        Ok(super::tar_sparse::SparseMap {
            real_size,
            segments,
        })
    }
}

/// The `GNU.sparse.*` records of a PAX header.
#[derive(Default)]
struct PaxSparse {
    major: Option<u64>,
    real_size: Option<u64>,
    map: Vec<(u64, u64)>,
    offsets: Vec<u64>,
    lengths: Vec<u64>,
}

/// The content of the current entry (at most its size; short streams are a [`io::ErrorKind::UnexpectedEof`]).
pub struct EntryData<'a, R> {
    t: &'a mut TarReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(mut cursor) = self.t.sparse.take() {
            let t = &mut *self.t;
            let r = cursor.read(buf, |b| raw_read(t, b));
            self.t.sparse = Some(cursor);
            return r;
        }
        raw_read(self.t, buf)
    }
}

/// Where an entry's content lies in the tar stream ([`TarReader::origin`]).
#[derive(Debug, Clone)]
pub struct EntryOrigin {
    start: u64,
    /// Sparse files: `(file offset, length, tar offset)` of each data segment.
    segments: Option<Vec<(u64, u64, u64)>>,
}

impl crate::ext4::DataOrigin for EntryOrigin {
    fn origin(&self, at: u64) -> (Option<u64>, u64) {
        let Some(segs) = &self.segments else {
            return (Some(self.start + at), u64::MAX);
        };
        // The first segment ending after `at`.
        let i = segs.partition_point(|&(off, len, _)| off + len <= at);
        match segs.get(i) {
            Some(&(off, len, tar)) if off <= at => (Some(tar + (at - off)), off + len - at),
            Some(&(off, _, _)) => (None, off - at),
            None => (None, u64::MAX),
        }
    }
}

/// Reads stored data of the current entry.
fn raw_read<R: Read>(t: &mut TarReader<R>, buf: &mut [u8]) -> io::Result<usize> {
    if t.remaining == 0 {
        return Ok(0);
    }
    let k = (buf.len() as u64).min(t.remaining) as usize;
    let n = t.r.read(&mut buf[..k])?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "tar stream ends inside file data",
        ));
    }
    t.remaining -= n as u64;
    t.pos += n as u64;
    Ok(n)
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn bad(offset: u64, reason: &str) -> TarStreamError {
    TarStreamError::BadHeader {
        offset,
        reason: reason.to_string(),
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn trim_nul(v: &mut Vec<u8>) {
    while v.last() == Some(&0) {
        v.pop();
    }
}

fn check_checksum(h: &[u8; BLOCK], offset: u64) -> Result<(), TarStreamError> {
    let stored = number(&h[148..156], offset, "checksum")
        .map_err(|_| bad(offset, "checksum field is not a number; not a tar stream?"))?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += b as i8 as i64;
    }
    // Under the fuzzer a wrong checksum would stop almost every input at the first header.
    if stored != unsigned && stored as i64 != signed && !cfg!(fuzzing) {
        return Err(bad(
            offset,
            &format!("checksum mismatch (stored {stored}, computed {unsigned}); not a tar stream?"),
        ));
    }
    Ok(())
}

/// Parses a numeric field: octal (NUL/space padded) or GNU base-256.
fn number(f: &[u8], offset: u64, what: &str) -> Result<u64, TarStreamError> {
    let v = signed_number(f, offset, what)?;
    u64::try_from(v).map_err(|_| bad(offset, &format!("negative {what}")))
}

fn signed_number(f: &[u8], offset: u64, what: &str) -> Result<i64, TarStreamError> {
    if f[0] & 0x80 != 0 {
        // base-256, two's complement; 0x80 positive, 0xff negative
        let neg = f[0] == 0xff;
        let mut v: i128 = if neg { -1 } else { 0 };
        for (i, &b) in f.iter().enumerate() {
            let b = if i == 0 {
                b & 0x7f | if neg { 0x80 } else { 0 }
            } else {
                b
            };
            v = (v << 8) | b as i128;
            if v > i64::MAX as i128 || v < i64::MIN as i128 {
                return Err(bad(offset, &format!("{what} out of range")));
            }
        }
        return Ok(v as i64);
    }
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let mut v: i64 = 0;
    for &c in &s {
        if !(b'0'..=b'7').contains(&c) {
            return Err(bad(
                offset,
                &format!(
                    "{what} field is not octal: {:?}",
                    String::from_utf8_lossy(f)
                ),
            ));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add((c - b'0') as i64))
            .ok_or_else(|| bad(offset, &format!("{what} out of range")))?;
    }
    Ok(v)
}

/// Parses PAX records: `"<len> <key>=<value>\n"`, where `len` counts the whole record. Values may hold
/// any byte, newlines included.
pub fn parse_pax(data: &[u8], offset: u64) -> Result<PaxRecords, TarStreamError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad(offset, "PAX record without a length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(offset, "PAX record length is not a number"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad(offset, "PAX record length does not match its content"));
        }
        let record = &rest[sp + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad(offset, "PAX record without '='"))?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn apply_pax(
    e: &mut TarEntry,
    records: PaxRecords,
    offset: u64,
) -> Result<Option<PaxSparse>, TarStreamError> {
    let mut sparse: Option<PaxSparse> = None;
    let num = |v: &[u8], what: &str| -> Result<u64, TarStreamError> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                bad(
                    offset,
                    &format!("bad PAX {what} {:?}", String::from_utf8_lossy(v)),
                )
            })
    };
    for (k, v) in records {
        match k.as_slice() {
            b"path" => e.path = v,
            b"linkpath" => e.link = v,
            b"size" => e.size = num(&v, "size")?,
            b"uid" => e.uid = num(&v, "uid")?,
            b"gid" => e.gid = num(&v, "gid")?,
            b"mtime" => {
                e.mtime = parse_pax_time(&v).ok_or_else(|| {
                    bad(
                        offset,
                        &format!("bad PAX mtime {:?}", String::from_utf8_lossy(&v)),
                    )
                })?
            }
            k if k.starts_with(b"SCHILY.xattr.") => {
                e.xattrs.insert(k[b"SCHILY.xattr.".len()..].to_vec(), v);
            }
            // GNU tar --acls: the text form, stored as the Linux xattr it stands for.
            b"SCHILY.acl.access" | b"SCHILY.acl.default" => {
                let name: &[u8] = if k == b"SCHILY.acl.access" {
                    b"system.posix_acl_access"
                } else {
                    b"system.posix_acl_default"
                };
                let text = String::from_utf8_lossy(&v);
                match crate::ext4::acl::parse_text(&text) {
                    Ok(acl) => {
                        e.xattrs
                            .insert(name.to_vec(), crate::ext4::acl::to_xattr(&acl));
                    }
                    Err(why) => tracing::warn!(
                        offset,
                        record = %String::from_utf8_lossy(&k),
                        reason = %why,
                        "POSIX ACL not stored"
                    ),
                }
            }
            k if k.starts_with(b"GNU.sparse.") => {
                let sp = sparse.get_or_insert_with(PaxSparse::default);
                match &k[b"GNU.sparse.".len()..] {
                    b"major" => sp.major = Some(num(&v, "GNU.sparse.major")?),
                    b"minor" => {
                        num(&v, "GNU.sparse.minor")?;
                    }
                    b"size" | b"realsize" => sp.real_size = Some(num(&v, "GNU.sparse.size")?),
                    b"name" => e.path = v,
                    b"map" => {
                        sp.map = super::tar_sparse::parse_map_record(&v)
                            .map_err(|why| bad(offset, &why))?
                    }
                    b"offset" => sp.offsets.push(num(&v, "GNU.sparse.offset")?),
                    b"numbytes" => sp.lengths.push(num(&v, "GNU.sparse.numbytes")?),
                    b"numblocks" => {
                        num(&v, "GNU.sparse.numblocks")?;
                    }
                    other => {
                        return Err(bad(
                            offset,
                            &format!(
                                "unknown PAX record GNU.sparse.{}",
                                String::from_utf8_lossy(other)
                            ),
                        ))
                    }
                }
                if sp.offsets.len() > super::tar_sparse::MAX_SEGMENTS {
                    return Err(bad(offset, "sparse map too long"));
                }
            }
            _ => {} // atime, ctime, comments, uname/gname, charset: not stored
        }
    }
    if let Some(sp) = &sparse {
        if sp.major.is_some_and(|m| m != 1) {
            return Err(bad(offset, "unsupported GNU sparse format major version"));
        }
    }
    Ok(sparse)
}

/// Parses a PAX time: `[-]seconds[.fraction]`.
pub fn parse_pax_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += (d - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    Some(if !neg {
        Timestamp { secs, nanos }
    } else if nanos == 0 {
        Timestamp {
            secs: -secs,
            nanos: 0,
        }
    } else {
        Timestamp {
            secs: -secs - 1,
            nanos: 1_000_000_000 - nanos,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &[u8], typeflag: u8, size: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.resize(data.len().div_ceil(512) * 512, 0);
        v
    }

    #[test]
    fn pax_values_may_contain_newlines() {
        let value = b"a\nb\n\0c";
        let rec_body = format!("SCHILY.xattr.user.bin={}\n", String::from_utf8_lossy(value));
        let mut len = rec_body.len() + 3;
        if format!("{len} {rec_body}").len() != len {
            len += 1;
        }
        let rec = [
            format!("{len} ").as_bytes(),
            b"SCHILY.xattr.user.bin=",
            value,
            b"\n",
        ]
        .concat();
        assert_eq!(rec.len(), len);
        let mut tar = Vec::new();
        tar.extend_from_slice(&header(b"pax", b'x', rec.len() as u64));
        tar.extend(padded(&rec));
        tar.extend_from_slice(&header(b"file", b'0', 3));
        tar.extend(padded(b"abc"));
        tar.extend([0u8; 1024]);
        let mut r = TarReader::new(&tar[..]);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.xattrs.get(&b"user.bin"[..]).unwrap(), value);
        let mut data = Vec::new();
        r.data().read_to_end(&mut data).unwrap();
        assert_eq!(data, b"abc");
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let junk = [0x55u8; 512];
        assert!(matches!(
            TarReader::new(&junk[..]).next_entry(),
            Err(TarStreamError::BadHeader { offset: 0, .. })
        ));
        let mut tar = header(b"f", b'0', 1000).to_vec();
        tar.extend_from_slice(&[1u8; 100]);
        let mut r = TarReader::new(&tar[..]);
        r.next_entry().unwrap().unwrap();
        let err = r.data().read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let big_pax = header(b"p", b'x', MAX_META_LEN + 1);
        assert!(matches!(
            TarReader::new(&big_pax[..]).next_entry(),
            Err(TarStreamError::BadHeader { .. })
        ));
        assert!(matches!(
            TarReader::new(&[0u8; 100][..]).next_entry(),
            Err(TarStreamError::Truncated { .. })
        ));
    }

    #[test]
    fn numbers() {
        assert_eq!(number(b"0000644\0", 0, "m").unwrap(), 0o644);
        assert_eq!(number(b"  755 \0\0", 0, "m").unwrap(), 0o755);
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[4..].copy_from_slice(&(5u64 << 30).to_be_bytes());
        assert_eq!(number(&b256, 0, "size").unwrap(), 5u64 << 30);
        assert!(number(b"12x4\0\0\0\0", 0, "m").is_err());
        assert_eq!(signed_number(&[0xff; 12], 0, "t").unwrap(), -1);
        assert_eq!(
            parse_pax_time(b"-1.25").unwrap(),
            Timestamp {
                secs: -2,
                nanos: 750_000_000
            }
        );
        assert_eq!(
            parse_pax_time(b"12.5").unwrap(),
            Timestamp {
                secs: 12,
                nanos: 500_000_000
            }
        );
        assert!(parse_pax_time(b"1.2.3").is_none());
    }
}
