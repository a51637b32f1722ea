//! The node daemon: one process serving every attached layer of a node, on every backend.
//!
//! ```text
//!  lazyblk CLI ─┐                 ┌──────────────── lazyblk daemon (one per node) ───────────────┐
//!  snapshotter ─┴─ daemon.sock ──▶│ api (tonic) → Node: attach / detach / list / recover / events │
//!                  (unix, 0600)   │   per layer: Engine ── BlockSource ──▶ ublk | NBD | loop      │
//!                                 │   shared: MemCache (--memory-mib), DiskCache, FillGate,       │
//!                                 │           registry Sessions, Events, Prometheus endpoint      │
//!                                 └───────────────────────────────────────────────────────────────┘
//! ```
//!
//! State lives in the run directory: per device its state file (with the versioned [`LayerSpec`])
//! and its verified index, written atomically, so a restarted or upgraded daemon resumes ublk and
//! NBD devices without the registry. The foreground `lazyblk attach` runs the same [`Node`] for one
//! layer, without the socket.

pub mod api;
pub mod daemon;
pub mod events;
pub mod metrics;
pub mod spec;

/// The generated control API (`proto/daemon.proto`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("lazyblk.daemon.v1");
}

pub use daemon::{Node, NodeConfig, NodeError};
pub use spec::LayerSpec;
