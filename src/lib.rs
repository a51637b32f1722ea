//! lazyblk: a block-device lazy loader for container images.
//!
//! This library holds the pieces the `lazyblk` binary is made of: the in-process ext4 writer
//! ([`ext4`]), layer conversion ([`convert`]), image conversion ([`image`]), the lazy fetch engine
//! ([`fetch`]), the NBD protocol ([`nbd`]), kernel block devices ([`device`]), the node daemon
//! ([`node`]), original-image indexes ([`original`]), the containerd snapshotter ([`snapshotter`]), startup traces ([`trace`]), process
//! identity and durable state ([`process`]), reading local blobs ([`blobfile`]) and the command line
//! ([`cli`], which only parses and prints). The block-image format itself is the separate
//! `lazyblk-image-format` crate, re-exported as [`format`].

#![warn(missing_docs)]

pub mod blobfile;
pub mod cli;
pub mod convert;
pub mod device;
pub mod ext4;
pub mod fetch;
pub mod image;
pub mod nbd;
pub mod node;
pub mod original;
pub mod process;
pub mod shape;
pub mod snapshotter;
pub mod trace;

pub use lazyblk_image_format as format;
