//! `lazyblk snapshotter`: the containerd proxy snapshotter daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::RegistryArgs;
use crate::device::{choose, Backend};
use crate::node::spec::RegistrySpec;
use crate::snapshotter::layers::{LayerOptions, Layers};
use crate::snapshotter::proto::snapshots::snapshots_server::SnapshotsServer;
use crate::snapshotter::service::{
    ReferrerLookup, ReferrerMode, ReferrerPolicy, Service, Snapshotter,
};
use crate::trace::auto::AutoRecorder;

/// Where, under the snapshotter's root, the startup traces it records are kept.
pub const RECORDED_TRACES: &str = "recorded-traces";

/// The snapshotter's default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.lazyblk";

/// Arguments of `lazyblk snapshotter` (each also settable in `--config`; flags win).
#[derive(Debug, Args)]
pub struct SnapshotterArgs {
    /// TOML file with any of: address, root, run_dir, start_daemon, backend, grace_secs, fill,
    /// attach_on_pull, prefetch_traces, record_traces, referrers, referrer_publishers, plain_http, hosts_dir, docker_config,
    /// cri_listen, cri_backend, cri_credential_ttl_secs.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket containerd connects to (`[proxy_plugins.lazyblk] address`)
    /// [default: /run/lazyblk/lazyblk.sock].
    #[arg(long)]
    address: Option<PathBuf>,
    /// State directory (snapshots, metadata, layer mounts, cache)
    /// [default: /var/lib/containerd/io.containerd.snapshotter.v1.lazyblk].
    #[arg(long)]
    root: Option<PathBuf>,
    /// Block-device backend for remote layers [default: auto].
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Seconds an unused remote layer stays attached [default: 60].
    #[arg(long)]
    grace_secs: Option<u64>,
    /// The node daemon's run directory (its control socket `daemon.sock`) [default: ROOT/run].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Do not start `lazyblk daemon` when none answers on the run dir (under systemd the daemon has
    /// its own unit).
    #[arg(long)]
    no_start_daemon: bool,
    /// Do not fetch attached layers completely in the background (by default every layer is filled
    /// from attach on, behind demand reads, so the registry stops being a runtime dependency).
    #[arg(long)]
    no_fill: bool,
    /// Deprecated: filling is the default now.
    #[arg(long, hide = true)]
    fill: bool,
    /// Attach a remote layer only when its first container's mount asks for it (by default a pull
    /// attaches the layers it records in the background: the container starts on mounted layers,
    /// and their fill starts at pull time; a layer no container uses within 10 minutes, or
    /// `--grace-secs` if longer, is detached again).
    #[arg(long)]
    no_attach_on_pull: bool,
    /// Do not look up startup traces shipped with images (`lazyblk trace push`); by default a
    /// layer's traced chunks are fetched as soon as it is attached.
    #[arg(long)]
    no_prefetch_traces: bool,
    /// Do not record the startup trace of an image's first container on this node (by default,
    /// when no trace was shipped with the image, the chunks its start reads are kept in
    /// ROOT/recorded-traces for `lazyblk trace recorded` and `lazyblk trace push`).
    #[arg(long)]
    no_record_traces: bool,
    /// Which `--referrer` artifacts replace an original image's layers: `same-repository` (only
    /// artifacts found in the image's own repository) or `off` [default: same-repository]. Such an
    /// artifact cannot prove its disk equals the layer's tar: see docs/operations.md, "Trust model".
    #[arg(long, value_enum)]
    referrers: Option<ReferrerMode>,
    /// Take referrer artifacts only for images in these repositories (`REGISTRY/REPO`, or a prefix
    /// ending in `*`, e.g. `registry.example.com/platform/*`); repeatable [default: any repository].
    #[arg(long = "referrer-publisher", value_name = "PATTERN")]
    referrer_publishers: Vec<String>,
    /// Serve the CRI image-service proxy on this socket (kubelet `--image-service-endpoint`):
    /// pull secrets of each PullImage are kept for lazy reads of that image's layers.
    #[arg(long)]
    cri_listen: Option<PathBuf>,
    /// containerd's CRI socket behind the proxy [default: /run/containerd/containerd.sock].
    #[arg(long)]
    cri_backend: Option<PathBuf>,
    /// How long pull-secret credentials are kept after the PullImage that brought them
    /// [default: 86400].
    #[arg(long)]
    cri_credential_ttl_secs: Option<u64>,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// The `--config` file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    address: Option<PathBuf>,
    root: Option<PathBuf>,
    backend: Option<Backend>,
    grace_secs: Option<u64>,
    fill: Option<bool>,
    attach_on_pull: Option<bool>,
    prefetch_traces: Option<bool>,
    record_traces: Option<bool>,
    referrers: Option<ReferrerMode>,
    referrer_publishers: Option<Vec<String>>,
    run_dir: Option<PathBuf>,
    start_daemon: Option<bool>,
    plain_http: Option<bool>,
    hosts_dir: Option<PathBuf>,
    docker_config: Option<PathBuf>,
    cri_listen: Option<PathBuf>,
    cri_backend: Option<PathBuf>,
    cri_credential_ttl_secs: Option<u64>,
}

