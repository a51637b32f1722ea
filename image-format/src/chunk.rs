//! Encoding and verified decoding of single chunks.

use crate::{sha256, ChunkEntry, Digest, FormatError};

/// How a chunk is stored in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ChunkKind {
    /// All zeros; nothing is stored.
    Zero = 0,
    /// Stored uncompressed.
    Raw = 1,
    /// One zstd frame.
    Zstd = 2,
    /// Not in the blob: the chunk's bytes come from outside it (the original layer an *original-image
    /// index* describes; docs/format.md, "External chunks"). `stored_len` is the chunk's length and the
    /// digest is the SHA-256 of its bytes, checked like a raw chunk's.
    External = 3,
}

impl ChunkKind {
    /// Parses the on-disk kind byte.
    pub fn from_u8(v: u8) -> Option<ChunkKind> {
        match v {
            0 => Some(ChunkKind::Zero),
            1 => Some(ChunkKind::Raw),
            2 => Some(ChunkKind::Zstd),
            3 => Some(ChunkKind::External),
            _ => None,
        }
    }
}

/// The compression a writer applies to non-zero chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Store chunks uncompressed.
    None,
    /// zstd at the given level (1..=22); a chunk that does not shrink is stored raw.
    Zstd {
        /// Compression level.
        level: i32,
    },
}

/// The zstd level writers use unless told otherwise: a blob is written once and fetched by every
/// node on every cold start, so bytes on the wire count more than conversion CPU (level 14 stores
/// about 11% fewer bytes than level 3 on real layers, for several times the conversion CPU; see
/// docs/benchmarks.md, "Compression level").
pub const DEFAULT_ZSTD_LEVEL: i32 = 14;

