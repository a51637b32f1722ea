//! lazyblk: a block-device lazy loader for container images.
//!
//! This library holds the pieces the `lazyblk` binary is made of: the in-process ext4 writer
//! ([`ext4`]) and layer conversion ([`convert`]). The block-image format itself is the separate
//! `lazyblk-image-format` crate, re-exported as [`format`].

pub mod convert;
pub mod ext4;

pub use lazyblk_image_format as format;
pub mod blobfile;
pub mod cli;
