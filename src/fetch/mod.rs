//! The lazy fetch engine: turns reads of a layer's virtual disk into verified, cached range fetches.
//!
//! [`BlockSource`] is the one seam every device backend uses (the NBD export today; ublk and the
//! FUSE-backed loop device later). [`Engine`] implements it on top of a [`RangeReader`] (a local file,
//! an HTTP URL, or a registry blob) and the block-image format's planner and verifier.

pub mod diskcache;
pub mod engine;
pub mod fill;
pub mod memcache;
pub mod metrics;
pub mod registry;
pub mod remote;
pub mod source;

pub use engine::{Engine, EngineOptions};
pub use fill::FillGate;
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

/// A raw disk image file as a [`BlockSource`] (baselines and tests).
pub struct RawFile {
    file: std::sync::Arc<std::fs::File>,
    size: u64,
}

impl RawFile {
    /// Opens a raw image.
    pub fn open(path: &std::path::Path) -> std::io::Result<RawFile> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(RawFile {
            file: std::sync::Arc::new(file),
            size,
        })
    }
}

impl BlockSource for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, ReadError>> {
        let file = self.file.clone();
        let size = self.size;
        Box::pin(async move {
            if offset.checked_add(len as u64).is_none_or(|e| e > size) {
                return Err(ReadError::OutOfRange {
                    offset,
                    len: len as u64,
                    size,
                });
            }
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, offset)
                    .map(|_| Bytes::from(buf))
            })
            .await
            .map_err(|e| ReadError::Fetch {
                offset,
                chunk: 0,
                cause: e.to_string(),
            })?
            .map_err(|e| ReadError::Fetch {
                offset,
                chunk: 0,
                cause: e.to_string(),
            })
        })
    }
}
