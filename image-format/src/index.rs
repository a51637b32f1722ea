//! The chunk index: header plus one fixed-size entry per chunk.

use crate::{
    sha256, ChunkKind, Digest, FormatError, DIGEST_SHA256, FORMAT_VERSION, MAX_CHUNK_SHIFT,
    MIN_CHUNK_SHIFT,
};

/// Magic bytes at the start of the index.
pub const INDEX_MAGIC: [u8; 8] = *b"LZBLKIX\x01";
/// Length of the index header in bytes.
pub const INDEX_HEADER_LEN: usize = 64;
/// Length of one index entry in bytes.
pub const INDEX_ENTRY_LEN: usize = 48;
/// Largest virtual disk the format describes (16 TiB, the ext4 limit with 32-bit block numbers).
pub const MAX_IMAGE_SIZE: u64 = 1 << 44;

/// Bounds a reader applies before it allocates anything for an index.
#[derive(Debug, Clone, Copy)]
pub struct IndexLimits {
    /// Largest index accepted, in bytes.
    pub max_index_len: u64,
}

impl Default for IndexLimits {
    fn default() -> Self {
        // 256 MiB describes a 16 TiB disk at 256 KiB chunks; anything bigger is refused.
        IndexLimits {
            max_index_len: 256 << 20,
        }
    }
}

/// Where one chunk is stored and what it hashes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Byte offset of the stored chunk in the blob (0 for zero chunks).
    pub offset: u64,
    /// Stored length in bytes (0 for zero chunks).
    pub stored_len: u32,
    /// How the chunk is stored.
    pub kind: ChunkKind,
    /// SHA-256 of the stored bytes (all zeros for zero chunks).
    pub digest: Digest,
}

impl ChunkEntry {
    /// The entry of an all-zero chunk.
    pub const ZERO: ChunkEntry = ChunkEntry {
        offset: 0,
        stored_len: 0,
        kind: ChunkKind::Zero,
        digest: [0; 32],
    };

    /// True for chunks whose bytes are in the blob (raw or zstd); false for zero and external ones.
    pub fn is_stored(&self) -> bool {
        matches!(self.kind, ChunkKind::Raw | ChunkKind::Zstd)
    }

    /// Byte range of the stored chunk in the blob.
    pub fn blob_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.stored_len as u64
    }
}

/// A parsed, validated chunk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    chunk_shift: u8,
    image_size: u64,
    entries: Vec<ChunkEntry>,
}

impl Index {
    /// Builds an index from its parts, validating it like a parsed one. `data_end` is the blob offset
    /// where chunk data ends (the index offset).
    pub fn new(
        chunk_shift: u8,
        image_size: u64,
        entries: Vec<ChunkEntry>,
        data_end: u64,
    ) -> Result<Index, FormatError> {
        check_geometry(chunk_shift, image_size)?;
        let expected = chunk_count(chunk_shift, image_size);
        if entries.len() as u64 != expected {
            return Err(bad("index", "chunk_count", entries.len() as u64));
        }
        let idx = Index {
            chunk_shift,
            image_size,
            entries,
        };
        for (i, e) in idx.entries.iter().enumerate() {
            idx.check_entry(i as u64, e, data_end)?;
        }
        Ok(idx)
    }

    /// Parses index bytes and checks them against a trusted SHA-256 digest before looking at them.
    pub fn parse_verified(
        bytes: &[u8],
        trusted: &Digest,
        limits: IndexLimits,
    ) -> Result<Index, FormatError> {
        let got = sha256(bytes);
        if &got != trusted {
            return Err(FormatError::IndexDigestMismatch {
                expected: hex::encode(trusted),
                got: hex::encode(got),
            });
        }
        Self::parse(bytes, limits)
    }

