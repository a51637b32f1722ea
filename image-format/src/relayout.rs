//! Re-laying out a blob: the same virtual disk and the same stored chunks, in a new order.
//!
//! The format lets chunks appear in any order, so a blob can be rewritten with the chunks a workload
//! reads at startup placed last, right before the index: a reader that knows where that *startup
//! region* begins fetches the region and the index with one range request. Chunk numbers, stored bytes
//! and chunk digests do not change; chunk offsets, the index bytes (and so the index digest) and the
//! blob digest do.

use std::io::{self, Write};

use crate::{sha256, BlobSummary, BlobWriter, ChunkEntry, ChunkKind, EncodedChunk, Index};

/// What [`relayout`] produced besides the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayoutSummary {
    /// The new blob.
    pub blob: BlobSummary,
    /// Blob offset of the startup region (equal to the index offset when it is empty). The region is
    /// `[startup_offset, index_offset)`.
    pub startup_offset: u64,
    /// Stored chunks in the startup region.
    pub startup_chunks: u64,
}

/// Writes to `out` the blob of `index` with the stored chunks in `startup` (in that order; numbers
/// out of range, zero chunks and repeats are skipped) moved to the end, after every other stored chunk
/// (kept in their old blob order). `stored(n, entry)` returns chunk `n`'s stored bytes from the old
/// blob; each is checked against the index digest before it is written, so a damaged source is an
/// error naming the chunk, never a blob with bad bytes.
pub fn relayout<W: Write>(
    index: &Index,
    startup: &[u64],
    mut stored: impl FnMut(u64, &ChunkEntry) -> io::Result<Vec<u8>>,
    out: W,
) -> io::Result<(W, RelayoutSummary)> {
    let n = index.chunk_count();
    let mut in_startup = vec![false; n as usize];
    let mut tail = Vec::new();
    for &c in startup {
        if c < n && !in_startup[c as usize] && index.entry(c).is_stored() {
            in_startup[c as usize] = true;
            tail.push(c);
        }
    }
    let mut head: Vec<u64> = (0..n)
        .filter(|&c| index.entry(c).is_stored() && !in_startup[c as usize])
        .collect();
    head.sort_by_key(|&c| index.entry(c).offset);
    let mut w = BlobWriter::new(out, index.chunk_shift())?;
    // External chunks are not in the blob: they stay external.
    for c in (0..n).filter(|&c| index.entry(c).kind == ChunkKind::External) {
        w.append(
            c,
            &EncodedChunk {
                kind: ChunkKind::External,
                data: Vec::new(),
                digest: index.entry(c).digest,
            },
        )?;
    }
    let mut copy = |w: &mut BlobWriter<W>, c: u64| -> io::Result<()> {
        let e = index.entry(c);
        let data = stored(c, e)?;
        if data.len() != e.stored_len as usize || sha256(&data) != e.digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {c}: stored bytes do not match the index digest"),
            ));
        }
        w.append(
            c,
            &EncodedChunk {
                kind: e.kind,
                data,
                digest: e.digest,
            },
        )
    };
    for &c in &head {
        copy(&mut w, c)?;
    }
    let startup_offset = w.position();
    for &c in &tail {
        copy(&mut w, c)?;
    }
    let (out, blob) = w.finish(index.image_size())?;
    Ok((
        out,
        RelayoutSummary {
            blob,
            startup_offset,
            startup_chunks: tail.len() as u64,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_chunk, encode_chunk, Codec, Footer, IndexLimits, FOOTER_LEN};

    fn blob_of(image: &[u8], shift: u8) -> (Vec<u8>, Index) {
        let cs = 1usize << shift;
        let mut w = BlobWriter::new(Vec::new(), shift).unwrap();
        for c in 0..image.len().div_ceil(cs) {
            let raw = &image[c * cs..((c + 1) * cs).min(image.len())];
            w.append(c as u64, &encode_chunk(raw, Codec::default()))
                .unwrap();
        }
        let (blob, _) = w.finish(image.len() as u64).unwrap();
        let idx = index_of(&blob);
        (blob, idx)
    }

    fn index_of(blob: &[u8]) -> Index {
        let f = Footer::parse(&blob[blob.len() - FOOTER_LEN..], Some(blob.len() as u64)).unwrap();
        let ib = &blob[f.index_offset as usize..][..f.index_length as usize];
        Index::parse_verified(ib, &f.index_digest, IndexLimits::default()).unwrap()
    }

    fn disk(blob: &[u8], idx: &Index) -> Vec<u8> {
        let mut out = vec![0u8; idx.image_size() as usize];
        for c in 0..idx.chunk_count() {
            let e = idx.entry(c);
            let off = idx.chunk_offset(c) as usize;
            let len = idx.chunk_len(c) as usize;
            let r = e.blob_range();
            decode_chunk(
                c,
                e,
                &blob[r.start as usize..r.end as usize],
                &mut out[off..off + len],
            )
            .unwrap();
        }
        out
    }

    #[test]
    fn startup_chunks_end_up_last_in_trace_order_and_the_disk_is_unchanged() {
        let mut image = vec![0u8; 16 * 4096];
        for (i, b) in image.iter_mut().enumerate() {
            if (i / 4096) % 4 != 1 {
                *b = (i * 7 % 251) as u8; // chunks 1, 5, 9, 13 stay zero
            }
        }
        let (old, idx) = blob_of(&image, 12);
        let startup = [12, 3, 5, 99, 3, 0];
        let (new, s) = relayout(
            &idx,
            &startup,
            |_, e| Ok(old[e.blob_range().start as usize..e.blob_range().end as usize].to_vec()),
            Vec::new(),
        )
        .unwrap();
        let nidx = index_of(&new);
        assert_eq!(disk(&new, &nidx), image);
        assert_eq!(s.startup_chunks, 3); // 5 is zero, 99 out of range, 3 repeated
        assert_eq!(s.blob.blob_size, new.len() as u64);
        assert_eq!(nidx.entry(12).offset, s.startup_offset);
        assert!(nidx.entry(3).offset > nidx.entry(12).offset);
        assert!(nidx.entry(0).offset > nidx.entry(3).offset);
        let end = nidx.entry(0).blob_range().end;
        assert_eq!(
            end, s.blob.index_offset,
            "the startup region ends at the index"
        );
        for c in [2, 4, 6, 15] {
            assert!(nidx.entry(c).offset < s.startup_offset);
            assert_eq!(nidx.entry(c).digest, idx.entry(c).digest);
        }
    }

    #[test]
    fn a_damaged_source_is_refused() {
        let image = vec![7u8; 4 * 4096];
        let (old, idx) = blob_of(&image, 12);
        let err = relayout(
            &idx,
            &[2],
            |c, e| {
                let mut b =
                    old[e.blob_range().start as usize..e.blob_range().end as usize].to_vec();
                if c == 2 {
                    b[0] ^= 1;
                }
                Ok(b)
            },
            Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("chunk 2"), "{err}");
    }
}
