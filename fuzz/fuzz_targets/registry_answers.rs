//! What registries answer: image manifests and indexes (as every media type), Referrers API
//! responses, `WWW-Authenticate` challenges, startup traces. Must end in Ok or an error, never a
//! panic.
#![no_main]

use lazyblk::fetch::registry::parse_challenge;
use lazyblk::image::oci::{parse_document, ImageIndex};
use libfuzzer_sys::fuzz_target;

const TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "",
    "text/plain",
];

fuzz_target!(|data: &[u8]| {
    for t in TYPES {
        let _ = parse_document(data, t);
    }
    let _ = serde_json::from_slice::<ImageIndex>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_challenge(s);
    }
    if let Ok(t) = lazyblk::trace::Trace::parse(data) {
        let _ = t.to_bytes();
    }
});