    /// Parses index bytes without a digest check (use [`Index::parse_verified`] for untrusted input;
    /// this still validates every field and never panics).
    pub fn parse(bytes: &[u8], limits: IndexLimits) -> Result<Index, FormatError> {
        if bytes.len() as u64 > limits.max_index_len {
            return Err(FormatError::IndexTooLarge {
                len: bytes.len() as u64,
                limit: limits.max_index_len,
            });
        }
        if bytes.len() < INDEX_HEADER_LEN {
            return Err(FormatError::BadLength {
                what: "index",
                expected: INDEX_HEADER_LEN as u64,
                got: bytes.len() as u64,
            });
        }
        let h = &bytes[..INDEX_HEADER_LEN];
        if h[0..8] != INDEX_MAGIC {
            return Err(FormatError::BadIndexMagic);
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: "index",
                version,
            });
        }
        let chunk_shift = h[10];
        if h[11] != DIGEST_SHA256 {
            return Err(FormatError::UnsupportedDigest {
                what: "index",
                algo: h[11],
            });
        }
        if h[12..16] != [0; 4] || h[32..64] != [0; 32] {
            return Err(bad("index", "reserved", 1));
        }
        let image_size = le64(&h[16..24]);
        let count = le64(&h[24..32]);
        check_geometry(chunk_shift, image_size)?;
        if count != chunk_count(chunk_shift, image_size) {
            return Err(bad("index", "chunk_count", count));
        }
        // count is bounded by check_geometry (image_size <= 16 TiB, chunks >= 4 KiB), so no overflow.
        let expected_len = INDEX_HEADER_LEN as u64 + count * INDEX_ENTRY_LEN as u64;
        if expected_len != bytes.len() as u64 {
            return Err(FormatError::BadLength {
                what: "index",
                expected: expected_len,
                got: bytes.len() as u64,
            });
        }
        let mut entries = Vec::with_capacity(count as usize);
        for raw in bytes[INDEX_HEADER_LEN..].chunks_exact(INDEX_ENTRY_LEN) {
            let i = entries.len() as u64;
            let kind =
                ChunkKind::from_u8(raw[12]).ok_or_else(|| bad_chunk(i, "kind", raw[12] as u64))?;
            if raw[13..16] != [0; 3] {
                return Err(bad_chunk(i, "reserved", 1));
            }
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&raw[16..48]);
            entries.push(ChunkEntry {
                offset: le64(&raw[0..8]),
                stored_len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
                kind,
                digest,
            });
        }
        let idx = Index {
            chunk_shift,
            image_size,
            entries,
        };
        for (i, e) in idx.entries.iter().enumerate() {
            idx.check_entry(i as u64, e, u64::MAX)?;
        }
        Ok(idx)
    }

    /// Checks that every stored chunk lies before `index_offset` (call after the footer is known).
    pub fn check_data_end(&self, index_offset: u64) -> Result<(), FormatError> {
        for (i, e) in self.entries.iter().enumerate() {
            if e.is_stored() && e.offset + e.stored_len as u64 > index_offset {
                return Err(bad_chunk(i as u64, "offset", e.offset));
            }
        }
        Ok(())
    }

    fn check_entry(&self, i: u64, e: &ChunkEntry, data_end: u64) -> Result<(), FormatError> {
        let len = self.chunk_len(i) as u64;
        match e.kind {
            ChunkKind::Zero => {
                if e.offset != 0 || e.stored_len != 0 || e.digest != [0; 32] {
                    return Err(bad_chunk(
                        i,
                        "zero chunk fields",
                        e.offset.max(e.stored_len as u64),
                    ));
                }
                return Ok(());
            }
            ChunkKind::Raw => {
                if e.stored_len as u64 != len {
                    return Err(bad_chunk(i, "stored_len", e.stored_len as u64));
                }
            }
            ChunkKind::External => {
                if e.stored_len as u64 != len {
                    return Err(bad_chunk(i, "stored_len", e.stored_len as u64));
                }
                if e.offset != 0 {
                    return Err(bad_chunk(i, "offset", e.offset));
                }
                return Ok(());
            }
            ChunkKind::Zstd => {
                // A zstd frame that is not smaller than its content is never written.
                if e.stored_len == 0 || e.stored_len as u64 >= len {
                    return Err(bad_chunk(i, "stored_len", e.stored_len as u64));
                }
            }
        }
        match e.offset.checked_add(e.stored_len as u64) {
            Some(end) if end <= data_end => Ok(()),
            _ => Err(bad_chunk(i, "offset", e.offset)),
        }
    }

    /// Serialises the index.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * INDEX_ENTRY_LEN);
        b.extend_from_slice(&INDEX_MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.push(self.chunk_shift);
        b.push(DIGEST_SHA256);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.image_size.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        b.extend_from_slice(&[0; 32]);
        for e in &self.entries {
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.stored_len.to_le_bytes());
            b.push(e.kind as u8);
            b.extend_from_slice(&[0; 3]);
            b.extend_from_slice(&e.digest);
        }
        b
    }

    /// The layer's *disk digest*: SHA-256 of [`Index::to_bytes`] with every entry's `offset` field
    /// written as zero. It commits to the geometry and to every chunk's kind, stored length and
    /// digest, so it names exactly one virtual disk, but not where the chunks sit in the blob:
    /// re-laying out a blob keeps it. A lazyblk layer's OCI diff ID is its disk digest
    /// (docs/format.md, "Diff IDs and chain IDs"), so containerd's chain IDs commit to the disks.
    pub fn disk_digest(&self) -> Digest {
        let mut b = self.to_bytes();
        for i in 0..self.entries.len() {
            let at = INDEX_HEADER_LEN + i * INDEX_ENTRY_LEN;
            b[at..at + 8].fill(0);
        }
        sha256(&b)
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Chunk size as a power-of-two exponent.
    pub fn chunk_shift(&self) -> u8 {
        self.chunk_shift
    }

    /// Size of the virtual disk in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// All entries, in chunk order.
    pub fn entries(&self) -> &[ChunkEntry] {
        &self.entries
    }

    /// The entry of chunk `i`. Panics if `i` is out of range; see [`Index::chunk_count`].
    pub fn entry(&self, i: u64) -> &ChunkEntry {
        &self.entries[i as usize]
    }

    /// Uncompressed length of chunk `i` (the chunk size, except possibly for the last chunk).
    pub fn chunk_len(&self, i: u64) -> u32 {
        let start = i << self.chunk_shift;
        (self.image_size.saturating_sub(start)).min(self.chunk_size()) as u32
    }

    /// Virtual-disk byte offset where chunk `i` starts.
    pub fn chunk_offset(&self, i: u64) -> u64 {
        i << self.chunk_shift
    }

    /// Total stored (compressed) bytes of all chunks.
    pub fn stored_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.is_stored())
            .map(|e| e.stored_len as u64)
            .sum()
    }
}

