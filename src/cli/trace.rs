//! `lazyblk trace record | push | show | recorded | relayout`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::RegistryArgs;
use crate::image::ImageRef;
use crate::trace::record::{collect, now_ms, Window};
use crate::trace::Trace;

/// Startup traces: record, ship with an image, inspect.
#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Record which chunks of which layers are read until the workload is ready (run it next to a
    /// container start; it reads the access logs every lazyblk device publishes in RUN_DIR).
    Record(RecordArgs),
    /// Ship a trace with an image: an OCI artifact referring to each of its manifests (Referrers API,
    /// or the `sha256-<hex>` tag fallback). The image and its layers are unchanged.
    Push(PushArgs),
    /// Print the trace shipped with an image (or a trace file), summarised.
    Show(ShowArgs),
    /// List the startup traces the snapshotter recorded on this node (the first container of an
    /// image that had none), for `lazyblk trace push IMAGE FILE`.
    Recorded(RecordedArgs),
    /// Make a new image whose lazyblk layers hold the traced chunks right before their index, so a
    /// node fetches the index and the startup set with one range request (layers without trace
    /// entries are copied; the config, diff IDs and chain IDs do not change).
    Relayout(RelayoutArgs),
}

/// Arguments of `lazyblk trace relayout`.
#[derive(Debug, Args)]
pub struct RelayoutArgs {
    /// The converted image (one platform manifest) the trace was recorded with.
    src: String,
    /// Where to push the new image.
    dst: String,
    /// The trace file.
    #[arg(long)]
    trace: PathBuf,
    /// Scratch directory (default: under $TMPDIR).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Arguments of `lazyblk trace record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Where the trace is written.
    #[arg(short, long)]
    out: PathBuf,
    /// Run directory of the devices to watch (the snapshotter's is ROOT/run).
    #[arg(long, default_value = "/run/lazyblk")]
    run_dir: PathBuf,
    /// Readiness: the first 2xx answer from this http:// URL ends the recording.
    #[arg(long)]
    ready_url: Option<String>,
    /// Keep recording this long after readiness (or, without --ready-url, this long in all).
    #[arg(long, default_value_t = 0.0)]
    window: f64,
    /// Give up waiting for readiness after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Only reads after this command started (by default a device's reads since it was attached
    /// count too, e.g. the mount during a pull that came first).
    #[arg(long)]
    from_now: bool,
}

/// Arguments of `lazyblk trace push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The (converted) image the trace was recorded with.
    image: String,
    /// The trace file.
    trace: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Arguments of `lazyblk trace recorded`.
#[derive(Debug, Args)]
pub struct RecordedArgs {
    /// The snapshotter's state directory.
    #[arg(long, default_value = super::snapshotter::DEFAULT_ROOT)]
    root: PathBuf,
}

/// Arguments of `lazyblk trace show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// An image (its shipped trace) or a trace file.
    what: String,
    /// The image's platform manifest digest to look up (default: the image's manifest, or an
    /// index's first).
    #[arg(long)]
    manifest: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Runs a `trace` subcommand.
pub fn run(c: TraceCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match c {
        TraceCommand::Record(a) => rt.block_on(record(a)),
        TraceCommand::Push(a) => rt.block_on(push(a)),
        TraceCommand::Show(a) => rt.block_on(show(a)),
        TraceCommand::Recorded(a) => recorded(a),
        TraceCommand::Relayout(a) => rt.block_on(relayout(a)),
    }
}

