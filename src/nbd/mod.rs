//! The NBD protocol, server side: fixed-newstyle handshake and the transmission phase, read-only.
//!
//! [`handshake`] negotiates an export with a userspace client (`lazyblk serve`); [`transmission`] is the
//! request loop alone, which the kernel NBD backend runs on socketpairs (the kernel skips the
//! handshake). Requests are answered concurrently and out of order, matched by cookie.

pub mod proto;
mod server;

pub use server::{handshake, serve_connection, transmission, Negotiated, NBD_MAX_REQUEST};
