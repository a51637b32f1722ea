//! A throwaway certificate authority (the `openssl` command line) for TLS registries, client
//! certificates and token signing keys in tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_ok;

/// A CA in a directory: `ca.crt` / `ca.key`, and the certificates it issued.
pub struct Pki {
    pub dir: PathBuf,
}

/// A certificate and its key.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name` under `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3",
                ])
                .arg("-keyout")
                .arg(dir.join("ca.key"))
                .arg("-out")
                .arg(dir.join("ca.crt"))
                .args(["-subj", &format!("/CN={name}")]),
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Issues `name.crt`/`name.key` with subjectAltNames `sans` (`IP:…`, `DNS:…`) for `usage`
    /// (`serverAuth` or `clientAuth`).
    pub fn issue(&self, name: &str, sans: &[&str], usage: &str) -> Issued {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.crt"));
        let ext = self.dir.join(format!("{name}.ext"));
        run_ok(
            Command::new("openssl")
                .args(["req", "-newkey", "rsa:2048", "-nodes"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr)
                .args(["-subj", &format!("/CN={name}")]),
        );
        let mut text = format!("extendedKeyUsage={usage}\n");
        if !sans.is_empty() {
            text.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        std::fs::write(&ext, text).unwrap();
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "3", "-CAcreateserial"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(self.ca())
                .arg("-CAkey")
                .arg(self.dir.join("ca.key"))
                .arg("-out")
                .arg(&cert)
                .arg("-extfile")
                .arg(&ext),
        );
        Issued { cert, key }
    }
}

/// A CA installed into the system trust store (`update-ca-certificates`) until dropped.
pub struct SystemCa {
    file: PathBuf,
}

impl SystemCa {
    /// Installs `ca` as `/usr/local/share/ca-certificates/lazyblk-test-<pid>-<tag>.crt`.
    pub fn install(ca: &Path, tag: &str) -> SystemCa {
        let file = PathBuf::from(format!(
            "/usr/local/share/ca-certificates/lazyblk-test-{}-{tag}.crt",
            std::process::id()
        ));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::copy(ca, &file).unwrap();
        run_ok(&mut Command::new("update-ca-certificates"));
        SystemCa { file }
    }
}

impl Drop for SystemCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = Command::new("update-ca-certificates")
            .arg("--fresh")
            .output();
    }
}

/// A JWT (RS256) for `claims`, signed with `key` and carrying `cert` in its `x5c` header, as a
/// docker token service issues them; signed by `openssl dgst`.
pub fn jwt(claims: &serde_json::Value, key: &Path, cert: &Path) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let pem = std::fs::read_to_string(cert).unwrap();
    let der_b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [der_b64]});
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(signing_input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign failed");
    format!("{signing_input}.{}", b64(&out.stdout))
}

/// A bcrypt `htpasswd` line for `user`:`password` (Python's crypt, libxcrypt's `$2b$`, cost 4).
pub fn htpasswd_line(user: &str, password: &str) -> String {
    let out = run_ok(Command::new("python3").arg("-c").arg(format!(
        "import crypt; print(crypt.crypt({password:?}, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))"
    )));
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        hash.starts_with("$2"),
        "no bcrypt from python3's crypt: {hash}"
    );
    format!("{user}:{hash}\n")
}
