//! The access log: the first read of each chunk by the workload (not by readahead, replay or fill),
//! in order, with its time — what `lazyblk trace record` turns into a startup trace.

use std::time::Instant;

/// The log of one layer.
pub struct AccessLog {
    /// Wall-clock time the engine was opened, in ms since the Unix epoch.
    pub opened_ms: u64,
    started: Instant,
    seen: Vec<bool>,
    /// First reads, in order.
    pub order: Vec<ChunkAccess>,
}

/// One first access of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkAccess {
    /// Chunk number.
    pub chunk: u64,
    /// Milliseconds since the engine was opened.
    pub ms: u64,
}

/// At most this many accesses are recorded per layer (a trace is about startup, not a full scan).
const MAX_ACCESSES: usize = 1 << 20;

impl AccessLog {
    /// A log for a disk of `chunks` chunks, opened now.
    pub fn new(chunks: usize) -> AccessLog {
        AccessLog {
            opened_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            started: Instant::now(),
            seen: vec![false; chunks],
            order: Vec::new(),
        }
    }

    /// Records the first read of each of `chunks` not seen before.
    pub fn record(&mut self, chunks: std::ops::Range<u64>) {
        let mut ms = None;
        for c in chunks {
            let Some(seen) = self.seen.get_mut(c as usize) else {
                continue;
            };
            if *seen || self.order.len() >= MAX_ACCESSES {
                continue;
            }
            *seen = true;
            let ms = *ms.get_or_insert_with(|| self.started.elapsed().as_millis() as u64);
            self.order.push(ChunkAccess { chunk: c, ms });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_first_reads_of_chunks_on_the_disk_are_logged_in_order() {
        let mut log = AccessLog::new(10);
        log.record(3..5);
        log.record(4..7);
        log.record(9..12);
        let chunks: Vec<u64> = log.order.iter().map(|a| a.chunk).collect();
        assert_eq!(chunks, vec![3, 4, 5, 6, 9]);
    }
}
