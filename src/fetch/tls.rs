//! TLS for registry connections, as containerd does it: the system trust store (`/etc/ssl/certs`, where
//! `update-ca-certificates` puts an enterprise CA; `SSL_CERT_FILE`/`SSL_CERT_DIR` override it), plus
//! per-host CAs, client certificates (mTLS) and `skip_verify` from `hosts.toml` or a docker-style
//! `certs.d/<host>/` directory. One HTTP client (one connection pool) per distinct TLS setting, shared by
//! every session of the process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::lane::Lane;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The TLS settings of one registry host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// Extra CA files (PEM), trusted on top of the system store.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files (PEM); `None` for the key means it is in the certificate file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Accept any server certificate (containerd's `skip_verify`; for tests and closed networks).
    pub skip_verify: bool,
}

impl TlsSettings {
    /// Whether these are the defaults (the system store and nothing else).
    pub fn is_default(&self) -> bool {
        *self == TlsSettings::default()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system trust store, loaded once per process. Falls back to the Mozilla roots compiled in
/// (`webpki-roots`) only when the system has no CA certificates at all.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system trust store");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if ignored > 0 {
            tracing::debug!(
                ignored,
                "system trust store: certificates rustls cannot use"
            );
        }
        if added == 0 {
            // Not a warning: nodes that only reach plain-HTTP registries have no CA bundle, and a
            // registry whose certificate these roots cannot verify fails with its own clear error.
            tracing::info!(
                "no CA certificates in the system trust store (install ca-certificates); \
                 using the built-in Mozilla roots"
            );
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parsing certificates in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The rustls configuration for `s`.
pub fn client_config(s: &TlsSettings) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = if s.skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
    } else {
        let mut roots = system_roots().clone();
        for f in &s.ca {
            for c in read_certs(f)? {
                roots
                    .add(c)
                    .map_err(|e| format!("CA certificate in {}: {e}", f.display()))?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut cfg = match s.client.first() {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            if s.client.len() > 1 {
                tracing::warn!(
                    used = %cert.display(),
                    "several client certificates configured for one host; using the first"
                );
            }
            let chain = read_certs(cert)?;
            let key_file = key.as_deref().unwrap_or(cert);
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|e| format!("reading the private key in {}: {e}", key_file.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A reqwest client builder with the registry client's TLS for `s` (callers add timeouts and policy).
pub fn client_builder(s: &TlsSettings) -> Result<reqwest::ClientBuilder, String> {
    Ok(reqwest::Client::builder().use_preconfigured_tls(client_config(s)?))
}

/// One client per TLS setting, built by `make` on first use and shared after (one pool per host kind).
/// The demand lane's (see [`shared_client_on`]).
pub fn shared_client(
    s: &TlsSettings,
    make: impl FnOnce(&TlsSettings) -> Result<reqwest::Client, String>,
) -> Result<reqwest::Client, String> {
    shared_client_on(Lane::Demand, s, make)
}

/// [`shared_client`] for `lane`: each lane has its own clients, hence its own connections
/// ([`super::lane`]).
pub fn shared_client_on(
    lane: Lane,
    s: &TlsSettings,
    make: impl FnOnce(&TlsSettings) -> Result<reqwest::Client, String>,
) -> Result<reqwest::Client, String> {
    type Clients = HashMap<(Lane, TlsSettings), reqwest::Client>;
    static CLIENTS: OnceLock<Mutex<Clients>> = OnceLock::new();
    let mut clients = CLIENTS
        .get_or_init(Default::default)
        .lock()
        .expect("tls clients lock");
    let key = (lane, s.clone());
    if let Some(c) = clients.get(&key) {
        return Ok(c.clone());
    }
    let c = make(s)?;
    clients.insert(key, c.clone());
    Ok(c)
}

/// What a TLS failure in `e`'s cause chain means, in words an operator can act on (None: no TLS error).
pub fn explain(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        // io::Error hides its payload from `source()`, and hyper nests one io::Error in another.
        let mut inner: &(dyn std::error::Error + 'static) = c;
        while let Some(payload) = inner
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            inner = payload;
        }
        let tls = inner.downcast_ref::<rustls::Error>();
        if let Some(t) = tls {
            return Some(describe(t));
        }
        // After a TLS 1.3 handshake the server's alert (a refused client certificate) reaches us
        // as a read error of the connection, its rustls type lost on the way.
        let text = c.to_string();
        if let Some(alert) = text.strip_prefix("received fatal alert: ") {
            return Some(format!(
                "TLS: the server refused the connection (alert {alert}; does it want a client certificate? set hosts.toml `client`)"
            ));
        }
        cur = c.source();
    }
    None
}

fn describe(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "TLS: the server's certificate is signed by an unknown authority \
                (trust its CA with hosts.toml `ca`, certs.d/<host>/ca.crt or the system store)"
                .into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("TLS: the server's certificate is not valid for this host name ({c:?})")
            }
            C::Expired | C::ExpiredContext { .. } => {
                format!("TLS: the server's certificate has expired ({c:?})")
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("TLS: the server's certificate is not valid yet ({c:?})")
            }
            C::Revoked => "TLS: the server's certificate is revoked".into(),
            other => format!("TLS: bad server certificate: {other:?}"),
        },
        rustls::Error::AlertReceived(a) => format!(
            "TLS: the server refused the handshake ({a:?}; does it want a client certificate?)"
        ),
        other => format!("TLS: {other}"),
    }
}

/// `skip_verify`: any certificate is accepted, but handshake signatures are still checked (so the
/// session is at least with the holder of the presented key).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("ca.crt");
        std::fs::write(&junk, "not a certificate").unwrap();
        let s = TlsSettings {
            ca: vec![junk.clone()],
            ..Default::default()
        };
        let e = client_config(&s).unwrap_err();
        assert!(
            e.contains("ca.crt") && e.contains("no PEM certificate"),
            "{e}"
        );
        let missing = TlsSettings {
            ca: vec![dir.path().join("missing.crt")],
            ..Default::default()
        };
        assert!(client_config(&missing).unwrap_err().contains("missing.crt"));
        assert!(client_config(&TlsSettings::default()).is_ok());
        assert!(client_config(&TlsSettings {
            skip_verify: true,
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn tls_errors_are_explained_through_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let m = explain(&io).unwrap();
        assert!(m.contains("unknown authority"), "{m}");
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(explain(&plain).is_none());
    }
}