/// Polls `url` until it answers 2xx.
async fn wait_ready(url: &str, timeout: Duration) -> Result<()> {
    let client = crate::fetch::tls::client_builder(&Default::default())
        .map_err(anyhow::Error::msg)?
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("{url} did not answer 2xx within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn record(a: RecordArgs) -> Result<()> {
    if !(a.window >= 0.0 && a.timeout > 0.0) {
        bail!("--window must be >= 0 and --timeout > 0");
    }
    if a.ready_url.is_none() && a.window == 0.0 {
        bail!("give --ready-url, --window, or both");
    }
    let start_ms = now_ms();
    let mut ready_ms = None;
    if let Some(url) = &a.ready_url {
        wait_ready(url, Duration::from_secs_f64(a.timeout)).await?;
        let ms = now_ms().saturating_sub(start_ms);
        ready_ms = Some(ms);
        eprintln!("ready after {:.3}s", ms as f64 / 1e3);
    }
    tokio::time::sleep(Duration::from_secs_f64(a.window)).await;
    let end_ms = now_ms();
    // Let every publisher write what it saw up to now.
    tokio::time::sleep(crate::trace::publish::PUBLISH_INTERVAL * 3).await;
    let mut trace = collect(
        &a.run_dir,
        Window {
            start_ms,
            end_ms,
            only_after_start: a.from_now,
        },
    )
    .with_context(|| format!("reading access logs under {}", a.run_dir.display()))?;
    trace.ready_ms = ready_ms;
    if trace.layers.is_empty() {
        bail!(
            "no lazyblk device under {} was read in the window",
            a.run_dir.display()
        );
    }
    std::fs::write(&a.out, trace.to_bytes())
        .with_context(|| format!("writing {}", a.out.display()))?;
    for l in &trace.layers {
        println!(
            "{}  {} chunks  {}",
            l.index_digest,
            l.chunks.len(),
            l.source
        );
    }
    Ok(())
}

fn recorded(a: RecordedArgs) -> Result<()> {
    let dir = a.root.join(super::snapshotter::RECORDED_TRACES);
    let all = match crate::trace::auto::list(&dir) {
        Ok(all) => all,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for r in all {
        println!(
            "{}  {}  {} layers  {} chunks  {}",
            if r.image.is_empty() { "-" } else { &r.image },
            r.manifest,
            r.layers,
            r.chunks,
            r.path.display()
        );
    }
    Ok(())
}

async fn push(a: PushArgs) -> Result<()> {
    let trace =
        Trace::read_file(&a.trace).with_context(|| format!("trace file {}", a.trace.display()))?;
    let image = ImageRef::parse(&a.image)?;
    for (subject, artifact) in
        crate::trace::registry::push_trace(&image, &trace, &a.registry.options()).await?
    {
        println!("{subject} <- {artifact}");
    }
    Ok(())
}

async fn show(a: ShowArgs) -> Result<()> {
    let trace = if std::path::Path::new(&a.what).exists() {
        Trace::read_file(std::path::Path::new(&a.what))
            .with_context(|| format!("trace file {}", a.what))?
    } else {
        let image = ImageRef::parse(&a.what)?;
        let opts = a.registry.options();
        let store = image.store(&opts, false)?;
        let manifest = match a.manifest {
            Some(m) => m,
            // Traces refer to platform manifests: an index's first one by default.
            None => {
                crate::image::convert::image_manifests(&*store, &image)
                    .await?
                    .into_iter()
                    .next()
                    .with_context(|| format!("{image}: an index without manifests"))?
                    .digest
            }
        };
        crate::trace::registry::find_trace(&*store, &manifest)
            .await?
            .with_context(|| format!("{image}: no trace for manifest {manifest}"))?
    };
    if let Some(ms) = trace.ready_ms {
        println!("ready after {ms} ms when recorded");
    }
    for l in &trace.layers {
        println!(
            "{}  {} chunks  last read at {} ms  {}",
            l.index_digest,
            l.chunks.len(),
            l.ms.last().copied().unwrap_or(0),
            l.source
        );
    }
    Ok(())
}

async fn relayout(a: RelayoutArgs) -> Result<()> {
    let trace =
        Trace::read_file(&a.trace).with_context(|| format!("trace file {}", a.trace.display()))?;
    let src = ImageRef::parse(&a.src)?;
    let dst = ImageRef::parse(&a.dst)?;
    let work = a
        .work_dir
        .clone()
        .unwrap_or_else(crate::image::convert::default_work_dir);
    let r =
        crate::trace::relayout::relayout_image(&src, &dst, &trace, &a.registry.options(), &work)
            .await;
    if a.work_dir.is_none() {
        let _ = std::fs::remove_dir(&work);
    }
    let r = r?;
    print_relaid_layers(&r);
    println!("{} {}", r.target, r.manifest_digest);
    Ok(())
}

/// One line per layer of a relayout: copied, or where its startup chunks went.
pub(super) fn print_relaid_layers(r: &crate::trace::relayout::RelayoutReport) {
    for l in &r.layers {
        if l.startup_chunks == 0 {
            println!("{}  copied", l.source_digest);
        } else {
            println!(
                "{} -> {}  {} startup chunks ({} bytes) before the index",
                l.source_digest, l.target_digest, l.startup_chunks, l.startup_bytes
            );
        }
    }
}
