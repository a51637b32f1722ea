//! Where a registry's requests go, with containerd's `hosts.toml` semantics: `server`, `[host."…"]`
//! entries tried in file order, `capabilities`, `ca`, `client`, `skip_verify`, `override_path` and
//! `header`; and, for a host directory without `hosts.toml`, Docker's `certs.d/<host>/` layout (`*.crt`
//! CAs, `*.cert` + `*.key` client pairs). Directories are looked up as containerd does: `<host>`, then
//! `<host>_<port>_`, then `_default` (Docker Hub's are under `docker.io`).

use std::path::{Path, PathBuf};

use reqwest::Url;

use super::tls::TlsSettings;

/// What a host may be asked for (containerd's capabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Blobs (and manifests by digest).
    pub pull: bool,
    /// Tags to manifests.
    pub resolve: bool,
    /// Uploads.
    pub push: bool,
}

impl Capabilities {
    /// Everything (a host without a `capabilities` list).
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One place a registry's requests can go: a mirror or the registry itself.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The API root, `scheme://host[:port]/v2` (or the path as given, with `override_path`).
    pub base: Url,
    /// A `[host]` entry rather than the server: gets `?ns=<registry>` and only its own credentials.
    pub mirror: bool,
    /// What this host may be asked for.
    pub capabilities: Capabilities,
    /// Its TLS settings.
    pub tls: TlsSettings,
    /// Extra request headers (`[host."…".header]`).
    pub headers: Vec<(String, String)>,
}

/// How to reach `registry` ([`super::registry::RegistryOptions`]'s parts that matter here).
pub struct HostsQuery<'a> {
    /// Registry host as in the image name (`registry-1.docker.io` for Docker Hub).
    pub registry: &'a str,
    /// The scheme of the default server (`http` with `--plain-http`).
    pub default_scheme: &'a str,
    /// containerd's `config_path` (`/etc/containerd/certs.d`).
    pub hosts_dir: Option<&'a Path>,
}

/// The endpoints for a registry: `hosts.toml` hosts in file order, then the server.
pub fn endpoints(q: &HostsQuery<'_>) -> Result<Vec<Endpoint>, String> {
    let default_server = format!("{}://{}", q.default_scheme, q.registry);
    let Some(dir) = q.hosts_dir.and_then(|d| host_dir(d, q.registry)) else {
        return Ok(vec![server(&default_server, HostEntry::default())?]);
    };
    let file = dir.join("hosts.toml");
    match std::fs::read_to_string(&file) {
        Ok(text) => parse_hosts_file(&text, &dir, &default_server)
            .map_err(|e| format!("{}: {e}", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let entry = cert_files(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(vec![server(&default_server, entry)?])
        }
        Err(e) => Err(format!("{}: {e}", file.display())),
    }
}

/// The host directory for `registry` under `root`, if one exists.
fn host_dir(root: &Path, registry: &str) -> Option<PathBuf> {
    let mut names = Vec::new();
    if registry == "registry-1.docker.io" {
        names.push("docker.io".to_string());
    }
    names.push(registry.to_string());
    if let Some((h, p)) = registry.rsplit_once(':') {
        names.push(format!("{h}_{p}_"));
    }
    names.push("_default".to_string());
    names.into_iter().map(|n| root.join(n)).find(|p| p.is_dir())
}

/// One `[host]` table (or the file's top level, for the server), parsed.
#[derive(Default)]
struct HostEntry {
    capabilities: Option<Capabilities>,
    tls: TlsSettings,
    headers: Vec<(String, String)>,
    override_path: bool,
}

fn parse_hosts_file(text: &str, dir: &Path, default_server: &str) -> Result<Vec<Endpoint>, String> {
    // `preserve_order`: the tables come in file order, as containerd tries them.
    let v: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if let Some(hosts) = v.get("host") {
        let hosts = hosts
            .as_table()
            .ok_or("`host` must be a table of [host.\"URL\"] entries")?;
        for (url, h) in hosts {
            let t = h
                .as_table()
                .ok_or_else(|| format!("[host.{url:?}] must be a table"))?;
            let entry = host_entry(t, dir).map_err(|e| format!("[host.{url:?}]: {e}"))?;
            let caps = entry.capabilities.unwrap_or(Capabilities::ALL);
            let mut ep = endpoint(url, entry)?;
            ep.mirror = true;
            ep.capabilities = caps;
            out.push(ep);
        }
    }
    let server_url = match v.get("server") {
        None => default_server.to_string(),
        Some(s) => s.as_str().ok_or("`server` must be a string")?.to_string(),
    };
    out.push(server(&server_url, host_entry(&v, dir)?)?);
    Ok(out)
}

fn server(url: &str, entry: HostEntry) -> Result<Endpoint, String> {
    let caps = entry.capabilities.unwrap_or(Capabilities::ALL);
    let mut ep = endpoint(url, entry)?;
    ep.capabilities = caps;
    Ok(ep)
}

fn endpoint(url: &str, entry: HostEntry) -> Result<Endpoint, String> {
    let full = if url.starts_with("http://") || url.starts_with("https://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let mut u = Url::parse(&full).map_err(|e| format!("bad registry URL {url:?}: {e}"))?;
    if u.host_str().is_none() {
        return Err(format!("bad registry URL {url:?}: no host"));
    }
    let path = u.path().trim_end_matches('/').to_string();
    let api = if entry.override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    u.set_path(&api);
    u.set_query(None);
    Ok(Endpoint {
        base: u,
        mirror: false,
        capabilities: Capabilities::ALL,
        tls: entry.tls,
        headers: entry.headers,
    })
}

fn abs(p: &str, dir: &Path) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn strings(v: &toml::Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("`{what}` entries must be strings"))
            })
            .collect(),
        _ => Err(format!("`{what}` must be a string or a list of strings")),
    }
}

