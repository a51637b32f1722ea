//! `lazyblk pull`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::RegistryArgs;
use crate::snapshotter::pull::{pull, PullOptions};

/// Arguments of `lazyblk pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference (`registry/repo:tag` or `@sha256:...`), converted by `lazyblk convert`.
    reference: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    address: PathBuf,
    /// containerd namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The snapshotter's name in containerd's config.
    #[arg(long, default_value = "lazyblk")]
    snapshotter: String,
    /// Platform to pick from an index.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Pulls an image into containerd for the lazyblk snapshotter.
pub fn run(a: PullArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let r = rt.block_on(pull(&PullOptions {
        reference: a.reference.clone(),
        address: a.address,
        namespace: a.namespace,
        snapshotter: a.snapshotter,
        platform: a.platform,
        registry: a.registry.options(),
    }))?;
    println!(
        "{}: {} remote layer(s), {} unpacked, {} already present; chain {} ({:.2}s)",
        a.reference,
        r.remote_layers,
        r.unpacked_layers,
        r.existing_layers,
        r.chain_id,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
