use thiserror::Error;

/// Everything that can be wrong with a blob, an index, a footer or a chunk.
///
/// Every variant names what was wrong (and which chunk, where there is one) so that a caller can log it and
/// fail the read with an I/O error; none of them is ever turned into data.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// The footer does not start with the expected magic bytes.
    #[error("footer: bad magic (not a lazyblk blob)")]
    BadFooterMagic,
    /// The index does not start with the expected magic bytes.
    #[error("index: bad magic")]
    BadIndexMagic,
    /// A version this reader does not know.
    #[error("{what}: unsupported format version {version}")]
    UnsupportedVersion {
        /// `footer` or `index`.
        what: &'static str,
        /// The version found.
        version: u16,
    },
    /// A digest algorithm this reader does not know.
    #[error("{what}: unsupported digest algorithm {algo}")]
    UnsupportedDigest {
        /// `footer` or `index`.
        what: &'static str,
        /// The algorithm identifier found.
        algo: u8,
    },
    /// A buffer had the wrong length for what it claims to be.
    #[error("{what}: expected {expected} bytes, got {got}")]
    BadLength {
        /// What was being parsed.
        what: &'static str,
        /// Bytes expected.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// A field that must be zero or within a range was not.
    #[error("{what}: invalid field {field} = {value}")]
    BadField {
        /// `footer`, `index` or `chunk N`.
        what: String,
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The index is bigger than the reader's limit.
    #[error("index: {len} bytes exceeds the limit of {limit} bytes")]
    IndexTooLarge {
        /// Claimed length.
        len: u64,
        /// Configured limit.
        limit: u64,
    },
    /// The index bytes do not match the trusted digest.
    #[error("index: digest mismatch (expected {expected}, got {got})")]
    IndexDigestMismatch {
        /// Trusted digest.
        expected: String,
        /// Digest of the bytes received.
        got: String,
    },
    /// A stored chunk does not match its digest.
    #[error("chunk {chunk}: digest mismatch (expected {expected}, got {got})")]
    ChunkDigestMismatch {
        /// Chunk number.
        chunk: u64,
        /// Digest from the index.
        expected: String,
        /// Digest of the bytes received.
        got: String,
    },
    /// A stored chunk could not be decompressed, or decompressed to the wrong size.
    #[error("chunk {chunk}: {reason}")]
    ChunkDecode {
        /// Chunk number.
        chunk: u64,
        /// What went wrong.
        reason: String,
    },
    /// A read outside the virtual disk.
    #[error("read of {len} bytes at offset {offset} is outside the image ({size} bytes)")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Image size.
        size: u64,
    },
    /// A malformed `sha256:` digest string.
    #[error("bad digest string {0:?} (want sha256:<64 hex digits>)")]
    BadDigestString(String),
    /// The writer was used wrongly (a chunk written twice, or missing at finish).
    #[error("writer: {0}")]
    Writer(String),
}