fn host_entry(t: &toml::Table, dir: &Path) -> Result<HostEntry, String> {
    let mut e = HostEntry::default();
    if let Some(c) = t.get("capabilities") {
        let mut caps = Capabilities {
            pull: false,
            resolve: false,
            push: false,
        };
        for c in strings(c, "capabilities")? {
            match c.to_ascii_lowercase().as_str() {
                "pull" => caps.pull = true,
                "resolve" => caps.resolve = true,
                "push" => caps.push = true,
                other => return Err(format!("unknown capability {other:?}")),
            }
        }
        e.capabilities = Some(caps);
    }
    if let Some(ca) = t.get("ca") {
        e.tls.ca = strings(ca, "ca")?.iter().map(|p| abs(p, dir)).collect();
    }
    if let Some(client) = t.get("client") {
        e.tls.client = match client {
            toml::Value::String(s) => vec![(abs(s, dir), None)],
            toml::Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    toml::Value::String(s) => Ok((abs(s, dir), None)),
                    toml::Value::Array(pair) => match pair.as_slice() {
                        [toml::Value::String(c), toml::Value::String(k)] => {
                            Ok((abs(c, dir), (!k.is_empty()).then(|| abs(k, dir))))
                        }
                        _ => Err(format!("`client` pair {x} must be [\"cert\", \"key\"]")),
                    },
                    _ => Err("`client` entries must be files or [cert, key] pairs".to_string()),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err("`client` must be a file, a list of files or of pairs".into()),
        };
    }
    if let Some(s) = t.get("skip_verify") {
        e.tls.skip_verify = s.as_bool().ok_or("`skip_verify` must be true or false")?;
    }
    if let Some(s) = t.get("override_path") {
        e.override_path = s.as_bool().ok_or("`override_path` must be true or false")?;
    }
    if let Some(h) = t.get("header") {
        let h = h.as_table().ok_or("`header` must be a table")?;
        for (k, v) in h {
            for value in strings(v, "header")? {
                e.headers.push((k.clone(), value));
            }
        }
    }
    Ok(e)
}

/// Docker's `certs.d/<host>/` layout: `*.crt` are CAs, `X.cert` a client certificate with key `X.key`
/// (or the key in the `.cert` file itself).
fn cert_files(dir: &Path) -> std::io::Result<HostEntry> {
    let mut e = HostEntry::default();
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|d| d.ok())
        .filter(|d| d.file_type().map(|t| !t.is_dir()).unwrap_or(false))
        .map(|d| d.path())
        .collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|x| x.to_str()) {
            Some("crt") => e.tls.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                let key = key.exists().then_some(key);
                e.tls.client.push((p, key));
            }
            _ => {}
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q<'a>(registry: &'a str, dir: &'a Path) -> HostsQuery<'a> {
        HostsQuery {
            registry,
            default_scheme: "https",
            hosts_dir: Some(dir),
        }
    }

    #[test]
    fn hosts_toml_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("reg.example_5000_");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            r#"