/// Effective settings.
struct Settings {
    address: PathBuf,
    root: PathBuf,
    backend: Backend,
    grace_secs: u64,
    fill: bool,
    attach_on_pull: bool,
    prefetch_traces: bool,
    record_traces: bool,
    referrers: ReferrerPolicy,
    registry: RegistryArgs,
    run_dir: PathBuf,
    start_daemon: bool,
    /// The CRI proxy: (listen, backend, credential ttl).
    cri: Option<(PathBuf, PathBuf, Duration)>,
}

fn settings(a: SnapshotterArgs) -> Result<Settings> {
    let c: ConfigFile = super::config_file(a.config.as_deref())?;
    let root = a
        .root
        .clone()
        .or(c.root.clone())
        .unwrap_or_else(|| DEFAULT_ROOT.into());
    let cri = a.cri_listen.or(c.cri_listen).map(|listen| {
        (
            listen,
            a.cri_backend
                .or(c.cri_backend)
                .unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
            Duration::from_secs(
                a.cri_credential_ttl_secs
                    .or(c.cri_credential_ttl_secs)
                    .unwrap_or(86_400),
            ),
        )
    });
    Ok(Settings {
        cri,
        run_dir: a.run_dir.or(c.run_dir).unwrap_or_else(|| root.join("run")),
        start_daemon: !a.no_start_daemon && c.start_daemon.unwrap_or(true),
        address: a
            .address
            .or(c.address)
            .unwrap_or_else(|| "/run/lazyblk/lazyblk.sock".into()),
        root: a.root.or(c.root).unwrap_or_else(|| DEFAULT_ROOT.into()),
        backend: a.backend.or(c.backend).unwrap_or(Backend::Auto),
        grace_secs: a.grace_secs.or(c.grace_secs).unwrap_or(60),
        fill: !a.no_fill && (a.fill || c.fill.unwrap_or(true)),
        attach_on_pull: !a.no_attach_on_pull && c.attach_on_pull.unwrap_or(true),
        prefetch_traces: !a.no_prefetch_traces && c.prefetch_traces.unwrap_or(true),
        record_traces: !a.no_record_traces && c.record_traces.unwrap_or(true),
        referrers: ReferrerPolicy {
            mode: a
                .referrers
                .or(c.referrers)
                .unwrap_or(ReferrerMode::SameRepository),
            publishers: if a.referrer_publishers.is_empty() {
                c.referrer_publishers.unwrap_or_default()
            } else {
                a.referrer_publishers
            },
        },
        registry: RegistryArgs {
            plain_http: a.registry.plain_http || c.plain_http.unwrap_or(false),
            hosts_dir: a.registry.hosts_dir.or(c.hosts_dir),
            docker_config: a.registry.docker_config.or(c.docker_config),
        },
    })
}

/// Tells systemd (Type=notify) that the socket is ready, if it is watching.
pub(crate) fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let path = path.to_string_lossy().to_string();
    let r = if let Some(abs) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "sd_notify");
    }
}

