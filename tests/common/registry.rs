//! A real OCI distribution registry (Debian's `docker-registry`) on a free loopback port.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Child,
    pub addr: String,
    /// Its storage directory (another registry can serve the same storage).
    pub storage: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to configure a test registry (Debian's docker-registry config.yml).
#[derive(Default, Clone)]
pub struct RegistryConfig {
    /// `http.tls`: certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `http.tls.clientcas`: client certificates must chain to this CA.
    pub client_ca: Option<PathBuf>,
    /// `auth.htpasswd` file (bcrypt).
    pub htpasswd: Option<PathBuf>,
    /// `auth.token`: realm, service, issuer, rootcertbundle.
    pub token: Option<(String, String, String, PathBuf)>,
    /// `proxy.remoteurl`: a pull-through cache of that registry.
    pub proxy_remote: Option<String>,
    /// Storage directory to use instead of a fresh one (two registries over one storage).
    pub storage: Option<PathBuf>,
}

impl Registry {
    /// Starts a registry, or returns None (with a message) when `docker-registry` is not installed
    /// outside CI; in CI its absence is a failure.
    pub fn start() -> Option<Registry> {
        Registry::start_with(&RegistryConfig::default())
    }

    /// [`Registry::start`] with `cfg`.
    pub fn start_with(cfg: &RegistryConfig) -> Option<Registry> {
        if Command::new("docker-registry")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(super::may_skip(), "docker-registry missing in CI");
            eprintln!("SKIPPED: docker-registry not installed (apt-get install docker-registry)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = cfg
            .storage
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let mut yml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((cert, key)) = &cfg.tls {
            yml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &cfg.client_ca {
                yml.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        if let Some(h) = &cfg.htpasswd {
            yml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lazyblk-test\n    path: {}\n",
                h.display()
            ));
        }
        if let Some((realm, service, issuer, bundle)) = &cfg.token {
            yml.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                bundle.display()
            ));
        }
        if let Some(remote) = &cfg.proxy_remote {
            yml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let path = dir.path().join("config.yml");
        std::fs::write(&path, yml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Registry {
            child,
            addr,
            storage,
            _dir: dir,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// Pushes a blob with lazyblk's own client; returns its digest.
    pub fn push(&self, repo: &str, blob: &Path) -> String {
        let data = bytes::Bytes::from(std::fs::read(blob).unwrap());
        let base = reqwest::Url::parse(&format!("http://{}", self.addr)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(lazyblk::fetch::registry::push_blob(
            &reqwest::Client::new(),
            &base,
            repo,
            data,
        ))
        .unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
