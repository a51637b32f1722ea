//! The lazy fetch engine: turns reads of a layer's virtual disk into verified, cached range fetches.
//!
//! [`BlockSource`] is the one seam every device backend uses (the NBD export, ublk, kernel NBD and the
//! FUSE-backed loop device). [`Engine`] implements it on top of a [`RangeReader`] (a local file, an
//! HTTP URL, or a registry blob) and the block-image format's planner and verifier. Shared by every
//! engine of a process: the [`MemCache`] budget, the [`FillGate`] scheduler, the disk cache and the
//! registry sessions.

pub mod access;
pub mod auth;
pub mod credentials;
pub mod diskcache;
pub mod engine;
pub mod external;
pub mod fill;
pub mod fill_order;
pub mod hosts;
pub mod keychain;
pub mod lane;
pub mod memcache;
pub mod metrics;
pub mod readahead;
pub mod registry;
pub mod remote;
pub mod retry;
pub mod source;
pub mod tls;

pub use engine::{Engine, EngineOptions};
pub use external::ExternalData;
pub use fill::{FillGate, LayerActivity};
pub use memcache::MemCache;
pub use metrics::Metrics;
pub use remote::{FetchError, RangeReader};
pub use source::{open_source, SourceOptions};

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a read of the virtual disk failed. Device backends turn every variant into an I/O error (EIO),
/// except `OutOfRange` (EINVAL).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// The read lies outside the disk.
    #[error("read of {len} bytes at {offset} is outside the disk ({size} bytes)")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The data could not be fetched and verified before the deadline.
    #[error("read at {offset}: chunk {chunk}: {cause}")]
    Fetch {
        /// Disk offset of the read.
        offset: u64,
        /// The chunk that failed.
        chunk: u64,
        /// What went wrong (last error seen).
        cause: String,
    },
}

/// Read-only random access to a virtual disk. Implementations are shared between connections and
/// threads; reads may run concurrently.
pub trait BlockSource: Send + Sync + 'static {
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, ReadError>>;
    /// Fills `buf` with the bytes at `offset` if that can be done at once from memory, without
    /// awaiting (device backends try this first from their own threads); false means use
    /// [`BlockSource::read_at`]. Default: never.
    fn read_now_into(&self, _offset: u64, _buf: &mut [u8]) -> bool {
        false
    }
    /// Hints that `len` bytes at `offset` will be read soon (NBD_CMD_CACHE, readahead). Default: ignore.
    fn prefetch(&self, _offset: u64, _len: u64) {}
}
