//! The containerd snapshotter (a proxy plugin speaking `containerd.services.snapshots.v1`).

pub mod cri_proxy;
pub mod filters;
pub mod layers;
pub mod proto;
pub mod pull;
pub mod service;
pub mod store;
