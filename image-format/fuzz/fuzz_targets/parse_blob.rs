//! Treats the input as a whole blob: footer → index → plan → verified decode of every chunk. Any input
//! must end in Ok or an error; never a panic, a huge allocation or a hang.
#![no_main]

use lazyblk_image_format::{decode_chunk, Footer, Index, IndexLimits, PlanOptions, FOOTER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|blob: &[u8]| {
    // The index parser on its own, with a small limit.
    let _ = Index::parse(blob, IndexLimits { max_index_len: 1 << 20 });
    if blob.len() < FOOTER_LEN {
        return;
    }
    let Ok(footer) = Footer::parse(&blob[blob.len() - FOOTER_LEN..], Some(blob.len() as u64)) else {
        return;
    };
    let ib = &blob[footer.index_offset as usize..][..footer.index_length as usize];
    // Skip the digest so the fuzzer can reach the entry validation.
    let Ok(idx) = Index::parse(ib, IndexLimits { max_index_len: 1 << 20 }) else {
        return;
    };
    if idx.check_data_end(footer.index_offset).is_err() || idx.image_size() > 64 << 20 {
        return;
    }
    let Ok(plan) = idx.plan(0, idx.image_size(), PlanOptions::default()) else {
        return;
    };
    let mut out = vec![0u8; idx.chunk_size() as usize];
    for f in &plan.fetches {
        for &c in &f.chunks {
            let e = idx.entry(c);
            let stored = &blob[e.blob_range().start as usize..e.blob_range().end as usize];
            let _ = decode_chunk(c, e, stored, &mut out[..idx.chunk_len(c) as usize]);
        }
    }
});
