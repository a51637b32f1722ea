//! Reading a lazyblk blob from a local file: footer, verified index, verified chunks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lazyblk_image_format::{
    decode_chunk, Digest, Footer, FormatError, Index, IndexLimits, FOOTER_LEN,
};

/// Errors reading a local blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobFileError {
    /// I/O on the blob file.
    #[error("{path}: {source}")]
    Io {
        /// The blob.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The blob's contents are invalid.
    #[error("{path}: {source}")]
    Format {
        /// The blob.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
}

/// An opened blob with its index parsed and verified.
pub struct BlobFile {
    path: PathBuf,
    file: File,
    size: u64,
    footer: Footer,
    index: Index,
}

impl BlobFile {
    /// Opens `path`. The index is checked against `trusted_index_digest` when given (the value from the
    /// OCI descriptor), else against the footer's own digest, which catches corruption but not tampering.
    pub fn open(
        path: &Path,
        trusted_index_digest: Option<&Digest>,
    ) -> Result<BlobFile, BlobFileError> {
        let io = |source| BlobFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let fmt = |source| BlobFileError::Format {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size < FOOTER_LEN as u64 {
            return Err(fmt(FormatError::BadLength {
                what: "blob",
                expected: FOOTER_LEN as u64,
                got: size,
            }));
        }
        let mut fb = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut fb, size - FOOTER_LEN as u64)
            .map_err(io)?;
        let footer = Footer::parse(&fb, Some(size)).map_err(fmt)?;
        let limits = IndexLimits::default();
        if footer.index_length > limits.max_index_len {
            return Err(fmt(FormatError::IndexTooLarge {
                len: footer.index_length,
                limit: limits.max_index_len,
            }));
        }
        let mut ib = vec![0u8; footer.index_length as usize];
        file.read_exact_at(&mut ib, footer.index_offset)
            .map_err(io)?;
        let trusted = trusted_index_digest.unwrap_or(&footer.index_digest);
        let index = Index::parse_verified(&ib, trusted, limits).map_err(fmt)?;
        index.check_data_end(footer.index_offset).map_err(fmt)?;
        Ok(BlobFile {
            path: path.to_path_buf(),
            file,
            size,
            footer,
            index,
        })
    }

    /// The parsed index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// Blob size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads, verifies and decodes chunk `c` into `out` (exactly [`Index::chunk_len`] bytes). `scratch` is
    /// reused for the stored bytes.
    pub fn read_chunk(
        &self,
        c: u64,
        scratch: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<(), BlobFileError> {
        let e = self.index.entry(c);
        scratch.resize(e.stored_len as usize, 0);
        self.file
            .read_exact_at(scratch, e.offset)
            .map_err(|source| BlobFileError::Io {
                path: self.path.clone(),
                source,
            })?;
        decode_chunk(c, e, scratch, out).map_err(|source| BlobFileError::Format {
            path: self.path.clone(),
            source,
        })
    }
}
