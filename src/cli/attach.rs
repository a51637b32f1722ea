//! `lazyblk attach`, `ls`, `detach`, `recover`: clients of the node daemon when one serves the run
//! directory; without one, `attach` serves its layer in the foreground (the debugging mode).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::serve::SourceArgs;
use crate::device::Backend;
use crate::node::proto::{DetachRequest, LayerStatus, ListRequest, RecoverRequest};
use crate::node::spec::{IndexRef, RegistrySpec, SPEC_VERSION};
use crate::node::{api, LayerSpec, Node, NodeConfig};

/// The default run directory of the node.
pub const DEFAULT_RUN_DIR: &str = "/run/lazyblk";

/// Arguments of `lazyblk attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Blob file, http(s) URL, or REGISTRY/REPO@sha256:DIGEST.
    source: String,
    /// Kernel interface for the device.
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
    /// Also mount the ext4 read-only here.
    #[arg(long)]
    mount: Option<PathBuf>,
    /// State directory (the node daemon's, if one runs).
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Foreground mode: serve Prometheus metrics on this address.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Return once the device is ready: attach through the node daemon of the run dir, starting one
    /// (`lazyblk daemon`, own session, log in RUN_DIR/daemon.log) if none runs.
    #[arg(long)]
    daemon: bool,
    /// ublk: hardware queues (one serving thread each).
    #[arg(long, default_value_t = 1)]
    ublk_queues: u16,
    /// ublk: requests in flight per queue.
    #[arg(long, default_value_t = 64)]
    ublk_depth: u16,
    #[command(flatten)]
    src: SourceArgs,
}

impl AttachArgs {
    fn spec(&self) -> Result<LayerSpec> {
        let s = &self.src;
        let index = match (s.index_offset, s.index_length, &s.index_digest) {
            (Some(offset), Some(length), Some(digest)) => Some(IndexRef {
                offset,
                length,
                digest: digest.clone(),
            }),
            _ => None,
        };
        // A relative blob path means nothing to a daemon with another working directory.
        let source = match std::path::Path::new(&self.source) {
            p if p.exists() => std::fs::canonicalize(p)
                .with_context(|| format!("resolving {}", p.display()))?
                .display()
                .to_string(),
            _ => self.source.clone(),
        };
        let abs = |p: &Option<PathBuf>| -> Result<Option<PathBuf>> {
            Ok(match p {
                Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
                other => other.clone(),
            })
        };
        let spec = LayerSpec {
            version: SPEC_VERSION,
            source,
            index_digest: if index.is_none() {
                s.index_digest.clone()
            } else {
                None
            },
            index,
            startup_offset: s.startup_offset,
            prefetch_trace: abs(&s.prefetch_trace)?,
            fill: s.fill,
            backend: self.backend,
            mount: abs(&self.mount)?,
            registry: RegistrySpec {
                plain_http: s.registry.plain_http,
                hosts_dir: abs(&s.registry.hosts_dir)?,
                docker_config: abs(&s.registry.docker_config)?,
            },
            read_deadline_secs: s.read_deadline,
            readahead_chunks: Some(s.readahead_chunks),
            ublk_queues: self.ublk_queues,
            ublk_depth: self.ublk_depth,
            original: None,
        };
        // Same checks as the daemon applies.
        LayerSpec::from_json(&serde_json::to_vec(&spec)?).map_err(anyhow::Error::msg)
    }
}

fn client_rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Runs `lazyblk attach`.
pub fn attach(a: AttachArgs) -> Result<()> {
    let spec = a.spec()?;
    let rt = client_rt()?;
    if let Some(mut c) = rt.block_on(api::connect(&a.run_dir)) {
        return attach_remote(&rt, &mut c, &spec);
    }
    if a.daemon {
        start_daemon(&a)?;
        let mut c = rt
            .block_on(api::connect(&a.run_dir))
            .context("the daemon started but its socket does not answer")?;
        return attach_remote(&rt, &mut c, &spec);
    }
    drop(rt);
    attach_foreground(a, spec)
}

fn attach_remote(
    rt: &tokio::runtime::Runtime,
    c: &mut api::Client,
    spec: &LayerSpec,
) -> Result<()> {
    let st = rt
        .block_on(api::attach(c, spec))
        .map_err(status_error)
        .with_context(|| format!("attaching {}", crate::fetch::source::shown(&spec.source)))?;
    println!("{}", st.device);
    Ok(())
}

