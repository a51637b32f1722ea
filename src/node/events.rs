//! The node's event log: attaches, detaches, failed reads, recoveries. Kept as a bounded ring of
//! recent events (for `lazyblk ls`, the API's history) and a broadcast to followers.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::proto::Event;

/// Recent events kept for clients that connect later.
const HISTORY: usize = 512;

/// Event kinds.
pub mod kind {
    /// A layer was attached.
    pub const ATTACHED: &str = "attached";
    /// A layer was detached.
    pub const DETACHED: &str = "detached";
    /// A read failed (EIO to the reader).
    pub const READ_ERROR: &str = "read_error";
    /// A device whose server died is served again.
    pub const RECOVERED: &str = "recovered";
    /// A device whose server died during its attach was removed.
    pub const ROLLED_BACK: &str = "rolled_back";
    /// Resuming a device failed (it is retried with backoff).
    pub const RECOVERY_FAILED: &str = "recovery_failed";
    /// The layer is complete locally.
    pub const FILL_COMPLETE: &str = "fill_complete";
    /// The background fill stopped on an error.
    pub const FILL_FAILED: &str = "fill_failed";
    /// An original-image index was proved against its whole layer (digest, diff ID, disk).
    pub const VERIFIED: &str = "verified";
    /// An original-image index does not describe its layer (or the layer is not the manifest's).
    pub const VERIFY_FAILED: &str = "verify_failed";
}

/// Ring + broadcast.
pub struct Events {
    ring: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
    totals: Mutex<std::collections::HashMap<String, u64>>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            ring: Mutex::new((0, VecDeque::new())),
            tx: broadcast::channel(HISTORY).0,
            totals: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Events {
    /// Records an event.
    pub fn emit(&self, kind: &str, device: &str, layer: &str, offset: u64, message: String) {
        *self
            .totals
            .lock()
            .expect("events lock")
            .entry(kind.to_string())
            .or_default() += 1;
        let mut ring = self.ring.lock().expect("events lock");
        ring.0 += 1;
        let e = Event {
            seq: ring.0,
            time_ms: now_ms(),
            kind: kind.to_string(),
            device: device.to_string(),
            layer: layer.to_string(),
            offset,
            message,
        };
        if ring.1.len() == HISTORY {
            ring.1.pop_front();
        }
        ring.1.push_back(e.clone());
        let _ = self.tx.send(e);
    }

    /// The recent events, oldest first, and a receiver for the ones after them.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let ring = self.ring.lock().expect("events lock");
        (ring.1.iter().cloned().collect(), self.tx.subscribe())
    }

    /// How many events of `kind` there were since the daemon started.
    pub fn total(&self, kind: &str) -> u64 {
        self.totals
            .lock()
            .expect("events lock")
            .get(kind)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_followers_see_new_events() {
        let ev = Events::default();
        for i in 0..(HISTORY as u64 + 10) {
            ev.emit(kind::READ_ERROR, "/dev/x", "l", i, "boom".into());
        }
        let (hist, mut rx) = ev.subscribe();
        assert_eq!(hist.len(), HISTORY);
        assert_eq!(hist[0].offset, 10);
        ev.emit(kind::ATTACHED, "/dev/y", "l", 0, String::new());
        assert_eq!(rx.try_recv().unwrap().device, "/dev/y");
    }
}
