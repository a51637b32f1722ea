//! The order a layer's background fill takes its chunks in, as a pure state machine (the engine asks
//! it for batches, then fetches them).
//!
//! Blob order by default (one sequential pass over the blob). But a container start reads scattered
//! parts of the disk, each one where the files it opens lie, and its next reads are usually close to
//! its last: the rest of a shared library, the next module of the same package. So after a demand
//! read, the fill first takes up to a budget of the stored chunks that follow it on the *disk* (disk
//! order, not blob order: a read's neighbours are its disk neighbours wherever the converter stored
//! them), then goes back to where its pass was. The start's next read then finds its chunks
//! fetched or in flight instead of paying a round trip of its own, which a plain blob-order fill
//! only achieves by chance. Chunks skipped that way are not lost: the pass ends only when its cursor
//! has gone over every chunk, and chunks already local are skipped wherever the cursor is.

/// Disk chunks the follow cursor looks at for one batch (zero or local chunks included).
const NEAR_SCAN: u64 = 1024;

/// One fill pass over a layer's stored chunks.
pub struct FillOrder {
    /// Stored chunks, in the order of their offsets in the blob.
    order: Vec<u64>,
    /// Whether each disk chunk is in `order` (false: a zero chunk, never stored).
    stored: Vec<bool>,
    /// The pass's cursor in `order`.
    main: usize,
    /// The follow cursor (a disk chunk) and the stored bytes it may still take.
    near: Option<(u64, u64)>,
}

/// How big a batch may be, and what each chunk costs.
pub struct BatchLimit {
    /// Most stored bytes (the last chunk may go over).
    pub stored: u64,
    /// Most decoded bytes (likewise).
    pub decoded: u64,
}

impl FillOrder {
    /// A pass over `order` (stored chunks in blob order) of a disk of `chunk_count` chunks.
    pub fn new(order: Vec<u64>, chunk_count: u64) -> FillOrder {
        let mut stored = vec![false; chunk_count as usize];
        for &c in &order {
            if let Some(s) = stored.get_mut(c as usize) {
                *s = true;
            }
        }
        FillOrder {
            order,
            stored,
            main: 0,
            near: None,
        }
    }

    /// A demand read ended just before disk chunk `next`: the next batches take the stored chunks
    /// from there on the disk, for up to `budget` stored bytes.
    pub fn follow(&mut self, next: u64, budget: u64) {
        self.near = ((next as usize) < self.stored.len() && budget > 0).then_some((next, budget));
    }

    /// Whether the pass has gone over every chunk.
    pub fn done(&self) -> bool {
        self.main >= self.order.len() && self.near.is_none()
    }

    /// The next batch: chunks that are not `local`, from the follow cursor while it has budget, else
    /// from the pass's cursor; within `limit` (`cost` gives a chunk's stored and decoded bytes); and
    /// its stored bytes. Empty only when the pass is done.
    pub fn next_batch(
        &mut self,
        local: impl Fn(u64) -> bool,
        cost: impl Fn(u64) -> (u64, u64),
        limit: BatchLimit,
    ) -> (Vec<u64>, u64) {
        if let Some((at, budget)) = self.near.take() {
            let near_limit = BatchLimit {
                stored: limit.stored.min(budget),
                decoded: limit.decoded,
            };
            // Disk order from `at`, stored chunks only, looking at most NEAR_SCAN chunks ahead.
            let mut disk = at..(at + NEAR_SCAN).min(self.stored.len() as u64);
            let stored = &self.stored;
            let (batch, bytes) = take(
                (&mut disk).filter(|&c| stored[c as usize]),
                &local,
                &cost,
                &near_limit,
            );
            if !batch.is_empty() {
                let left = budget.saturating_sub(bytes);
                if left > 0 && (disk.start as usize) < self.stored.len() {
                    self.near = Some((disk.start, left));
                }
                return (batch, bytes);
            }
        }
        let mut rest = self.order[self.main..].iter().copied();
        let out = take(&mut rest, &local, &cost, &limit);
        self.main = self.order.len() - rest.len();
        out
    }
}

