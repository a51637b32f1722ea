//! The `lazyblk` command line.

mod attach;
mod bench;
mod daemon;
mod image;
mod layer;
mod pull;
pub mod serve;
mod snapshotter;
mod trace;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::fetch::registry::RegistryOptions;

/// Block-device lazy loader for container images.
#[derive(Debug, Parser)]
#[command(name = "lazyblk", version, about)]
pub struct Cli {
    /// Log filter (also read from RUST_LOG), e.g. `info` or `lazyblk=debug`.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with single layers: convert, export, inspect.
    #[command(subcommand)]
    Layer(layer::LayerCommand),
    /// Expose a layer as a read-only block device (prints the device; Ctrl-C/SIGTERM detaches).
    Attach(attach::AttachArgs),
    /// List devices attached by lazyblk.
    Ls(attach::LsArgs),
    /// Detach a device (or `all`).
    Detach(attach::DetachArgs),
    /// Ask the node daemon to resume, now, devices whose server died (ublk user recovery, NBD reconnect).
    Recover(attach::RecoverArgs),
    /// Events of the node daemon: attaches, detaches, failed reads (layer, offset, cause), recoveries.
    Events(attach::EventsArgs),
    /// The node daemon: serves every attached layer of the node (control socket RUN_DIR/daemon.sock).
    Daemon(daemon::DaemonArgs),
    /// Convert a whole image (every platform) from a registry or OCI layout, pushing the result.
    Convert(image::ConvertImageArgs),
    /// Index an image's original layers (no data converted or copied): pushes, per manifest, a
    /// referrer artifact with each layer's ext4 metadata and inflate checkpoints, so the snapshotter
    /// runs the unmodified image lazily.
    Index(image::IndexImageArgs),
    /// List the lazyblk referrer artifacts of an image.
    Referrers(image::ReferrersArgs),
    /// Serve a layer (file, URL or registry blob) read-only over NBD, fetching lazily.
    Serve(serve::ServeArgs),
    /// The containerd snapshotter (proxy plugin): remote layers on block devices.
    Snapshotter(snapshotter::SnapshotterArgs),
    /// Pull an image into containerd for the lazyblk snapshotter (remote layers are not downloaded).
    Pull(pull::PullArgs),
    /// Startup traces: record which chunks an image reads until ready, ship them with the image.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// Benchmarks (block-device reads).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs the command line; the binary's `main` calls this.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Layer(c) => layer::run(c),
        Command::Serve(a) => serve::run(a),
        Command::Convert(a) => image::convert(a),
        Command::Index(a) => image::index(a),
        Command::Attach(a) => attach::attach(a),
        Command::Ls(a) => attach::ls(a),
        Command::Detach(a) => attach::detach(a),
        Command::Recover(a) => attach::recover(a),
        Command::Daemon(a) => daemon::run(a),
        Command::Events(a) => attach::events(a),
        Command::Referrers(a) => image::referrers(a),
        Command::Bench(c) => bench::run(c),
        Command::Snapshotter(a) => snapshotter::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Trace(c) => trace::run(c),
    }
}

/// Registry access options.
#[derive(Debug, Args, Clone, serde::Serialize, serde::Deserialize)]
pub struct RegistryArgs {
    /// Plain HTTP to registries (only for registries you trust on this network).
    #[arg(long)]
    pub plain_http: bool,
    /// containerd-style certs.d directory with REGISTRY/hosts.toml.
    #[arg(long)]
    pub hosts_dir: Option<PathBuf>,
    /// Docker config with credentials (default ~/.docker/config.json).
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
}

impl RegistryArgs {
    /// The registry options these flags describe.
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            plain_http: self.plain_http,
            hosts_dir: self.hosts_dir.clone(),
            docker_config: self.docker_config.clone(),
        }
    }
}

/// A command's `--config` TOML file (unknown keys refused by the type), or its defaults without one.
fn config_file<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> Result<T> {
    use anyhow::Context;
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("{}", p.display()))
}