impl Default for Codec {
    fn default() -> Self {
        Codec::Zstd {
            level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// A chunk ready to be appended to a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    /// How it is stored.
    pub kind: ChunkKind,
    /// The stored bytes (empty for [`ChunkKind::Zero`]).
    pub data: Vec<u8>,
    /// SHA-256 of `data` (all zeros for [`ChunkKind::Zero`]).
    pub digest: Digest,
}

/// True if every byte of `data` is zero.
pub fn is_all_zero(data: &[u8]) -> bool {
    // OR 16-byte words together a page at a time so the common non-zero case exits early.
    data.chunks(4096).all(|page| {
        let mut words = page.chunks_exact(16);
        let mut acc = 0u128;
        for w in words.by_ref() {
            acc |= u128::from_ne_bytes(w.try_into().expect("16 bytes"));
        }
        acc == 0 && words.remainder().iter().all(|&b| b == 0)
    })
}

/// Encodes one chunk: all-zero chunks become [`ChunkKind::Zero`], others are compressed with `codec`
/// (falling back to raw when compression does not help) and hashed.
pub fn encode_chunk(raw: &[u8], codec: Codec) -> EncodedChunk {
    if is_all_zero(raw) {
        return EncodedChunk {
            kind: ChunkKind::Zero,
            data: Vec::new(),
            digest: [0; 32],
        };
    }
    let (kind, data) = match codec {
        Codec::None => (ChunkKind::Raw, raw.to_vec()),
        Codec::Zstd { level } => match compress(raw, level) {
            Some(c) if c.len() < raw.len() => (ChunkKind::Zstd, c),
            _ => (ChunkKind::Raw, raw.to_vec()),
        },
    };
    let digest = sha256(&data);
    EncodedChunk { kind, data, digest }
}

/// Levels above this first try this one: see [`compress`].
const PROBE_LEVEL: i32 = 1;

/// zstd of `raw` at `level`; but data that [`PROBE_LEVEL`] cannot shrink by 3% (already compressed
/// files, weights, random bytes) keeps the probe's result. High levels compress such data at about
/// 10 MB/s per core for a saving of a few tenths of a percent; the probe costs a few percent of a
/// high level's time on data that compresses. Deterministic: the same bytes always encode the same.
fn compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    if level <= PROBE_LEVEL {
        return zstd::bulk::compress(raw, level).ok();
    }
    let probe = zstd::bulk::compress(raw, PROBE_LEVEL).ok()?;
    if probe.len() as u64 * 100 >= raw.len() as u64 * 97 {
        return Some(probe);
    }
    zstd::bulk::compress(raw, level).ok()
}

/// Encodes a chunk whose bytes stay outside the blob: all zeros become [`ChunkKind::Zero`], anything
/// else [`ChunkKind::External`] with the SHA-256 of `raw` and nothing stored.
pub fn encode_external(raw: &[u8]) -> EncodedChunk {
    if is_all_zero(raw) {
        return encode_chunk(raw, Codec::None);
    }
    EncodedChunk {
        kind: ChunkKind::External,
        data: Vec::new(),
        digest: sha256(raw),
    }
}

/// Verifies `stored` against `entry`: its length and (unless a zero chunk) its SHA-256. What a cache
/// of stored chunks checks before it keeps bytes it will decode later with [`decode_chunk`].
pub fn verify_chunk(chunk: u64, entry: &ChunkEntry, stored: &[u8]) -> Result<(), FormatError> {
    if stored.len() as u64 != entry.stored_len as u64 {
        return Err(FormatError::ChunkDecode {
            chunk,
            reason: format!(
                "stored length {} does not match the index ({})",
                stored.len(),
                entry.stored_len
            ),
        });
    }
    if entry.kind == ChunkKind::Zero {
        return Ok(());
    }
    let got = sha256(stored);
    if got != entry.digest {
        return Err(FormatError::ChunkDigestMismatch {
            chunk,
            expected: hex::encode(entry.digest),
            got: hex::encode(got),
        });
    }
    Ok(())
}

/// Verifies `stored` against `entry` (digest first, before any decompression) and decodes it into `out`,
/// whose length must be the chunk's uncompressed length ([`crate::Index::chunk_len`]).
pub fn decode_chunk(
    chunk: u64,
    entry: &ChunkEntry,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), FormatError> {
    verify_chunk(chunk, entry, stored)?;
    match entry.kind {
        ChunkKind::Zero => out.fill(0),
        ChunkKind::Raw | ChunkKind::External => {
            if stored.len() != out.len() {
                return Err(FormatError::ChunkDecode {
                    chunk,
                    reason: format!(
                        "raw chunk is {} bytes, expected {}",
                        stored.len(),
                        out.len()
                    ),
                });
            }
            out.copy_from_slice(stored);
        }
        ChunkKind::Zstd => {
            let n = zstd::bulk::decompress_to_buffer(stored, out).map_err(|e| {
                FormatError::ChunkDecode {
                    chunk,
                    reason: format!("zstd: {e}"),
                }
            })?;
            if n != out.len() {
                return Err(FormatError::ChunkDecode {
                    chunk,
                    reason: format!("decompressed to {n} bytes, expected {}", out.len()),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(e: &EncodedChunk) -> ChunkEntry {
        ChunkEntry {
            offset: 0,
            stored_len: e.data.len() as u32,
            kind: e.kind,
            digest: e.digest,
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[0; 4096]));
        assert!(is_all_zero(&[]));
        for i in [0, 15, 16, 17, 4095] {
            let mut b = vec![0u8; 4096];
            b[i] = 1;
            assert!(!is_all_zero(&b), "byte {i}");
        }
        let mut odd = vec![0u8; 21];
        odd[20] = 3;
        assert!(!is_all_zero(&odd));
    }

    #[test]
    fn encode_decode_kinds() {
        let zero = encode_chunk(&[0; 4096], Codec::default());
        assert_eq!(zero.kind, ChunkKind::Zero);
        let text: Vec<u8> = b"hello world ".iter().cycle().take(4096).copied().collect();
        let z = encode_chunk(&text, Codec::default());
        assert_eq!(z.kind, ChunkKind::Zstd);
        let mut out = vec![0u8; 4096];
        decode_chunk(1, &entry(&z), &z.data, &mut out).unwrap();
        assert_eq!(out, text);
        // Incompressible data is stored raw.
        let noise = noise(4096, 0, 0xff);
        let r = encode_chunk(&noise, Codec::default());
        assert_eq!(r.kind, ChunkKind::Raw);
        decode_chunk(2, &entry(&r), &r.data, &mut out).unwrap();
        assert_eq!(out, noise);
    }

    /// xorshift bytes; `zero_every` > 0 zeroes every `zero_every`-th 8-byte run (a little
    /// redundancy), `mask` keeps some bits of every byte (entropy below 8 bits).
    fn noise(len: usize, zero_every: usize, mask: u8) -> Vec<u8> {
        let mut x = 0x9e37_79b9u32;
        let mut v: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8 & mask
            })
            .collect();
        if zero_every > 0 {
            for run in v.chunks_mut(8).step_by(zero_every) {
                run.fill(0);
            }
        }
        v
    }

    #[test]
    fn high_levels_keep_the_probe_on_data_it_barely_shrinks() {
        // One 8-byte run in 30 zeroed: the probe shrinks it by 2.5%, so a high level keeps the
        // probe's bytes (a level-19 pass finds other matches and stores different bytes, no fewer).
        let barely = noise(256 << 10, 30, 0xff);
        let probe = encode_chunk(&barely, Codec::Zstd { level: PROBE_LEVEL });
        assert_eq!(probe.kind, ChunkKind::Zstd);
        assert!(
            probe.data.len() * 100 >= barely.len() * 97,
            "{}",
            probe.data.len()
        );
        let direct = zstd::bulk::compress(&barely, 19).unwrap();
        assert_ne!(direct, probe.data, "level 19 alone would store other bytes");
        let high = encode_chunk(&barely, Codec::Zstd { level: 19 });
        assert_eq!(high, probe);
        let mut out = vec![0u8; barely.len()];
        decode_chunk(0, &entry(&high), &high.data, &mut out).unwrap();
        assert_eq!(out, barely);
        // Data the probe shrinks by more gets the level asked for.
        let seven_bits = noise(256 << 10, 0, 0x7f);
        let probe = encode_chunk(&seven_bits, Codec::Zstd { level: PROBE_LEVEL });
        assert!(
            probe.data.len() * 100 < seven_bits.len() * 97,
            "{}",
            probe.data.len()
        );
        let high = encode_chunk(&seven_bits, Codec::Zstd { level: 19 });
        assert_eq!(high.data, zstd::bulk::compress(&seven_bits, 19).unwrap());
        decode_chunk(0, &entry(&high), &high.data, &mut out).unwrap();
        assert_eq!(out, seven_bits);
    }

    #[test]
    fn corruption_and_wrong_size_are_errors() {
        let text: Vec<u8> = b"abcdefgh".iter().cycle().take(8192).copied().collect();
        let z = encode_chunk(&text, Codec::default());
        let mut bad = z.data.clone();
        bad[3] ^= 0x40;
        let mut out = vec![0u8; 8192];
        assert!(matches!(
            decode_chunk(7, &entry(&z), &bad, &mut out),
            Err(FormatError::ChunkDigestMismatch { chunk: 7, .. })
        ));
        // Right bytes, wrong expected size: bigger content than the buffer, and smaller.
        let mut small = vec![0u8; 4096];
        assert!(decode_chunk(7, &entry(&z), &z.data, &mut small).is_err());
        let mut big = vec![0u8; 16384];
        assert!(decode_chunk(7, &entry(&z), &z.data, &mut big).is_err());
    }
}
