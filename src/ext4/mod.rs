//! A writer for read-only ext4 images, fed entry by entry from a tar stream.
//!
//! File data is written to a [`BlockSink`] as it arrives, in ascending block order, starting at
//! [`DATA_START_BLOCK`]; all metadata (directories, extent trees, attribute blocks, bitmaps, inode tables)
//! follows the data when [`Ext4Builder::finish`] runs, and the superblock and group descriptors are written
//! last, to the head of the image. Nothing touches the host filesystem. `docs/architecture.md` explains
//! the layout and why it is an in-process writer rather than `mke2fs -d`.

pub mod acl;
mod builder;
pub mod dir;
pub mod disk;
pub mod extent;
pub mod tree;
pub mod xattr;

pub use builder::{Ext4Builder, Ext4Summary, FinishOptions};
pub use tree::{clean_path, Meta, NodeKind, Timestamp};

use std::io;

/// Filesystem block size (bytes).
pub const BLOCK_SIZE: usize = 4096;
/// On-disk inode size (bytes).
pub const INODE_SIZE: usize = 256;
/// `i_extra_isize`: room for nanosecond timestamps and crtime.
pub const EXTRA_ISIZE: usize = 32;
/// Blocks per block group (one bitmap block's worth).
pub const BLOCKS_PER_GROUP: u64 = 32768;
/// First non-reserved inode.
pub const FIRST_INO: u32 = 11;
/// The root directory's inode.
pub const ROOT_INO: u32 = 2;
/// Blocks reserved after the superblock for group descriptors: enough for 2^32 blocks.
pub const GDT_RESERVED_BLOCKS: u64 = 1024;
/// First block of file data. Blocks before it hold only the superblock and group descriptors, which are
/// written last; 8 MiB keeps the head in its own chunks for any chunk size the format allows.
pub const DATA_START_BLOCK: u64 = 2048;
/// Largest image (blocks): 32-bit block numbers.
pub const MAX_BLOCKS: u64 = (1 << 32) - 1;

/// Where the image goes: positioned writes, ascending except for the head (offsets below
/// `DATA_START_BLOCK * BLOCK_SIZE`), which is written once, at the end.
pub trait BlockSink {
    /// Writes `data` at byte `offset` of the image.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Declares the final image size (bytes); called once, after every write.
    fn set_size(&mut self, size: u64) -> io::Result<()>;
    /// Writes file data: like [`BlockSink::write_at`], and `origin`, when known, is where `data`
    /// lies verbatim in the layer's tar stream (its byte offset there). A sink that serves file data
    /// from the original layer (an original-image index) records the mapping instead of the bytes.
    fn write_file_data(&mut self, offset: u64, data: &[u8], origin: Option<u64>) -> io::Result<()> {
        let _ = origin;
        self.write_at(offset, data)
    }
}

/// Where a regular file's bytes lie in the layer's tar stream, for [`Ext4Builder::add_file_from`].
pub trait DataOrigin {
    /// For logical byte `at` of the file: the tar offset of that byte (`None` inside a hole of a
    /// sparse file) and how many bytes from `at` on keep that property (contiguous in the tar, or hole).
    fn origin(&self, at: u64) -> (Option<u64>, u64);
}

impl BlockSink for std::fs::File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }
    fn set_size(&mut self, size: u64) -> io::Result<()> {
        self.set_len(size)
    }
}

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// Writing to the sink failed.
    #[error("writing the image: {0}")]
    Io(#[from] io::Error),
    /// A path the layer cannot contain.
    #[error("{path}: {reason}")]
    Path {
        /// The offending path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Reading file data from the layer failed.
    #[error("reading file data: {0}")]
    Source(io::Error),
    /// File data ended early.
    #[error("{path}: data ends after {got} of {size} bytes")]
    Truncated {
        /// The file.
        path: String,
        /// Bytes read.
        got: u64,
        /// Bytes announced.
        size: u64,
    },
    /// Something this writer does not support.
    #[error("{0}")]
    Unsupported(String),
}