/// Runs the snapshotter until SIGINT/SIGTERM.
pub fn run(a: SnapshotterArgs) -> Result<()> {
    let a = settings(a)?;
    let backend = choose(a.backend).map_err(anyhow::Error::msg)?;
    crate::process::private_dir(&a.root)
        .with_context(|| format!("creating {}", a.root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let layers = Layers::new(
        LayerOptions {
            exe: std::env::current_exe()?,
            mount_dir: a.root.join("layers"),
            run_dir: a.run_dir.clone(),
            cache_dir: a.root.join("cache"),
            backend,
            registry: RegistrySpec {
                plain_http: a.registry.plain_http,
                hosts_dir: a.registry.hosts_dir.clone(),
                docker_config: a.registry.docker_config.clone(),
            },
            fill: a.fill,
            attach_on_pull: a.attach_on_pull,
            grace: Duration::from_secs(a.grace_secs),
            start_daemon: a.start_daemon,
        },
        rt.handle().clone(),
    )
    .context("connecting to the node daemon")?;
    let mut referrers = ReferrerLookup::new(
        rt.handle().clone(),
        a.registry.options(),
        a.referrers.clone(),
    );
    if a.prefetch_traces {
        referrers = referrers.with_traces(a.root.join("traces"));
    }
    let mut snap = Snapshotter::open(&a.root, layers, Some(referrers))?;
    if a.record_traces {
        let dir = a.root.join(RECORDED_TRACES);
        let recorder = AutoRecorder::new(dir.clone(), a.run_dir.clone(), Default::default())
            .with_context(|| format!("creating {}", dir.display()))?;
        snap = snap.with_recorder(recorder);
    }
    let snap = Arc::new(snap);
    rt.block_on(async move {
        if let Some(dir) = a.address.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // 0600 from the start; a socket left by a previous run (crash, kill -9) is replaced.
        let listener = crate::process::bind_private_unix(&a.address)
            .with_context(|| format!("listening on {}", a.address.display()))?;
        tracing::info!(address = %a.address.display(), root = %a.root.display(), ?backend, "snapshotter ready");
        eprintln!("lazyblk snapshotter listening on {}", a.address.display());
        sd_notify_ready();
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let cri = a.cri.clone().map(|(listen, backend, ttl)| {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let r = crate::snapshotter::cri_proxy::serve(listen.clone(), backend, ttl, async move {
                    let _ = stop.changed().await;
                })
                .await;
                if let Err(e) = &r {
                    tracing::error!(listen = %listen.display(), error = %e, "CRI proxy stopped");
                }
                r
            })
        });
        let served = tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(Service(snap)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                shutdown,
            )
            .await
            .context("gRPC server");
        let _ = stop_tx.send(true);
        if let Some(cri) = cri {
            let _ = cri.await;
        }
        served?;
        let _ = std::fs::remove_file(&a.address);
        Ok::<(), anyhow::Error>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_flags_override_it() {
        let c: ConfigFile =
            toml::from_str(include_str!("../../deploy/lazyblk-snapshotter.toml")).unwrap();
        assert_eq!(c.backend, Some(Backend::Auto));
        assert_eq!(c.fill, Some(true));
        assert_eq!(c.attach_on_pull, Some(true));
        assert_eq!(c.referrers, Some(ReferrerMode::SameRepository));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "grace_secs = 5\nbackend = \"nbd\"\n").unwrap();
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: SnapshotterArgs,
        }
        let t = T::parse_from(["t", "--config", p.to_str().unwrap(), "--backend", "loop"]);
        let s = settings(t.a).unwrap();
        assert_eq!(s.backend, Backend::Loop);
        assert_eq!(s.grace_secs, 5);
        assert!(s.attach_on_pull, "attach on pull is the default");
        assert!(s.record_traces, "recording first starts is the default");
        assert_eq!(s.address, PathBuf::from("/run/lazyblk/lazyblk.sock"));
        std::fs::write(&p, "attach_on_pull = false\n").unwrap();
        let t = T::parse_from(["t", "--config", p.to_str().unwrap()]);
        assert!(!settings(t.a).unwrap().attach_on_pull);
        let t = T::parse_from(["t", "--no-attach-on-pull"]);
        assert!(!settings(t.a).unwrap().attach_on_pull);
        std::fs::write(&p, "record_traces = false\n").unwrap();
        let t = T::parse_from(["t", "--config", p.to_str().unwrap()]);
        assert!(!settings(t.a).unwrap().record_traces);
        let t = T::parse_from(["t", "--no-record-traces"]);
        assert!(!settings(t.a).unwrap().record_traces);
        std::fs::write(&p, "referrer_publishers = [\"r.example/team/*\"]\n").unwrap();
        let t = T::parse_from(["t", "--config", p.to_str().unwrap()]);
        let s = settings(t.a).unwrap();
        assert!(s.referrers.accepts("r.example/team/app"));
        assert!(!s.referrers.accepts("r.example/other/app"));
        let t = T::parse_from(["t", "--config", p.to_str().unwrap(), "--referrers", "off"]);
        assert!(!settings(t.a)
            .unwrap()
            .referrers
            .accepts("r.example/team/app"));
        let t = T::parse_from(["t", "--referrer-publisher", "r.example/exact"]);
        let s = settings(t.a).unwrap();
        assert!(s.referrers.accepts("r.example/exact") && !s.referrers.accepts("r.example/exact2"));
        std::fs::write(&p, "grace = 5\n").unwrap();
        let t = T::parse_from(["t", "--config", p.to_str().unwrap()]);
        assert!(settings(t.a).is_err(), "unknown keys are refused");
    }
}
