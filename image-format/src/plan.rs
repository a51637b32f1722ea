//! Read planning: which byte ranges of the blob serve a read of the virtual disk. No I/O here.

use std::ops::Range;

use crate::{ChunkKind, FormatError, Index};

/// How aggressively a plan merges neighbouring chunks into one range request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Merge two stored chunks into one request when at most this many unneeded blob bytes lie between
    /// them (those bytes are fetched and thrown away).
    pub max_gap: u64,
    /// Never make one request longer than this (unless a single chunk is longer).
    pub max_request: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_gap: 64 << 10,
            max_request: 8 << 20,
        }
    }
}

/// One range request and the chunks it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeFetch {
    /// Byte range of the blob to fetch.
    pub blob_range: Range<u64>,
    /// Chunk numbers whose stored bytes lie inside `blob_range`, in blob order.
    pub chunks: Vec<u64>,
}

/// What it takes to serve a set of chunks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadPlan {
    /// Range requests, in blob order.
    pub fetches: Vec<RangeFetch>,
    /// Chunks that are all zeros and need no fetch.
    pub zero_chunks: Vec<u64>,
    /// External chunks (not in this blob; [`crate::ChunkKind::External`]), in chunk order.
    pub external_chunks: Vec<u64>,
}

impl ReadPlan {
    /// Total bytes the plan fetches from the blob.
    pub fn fetch_bytes(&self) -> u64 {
        self.fetches
            .iter()
            .map(|f| f.blob_range.end - f.blob_range.start)
            .sum()
    }
}

impl Index {
    /// The chunk numbers that cover `len` bytes at `offset` of the virtual disk.
    pub fn chunks_for(&self, offset: u64, len: u64) -> Result<Range<u64>, FormatError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.image_size());
        let end = end.ok_or(FormatError::OutOfRange {
            offset,
            len,
            size: self.image_size(),
        })?;
        if len == 0 {
            return Ok(0..0);
        }
        Ok(offset >> self.chunk_shift()..(end - 1) / self.chunk_size() + 1)
    }

    /// Plans the fetches for a read of `len` bytes at `offset` of the virtual disk.
    pub fn plan(&self, offset: u64, len: u64, opts: PlanOptions) -> Result<ReadPlan, FormatError> {
        let chunks = self.chunks_for(offset, len)?;
        Ok(self.plan_chunks(chunks, opts))
    }

    /// Plans the fetches for a set of chunks (for instance the ones a cache does not have). Chunk numbers
    /// out of range are ignored; duplicates are fetched once.
    pub fn plan_chunks(
        &self,
        chunks: impl IntoIterator<Item = u64>,
        opts: PlanOptions,
    ) -> ReadPlan {
        let mut plan = ReadPlan::default();
        let mut stored: Vec<u64> = Vec::new();
        for c in chunks {
            if c >= self.chunk_count() {
                continue;
            }
            match self.entry(c).kind {
                ChunkKind::Zero => plan.zero_chunks.push(c),
                ChunkKind::External => plan.external_chunks.push(c),
                ChunkKind::Raw | ChunkKind::Zstd => stored.push(c),
            }
        }
        plan.zero_chunks.sort_unstable();
        plan.zero_chunks.dedup();
        plan.external_chunks.sort_unstable();
        plan.external_chunks.dedup();
        stored.sort_unstable_by_key(|&c| (self.entry(c).offset, c));
        stored.dedup();
        for c in stored {
            let r = self.entry(c).blob_range();
            if let Some(last) = plan.fetches.last_mut() {
                let gap_ok =
                    r.start >= last.blob_range.end && r.start - last.blob_range.end <= opts.max_gap;
                let size_ok =
                    r.end.max(last.blob_range.end) - last.blob_range.start <= opts.max_request;
                let overlaps = r.start < last.blob_range.end;
                if (gap_ok && size_ok) || overlaps {
                    last.blob_range.end = last.blob_range.end.max(r.end);
                    last.chunks.push(c);
                    continue;
                }
            }
            plan.fetches.push(RangeFetch {
                blob_range: r,
                chunks: vec![c],
            });
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use crate::{ChunkEntry, ChunkKind, Index, PlanOptions};

    fn idx() -> Index {
        // 6 chunks of 4 KiB; chunk 2 is zero; stored order in the blob is 5,0,1,3,4 with a gap before 4.
        let e = |offset, len| ChunkEntry {
            offset,
            stored_len: len,
            kind: ChunkKind::Zstd,
            digest: [9; 32],
        };
        let entries = vec![
            e(100, 100),
            e(200, 50),
            ChunkEntry::ZERO,
            e(250, 10),
            e(100_000, 20),
            e(0, 100),
        ];
        Index::new(12, 6 * 4096, entries, 200_000).unwrap()
    }

    #[test]
    fn chunk_ranges() {
        let i = idx();
        assert_eq!(i.chunks_for(0, 1).unwrap(), 0..1);
        assert_eq!(i.chunks_for(4095, 2).unwrap(), 0..2);
        assert_eq!(i.chunks_for(4096, 4096).unwrap(), 1..2);
        assert_eq!(i.chunks_for(0, 6 * 4096).unwrap(), 0..6);
        assert!(i.chunks_for(6 * 4096 - 1, 2).is_err());
        assert!(i.chunks_for(u64::MAX, 2).is_err());
    }

    #[test]
    fn coalesces_by_blob_order() {
        let i = idx();
        let p = i.plan(0, 6 * 4096, PlanOptions::default()).unwrap();
        assert_eq!(p.zero_chunks, vec![2]);
        assert_eq!(p.fetches.len(), 2, "{p:?}");
        assert_eq!(p.fetches[0].blob_range, 0..260);
        assert_eq!(p.fetches[0].chunks, vec![5, 0, 1, 3]);
        assert_eq!(p.fetches[1].blob_range, 100_000..100_020);
        let tight = PlanOptions {
            max_gap: 0,
            max_request: 200,
        };
        let p = i.plan_chunks([0, 1, 5, 5], tight);
        assert_eq!(
            p.fetches
                .iter()
                .map(|f| f.chunks.clone())
                .collect::<Vec<_>>(),
            vec![vec![5, 0], vec![1]]
        );
        assert_eq!(p.fetch_bytes(), 250);
    }
}
