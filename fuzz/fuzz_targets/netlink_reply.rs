//! Arbitrary bytes as a generic-netlink reply (the kernel's answer to the NBD/ublk control
//! requests) and as nested attributes. Must end in Ok or an error, never a panic.
#![no_main]

use lazyblk::device::netlink::{parse_attrs, parse_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut attrs = Vec::new();
    if let Ok(Some(reply)) = parse_reply(data, 1, &mut attrs) {
        for (_, v) in parse_attrs(&reply) {
            let _ = parse_attrs(v);
        }
    }
    for (_, v) in parse_attrs(data) {
        let _ = parse_attrs(v);
    }
});