/// Number of chunks of `1 << shift` bytes needed for `image_size` bytes.
pub(crate) fn chunk_count(shift: u8, image_size: u64) -> u64 {
    image_size.div_ceil(1u64 << shift)
}

pub(crate) fn check_geometry(chunk_shift: u8, image_size: u64) -> Result<(), FormatError> {
    if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&chunk_shift) {
        return Err(bad("index", "chunk_shift", chunk_shift as u64));
    }
    if image_size == 0 || image_size > MAX_IMAGE_SIZE || !image_size.is_multiple_of(512) {
        return Err(bad("index", "image_size", image_size));
    }
    Ok(())
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fn bad(what: &str, field: &'static str, value: u64) -> FormatError {
    FormatError::BadField {
        what: what.to_string(),
        field,
        value,
    }
}

fn bad_chunk(i: u64, field: &'static str, value: u64) -> FormatError {
    bad(&format!("chunk {i}"), field, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Index {
        let entries = vec![
            ChunkEntry {
                offset: 0,
                stored_len: 100,
                kind: ChunkKind::Zstd,
                digest: [1; 32],
            },
            ChunkEntry::ZERO,
            ChunkEntry {
                offset: 100,
                stored_len: 2048,
                kind: ChunkKind::Raw,
                digest: [2; 32],
            },
        ];
        Index::new(12, 4096 * 2 + 2048, entries, 2148).unwrap()
    }

    #[test]
    fn disk_digest_ignores_offsets_only() {
        let idx = sample();
        let d = idx.disk_digest();
        // Same chunks at other offsets: same disk.
        let mut moved = idx.entries().to_vec();
        moved[0].offset = 2048;
        moved[2].offset = 0;
        let moved = Index::new(12, idx.image_size(), moved, 2148).unwrap();
        assert_ne!(sha256(&moved.to_bytes()), sha256(&idx.to_bytes()));
        assert_eq!(moved.disk_digest(), d);
        // Any other field changes it.
        let mut other = idx.entries().to_vec();
        other[2].digest = [3; 32];
        assert_ne!(
            Index::new(12, idx.image_size(), other, 2148)
                .unwrap()
                .disk_digest(),
            d
        );
        let mut other = idx.entries().to_vec();
        other[0].stored_len = 99;
        assert_ne!(
            Index::new(12, idx.image_size(), other, 2148)
                .unwrap()
                .disk_digest(),
            d
        );
        // Known vector: the header and entries with zero offsets, hashed.
        let mut b = idx.to_bytes();
        for i in 0..3 {
            b[INDEX_HEADER_LEN + i * INDEX_ENTRY_LEN..][..8].fill(0);
        }
        assert_eq!(d, sha256(&b));
    }

    #[test]
    fn round_trip_and_lengths() {
        let idx = sample();
        assert_eq!(idx.chunk_len(2), 2048);
        let bytes = idx.to_bytes();
        assert_eq!(bytes.len(), INDEX_HEADER_LEN + 3 * INDEX_ENTRY_LEN);
        let parsed =
            Index::parse_verified(&bytes, &sha256(&bytes), IndexLimits::default()).unwrap();
        assert_eq!(parsed, idx);
        assert!(parsed.check_data_end(2148).is_ok());
        assert!(parsed.check_data_end(2000).is_err());
    }

    #[test]
    fn rejects_bad_fields() {
        let bytes = sample().to_bytes();
        assert!(matches!(
            Index::parse_verified(&bytes, &[0; 32], IndexLimits::default()),
            Err(FormatError::IndexDigestMismatch { .. })
        ));
        let limits = IndexLimits { max_index_len: 100 };
        assert!(matches!(
            Index::parse(&bytes, limits),
            Err(FormatError::IndexTooLarge { .. })
        ));
        // chunk count that would need a huge allocation
        let mut b = bytes.clone();
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Index::parse(&b, IndexLimits::default()).is_err());
        // image size 0 and non-multiple of 512
        let mut b = bytes.clone();
        b[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert!(Index::parse(&b, IndexLimits::default()).is_err());
        // bad chunk shift
        let mut b = bytes.clone();
        b[10] = 40;
        assert!(Index::parse(&b, IndexLimits::default()).is_err());
        // raw chunk with the wrong length
        let mut b = bytes.clone();
        let e2 = INDEX_HEADER_LEN + 2 * INDEX_ENTRY_LEN;
        b[e2 + 8..e2 + 12].copy_from_slice(&4096u32.to_le_bytes());
        assert!(matches!(
            Index::parse(&b, IndexLimits::default()),
            Err(FormatError::BadField {
                field: "stored_len",
                ..
            })
        ));
        // unknown kind
        let mut b = bytes;
        b[INDEX_HEADER_LEN + 12] = 9;
        assert!(matches!(
            Index::parse(&b, IndexLimits::default()),
            Err(FormatError::BadField { field: "kind", .. })
        ));
    }
}
