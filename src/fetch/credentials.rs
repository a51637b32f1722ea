//! Registry credentials from a docker `config.json`: `credHelpers` per host, then `auths` (basic `auth`,
//! `identitytoken`, `registrytoken`), then `credsStore`, as docker and containerd's CRI read them. Docker
//! Hub's entry is `https://index.docker.io/v1/`. Credentials are looked up per host and never logged.

use std::path::{Path, PathBuf};

use base64::Engine as _;

/// What a registry host accepts from us. `Debug` never prints a secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// User name (empty with only an identity or registry token).
    pub username: String,
    /// Password (or a personal access token used as one).
    pub password: String,
    /// An OAuth2 refresh token for the registry's token service (`identitytoken`; what `docker login`
    /// stores for Azure, Harbor OIDC and others): exchanged with `grant_type=refresh_token`.
    pub identity_token: Option<String>,
    /// A bearer token to send as is (`registrytoken`).
    pub registry_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials({}, <redacted>{}{})",
            self.username,
            if self.identity_token.is_some() {
                ", identity token"
            } else {
                ""
            },
            if self.registry_token.is_some() {
                ", registry token"
            } else {
                ""
            }
        )
    }
}

impl Credentials {
    /// A user name and password.
    pub fn basic(username: &str, password: &str) -> Credentials {
        Credentials {
            username: username.to_string(),
            password: password.to_string(),
            ..Default::default()
        }
    }

    /// Whether there is a user name and password to send (basic auth, or to a token realm).
    pub fn has_password(&self) -> bool {
        !self.username.is_empty() || !self.password.is_empty()
    }
}

/// The keys a config may file `registry`'s credentials under, most specific first.
pub fn config_keys(registry: &str) -> Vec<String> {
    if registry == "registry-1.docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "docker.io".into(),
            "index.docker.io".into(),
            registry.into(),
        ]
    } else {
        vec![
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    }
}

/// The docker config path: `config`, or `$DOCKER_CONFIG/config.json`, or `~/.docker/config.json`.
fn config_path(config: Option<&Path>) -> Option<PathBuf> {
    match config {
        Some(p) => Some(p.to_path_buf()),
        None => match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => Some(PathBuf::from(d).join("config.json")),
            None => Some(PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json")),
        },
    }
}

/// Looks up credentials for `registry` in a docker config file: `credHelpers`, then `auths`, then
/// `credsStore`. A missing file means none; an unreadable or malformed one is logged and means none.
pub fn docker_credentials(registry: &str, config: Option<&Path>) -> Option<Credentials> {
    lookup(registry, config, None)
}

/// [`docker_credentials`], with helpers run from `helper_dir` instead of `PATH` when given.
fn lookup(registry: &str, config: Option<&Path>, helper_dir: Option<&Path>) -> Option<Credentials> {
    let path = config_path(config)?;
    let text = std::fs::read_to_string(&path).ok()?;
    let cfg: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(config = %path.display(), error = %e, "docker config is not JSON; no credentials from it");
            return None;
        }
    };
    let keys = config_keys(registry);
    if let Some(helper) = keys.iter().find_map(|k| cfg["credHelpers"][k].as_str()) {
        return run_credential_helper(helper, &keys[0], helper_dir);
    }
    for k in &keys {
        let entry = &cfg["auths"][k];
        if entry.is_object() {
            if let Some(c) = auth_entry(entry) {
                return Some(c);
            }
        }
    }
    let store = cfg["credsStore"].as_str()?;
    run_credential_helper(store, &keys[0], helper_dir)
}

