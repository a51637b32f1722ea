//! The fixed-size footer at the very end of a blob.

use crate::{Digest, FormatError, DIGEST_SHA256, FORMAT_VERSION};

/// Length of the footer in bytes.
pub const FOOTER_LEN: usize = 64;
/// Magic bytes at the start of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"LZBLKFT\x01";

/// Where the index is and what it hashes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Byte offset of the index inside the blob.
    pub index_offset: u64,
    /// Length of the index in bytes.
    pub index_length: u64,
    /// SHA-256 of the index bytes.
    pub index_digest: Digest,
}

impl Footer {
    /// Serialises the footer (little-endian, 64 bytes).
    pub fn to_bytes(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&FOOTER_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        // 10..12 flags = 0
        b[12] = DIGEST_SHA256;
        // 13..16 reserved
        b[16..24].copy_from_slice(&self.index_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.index_length.to_le_bytes());
        b[32..64].copy_from_slice(&self.index_digest);
        b
    }

    /// Parses a footer. `blob_size`, when known, is checked against the index location: the index must end
    /// exactly where the footer starts.
    pub fn parse(b: &[u8], blob_size: Option<u64>) -> Result<Footer, FormatError> {
        if b.len() != FOOTER_LEN {
            return Err(FormatError::BadLength {
                what: "footer",
                expected: FOOTER_LEN as u64,
                got: b.len() as u64,
            });
        }
        if b[0..8] != FOOTER_MAGIC {
            return Err(FormatError::BadFooterMagic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: "footer",
                version,
            });
        }
        let flags = u16::from_le_bytes([b[10], b[11]]);
        if flags != 0 {
            return Err(bad("flags", flags as u64));
        }
        if b[12] != DIGEST_SHA256 {
            return Err(FormatError::UnsupportedDigest {
                what: "footer",
                algo: b[12],
            });
        }
        if b[13..16] != [0, 0, 0] {
            return Err(bad("reserved", 1));
        }
        let index_offset = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        let index_length = u64::from_le_bytes(b[24..32].try_into().expect("8 bytes"));
        let mut index_digest = [0u8; 32];
        index_digest.copy_from_slice(&b[32..64]);
        let end = index_offset
            .checked_add(index_length)
            .ok_or_else(|| bad("index_offset", index_offset))?;
        if let Some(size) = blob_size {
            if end.checked_add(FOOTER_LEN as u64) != Some(size) {
                return Err(bad("index_offset", index_offset));
            }
        }
        Ok(Footer {
            index_offset,
            index_length,
            index_digest,
        })
    }
}

fn bad(field: &'static str, value: u64) -> FormatError {
    FormatError::BadField {
        what: "footer".into(),
        field,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = Footer {
            index_offset: 1234,
            index_length: 112,
            index_digest: [7; 32],
        };
        let b = f.to_bytes();
        assert_eq!(Footer::parse(&b, Some(1234 + 112 + 64)), Ok(f));
        assert!(matches!(
            Footer::parse(&b, Some(9999)),
            Err(FormatError::BadField {
                field: "index_offset",
                ..
            })
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            Footer::parse(&[0; 64], None),
            Err(FormatError::BadFooterMagic)
        );
        assert!(Footer::parse(&[0; 10], None).is_err());
        let mut b = Footer {
            index_offset: u64::MAX,
            index_length: 2,
            index_digest: [0; 32],
        }
        .to_bytes();
        assert!(Footer::parse(&b, None).is_err(), "offset+length overflow");
        b[8] = 9;
        assert!(matches!(
            Footer::parse(&b, None),
            Err(FormatError::UnsupportedVersion { version: 9, .. })
        ));
    }
}
