//! The lazyblk seekable block-image format.
//!
//! A virtual disk image (an ext4 filesystem in lazyblk) is cut into fixed-size chunks. Every chunk that is
//! not all zeros is compressed independently and stored in a blob; an [`Index`] at the end of the blob maps
//! chunk number → (blob offset, stored length, codec, SHA-256 digest), and a fixed-size [`Footer`] after it
//! says where the index is and what its digest is. See `docs/format.md` in the repository for the byte-level
//! specification.
//!
//! The crate is pure: no I/O besides `std::io::Write` in [`BlobWriter`], no async runtime, no HTTP. A reader
//! does three things, in this order:
//!
//! 1. parse the [`Footer`] (or take the index location from OCI annotations) and fetch the index bytes;
//! 2. [`Index::parse`] them, checking the digest it trusts ([`Index::parse_verified`]);
//! 3. for a read of the virtual disk, ask the index for a [`ReadPlan`] ([`Index::plan`]), fetch the byte
//!    ranges it names, and hand each stored chunk to [`decode_chunk`], which verifies the digest before it
//!    decompresses and checks the decompressed size.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod chunk;
mod error;
mod footer;
mod index;
mod plan;
mod relayout;
mod writer;

pub use chunk::{
    decode_chunk, encode_chunk, encode_external, is_all_zero, verify_chunk, ChunkKind, Codec,
    EncodedChunk, DEFAULT_ZSTD_LEVEL,
};
pub use error::FormatError;
pub use footer::{Footer, FOOTER_LEN, FOOTER_MAGIC};
pub use index::{ChunkEntry, Index, IndexLimits, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, INDEX_MAGIC};
pub use plan::{PlanOptions, RangeFetch, ReadPlan};
pub use relayout::{relayout, RelayoutSummary};
pub use writer::{BlobSummary, BlobWriter};

/// Format version written by this crate and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// Smallest allowed chunk size (4 KiB), as a power of two exponent.
pub const MIN_CHUNK_SHIFT: u8 = 12;
/// Largest allowed chunk size (4 MiB), as a power of two exponent.
pub const MAX_CHUNK_SHIFT: u8 = 22;
/// Default chunk size exponent (see `docs/format.md` for the measurements behind it).
pub const DEFAULT_CHUNK_SHIFT: u8 = 18;

/// Digest algorithm identifier for SHA-256, the only one defined in version 1.
pub const DIGEST_SHA256: u8 = 1;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

/// Formats a digest the OCI way: `sha256:<lowercase hex>`.
pub fn digest_string(d: &Digest) -> String {
    format!("sha256:{}", hex::encode(d))
}

/// Parses an OCI digest string `sha256:<64 hex>`.
pub fn parse_digest(s: &str) -> Result<Digest, FormatError> {
    let hexpart = s
        .strip_prefix("sha256:")
        .ok_or_else(|| FormatError::BadDigestString(s.to_string()))?;
    let mut out = [0u8; 32];
    if hexpart.len() != 64 || hex::decode_to_slice(hexpart, &mut out).is_err() {
        return Err(FormatError::BadDigestString(s.to_string()));
    }
    Ok(out)
}
