//! Property tests: any image round-trips, and any single corrupted byte of a blob is detected.

use lazyblk_image_format::{
    decode_chunk, encode_chunk, BlobWriter, Codec, Footer, FormatError, Index, IndexLimits,
    PlanOptions, FOOTER_LEN,
};
use proptest::prelude::*;

/// Builds an image of `blocks` 512-byte sectors from a sparse list of (sector, byte) writes so that
/// zero chunks, compressible and incompressible chunks all occur.
fn image(sectors: usize, writes: &[(usize, u8, bool)]) -> Vec<u8> {
    let mut img = vec![0u8; sectors * 512];
    for &(s, b, noisy) in writes {
        let s = s % sectors;
        let sec = &mut img[s * 512..(s + 1) * 512];
        let mut x = b as u32 | 1;
        for (i, v) in sec.iter_mut().enumerate() {
            *v = if noisy {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            } else {
                b.wrapping_add((i % 7) as u8)
            };
        }
    }
    img
}

fn write_blob(img: &[u8], shift: u8, codec: Codec) -> Vec<u8> {
    let cs = 1usize << shift;
    let mut w = BlobWriter::new(Vec::new(), shift).unwrap();
    let n = img.len().div_ceil(cs);
    // Interleave the order: odd chunks first, then even ones.
    for c in (0..n)
        .filter(|c| c % 2 == 1)
        .chain((0..n).filter(|c| c % 2 == 0))
    {
        let raw = &img[c * cs..((c + 1) * cs).min(img.len())];
        w.append(c as u64, &encode_chunk(raw, codec)).unwrap();
    }
    w.finish(img.len() as u64).unwrap().0
}

/// Reads the whole virtual disk back the way a lazy reader would.
fn read_all(blob: &[u8]) -> Result<Vec<u8>, FormatError> {
    if blob.len() < FOOTER_LEN {
        return Err(FormatError::BadFooterMagic);
    }
    let footer = Footer::parse(&blob[blob.len() - FOOTER_LEN..], Some(blob.len() as u64))?;
    let ib = &blob[footer.index_offset as usize..][..footer.index_length as usize];
    let idx = Index::parse_verified(ib, &footer.index_digest, IndexLimits::default())?;
    idx.check_data_end(footer.index_offset)?;
    let mut out = vec![0u8; idx.image_size() as usize];
    let plan = idx.plan(0, idx.image_size(), PlanOptions::default())?;
    for f in &plan.fetches {
        for &c in &f.chunks {
            let e = idx.entry(c);
            let stored = &blob[e.blob_range().start as usize..e.blob_range().end as usize];
            let off = idx.chunk_offset(c) as usize;
            decode_chunk(c, e, stored, &mut out[off..off + idx.chunk_len(c) as usize])?;
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(sectors in 1usize..200, shift in 12u8..15,
                  writes in proptest::collection::vec((0usize..200, any::<u8>(), any::<bool>()), 0..20),
                  compress in any::<bool>()) {
        let img = image(sectors, &writes);
        let codec = if compress { Codec::Zstd { level: 1 } } else { Codec::None };
        let blob = write_blob(&img, shift, codec);
        prop_assert_eq!(read_all(&blob).unwrap(), img);
    }

    #[test]
    fn any_corrupted_byte_is_detected(sectors in 1usize..64,
                  writes in proptest::collection::vec((0usize..64, any::<u8>(), any::<bool>()), 1..10),
                  pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let img = image(sectors, &writes);
        let mut blob = write_blob(&img, 12, Codec::default());
        let p = pos.index(blob.len());
        blob[p] ^= flip;
        prop_assert!(read_all(&blob).is_err(), "flipping byte {} of {} went unnoticed", p, blob.len());
    }

    #[test]
    fn truncation_is_detected(sectors in 1usize..64,
                  writes in proptest::collection::vec((0usize..64, any::<u8>(), any::<bool>()), 1..10),
                  cut in any::<prop::sample::Index>()) {
        let img = image(sectors, &writes);
        let blob = write_blob(&img, 12, Codec::default());
        let keep = cut.index(blob.len());
        prop_assert!(read_all(&blob[..keep]).is_err());
    }

    /// Arbitrary bytes never panic the footer or index parsers.
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Footer::parse(&bytes, None);
        let _ = Index::parse(&bytes, IndexLimits::default());
        if bytes.len() >= 64 {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(b"LZBLKIX\x01");
            b[8] = 1; b[9] = 0; b[10] = 12; b[11] = 1;
            let _ = Index::parse(&b, IndexLimits::default());
        }
    }
}
