//! `lazyblk attach`, `lazyblk ls`, `lazyblk detach`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::serve::{spawn_background, SourceArgs};
use crate::device::{choose, list, ublk::UblkOptions, Attachment, Backend, DeviceState};
use crate::fetch::{open_source, BlockSource};

const DEFAULT_RUN_DIR: &str = "/run/lazyblk";

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
    /// State directory.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Return once the device is ready, leaving a background process serving it (log in RUN_DIR).
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

/// Re-runs this command without `--daemon` in a new session, waits for the device line, prints it.
fn daemonize(run_dir: &std::path::Path) -> Result<()> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(run_dir)?;
    let log_path = run_dir.join(format!("attach-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and only detaches the child from our session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if line.trim().is_empty() {
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!(
            "attach failed:\n{}",
            log.lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    print!("{line}");
    Ok(())
}

/// Publishes the layer's stats and access log next to the device's state file.
fn publish(att: &mut Attachment, engine: &crate::fetch::Engine, rt: &tokio::runtime::Runtime) {
    att.publish_stats(engine.metrics(), rt.handle());
    let file = att.side_file(crate::trace::publish::ACCESS_SUFFIX);
    let task = crate::trace::publish::spawn_publisher(engine.clone(), file.clone(), rt.handle());
    att.keep_publisher(task, file);
}

/// Runs `lazyblk attach` in the foreground until SIGINT/SIGTERM, then detaches cleanly.
pub fn attach(a: AttachArgs) -> Result<()> {
    let backend = choose(a.backend).map_err(anyhow::Error::msg)?;
    if a.daemon {
        return daemonize(&a.run_dir);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let opts = a.src.options()?;
    let engine = rt
        .block_on(open_source(&a.source, &opts))
        .with_context(|| format!("opening {}", a.source))?;
    if let Some(addr) = &a.metrics_addr {
        let l = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("metrics listen {addr}"))?;
        rt.spawn(crate::fetch::metrics::serve_metrics(
            l,
            vec![(engine.name().to_string(), engine.metrics())],
        ));
    }
    spawn_background(rt.handle(), &engine, &a.src);
    let name = engine.name().to_string();
    let source: Arc<dyn BlockSource> = Arc::new(engine.clone());
    let mut att = match backend {
        Backend::Ublk => Attachment::attach_ublk(
            source,
            rt.handle().clone(),
            &name,
            &a.run_dir,
            a.mount.as_deref(),
            UblkOptions {
                queues: a.ublk_queues,
                depth: a.ublk_depth,
                ..UblkOptions::default()
            },
        )
        .context("attaching with the ublk backend")?,
        Backend::Loop => Attachment::attach_loop(
            source,
            rt.handle().clone(),
            &name,
            &a.run_dir,
            a.mount.as_deref(),
        )
        .context("attaching with the loop backend")?,
        Backend::Nbd => {
            let timeout = (opts.engine.read_deadline.as_secs() + 30).max(30);
            Attachment::attach_nbd(
                source,
                rt.handle().clone(),
                &name,
                &a.run_dir,
                a.mount.as_deref(),
                timeout,
            )
            .context("attaching with the kernel NBD backend")?
        }
        Backend::Auto => unreachable!("choose() resolves auto"),
    };
    publish(&mut att, &engine, &rt);
    att.set_source_args(serde_json::json!({"spec": a.source, "args": a.src}))?;
    println!("{}", att.state().device);
    use std::io::Write;
    std::io::stdout().flush()?;
    wait_for_signal(&rt)?;
    let dev = att.state().device.clone();
    att.detach().with_context(|| format!("detaching {dev}"))?;
    tracing::info!(device = %dev, "detached");
    Ok(())
}

fn wait_for_signal(rt: &tokio::runtime::Runtime) -> std::io::Result<()> {
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
    /// Keep running: take over any device whose server dies later too (run this as a service so a
    /// restarted supervisor resumes every device).
    #[arg(long)]
    watch: bool,
}

/// Holds `RUN_DIR/recover.lock`: one recoverer at a time, or two would fight over a device.
fn recover_lock(run_dir: &std::path::Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(run_dir)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(run_dir.join("recover.lock"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        bail!(
            "another `lazyblk recover` holds {}",
            run_dir.join("recover.lock").display()
        );
    }
    // Who holds it (for operators and tests; the lock itself is the flock).
    let _ = std::fs::write(
        run_dir.join("recover.pid"),
        format!("{}\n", std::process::id()),
    );
    Ok(f)
}

/// Reopens the source recorded for `state` and takes the device over.
fn adopt(
    state: DeviceState,
    rt: &tokio::runtime::Runtime,
    run_dir: &std::path::Path,
) -> Result<Attachment> {
    let spec = state.source_args["spec"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let src: SourceArgs = serde_json::from_value(state.source_args["args"].clone())
        .with_context(|| format!("{}: no recorded source options", state.device))?;
    let opts = src.options()?;
    let engine = rt
        .block_on(open_source(&spec, &opts))
        .with_context(|| format!("{}: reopening {spec}", state.device))?;
    spawn_background(rt.handle(), &engine, &src);
    let device = state.device.clone();
    let source_args = state.source_args.clone();
    let source: Arc<dyn BlockSource> = Arc::new(engine.clone());
    let mut att = match state.backend {
        Backend::Nbd => Attachment::adopt_nbd(state, source, rt.handle().clone(), run_dir)
            .with_context(|| format!("{device}: NBD_CMD_RECONFIGURE"))?,
        Backend::Ublk => Attachment::adopt_ublk(state, source, rt.handle().clone(), run_dir)
            .with_context(|| format!("{device}: ublk user recovery"))?,
        other => bail!(
            "{device}: the {other:?} backend cannot be resumed (its FUSE export died with the \
             server); run `lazyblk detach {device}`"
        ),
    };
    att.set_source_args(source_args)?;
    publish(&mut att, &engine, rt);
    Ok(att)
}

/// Resumes every ublk and NBD device whose serving process died, serving them in the foreground
/// until SIGINT/SIGTERM (then they are detached like with `attach`). With `--watch`, keeps looking.
pub fn recover(a: RecoverArgs) -> Result<()> {
    let _lock = recover_lock(&a.run_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut adopted: Vec<Attachment> = Vec::new();
    let mut given_up = std::collections::HashSet::new();
    use std::io::Write;
    loop {
        for (state, alive) in list(&a.run_dir) {
            if alive || given_up.contains(&state.device) {
                continue;
            }
            let device = state.device.clone();
            match adopt(state, &rt, &a.run_dir) {
                Ok(att) => {
                    println!("{device} recovered");
                    tracing::info!(device = %device, "recovered");
                    adopted.push(att);
                }
                Err(e) => {
                    eprintln!("{device}: cannot recover: {e:#}");
                    tracing::error!(device = %device, error = format!("{e:#}"), "recovery failed");
                    given_up.insert(device);
                }
            }
            std::io::stdout().flush()?;
        }
        if !a.watch {
            break;
        }
        let stop = rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Ok::<bool, std::io::Error>(true),
                _ = term.recv() => Ok(true),
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => Ok(false),
            }
        })?;
        if stop {
            return detach_all(adopted);
        }
    }
    if adopted.is_empty() {
        println!("nothing to recover");
        return Ok(());
    }
    std::io::stdout().flush()?;
    wait_for_signal(&rt)?;
    detach_all(adopted)
}

fn detach_all(adopted: Vec<Attachment>) -> Result<()> {
    for att in adopted {
        let dev = att.state().device.clone();
        att.detach().with_context(|| format!("detaching {dev}"))?;
    }
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

/// Lists attached devices.
pub fn ls(a: LsArgs) -> Result<()> {
    let devs = list(&a.run_dir);
    if a.json {
        let v: Vec<_> = devs
            .iter()
            .map(|(s, alive)| {
                let stats = crate::device::stats(&a.run_dir, &s.device);
                serde_json::json!({"state": s, "serving": alive, "stats": stats})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<7} {:>12} {:>6} {:>9} {:>7} {:>8} {:<8} SOURCE",
        "DEVICE", "BACKEND", "SIZE", "FILL", "READS", "ERRORS", "PID", "STATE"
    );
    for (s, alive) in devs {
        let st = crate::device::stats(&a.run_dir, &s.device);
        let (fill, reads, errors) = match (&st, alive) {
            (Some(st), true) => (
                format!("{:.0}%", st.fill * 100.0),
                st.reads.to_string(),
                st.read_errors.to_string(),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<12} {:<7} {:>12} {:>6} {:>9} {:>7} {:>8} {:<8} {}",
            s.device,
            format!("{:?}", s.backend).to_lowercase(),
            s.size,
            fill,
            reads,
            errors,
            s.pid,
            if alive { "serving" } else { "dead" },
            s.source
        );
    }
    Ok(())
}

/// Arguments of `lazyblk detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// `/dev/loopN` (or `loopN`), or `all`.
    device: String,
    /// State directory.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

/// Asks the serving process of a device to detach it, and waits.
pub fn detach(a: DetachArgs) -> Result<()> {
    let want = a.device.trim_start_matches("/dev/").to_string();
    let devs = list(&a.run_dir);
    let targets: Vec<_> = devs
        .iter()
        .filter(|(s, _)| want == "all" || s.device.trim_start_matches("/dev/") == want)
        .collect();
    if targets.is_empty() {
        bail!("{} is not attached by lazyblk (see lazyblk ls)", a.device);
    }
    for (s, alive) in targets {
        if !alive {
            eprintln!(
                "{}: serving process {} is gone; removing the device and its state",
                s.device, s.pid
            );
            remove_orphan(s)?;
            let _ = std::fs::remove_file(
                a.run_dir
                    .join("devices")
                    .join(format!("{}.json", s.device.trim_start_matches("/dev/"))),
            );
            continue;
        }
        // SAFETY: sending SIGTERM to a pid read from our own state file.
        unsafe { libc::kill(s.pid as libc::pid_t, libc::SIGTERM) };
        let state = a
            .run_dir
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
    }
    Ok(())
}

/// Removes a device nobody serves, so that reads it holds fail with EIO instead of waiting for a
/// recovery that will not come. (A loop device over a dead FUSE export already fails them.)
fn remove_orphan(s: &DeviceState) -> Result<()> {
    let detach_mount = || {
        if let Some(dir) = &s.mount {
            if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
                // SAFETY: `c` is a valid NUL-terminated path; a failure leaves the mount as it was.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    };
    match s.backend {
        Backend::Ublk => {
            crate::device::ublk::delete_orphan(crate::device::ublk_id(&s.device)?, detach_mount)
                .with_context(|| format!("deleting {}", s.device))
        }
        Backend::Nbd => {
            let r =
                crate::device::nbd_kernel::disconnect_index(crate::device::nbd_index(&s.device)?)
                    .with_context(|| format!("disconnecting {}", s.device));
            detach_mount();
            r
        }
        _ => {
            detach_mount();
            Ok(())
        }
    }
}
