//! Every serving process publishes its layer's access log next to the device's state file
//! (`RUN_DIR/devices/<dev>.access.json`, removed on detach), so `lazyblk trace record` can read what any device — ublk,
//! NBD or loop, served by any process — was asked for.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fetch::engine::ChunkAccess;
use crate::fetch::Engine;

/// How often a changed access log is rewritten.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(200);

/// The published access log of one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessFile {
    /// `sha256:<hex>` of the layer's index.
    pub index_digest: String,
    /// The layer source (for messages).
    pub source: String,
    /// When the engine was opened, ms since the Unix epoch.
    pub opened_ms: u64,
    /// First reads, in order.
    pub accesses: Vec<ChunkAccess>,
}

/// Suffix of the access log file next to a device's state file.
pub const ACCESS_SUFFIX: &str = "access.json";

/// Rewrites `path` whenever the engine's access log grew, until the task is dropped.
pub fn spawn_publisher(
    engine: Engine,
    path: PathBuf,
    rt: &tokio::runtime::Handle,
) -> tokio::task::JoinHandle<()> {
    rt.spawn(async move {
        let mut published = usize::MAX;
        loop {
            let (opened_ms, accesses) = engine.accesses();
            if accesses.len() != published {
                published = accesses.len();
                let f = AccessFile {
                    index_digest: engine.index_digest(),
                    source: engine.name().to_string(),
                    opened_ms,
                    accesses,
                };
                let tmp = path.with_extension("tmp-access");
                let bytes = serde_json::to_vec(&f).expect("access log serialises");
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
            tokio::time::sleep(PUBLISH_INTERVAL).await;
        }
    })
}
