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
//!
//! That holds for the layers being read. A layer that has not had to fetch for a demand read in the
//! last [`QUIET`] (one the starting workload does not read, like 4 GiB of libraries it never loads)
//! fills only once the node has had no demand read for [`QUIET`]: its fill would only take
//! bandwidth and CPU from the start (docs/benchmarks.md, "A large image"). It waits so for at most
//! [`MAX_DEFER`] per busy spell, so a node that never goes quiet still fills every layer.
//!
//! Only a read that waits for chunks that are not local marks its layer as being read; every read
//! marks the node busy. A mount and overlayfs's lookups read a few metadata blocks of *every* layer,
//! which the startup region or a trace replay has made local: those reads say nothing about which
//! layer the workload needs, and counting them let a layer nobody reads fill for a second at every
//! container start.
//!
//! A node that has just attached a layer counts as busy for [`QUIET`] too: a start follows a pull
//! at once, and until it has read something no layer is known to be needed, so its first reads
//! should not queue behind full batches of every layer (on a 200 Mbit/s link, four 4 MiB batches
//! are 0.7 s).
//!
//! A batch that may not run yet sleeps until what holds it back can have changed, never polls: a
//! layer waiting for the node to go quiet wakes when the quiet time or its [`MAX_DEFER`] can have
//! come (at most once per [`QUIET`] while demand reads run) or when its own layer starts being read;
//! a batch held back by `busy_concurrency` wakes when a batch ends or the last demand read does.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// How long after its last demand read a layer still counts as being read, and how long the node
/// must have had no demand read before the layers nobody reads fill.
pub const QUIET: Duration = Duration::from_secs(1);

/// The longest a layer nobody reads waits for the node to go quiet, per busy spell.
pub const MAX_DEFER: Duration = Duration::from_secs(30);

/// When a layer was last read on demand, as the node's [`FillGate`] saw it (one per engine).
#[derive(Debug, Default)]
pub struct LayerActivity {
    /// Milliseconds since the gate's epoch, plus one; 0: never.
    last_demand: AtomicU64,
    /// Since when its fill waits for the node to go quiet (same clock; 0: it does not wait).
    deferred_since: AtomicU64,
    /// Woken when the layer starts being read (its batches waiting for quiet may run).
    read: Notify,
}

/// Shared by every engine of a node (see the module docs).
pub struct FillGate {
    slots: Semaphore,
    busy_concurrency: usize,
    running: AtomicUsize,
    bytes_per_sec: Option<u64>,
    next_free: Mutex<Instant>,
    demand: AtomicUsize,
    /// The clock of the demand times (tokio's, so tests can pause it).
    epoch: tokio::time::Instant,
    /// When a demand read last started or ended on the node (as in [`LayerActivity`]).
    last_demand: AtomicU64,
    /// Woken when a batch ends or the node's last demand read does (batches held back by
    /// `busy_concurrency` may run).
    changed: Notify,
    /// Admission checks made, for the tests that prove waiting batches do not poll.
    #[cfg(test)]
    checks: AtomicUsize,
}

/// Why a fill batch may not run yet.
enum Wait {
    /// Its layer waits for the node to go quiet: until this moment at the latest, or until the
    /// layer is read.
    Quiet(tokio::time::Instant),
    /// `busy_concurrency` batches run beside demand reads: until one ends or the demand does.
    Busy,
}

/// A fill batch's right to run; dropping it frees the slot.
pub struct FillPermit<'a> {
    _slot: SemaphorePermit<'a>,
    gate: &'a FillGate,
}

