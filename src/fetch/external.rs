//! The seam between the fetch engine and where an index's *external* chunks come from
//! ([`lazyblk_image_format::ChunkKind::External`]: bytes that are not in the layer's blob, such as
//! the file data of an original gzip layer served through an original-image index, `crate::original`).

use std::ops::Range;

use bytes::Bytes;

use super::remote::FetchError;
use super::BoxFuture;

/// A source of a virtual disk's external chunks.
pub trait ExternalData: Send + Sync + 'static {
    /// The bytes of `range` of the virtual disk (chunk-aligned; the end may be the disk's end). The
    /// engine checks every chunk in the answer against its index digest before it is used, so an
    /// implementation verifies what it fetches against its own digests but need not trust itself.
    fn read_disk(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>>;
    /// Where the bytes come from, for logs and errors.
    fn describe(&self) -> String;
    /// Bytes fetched from the network so far.
    fn fetched_bytes(&self) -> u64 {
        0
    }
}