/// Starts `lazyblk daemon` for the run dir in its own session and waits for its socket.
fn start_daemon(a: &AttachArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    crate::process::private_dir(&a.run_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.run_dir.join("daemon.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("daemon").arg("--run-dir").arg(&a.run_dir);
    if let Some(d) = &a.src.cache_dir {
        cmd.arg("--cache-dir").arg(d);
        cmd.args(["--cache-size-mib", &a.src.cache_size_mib.to_string()]);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and only detaches the child from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting lazyblk daemon")?;
    let sock = api::socket_path(&a.run_dir);
    let started = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "lazyblk daemon exited ({status}); see {}",
                a.run_dir.join("daemon.log").display()
            );
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            bail!("lazyblk daemon did not open {} in 30 s", sock.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Reap it if it ever exits while we run (we normally exit first).
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// Serves one layer in this process until SIGINT/SIGTERM, then detaches it.
fn attach_foreground(a: AttachArgs, spec: LayerSpec) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let node = Node::new(
        NodeConfig {
            run_dir: a.run_dir.clone(),
            cache_dir: a.src.cache_dir.clone(),
            cache_size_mib: a.src.cache_size_mib,
            memory_mib: a.src.mem_cache_mib,
            parallel_fetches: a.src.parallel_fetches,
            fill_rate_mib: a.src.fill_rate_mib,
            ..NodeConfig::default()
        },
        rt.handle().clone(),
    )?;
    if let Some(addr) = &a.metrics_addr {
        let l = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("metrics listen {addr}"))?;
        rt.spawn(crate::node::metrics::serve(node.clone(), l));
    }
    let st = rt
        .block_on(node.attach(spec))
        .with_context(|| format!("attaching {}", crate::fetch::source::shown(&a.source)))?;
    println!("{}", st.device);
    use std::io::Write;
    std::io::stdout().flush()?;
    wait_for_signal(&rt)?;
    rt.block_on(node.detach_all())
        .with_context(|| format!("detaching {}", st.device))?;
    tracing::info!(device = %st.device, "detached");
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub fn wait_for_signal(rt: &tokio::runtime::Runtime) -> std::io::Result<()> {
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}

/// Arguments of `lazyblk recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// State directory.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

/// Asks the daemon to retry every device waiting to be resumed now, and shows the result.
pub fn recover(a: RecoverArgs) -> Result<()> {
    let rt = client_rt()?;
    let Some(mut c) = rt.block_on(api::connect(&a.run_dir)) else {
        bail!(
            "no lazyblk daemon serves {}: start one (`lazyblk daemon --run-dir {}`); it resumes \
             every ublk and NBD device whose server died",
            a.run_dir.display(),
            a.run_dir.display()
        );
    };
    let layers = rt
        .block_on(c.recover(RecoverRequest {}))
        .map_err(status_error)?
        .into_inner()
        .layers;
    print_table(&layers);
    Ok(())
}

/// Arguments of `lazyblk ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// State directory.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

/// The devices of a run dir: from its daemon, else from the state files.
fn statuses(run_dir: &std::path::Path) -> Result<Vec<LayerStatus>> {
    let rt = client_rt()?;
    if let Some(mut c) = rt.block_on(api::connect(run_dir)) {
        return Ok(rt
            .block_on(c.list(ListRequest {}))
            .map_err(status_error)?
            .into_inner()
            .layers);
    }
    Ok(crate::device::list(run_dir)
        .into_iter()
        .map(|(s, alive)| {
            let st = crate::device::stats(run_dir, &s.device).filter(|_| alive);
            LayerStatus {
                device: s.device.clone(),
                backend: format!("{:?}", s.backend).to_lowercase(),
                source: s.source.clone(),
                size: s.size,
                mount: s
                    .mount
                    .as_ref()
                    .map(|m| m.display().to_string())
                    .unwrap_or_default(),
                pid: s.pid,
                state: if alive { "serving" } else { "dead" }.into(),
                reason: if alive {
                    String::new()
                } else {
                    "its server is gone and no daemon serves this run dir".into()
                },
                fill: st.as_ref().map(|s| s.fill).unwrap_or(0.0),
                reads: st.as_ref().map(|s| s.reads).unwrap_or(0),
                read_errors: st.as_ref().map(|s| s.read_errors).unwrap_or(0),
                fetched_bytes: st.as_ref().map(|s| s.fetched_bytes).unwrap_or(0),
                trace_prefetched: st.as_ref().map(|s| s.trace_prefetched).unwrap_or(0),
                startup_region: st.as_ref().map(|s| s.startup_region).unwrap_or(0),
                depends_on_registry: st.as_ref().is_none_or(|s| s.fill < 1.0),
                ..LayerStatus::default()
            }
        })
        .collect())
}

fn print_table(layers: &[LayerStatus]) {
    println!(
        "{:<13} {:<7} {:>12} {:>5} {:>8} {:>6} {:>8} {:<10} {:<8} SOURCE",
        "DEVICE", "BACKEND", "SIZE", "FILL", "READS", "ERRORS", "PID", "STATE", "REGISTRY"
    );
    for s in layers {
        let serving = s.state == "serving";
        println!(
            "{:<13} {:<7} {:>12} {:>5} {:>8} {:>6} {:>8} {:<10} {:<8} {}",
            s.device,
            s.backend,
            s.size,
            if serving {
                format!("{:.0}%", s.fill * 100.0)
            } else {
                "-".into()
            },
            s.reads,
            s.read_errors,
            s.pid,
            s.state,
            // Whether reads may still need the registry (the layer is not complete locally).
            if s.depends_on_registry {
                "needed"
            } else {
                "no"
            },
            s.source
        );
        if !s.reason.is_empty() {
            println!("  └ {}", s.reason);
        }
        if !s.last_error.is_empty() {
            println!("  └ last failed read: {}", s.last_error);
        }
    }
}

/// Lists attached devices.
pub fn ls(a: LsArgs) -> Result<()> {
    let layers = statuses(&a.run_dir)?;
    if a.json {
        let v: Vec<_> = layers
            .iter()
            .map(|s| {
                serde_json::json!({
                    "device": s.device, "backend": s.backend, "source": s.source, "size": s.size,
                    "mount": s.mount, "pid": s.pid, "state": s.state, "reason": s.reason,
                    "fill": s.fill, "reads": s.reads, "read_errors": s.read_errors,
                    "fetched_bytes": s.fetched_bytes, "trace_prefetched": s.trace_prefetched,
                    "startup_region": s.startup_region, "last_error": s.last_error,
                    "depends_on_registry": s.depends_on_registry, "index_digest": s.index_digest,
                    "original_source": s.original_source,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_table(&layers);
    Ok(())
}

/// Arguments of `lazyblk detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// `/dev/loopN` (or `loopN`), a mount point, or `all`.
    device: String,
    /// State directory.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

/// Detaches devices: through the daemon, else by stopping their foreground server (or removing them
/// if it is gone).
pub fn detach(a: DetachArgs) -> Result<()> {
    let rt = client_rt()?;
    let all = a.device == "all";
    let targets: Vec<String> = if all {
        statuses(&a.run_dir)?
            .into_iter()
            .map(|s| s.device)
            .collect()
    } else {
        vec![a.device.clone()]
    };
    if targets.is_empty() && !all {
        bail!("{} is not attached by lazyblk (see lazyblk ls)", a.device);
    }
    if let Some(mut c) = rt.block_on(api::connect(&a.run_dir)) {
        let mut failed = 0;
        for d in targets {
            match rt.block_on(c.detach(DetachRequest { device: d.clone() })) {
                Ok(_) => println!("{d} detached"),
                Err(e) => {
                    eprintln!("{d}: {}", e.message());
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            bail!("{failed} device(s) not detached");
        }
        return Ok(());
    }
    for d in targets {
        detach_without_daemon(&a.run_dir, &d)?;
    }
    Ok(())
}

fn detach_without_daemon(run_dir: &std::path::Path, device: &str) -> Result<()> {
    let want = device.trim_start_matches("/dev/");
    let Some((s, alive)) = crate::device::list(run_dir).into_iter().find(|(s, _)| {
        s.device.trim_start_matches("/dev/") == want
            || s.mount.as_deref() == Some(std::path::Path::new(device))
    }) else {
        bail!("{device} is not attached by lazyblk (see lazyblk ls)");
    };
    if !alive {
        eprintln!(
            "{}: serving process {} is gone; removing the device and its state",
            s.device, s.pid
        );
        return crate::device::remove_orphan(&s, run_dir)
            .with_context(|| format!("removing {}", s.device));
    }
    crate::process::ProcessId {
        pid: s.pid,
        start: s.pid_start,
    }
    .signal(libc::SIGTERM)
    .with_context(|| format!("{}: signalling its serving process {}", s.device, s.pid))?;
    let state = run_dir
        .join("devices")
        .join(format!("{}.json", s.device.trim_start_matches("/dev/")));
    let started = std::time::Instant::now();
    while state.exists() {
        if started.elapsed() > std::time::Duration::from_secs(30) {
            bail!("{}: still attached after 30 s (is it in use?)", s.device);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    println!("{} detached", s.device);
    Ok(())
}

/// Arguments of `lazyblk events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen.
    #[arg(long)]
    follow: bool,
    /// JSON lines.
    #[arg(long)]
    json: bool,
    /// State directory.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

/// Prints the daemon's recent events (attach, detach, failed reads, recoveries).
pub fn events(a: EventsArgs) -> Result<()> {
    use futures::StreamExt;
    let rt = client_rt()?;
    let Some(mut c) = rt.block_on(api::connect(&a.run_dir)) else {
        bail!("no lazyblk daemon serves {}", a.run_dir.display());
    };
    rt.block_on(async {
        let mut s = c
            .events(crate::node::proto::EventsRequest { follow: a.follow })
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(e) = s.next().await {
            let e = e.map_err(status_error)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"seq": e.seq, "time_ms": e.time_ms, "kind": e.kind,
                        "device": e.device, "layer": e.layer, "offset": e.offset, "message": e.message})
                );
            } else {
                println!(
                    "{} {:<16} {:<13} offset={} {} {}",
                    e.time_ms, e.kind, e.device, e.offset, e.layer, e.message
                );
            }
        }
        Ok(())
    })
}