impl Drop for FillPermit<'_> {
    fn drop(&mut self) {
        self.gate.running.fetch_sub(1, Relaxed);
        self.gate.changed.notify_waiters();
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
            epoch: tokio::time::Instant::now(),
            last_demand: AtomicU64::new(0),
            changed: Notify::new(),
            #[cfg(test)]
            checks: AtomicUsize::new(0),
        }
    }

    /// A moment at which the clock reads more than `tick` ([`FillGate::tick`] truncates to the
    /// millisecond: waking up to a millisecond late is what keeps a waiter from spinning through
    /// that last millisecond).
    fn instant_of(&self, tick: u64) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(tick)
    }

    /// Now on the clock of the demand times (never 0).
    fn tick(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether a demand time `t` is within [`QUIET`] of now.
    fn recent(&self, t: u64) -> bool {
        t != 0 && self.tick().saturating_sub(t) < QUIET.as_millis() as u64
    }

    /// Marks a demand read in progress on the node (until the guard drops); `fetching`: it waits
    /// for chunks of `layer` that are not local, which marks `layer` as being read.
    pub fn demand<'a>(&'a self, layer: &'a LayerActivity, fetching: bool) -> DemandGuard<'a> {
        self.demand.fetch_add(1, Relaxed);
        let layer = fetching.then_some(layer);
        self.mark(layer);
        DemandGuard { gate: self, layer }
    }

    /// Marks a demand read served at once from memory: the node is busy, no layer is being read.
    pub fn local_read(&self) {
        self.mark(None);
    }

    /// Marks a layer attached: the node counts as busy for [`QUIET`] (see the module docs).
    pub fn attached(&self) {
        self.mark(None);
    }

    fn mark(&self, layer: Option<&LayerActivity>) {
        let now = self.tick();
        self.last_demand.store(now, Relaxed);
        if let Some(layer) = layer {
            // Batches wait for their layer to be read only while it is not: wake them when it
            // starts to be (a waiter registers before it looks, so it sees this or is woken).
            if !self.recent(layer.last_demand.swap(now, Relaxed)) {
                layer.read.notify_waiters();
            }
        }
    }

    /// Until when a fill batch of `layer` must wait for the node to go quiet (`None`: it need not):
    /// the node serves demand reads (now or within [`QUIET`]), none of them fetched for `layer`
    /// lately, and it has not waited for [`MAX_DEFER`] already in this busy spell. The moment
    /// returned is the earliest at which that can have changed without the layer being read.
    fn waits_for_quiet(&self, layer: &LayerActivity) -> Option<tokio::time::Instant> {
        let demand_now = self.demand.load(Relaxed) > 0;
        let last = self.last_demand.load(Relaxed);
        if !demand_now && !self.recent(last) {
            layer.deferred_since.store(0, Relaxed);
            return None;
        }
        if self.recent(layer.last_demand.load(Relaxed)) {
            return None;
        }
        let now = self.tick();
        let since = match layer
            .deferred_since
            .compare_exchange(0, now, Relaxed, Relaxed)
        {
            Ok(_) => now,
            Err(t) => t,
        };
        let defer_ends = since + MAX_DEFER.as_millis() as u64;
        if now >= defer_ends {
            return None;
        }
        // A read in progress ends no earlier than now, and the node is quiet QUIET after it.
        let quiet_at = if demand_now { now } else { last } + QUIET.as_millis() as u64;
        Some(self.instant_of(quiet_at.min(defer_ends)))
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

    /// Takes a running place if the demand rules allow one now, or says what to wait for.
    fn try_run(&self, layer: &LayerActivity) -> Result<(), Wait> {
        #[cfg(test)]
        self.checks.fetch_add(1, Relaxed);
        if let Some(until) = self.waits_for_quiet(layer) {
            return Err(Wait::Quiet(until));
        }
        self.running
            .fetch_update(Relaxed, Relaxed, |r| {
                (self.demand.load(Relaxed) == 0 || r < self.busy_concurrency).then_some(r + 1)
            })
            .map(|_| ())
            .map_err(|_| Wait::Busy)
    }

    /// Waits until a batch of `bytes` of `layer` may be fetched: a free slot (first come, first
    /// served), fewer than `busy_concurrency` batches running if a demand read runs on the node, no
    /// demand read elsewhere on the node for [`QUIET`] if `layer` is not being read, and its share of
    /// the node's bandwidth.
    pub async fn admit(&self, bytes: u64, layer: &LayerActivity) -> FillPermit<'_> {
        loop {
            let slot = self.slots.acquire().await.expect("fill gate never closes");
            // Registered before the check, so a change between the check and the wait wakes it.
            let changed = self.changed.notified();
            let read = layer.read.notified();
            tokio::pin!(changed, read);
            changed.as_mut().enable();
            read.as_mut().enable();
            if let Err(wait) = self.try_run(layer) {
                drop(slot);
                match wait {
                    Wait::Quiet(until) => tokio::select! {
                        _ = read => {}
                        _ = tokio::time::sleep_until(until) => {}
                    },
                    Wait::Busy => changed.await,
                }
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
pub struct DemandGuard<'a> {
    gate: &'a FillGate,
    layer: Option<&'a LayerActivity>,
}

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        // A read that ended just now counts as recent, however long it took.
        self.gate.mark(self.layer);
        if self.gate.demand.fetch_sub(1, Relaxed) == 1 {
            self.gate.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// When a batch of `layer`, queued now, is admitted.
    fn admitted_at(
        gate: &Arc<FillGate>,
        layer: &Arc<LayerActivity>,
    ) -> tokio::task::JoinHandle<tokio::time::Instant> {
        let (gate, layer) = (gate.clone(), layer.clone());
        tokio::spawn(async move {
            drop(gate.admit(1, &layer).await);
            tokio::time::Instant::now()
        })
    }

    /// How long a batch of `layer` waited to be admitted.
    async fn wait_to_admit(gate: &FillGate, layer: &LayerActivity) -> Duration {
        let t = tokio::time::Instant::now();
        drop(gate.admit(1, layer).await);
        t.elapsed()
    }

    #[tokio::test]
    async fn batches_take_turns_within_the_concurrency_limit() {
        let gate = Arc::new(FillGate::new(2, 2, None));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (gate, running, peak) = (gate.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    let _p = gate.admit(1, &LayerActivity::default()).await;
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
            drop(gate.admit(512 << 10, &LayerActivity::default()).await);
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
        let read = Arc::new(LayerActivity::default());
        let guard = gate.demand(&read, true);
        let (g, r) = (gate.clone(), read.clone());
        let fill = tokio::spawn(async move {
            drop(g.admit(1, &r).await);
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
        let read = LayerActivity::default();
        let guard = gate.demand(&read, true);
        assert_eq!(gate.batch_bytes(4 << 20), 1 << 20);
        drop(guard);
        assert_eq!(gate.batch_bytes(4 << 20), 4 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn demand_reads_leave_the_busy_slots_to_fills() {
        let gate = Arc::new(FillGate::new(4, 1, None));
        let read = Arc::new(LayerActivity::default());
        let guard = gate.demand(&read, true);
        let first = gate.admit(1, &read).await;
        assert_eq!(gate.running(), 1);
        let (g, r) = (gate.clone(), read.clone());
        let second = tokio::spawn(async move {
            let _p = g.admit(1, &r).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_layer_nobody_reads_fills_once_the_node_is_quiet() {
        let gate = Arc::new(FillGate::new(4, 4, None));
        let (read, unread) = (
            Arc::new(LayerActivity::default()),
            Arc::new(LayerActivity::default()),
        );
        // With no demand read and no attach lately, every layer fills.
        drop(gate.admit(1, &unread).await);
        let guard = gate.demand(&read, true);
        let cold = admitted_at(&gate, &unread);
        // The layer being read fills beside its reads; the other waits.
        drop(gate.admit(1, &read).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!cold.is_finished(), "an unread layer filled during a read");
        let ended = tokio::time::Instant::now();
        drop(guard);
        // ... and for QUIET after the node's last demand read.
        let started = cold.await.unwrap();
        assert!(started - ended >= QUIET, "{:?}", started - ended);
        assert!(started - ended < QUIET + Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn reads_of_local_chunks_keep_the_node_busy_but_mark_no_layer() {
        let gate = FillGate::new(4, 4, None);
        let (mounted, other) = (LayerActivity::default(), LayerActivity::default());
        // A mount reads `mounted`'s local superblock, and the workload's reads hit memory: neither
        // layer is being read, so both wait for the node to go quiet.
        for layer in [&mounted, &other] {
            drop(gate.demand(&mounted, false));
            gate.local_read();
            let waited = wait_to_admit(&gate, layer).await;
            assert!(waited >= QUIET, "{:?}", waited);
        }
        // A read that fetches marks its layer: it fills beside the reads at once.
        let _reading = gate.demand(&other, true);
        let waited = wait_to_admit(&gate, &other).await;
        assert!(waited < Duration::from_millis(50), "{:?}", waited);
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_attach_layers_fill_once_a_read_says_which_or_the_node_stays_quiet() {
        let gate = FillGate::new(4, 4, None);
        let (read, unread) = (LayerActivity::default(), LayerActivity::default());
        gate.attached();
        let waited = wait_to_admit(&gate, &unread).await;
        assert!(waited >= QUIET, "{:?}", waited);
        gate.attached();
        let _reading = gate.demand(&read, true);
        let waited = wait_to_admit(&gate, &read).await;
        assert!(waited < Duration::from_millis(50), "{:?}", waited);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waiting_for_quiet_sleeps_instead_of_polling() {
        let gate = Arc::new(FillGate::new(4, 4, None));
        let (read, unread) = (LayerActivity::default(), LayerActivity::default());
        let _reading = gate.demand(&read, true);
        drop(gate.admit(1, &unread).await);
        // 30 s of waiting: about one check per QUIET (polling every 5 ms made 6,000).
        let checks = gate.checks.load(Relaxed);
        assert!(
            checks <= 2 + (MAX_DEFER.as_secs() as usize),
            "{checks} checks"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waiting_for_quiet_runs_as_soon_as_its_layer_is_read() {
        let gate = Arc::new(FillGate::new(4, 4, None));
        let (read, unread) = (
            Arc::new(LayerActivity::default()),
            Arc::new(LayerActivity::default()),
        );
        let _reading = gate.demand(&read, true);
        let waiting = admitted_at(&gate, &unread);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished());
        let marked = tokio::time::Instant::now();
        let _now_read = gate.demand(&unread, true);
        let ran = waiting.await.unwrap();
        assert!(
            ran - marked < Duration::from_millis(20),
            "{:?}",
            ran - marked
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_held_back_beside_demand_reads_sleeps_until_a_batch_ends() {
        let gate = Arc::new(FillGate::new(4, 1, None));
        let read = Arc::new(LayerActivity::default());
        let _reading = gate.demand(&read, true);
        let first = gate.admit(1, &read).await;
        let second = admitted_at(&gate, &read);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!second.is_finished());
        let checks = gate.checks.load(Relaxed);
        assert!(checks <= 3, "{checks} checks in 10 s");
        // The layer is still being read (a read started 10 s ago no longer says so by itself).
        let _still_reading = gate.demand(&read, true);
        let ended = tokio::time::Instant::now();
        drop(first);
        let ran = second.await.unwrap();
        assert!(ran - ended < Duration::from_millis(20), "{:?}", ran - ended);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_goes_quiet_still_fills_every_layer() {
        let gate = Arc::new(FillGate::new(4, 4, None));
        let (read, unread) = (LayerActivity::default(), LayerActivity::default());
        let _reading = gate.demand(&read, true);
        let waited = wait_to_admit(&gate, &unread).await;
        assert!(waited >= MAX_DEFER, "{:?}", waited);
        assert!(waited < MAX_DEFER + Duration::from_millis(50));
        // Within the same busy spell it no longer waits.
        let waited = wait_to_admit(&gate, &unread).await;
        assert!(waited < Duration::from_millis(50));
    }
}