/// One `auths` entry: `auth` (base64 `user:password`), or `username`/`password`, plus tokens.
fn auth_entry(entry: &serde_json::Value) -> Option<Credentials> {
    let mut c = Credentials::default();
    if let Some(auth) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let s = String::from_utf8(decoded).ok()?;
        let (u, p) = s.split_once(':')?;
        c.username = u.to_string();
        c.password = p.to_string();
    } else {
        c.username = entry["username"].as_str().unwrap_or("").to_string();
        c.password = entry["password"].as_str().unwrap_or("").to_string();
    }
    c.identity_token = entry["identitytoken"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    c.registry_token = entry["registrytoken"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    (c.has_password() || c.identity_token.is_some() || c.registry_token.is_some()).then_some(c)
}

/// Runs `docker-credential-<helper> get` with `server` on stdin (the helper protocol). A helper that
/// answers user `<token>` gives an identity token (docker's convention).
fn run_credential_helper(
    helper: &str,
    server: &str,
    helper_dir: Option<&Path>,
) -> Option<Credentials> {
    use std::io::Write;
    let name = format!("docker-credential-{helper}");
    let program = match helper_dir {
        Some(d) => d.join(&name),
        None => PathBuf::from(&name),
    };
    let mut child = std::process::Command::new(program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!(helper, error = %e, "credential helper not runnable"))
        .ok()?;
    child.stdin.take()?.write_all(server.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        tracing::warn!(helper, server, "credential helper found no credentials");
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| tracing::warn!(helper, error = %e, "credential helper answer is not JSON"))
        .ok()?;
    let user = v["Username"].as_str()?;
    let secret = v["Secret"].as_str()?;
    if user == "<token>" {
        return Some(Credentials {
            identity_token: Some(secret.to_string()),
            ..Default::default()
        });
    }
    Some(Credentials::basic(user, secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn auths_entries_in_their_forms() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"auths":{{
                "reg.example:5000":{{"auth":"{auth}"}},
                "https://index.docker.io/v1/":{{"auth":"","identitytoken":"refresh-xyz"}},
                "tok.example":{{"registrytoken":"bearer-abc"}},
                "split.example":{{"username":"bob","password":"pw"}},
                "empty.example":{{}}
            }}}}"#
            ),
        )
        .unwrap();
        let c = docker_credentials("reg.example:5000", Some(&cfg)).unwrap();
        assert_eq!(c, Credentials::basic("alice", "s3cret"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "credentials must not print"
        );
        let hub = docker_credentials("registry-1.docker.io", Some(&cfg)).unwrap();
        assert_eq!(hub.identity_token.as_deref(), Some("refresh-xyz"));
        assert!(!hub.has_password());
        assert!(!format!("{hub:?}").contains("refresh-xyz"));
        let t = docker_credentials("tok.example", Some(&cfg)).unwrap();
        assert_eq!(t.registry_token.as_deref(), Some("bearer-abc"));
        assert_eq!(
            docker_credentials("split.example", Some(&cfg)).unwrap(),
            Credentials::basic("bob", "pw")
        );
        assert!(docker_credentials("empty.example", Some(&cfg)).is_none());
        assert!(docker_credentials("other.example", Some(&cfg)).is_none());
    }

    #[test]
    fn helpers_and_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // A helper that answers per server: basic for one, an identity token for another.
        let helper = bin.join("docker-credential-test");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread s\ncase \"$s\" in\n  store.example) echo '{\"ServerURL\":\"store.example\",\"Username\":\"carol\",\"Secret\":\"pw2\"}';;\n  tok.example) echo '{\"Username\":\"<token>\",\"Secret\":\"refresh-1\"}';;\n  *) echo 'credentials not found' >&2; exit 1;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            r#"{"credsStore":"test","credHelpers":{"tok.example":"test"}}"#,
        )
        .unwrap();
        assert_eq!(
            lookup("store.example", Some(&cfg), Some(&bin)).unwrap(),
            Credentials::basic("carol", "pw2")
        );
        let t = lookup("tok.example", Some(&cfg), Some(&bin)).unwrap();
        assert_eq!(t.identity_token.as_deref(), Some("refresh-1"));
        assert!(lookup("nobody.example", Some(&cfg), Some(&bin)).is_none());
    }
}