/// Chunks of `candidates` that are not `local`, taken until `limit`; with their stored bytes. Takes
/// from `candidates` only what it looks at, so the caller's cursor stays right after the batch.
fn take(
    candidates: impl Iterator<Item = u64>,
    local: &impl Fn(u64) -> bool,
    cost: &impl Fn(u64) -> (u64, u64),
    limit: &BatchLimit,
) -> (Vec<u64>, u64) {
    let mut candidates = candidates;
    let mut batch = Vec::new();
    let (mut stored, mut decoded) = (0u64, 0u64);
    while stored < limit.stored && decoded < limit.decoded {
        let Some(c) = candidates.next() else { break };
        if local(c) {
            continue;
        }
        let (s, d) = cost(c);
        stored += s;
        decoded += d;
        batch.push(c);
    }
    (batch, stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashSet;

    const MIB: u64 = 1 << 20;

    fn limit(stored: u64) -> BatchLimit {
        BatchLimit {
            stored,
            decoded: 64 * MIB,
        }
    }

    /// Runs a pass to its end, every chunk 1 MiB stored; returns the batches.
    fn drain(o: &mut FillOrder, local: &RefCell<HashSet<u64>>) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        while !o.done() {
            let (b, _) = o.next_batch(
                |c| local.borrow().contains(&c),
                |_| (MIB, MIB),
                limit(2 * MIB),
            );
            if b.is_empty() {
                break;
            }
            local.borrow_mut().extend(&b);
            out.push(b);
        }
        out
    }

    #[test]
    fn without_demand_reads_the_pass_is_blob_order_in_batches() {
        let mut o = FillOrder::new(vec![0, 1, 2, 3, 4], 5);
        let local = RefCell::new(HashSet::from([2]));
        assert_eq!(drain(&mut o, &local), vec![vec![0, 1], vec![3, 4]]);
        assert!(o.done());
    }

    #[test]
    fn after_a_demand_read_the_fill_takes_what_follows_it_then_resumes_the_pass() {
        let mut o = FillOrder::new((0..20).collect(), 20);
        let local = RefCell::new(HashSet::new());
        let (first, bytes) = o.next_batch(|_| false, |_| (MIB, MIB), limit(2 * MIB));
        assert_eq!(bytes, 2 * MIB);
        assert_eq!(first, vec![0, 1]);
        local.borrow_mut().extend(&first);
        // A read of chunk 10 (ending before 11); chunk 12 is local already; budget 3 MiB.
        local.borrow_mut().insert(12);
        o.follow(11, 3 * MIB);
        let batches = drain(&mut o, &local);
        assert_eq!(
            batches[0],
            vec![11, 13],
            "follows the read, skipping local chunks"
        );
        assert_eq!(batches[1], vec![14], "until the budget is spent");
        assert_eq!(batches[2], vec![2, 3], "then the pass goes on where it was");
        // Nothing is skipped for good: every chunk ends up fetched once.
        let all: Vec<u64> = batches.concat();
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len(), "no chunk fetched twice: {all:?}");
        assert_eq!(local.borrow().len(), 20);
    }

    #[test]
    fn the_follow_cursor_goes_in_disk_order_and_skips_zero_chunks() {
        // Blob order differs from disk order (a metadata region stored first); chunks 3 and 4 are
        // zero chunks (not stored).
        let mut o = FillOrder::new(vec![7, 0, 1, 2, 5, 6], 8);
        o.follow(3, 2 * MIB);
        let (b, _) = o.next_batch(|_| false, |_| (MIB, MIB), limit(8 * MIB));
        assert_eq!(b, vec![5, 6], "starts at the next stored chunk on the disk");
        // Disk order, whatever the blob order: after chunk 5, chunks 6 and 7 (7 is first in the blob).
        o.follow(6, 2 * MIB);
        let (b, _) = o.next_batch(|c| c == 0, |_| (MIB, MIB), limit(8 * MIB));
        assert_eq!(b, vec![6, 7]);
        // A read at the end of the disk: nothing follows, the pass goes on.
        o.follow(8, 2 * MIB);
        let (b, _) = o.next_batch(|_| false, |_| (MIB, MIB), limit(MIB));
        assert_eq!(b, vec![7]);
    }

    #[test]
    fn a_newer_demand_read_moves_the_follow_cursor() {
        let mut o = FillOrder::new((0..100).collect(), 100);
        o.follow(50, 8 * MIB);
        assert_eq!(
            o.next_batch(|_| false, |_| (MIB, MIB), limit(MIB)).0,
            vec![50]
        );
        o.follow(80, 8 * MIB);
        assert_eq!(
            o.next_batch(|_| false, |_| (MIB, MIB), limit(MIB)).0,
            vec![80]
        );
    }
}
