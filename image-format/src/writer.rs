//! Streaming blob writer.

use std::io::{self, Write};

use crate::{
    index::check_geometry, sha256, ChunkEntry, ChunkKind, Digest, EncodedChunk, Footer, Index,
    FOOTER_LEN,
};

/// What a finished blob looks like; everything an OCI descriptor annotation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSummary {
    /// Total blob size in bytes.
    pub blob_size: u64,
    /// Offset of the index in the blob.
    pub index_offset: u64,
    /// Length of the index in bytes.
    pub index_length: u64,
    /// SHA-256 of the index.
    pub index_digest: Digest,
    /// The disk digest ([`Index::disk_digest`]): the layer's OCI diff ID.
    pub disk_digest: Digest,
    /// SHA-256 of the whole blob (its OCI content digest).
    pub blob_digest: Digest,
    /// Size of the virtual disk in bytes.
    pub image_size: u64,
    /// Chunk size exponent.
    pub chunk_shift: u8,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Number of all-zero (not stored) chunks.
    pub zero_chunks: u64,
    /// Sum of stored chunk lengths.
    pub stored_bytes: u64,
}

/// Appends encoded chunks to `W` in whatever order they arrive, then writes the index and footer.
///
/// Chunks may be appended in any order (the index records each one's offset); a chunk never appended is
/// an all-zero chunk. Appending the same chunk twice is an error.
pub struct BlobWriter<W: Write> {
    out: HashingWriter<W>,
    chunk_shift: u8,
    entries: Vec<Option<ChunkEntry>>,
}

impl<W: Write> BlobWriter<W> {
    /// Starts a blob with chunks of `1 << chunk_shift` bytes.
    pub fn new(out: W, chunk_shift: u8) -> io::Result<BlobWriter<W>> {
        check_geometry(chunk_shift, 512).map_err(invalid)?;
        Ok(BlobWriter {
            out: HashingWriter::new(out),
            chunk_shift,
            entries: Vec::new(),
        })
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.out.written
    }

    /// Appends chunk number `chunk`.
    pub fn append(&mut self, chunk: u64, enc: &EncodedChunk) -> io::Result<()> {
        let i = usize::try_from(chunk).map_err(|_| invalid("chunk number too large"))?;
        if self.entries.len() <= i {
            self.entries.resize(i + 1, None);
        }
        if self.entries[i].is_some() {
            return Err(invalid(format!("chunk {chunk} appended twice")));
        }
        let entry = if enc.kind == ChunkKind::Zero {
            ChunkEntry::ZERO
        } else if enc.kind == ChunkKind::External {
            // Nothing stored; `stored_len` (the chunk length) is set in `finish`.
            ChunkEntry {
                offset: 0,
                stored_len: 0,
                kind: ChunkKind::External,
                digest: enc.digest,
            }
        } else {
            let stored_len =
                u32::try_from(enc.data.len()).map_err(|_| invalid("chunk too large"))?;
            let e = ChunkEntry {
                offset: self.out.written,
                stored_len,
                kind: enc.kind,
                digest: enc.digest,
            };
            self.out.write_all(&enc.data)?;
            e
        };
        self.entries[i] = Some(entry);
        Ok(())
    }