server = "reg.example:5000"
ca = "server-ca.pem"
client = [["/abs/client.cert", "client.key"]]
[host."https://zeta.mirror/cache"]
  capabilities = ["pull"]
  ca = ["a.pem", "/b.pem"]
  skip_verify = true
  [host."https://zeta.mirror/cache".header]
    X-Dragonfly-Registry = "https://reg.example:5000"
[host."http://alpha.mirror:8080/custom/api"]
  override_path = true
  client = "both.pem"
"#,
        )
        .unwrap();
        let eps = endpoints(&q("reg.example:5000", dir.path())).unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].base.as_str(), "https://zeta.mirror/cache/v2");
        assert!(eps[0].mirror && eps[0].capabilities.pull && !eps[0].capabilities.resolve);
        assert_eq!(eps[0].tls.ca, [d.join("a.pem"), PathBuf::from("/b.pem")]);
        assert!(eps[0].tls.skip_verify);
        assert_eq!(
            eps[0].headers,
            [(
                "X-Dragonfly-Registry".to_string(),
                "https://reg.example:5000".to_string()
            )]
        );
        assert_eq!(eps[1].base.as_str(), "http://alpha.mirror:8080/custom/api");
        assert_eq!(eps[1].capabilities, Capabilities::ALL);
        assert_eq!(eps[1].tls.client, [(d.join("both.pem"), None)]);
        let s = &eps[2];
        assert!(!s.mirror);
        assert_eq!(s.base.as_str(), "https://reg.example:5000/v2");
        assert_eq!(s.tls.ca, [d.join("server-ca.pem")]);
        assert_eq!(
            s.tls.client,
            [(
                PathBuf::from("/abs/client.cert"),
                Some(d.join("client.key"))
            )]
        );
    }

    #[test]
    fn docker_cert_layout_and_default_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("reg.example:5443");
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            "ca.crt",
            "client.cert",
            "client.key",
            "other.cert",
            "notes.txt",
        ] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        let eps = endpoints(&q("reg.example:5443", dir.path())).unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].tls.ca, [d.join("ca.crt")]);
        assert_eq!(
            eps[0].tls.client,
            [
                (d.join("client.cert"), Some(d.join("client.key"))),
                (d.join("other.cert"), None)
            ]
        );
        // No directory: the default server, nothing else.
        let eps = endpoints(&q("none.example", dir.path())).unwrap();
        assert_eq!(eps[0].base.as_str(), "https://none.example/v2");
        assert!(eps[0].tls.is_default());
        // `_default` applies to every registry without its own directory; Docker Hub's is docker.io.
        let def = dir.path().join("_default");
        std::fs::create_dir_all(&def).unwrap();
        std::fs::write(
            def.join("hosts.toml"),
            "[host.\"https://mirror.internal\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
        )
        .unwrap();
        let eps = endpoints(&q("none.example", dir.path())).unwrap();
        assert_eq!(eps[0].base.as_str(), "https://mirror.internal/v2");
        assert_eq!(eps[1].base.as_str(), "https://none.example/v2");
        let hub = dir.path().join("docker.io");
        std::fs::create_dir_all(&hub).unwrap();
        std::fs::write(
            hub.join("hosts.toml"),
            "server = \"https://registry-1.docker.io\"\n[host.\"https://hub-mirror.internal\"]\n",
        )
        .unwrap();
        let eps = endpoints(&q("registry-1.docker.io", dir.path())).unwrap();
        assert_eq!(eps[0].base.as_str(), "https://hub-mirror.internal/v2");
        assert_eq!(eps[1].base.as_str(), "https://registry-1.docker.io/v2");
    }

    #[test]
    fn bad_hosts_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("r.example");
        std::fs::create_dir_all(&d).unwrap();
        for (text, want) in [
            (
                "[host.\"https://m\"]\ncapabilities = [\"fly\"]\n",
                "unknown capability",
            ),
            ("skip_verify = \"yes\"\n", "skip_verify"),
            ("[host.\"https://m\"]\nclient = [[\"a\"]]\n", "client"),
            ("server = 5\n", "server"),
            ("this is not toml", "hosts.toml"),
        ] {
            std::fs::write(d.join("hosts.toml"), text).unwrap();
            let e = endpoints(&q("r.example", dir.path())).unwrap_err();
            assert!(e.contains(want) && e.contains("hosts.toml"), "{text}: {e}");
        }
    }
}
