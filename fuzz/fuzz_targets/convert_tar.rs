//! Arbitrary bytes as a layer tar: tar reader, OCI whiteouts, path semantics and the whole ext4 build
//! (into a sink that only checks writes stay inside the image). Must end in Ok or an error, never a panic.
#![no_main]

use lazyblk::convert::apply_tar;
use lazyblk::ext4::{BlockSink, Ext4Builder, FinishOptions};
use libfuzzer_sys::fuzz_target;

struct CheckingSink {
    written: u64,
    max_end: u64,
}

impl BlockSink for CheckingSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.written += data.len() as u64;
        self.max_end = self.max_end.max(offset + data.len() as u64);
        Ok(())
    }
    fn set_size(&mut self, size: u64) -> std::io::Result<()> {
        assert!(self.max_end <= size, "write beyond the image end");
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Ext4Builder::new(CheckingSink { written: 0, max_end: 0 });
    if apply_tar(data, &mut b, 100_000).is_ok() {
        let _ = b.finish(&FinishOptions::default());
    }
});
