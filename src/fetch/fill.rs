//! The node's fill scheduler: background fills of every layer share one concurrency limit and one
//! bandwidth budget, and give way to demand reads anywhere on the node.
//!
//! Priorities: a demand read (a workload waiting) > a trace replay (runs before its layer's fill and
//! takes no fill slot) > background fill. Fairness: every fill batch (a few MiB) queues for a slot of
//! a FIFO semaphore, so layers filling at once take turns batch by batch.
//!
//! Demand first does not mean fill last: a start reads most of what the fill would fetch, and on a
//! link with round trips a paused fill leaves the link idle between the workload's dependent reads.
//! While a demand read runs anywhere on the node, at most `busy_concurrency` fill batches run (the
//! node daemon's default equals `concurrency`: a large start reads nearly the whole image, and one
//! batch at a time left the link half idle — docs/benchmarks.md, run T), each a quarter batch so a
//! demand response queues behind little fill; with no demand read, up to `concurrency` full
//! batches. `busy_concurrency` 0 pauses fills entirely while demand reads run.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Shared by every engine of a node (see the module docs).
pub struct FillGate {
    slots: Semaphore,
    busy_concurrency: usize,
    running: AtomicUsize,
    bytes_per_sec: Option<u64>,
    next_free: Mutex<Instant>,
    demand: AtomicUsize,
}

/// A fill batch's right to run; dropping it frees the slot.
pub struct FillPermit<'a> {
    _slot: SemaphorePermit<'a>,
    gate: &'a FillGate,
}

impl Drop for FillPermit<'_> {
    fn drop(&mut self) {
        self.gate.running.fetch_sub(1, Relaxed);
    }
}

impl FillGate {
    /// At most `concurrency` fill batches at once on the node (`busy_concurrency` while a demand
    /// read runs), together at most `bytes_per_sec`.
    pub fn new(
        concurrency: usize,
        busy_concurrency: usize,
        bytes_per_sec: Option<u64>,
    ) -> FillGate {
        let concurrency = concurrency.max(1);
        FillGate {
            slots: Semaphore::new(concurrency),
            busy_concurrency: busy_concurrency.min(concurrency),
            running: AtomicUsize::new(0),
            bytes_per_sec: bytes_per_sec.filter(|&r| r > 0),
            next_free: Mutex::new(Instant::now()),
            demand: AtomicUsize::new(0),
        }
    }

    /// Marks a demand read in progress somewhere on the node (until the guard drops).
    pub fn demand(&self) -> DemandGuard<'_> {
        self.demand.fetch_add(1, Relaxed);
        DemandGuard(self)
    }

    /// How many stored bytes the next fill batch should ask for, of a full batch of `full`: a
    /// quarter while a demand read runs. Fill and demand responses share the registry connection
    /// (HTTP/2) and the path's queue, so a demand response can wait behind a whole batch; a small
    /// one bounds that wait (1 MiB: 40 ms at 200 Mbit/s) while the fill keeps going.
    pub fn batch_bytes(&self, full: u64) -> u64 {
        if self.demand.load(Relaxed) > 0 {
            (full / 4).max(1)
        } else {
            full
        }
    }

    /// Fill batches running now.
    pub fn running(&self) -> usize {
        self.running.load(Relaxed)
    }

    /// Takes a running place if the demand rule allows one now.
    fn try_run(&self) -> bool {
        self.running
            .fetch_update(Relaxed, Relaxed, |r| {
                (self.demand.load(Relaxed) == 0 || r < self.busy_concurrency).then_some(r + 1)
            })
            .is_ok()
    }

    /// Waits until a batch of `bytes` may be fetched: a free slot (first come, first served), fewer
    /// than `busy_concurrency` batches running if a demand read runs on the node, and its share of
    /// the node's bandwidth.
    pub async fn admit(&self, bytes: u64) -> FillPermit<'_> {
        loop {
            let slot = self.slots.acquire().await.expect("fill gate never closes");
            if !self.try_run() {
                drop(slot);
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let permit = FillPermit {
                _slot: slot,
                gate: self,
            };
            if let Some(rate) = self.bytes_per_sec {
                let start = {
                    let mut next = self.next_free.lock().expect("fill gate lock");
                    let start = (*next).max(Instant::now());
                    *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
                    start
                };
                tokio::time::sleep_until(start.into()).await;
            }
            return permit;
        }
    }
}

/// See [`FillGate::demand`].
pub struct DemandGuard<'a>(&'a FillGate);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.demand.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn batches_take_turns_within_the_concurrency_limit() {
        let gate = Arc::new(FillGate::new(2, 2, None));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (gate, running, peak) = (gate.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    let _p = gate.admit(1).await;
                    let n = running.fetch_add(1, Relaxed) + 1;
                    peak.fetch_max(n, Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Relaxed);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(peak.load(Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_node_bandwidth_is_shared() {
        let gate = FillGate::new(4, 4, Some(1 << 20));
        let t = tokio::time::Instant::now();
        for _ in 0..4 {
            drop(gate.admit(512 << 10).await);
        }
        // Four half-MiB batches at 1 MiB/s: the last may start only after 1.5 s.
        assert!(
            t.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn demand_reads_pause_fills_when_no_busy_slot_is_allowed() {
        let gate = Arc::new(FillGate::new(1, 0, None));
        let guard = gate.demand();
        let g = gate.clone();
        let fill = tokio::spawn(async move {
            drop(g.admit(1).await);
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!fill.is_finished());
        drop(guard);
        fill.await.unwrap();
    }

    #[test]
    fn batches_shrink_while_demand_reads_run() {
        let gate = FillGate::new(4, 1, None);
        assert_eq!(gate.batch_bytes(4 << 20), 4 << 20);
        let guard = gate.demand();
        assert_eq!(gate.batch_bytes(4 << 20), 1 << 20);
        drop(guard);
        assert_eq!(gate.batch_bytes(4 << 20), 4 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn demand_reads_leave_the_busy_slots_to_fills() {
        let gate = Arc::new(FillGate::new(4, 1, None));
        let guard = gate.demand();
        let first = gate.admit(1).await;
        assert_eq!(gate.running(), 1);
        let g = gate.clone();
        let second = tokio::spawn(async move {
            let _p = g.admit(1).await;
            g.running()
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "a second batch ran beside a demand read"
        );
        drop(guard);
        // No demand: the second batch runs beside the first, up to the full concurrency.
        assert_eq!(second.await.unwrap(), 2);
        drop(first);
        assert_eq!(gate.running(), 0);
    }
}