    /// Writes the index and footer for a virtual disk of `image_size` bytes and returns the summary and
    /// the inner writer.
    pub fn finish(mut self, image_size: u64) -> io::Result<(W, BlobSummary)> {
        let count = image_size.div_ceil(self.chunk_size());
        if (self.entries.len() as u64) > count {
            return Err(invalid(format!(
                "chunk {} appended beyond the image size {image_size}",
                self.entries.len() - 1
            )));
        }
        let cs = self.chunk_size();
        let entries: Vec<ChunkEntry> = (0..count as usize)
            .map(|i| {
                let mut e = self
                    .entries
                    .get(i)
                    .copied()
                    .flatten()
                    .unwrap_or(ChunkEntry::ZERO);
                if e.kind == ChunkKind::External {
                    e.stored_len = (image_size - i as u64 * cs).min(cs) as u32;
                }
                e
            })
            .collect();
        let index_offset = self.out.written;
        let index =
            Index::new(self.chunk_shift, image_size, entries, index_offset).map_err(invalid)?;
        let bytes = index.to_bytes();
        let index_digest = sha256(&bytes);
        self.out.write_all(&bytes)?;
        let footer = Footer {
            index_offset,
            index_length: bytes.len() as u64,
            index_digest,
        };
        self.out.write_all(&footer.to_bytes())?;
        let blob_size = index_offset + bytes.len() as u64 + FOOTER_LEN as u64;
        let zero_chunks = index
            .entries()
            .iter()
            .filter(|e| e.kind == ChunkKind::Zero)
            .count() as u64;
        let summary = BlobSummary {
            blob_size,
            index_offset,
            index_length: bytes.len() as u64,
            index_digest,
            disk_digest: index.disk_digest(),
            blob_digest: self.out.hasher_digest(),
            image_size,
            chunk_shift: self.chunk_shift,
            chunk_count: count,
            zero_chunks,
            stored_bytes: index.stored_bytes(),
        };
        Ok((self.out.inner, summary))
    }
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        use sha2::Digest as _;
        HashingWriter {
            inner,
            hasher: sha2::Sha256::new(),
            written: 0,
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        use sha2::Digest as _;
        self.inner.write_all(b)?;
        self.hasher.update(b);
        self.written += b.len() as u64;
        Ok(())
    }

    fn hasher_digest(&mut self) -> Digest {
        use sha2::Digest as _;
        std::mem::take(&mut self.hasher).finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_chunk, encode_chunk, Codec, IndexLimits, PlanOptions};

    /// Writes `image` as a blob (chunks appended in reverse order) and reads every byte back through
    /// footer → index → plan → decode.
    fn round_trip(image: &[u8], shift: u8) {
        let cs = 1usize << shift;
        let mut w = BlobWriter::new(Vec::new(), shift).unwrap();
        let n = image.len().div_ceil(cs);
        for c in (0..n).rev() {
            let raw = &image[c * cs..((c + 1) * cs).min(image.len())];
            w.append(c as u64, &encode_chunk(raw, Codec::default()))
                .unwrap();
        }
        let (blob, s) = w.finish(image.len() as u64).unwrap();
        assert_eq!(s.blob_size, blob.len() as u64);
        assert_eq!(s.blob_digest, sha256(&blob));
        let footer =
            Footer::parse(&blob[blob.len() - FOOTER_LEN..], Some(blob.len() as u64)).unwrap();
        let ib = &blob[footer.index_offset as usize..][..footer.index_length as usize];
        let idx = Index::parse_verified(ib, &footer.index_digest, IndexLimits::default()).unwrap();
        idx.check_data_end(footer.index_offset).unwrap();
        let plan = idx
            .plan(0, image.len() as u64, PlanOptions::default())
            .unwrap();
        let mut out = vec![0xAAu8; image.len()];
        for f in &plan.fetches {
            for &c in &f.chunks {
                let e = idx.entry(c);
                let stored = &blob[e.blob_range().start as usize..e.blob_range().end as usize];
                let off = idx.chunk_offset(c) as usize;
                let len = idx.chunk_len(c) as usize;
                decode_chunk(c, e, stored, &mut out[off..off + len]).unwrap();
            }
        }
        for &c in &plan.zero_chunks {
            let off = idx.chunk_offset(c) as usize;
            out[off..off + idx.chunk_len(c) as usize].fill(0);
        }
        assert_eq!(out, image);
    }

    #[test]
    fn writes_readable_blobs() {
        let mut image = vec![0u8; 5 * 4096 + 512];
        image[10..20].copy_from_slice(b"0123456789");
        image[3 * 4096 + 7] = 1;
        image[5 * 4096 + 100] = 2;
        round_trip(&image, 12);
        round_trip(&image, 13);
    }

    #[test]
    fn rejects_misuse() {
        let mut w = BlobWriter::new(Vec::new(), 12).unwrap();
        let c = encode_chunk(&[1; 4096], Codec::None);
        w.append(0, &c).unwrap();
        assert!(w.append(0, &c).is_err());
        w.append(3, &c).unwrap();
        assert!(
            w.finish(4096 * 2).is_err(),
            "chunk 3 is beyond a 2-chunk image"
        );
        assert!(BlobWriter::new(Vec::new(), 30).is_err());
    }
}
