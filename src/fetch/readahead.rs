//! Readahead for sequential readers, as a pure state machine (the engine asks it, then fetches).
//!
//! Like the kernel's: a read that starts where the previous one ended keeps a window of chunks
//! requested ahead of it; the window starts at [`INITIAL_WINDOW`] chunks and doubles (up to the
//! configured maximum) each time the reader gets within half a window of its end, and the next batch
//! is requested then, in one go. Any other read ends the streak, so scattered small reads (a container
//! starting) fetch only what they ask for. Lock-free: concurrent readers of one layer at worst make
//! it request a window twice or end a streak early.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// First window of a sequential streak, in chunks.
pub const INITIAL_WINDOW: u64 = 8;

/// The readahead state of one layer.
pub struct Readahead {
    max: u64,
    chunk_count: u64,
    last_end: AtomicU64,
    window: AtomicU64,
    next: AtomicU64,
}

impl Readahead {
    /// Windows of at most `max` chunks (0 disables readahead) over a disk of `chunk_count` chunks.
    pub fn new(max: u64, chunk_count: u64) -> Readahead {
        Readahead {
            max,
            chunk_count,
            last_end: AtomicU64::new(u64::MAX),
            window: AtomicU64::new(0),
            next: AtomicU64::new(0),
        }
    }

    /// Notes a read of `len` bytes at `offset` whose last chunk is `end_chunk - 1`; returns the chunks
    /// to request ahead now, if any.
    pub fn on_read(&self, offset: u64, len: u64, end_chunk: u64) -> Option<Range<u64>> {
        let prev_end = self.last_end.swap(offset.saturating_add(len), Relaxed);
        if self.max == 0 {
            return None;
        }
        if prev_end != offset {
            self.window.store(0, Relaxed);
            self.next.store(0, Relaxed);
            return None;
        }
        let w = self
            .window
            .load(Relaxed)
            .clamp(INITIAL_WINDOW.min(self.max), self.max);
        let next = self.next.load(Relaxed).max(end_chunk);
        if next - end_chunk > w / 2 {
            return None; // enough requested ahead already
        }
        let to = (end_chunk + w).max(next + w / 2).min(self.chunk_count);
        self.window.store((w * 2).min(self.max), Relaxed);
        self.next.store(to, Relaxed);
        (next < to).then_some(next..to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 256 << 10;

    /// A sequential reader of `req` bytes per read; returns every range requested ahead.
    fn sequential(ra: &Readahead, req: u64, reads: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for i in 0..reads {
            let off = i * req;
            let end_chunk = (off + req).div_ceil(CHUNK);
            out.extend(ra.on_read(off, req, end_chunk));
        }
        out
    }

    #[test]
    fn a_sequential_streak_grows_its_window_up_to_the_maximum() {
        let ra = Readahead::new(32, 10_000);
        let got = sequential(&ra, 128 << 10, 400);
        assert!(!got.is_empty());
        let sizes: Vec<u64> = got.iter().map(|r| r.end - r.start).collect();
        assert_eq!(sizes[0], INITIAL_WINDOW, "{sizes:?}");
        assert!(sizes.iter().all(|&s| s <= 32), "{sizes:?}");
        assert!(sizes.contains(&16) || sizes.contains(&32), "{sizes:?}");
        // Requests never overlap and always stay ahead of the reader.
        for w in got.windows(2) {
            assert!(w[0].end <= w[1].start, "{got:?}");
        }
    }

    #[test]
    fn scattered_reads_fetch_nothing_ahead() {
        let ra = Readahead::new(32, 10_000);
        for i in 0..100u64 {
            let off = (i * 7919 % 1000) * CHUNK;
            assert_eq!(ra.on_read(off, 4096, off / CHUNK + 1), None);
        }
    }

    #[test]
    fn a_jump_ends_the_streak_and_the_end_of_the_disk_bounds_it() {
        let ra = Readahead::new(32, 20);
        assert!(!sequential(&ra, CHUNK, 30).is_empty());
        assert!(sequential(&ra, CHUNK, 30).iter().all(|r| r.end <= 20));
        // Off the streak: nothing.
        assert_eq!(ra.on_read(3 * CHUNK, 4096, 4), None);
        let off = Readahead::new(0, 100);
        assert!(
            sequential(&off, CHUNK, 50).is_empty(),
            "max 0 disables readahead"
        );
    }
}
