//! Registry auth and redirects against a mock registry (Debian's docker-registry cannot run a token
//! service or redirect to object storage here): the WWW-Authenticate bearer flow with credentials from a
//! docker config, a 307 to "object storage" that is cached and reused, and no registry credentials ever
//! sent to the object store.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use base64::Engine as _;
use common::layer::{LayerTar, DEF};
use common::*;
use lazyblk::fetch::registry::RegistryOptions;
use lazyblk::fetch::{open_source, SourceOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
struct Counters {
    token: AtomicU64,
    token_denied: AtomicU64,
    registry: AtomicU64,
    unauthorized: AtomicU64,
    object: AtomicU64,
    leaked_auth: AtomicU64,
}

async fn mock(blob: Arc<Vec<u8>>, digest: String, counters: Arc<Counters>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let a2 = addr.clone();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    recording_on(l, move |method, path, auth, range| {
        let c = &counters;
        if path.starts_with("/token") {
            if auth == basic && path.contains("scope=repository%3Ateam%2Fapp%3Apull") {
                c.token.fetch_add(1, Relaxed);
                let body = r#"{"token":"tok-123"}"#;
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
            } else {
                c.token_denied.fetch_add(1, Relaxed);
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_vec()
            }
        } else if path == format!("/v2/team/app/blobs/{digest}") {
            c.registry.fetch_add(1, Relaxed);
            if auth != "Bearer tok-123" {
                c.unauthorized.fetch_add(1, Relaxed);
                format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{a2}/token\",service=\"mock\",scope=\"repository:team/app:pull\"\r\nContent-Length: 0\r\n\r\n").into_bytes()
            } else {
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /object/blob?X-Signature=SECRET\r\nContent-Length: 0\r\n\r\n".to_vec()
            }
        } else if path == "/object/blob?X-Signature=SECRET" {
            c.object.fetch_add(1, Relaxed);
            if !auth.is_empty() {
                c.leaked_auth.fetch_add(1, Relaxed);
            }
            if method == "HEAD" {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len()).into_bytes()
            } else {
                let (a, b) = range.unwrap();
                let mut v = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\r\n",
                    b + 1 - a
                )
                .into_bytes();
                v.extend_from_slice(&blob[a as usize..=b as usize]);
                v
            }
        } else {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
        }
    });
    addr
}

/// A converted layer with one file `f` of `body`: (blob bytes, raw disk bytes, convert summary).
fn layer_of(dir: &std::path::Path, body: &[u8]) -> (Vec<u8>, Vec<u8>, serde_json::Value) {
    let mut t = LayerTar::new();
    t.file("f", DEF, body);
    let tar = dir.join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob_path = dir.join("l.blob");
    let summary = convert(&tar, &blob_path);
    let raw_path = dir.join("l.img");
    run_ok(
        lazyblk()
            .args(["layer", "export"])
            .arg(&blob_path)
            .arg("-o")
            .arg(&raw_path),
    );
    (
        std::fs::read(&blob_path).unwrap(),
        std::fs::read(&raw_path).unwrap(),
        summary,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_and_cached_redirects() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, raw, summary) = layer_of(dir.path(), &b"content ".repeat(400_000));
    let blob = Arc::new(blob);
    let digest = summary["blob"]["digest"].as_str().unwrap().to_string();
    let counters = Arc::new(Counters::default());
    let addr = mock(blob, digest.clone(), counters.clone()).await;

    // Without credentials the token endpoint refuses: a clear, permanent error.
    let empty_cfg = dir.path().join("empty.json");
    std::fs::write(&empty_cfg, "{}").unwrap();
    let mut opts = SourceOptions {
        registry: RegistryOptions {
            plain_http: true,
            docker_config: Some(empty_cfg),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = open_source(&format!("{addr}/team/app@{digest}"), &opts)
        .await
        .err()
        .expect("must fail without credentials");
    assert!(
        err.message.contains("token endpoint") && err.message.contains("401"),
        "{}",
        err.message
    );

    // With credentials in a docker config.
    let cfg = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"{addr}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    opts.registry.docker_config = Some(cfg);
    let e = open_source(&format!("{addr}/team/app@{digest}"), &opts)
        .await
        .unwrap();
    let size = e.index().image_size();
    let mut got = Vec::new();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(300_000);
        got.extend_from_slice(&e.read(off, n as usize).await.unwrap());
        off += n;
    }
    assert!(got == raw);
    let c = &counters;
    assert_eq!(c.token.load(Relaxed), 1, "one token for the whole session");
    assert_eq!(
        c.leaked_auth.load(Relaxed),
        0,
        "registry credentials must never reach object storage"
    );
    let registry_hits = c.registry.load(Relaxed);
    let object_hits = c.object.load(Relaxed);
    assert!(
        object_hits > 3,
        "data must come from the redirect target ({object_hits})"
    );
    // HEAD (401 + retry) and the first GET go to the registry; later reads reuse the cached target.
    assert!(
        registry_hits <= 4,
        "redirect target not reused: {registry_hits} registry requests"
    );
}

/// What a recording server received: (path, Authorization header).
type Seen = Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A loopback HTTP/1.1 server answering each request with `answer(method, path, auth)` and
/// recording every (path, Authorization) it receives.
async fn recording(
    answer: impl Fn(&str, &str, &str, Option<(u64, u64)>) -> Vec<u8> + Send + Sync + 'static,
) -> (String, Seen) {
    recording_at("127.0.0.1", answer).await
}

/// [`recording`] on loopback address `ip` (127.0.0.2 is another host than 127.0.0.1).
async fn recording_at(
    ip: &str,
    answer: impl Fn(&str, &str, &str, Option<(u64, u64)>) -> Vec<u8> + Send + Sync + 'static,
) -> (String, Seen) {
    let l = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (addr, recording_on(l, answer))
}

/// [`recording`] on an already bound listener (for servers that must know their own address).
fn recording_on(
    l: tokio::net::TcpListener,
    answer: impl Fn(&str, &str, &str, Option<(u64, u64)>) -> Vec<u8> + Send + Sync + 'static,
) -> Seen {
    let seen: Seen = Default::default();
    let (answer, seen2) = (Arc::new(answer), seen.clone());
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let (answer, seen) = (answer.clone(), seen2.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let mut auth = String::new();
                    let mut range = None;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("authorization") {
                                auth = v.trim().to_string();
                            }
                            if k.eq_ignore_ascii_case("range") {
                                range = v
                                    .trim()
                                    .trim_start_matches("bytes=")
                                    .split_once('-')
                                    .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()));
                            }
                        }
                    }
                    seen.lock().unwrap().push((path.clone(), auth.clone()));
                    let resp = answer(&method, &path, &auth, range);
                    if r.get_mut().write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    seen
}

fn http(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Credentials are scoped to the host they were configured for: a token realm on another origin
/// reached over plain HTTP gets none (an anonymous token request), a mirror gets none of the
/// upstream's (it answers 401 and the read falls back to the registry), and a basic challenge from
/// the registry itself over loopback is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_leave_their_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = LayerTar::new();
    t.file("f", DEF, &b"scoped ".repeat(100_000));
    let tar = dir.path().join("l.tar");
    std::fs::write(&tar, t.finish()).unwrap();
    let blob_path = dir.path().join("l.blob");
    let summary = convert(&tar, &blob_path);
    let blob = Arc::new(std::fs::read(&blob_path).unwrap());
    let digest = summary["blob"]["digest"].as_str().unwrap().to_string();

    // The realm, on another host: hands out a token to anyone (an anonymous pull token), records
    // what it got.
    let (realm, realm_seen) = recording_at("127.0.0.2", |_, _, _, _| {
        http(
            "200 OK",
            "Content-Type: application/json\r\n",
            r#"{"token":"anon"}"#,
        )
    })
    .await;
    // A mirror that wants basic auth: it must never see the upstream's credentials.
    let (mirror, mirror_seen) = recording(|_, _, _, _| {
        http(
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"mirror\"\r\n",
            "",
        )
    })
    .await;
    // The registry: bearer challenge naming the foreign realm; serves ranges to the anonymous token.
    let b2 = blob.clone();
    let realm2 = realm.clone();
    let (registry, registry_seen) = recording(move |method, _path, auth, _| {
        if auth != "Bearer anon" {
            return http(
                "401 Unauthorized",
                &format!(
                    "WWW-Authenticate: Bearer realm=\"http://{realm2}/token\",service=\"r\"\r\n"
                ),
                "",
            );
        }
        if method == "HEAD" {
            return format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b2.len()).into_bytes();
        }
        let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b2.len()).into_bytes();
        v.extend_from_slice(&b2);
        v
    })
    .await;
    let _ = registry_seen;
    let secret = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"{registry}":{{"auth":"{secret}"}}}}}}"#),
    )
    .unwrap();
    let hosts = dir.path().join("certs.d");
    std::fs::create_dir_all(hosts.join(&registry)).unwrap();
    std::fs::write(
        hosts.join(&registry).join("hosts.toml"),
        format!("server = \"http://{registry}\"\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\"]\n"),
    )
    .unwrap();
    let opts = SourceOptions {
        registry: RegistryOptions {
            plain_http: true,
            docker_config: Some(cfg),
            hosts_dir: Some(hosts),
        },
        ..Default::default()
    };
    // The registry answers whole blobs (200, not 206): refused as a bad range answer, but only
    // after the auth flow ran, which is what this test is about.
    let _ = open_source(&format!("{registry}/team/app@{digest}"), &opts).await;
    let realm_seen = realm_seen.lock().unwrap().clone();
    assert!(!realm_seen.is_empty(), "the token realm was never asked");
    for (path, auth) in &realm_seen {
        assert!(
            auth.is_empty(),
            "credentials sent to a foreign plain-HTTP realm: {path} {auth}"
        );
    }
    let mirror_seen = mirror_seen.lock().unwrap().clone();
    assert!(!mirror_seen.is_empty(), "the mirror was never tried");
    for (path, auth) in &mirror_seen {
        assert!(auth.is_empty(), "the mirror got credentials: {path} {auth}");
    }
}

#[test]
fn credential_channels() {
    use lazyblk::fetch::registry::{realm_may_get_credentials, secure_channel};
    let u = |s: &str| reqwest::Url::parse(s).unwrap();
    assert!(secure_channel(&u("https://r.example.com/v2/")));
    assert!(secure_channel(&u("http://127.0.0.1:5000/v2/")));
    assert!(secure_channel(&u("http://localhost:5000/v2/")));
    assert!(!secure_channel(&u("http://r.example.com/v2/")));
    assert!(!secure_channel(&u("http://10.0.0.1:5000/v2/")));
    let ok = |e: &str, r: &str| realm_may_get_credentials(&u(e), &u(r));
    assert!(ok(
        "https://registry-1.docker.io/v2/",
        "https://auth.docker.io/token"
    ));
    assert!(ok(
        "https://registry.gitlab.com/v2/",
        "https://gitlab.com/jwt/auth"
    ));
    assert!(ok(
        "http://127.0.0.1:5000/v2/",
        "http://127.0.0.1:5000/token"
    ));
    // Same host, another port (docker_auth's layout): yes; another loopback address: no.
    assert!(ok(
        "http://127.0.0.1:5000/v2/",
        "http://127.0.0.1:5001/token"
    ));
    assert!(!ok(
        "http://127.0.0.1:5000/v2/",
        "http://127.0.0.2:5000/token"
    ));
    assert!(!ok(
        "https://r.example.com:5000/v2/",
        "https://r.example.com.evil.org/token"
    ));
    assert!(!ok(
        "https://r.example.com/v2/",
        "https://evil.example.org/token"
    ));
    assert!(!ok(
        "https://r.example.com/v2/",
        "http://auth.example.com/token"
    ));
    assert!(!ok("https://10.0.0.1/v2/", "https://10.0.0.2/token"));
}

/// A redirect target that once served corrupt bytes is not reused: the retry asks the registry
/// for a fresh target, and only verified bytes are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_target_that_served_corrupt_bytes_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, raw, summary) = layer_of(dir.path(), &noise(600_000, 5));
    let blob = Arc::new(blob);
    let digest = summary["blob"]["digest"].as_str().unwrap().to_string();
    let index_offset = summary["blob"]["index_offset"].as_u64().unwrap();
    // Object storage: the first data range (below the index) comes back with a flipped byte.
    let flipped = Arc::new(AtomicU64::new(0));
    let (b2, f2) = (blob.clone(), flipped.clone());
    let (object, _) = recording(move |method, _, _, range| {
        if method == "HEAD" {
            return format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b2.len()).into_bytes();
        }
        let (a, b) = range.unwrap();
        let mut body = b2[a as usize..=b as usize].to_vec();
        if b < index_offset && f2.fetch_add(1, Relaxed) == 0 {
            body[0] ^= 0xff;
        }
        let mut v = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(&body);
        v
    })
    .await;
    let registry_gets = Arc::new(AtomicU64::new(0));
    let g2 = registry_gets.clone();
    let (registry, _) = recording(move |method, _, _, _| {
        if method == "GET" {
            g2.fetch_add(1, Relaxed);
        }
        format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{object}/blob?sig=x\r\nContent-Length: 0\r\n\r\n").into_bytes()
    })
    .await;
    let opts = SourceOptions {
        registry: RegistryOptions {
            plain_http: true,
            ..Default::default()
        },
        engine: lazyblk::fetch::EngineOptions {
            retry_base: std::time::Duration::from_millis(5),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = open_source(&format!("{registry}/team/app@{digest}"), &opts)
        .await
        .unwrap();
    let before = registry_gets.load(Relaxed);
    let size = e.index().image_size();
    let mut got = Vec::new();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20);
        got.extend_from_slice(&e.read(off, n as usize).await.unwrap());
        off += n;
    }
    assert!(got == raw, "wrong bytes served");
    assert!(flipped.load(Relaxed) > 0, "no corrupt answer was sent");
    assert!(
        registry_gets.load(Relaxed) > before,
        "the redirect target that served corrupt bytes was reused ({} registry GETs)",
        registry_gets.load(Relaxed)
    );
}

/// Tokens are cached per scope and replaced shortly before they expire, with no 401 round trip: the
/// registry sees one challenge for the whole session even as its 2-second tokens run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_they_expire() {
    use lazyblk::fetch::registry::{registry_client, BlobRef, RegistryBlob};
    use lazyblk::fetch::RangeReader;
    let blob = Arc::new(noise(100_000, 3));
    let digest = format!("sha256:{}", "c".repeat(64));
    let issued = Arc::new(AtomicU64::new(0));
    let challenged = Arc::new(AtomicU64::new(0));
    let (realm, _) = {
        let issued = issued.clone();
        recording(move |_, path, _, _| {
            assert!(
                path.contains("scope=repository%3Ateam%2Fapp%3Apull"),
                "{path}"
            );
            let n = issued.fetch_add(1, Relaxed) + 1;
            http(
                "200 OK",
                "Content-Type: application/json\r\n",
                &format!(r#"{{"token":"t{n}","expires_in":2}}"#),
            )
        })
        .await
    };
    let (registry, seen) = {
        let (blob, challenged) = (blob.clone(), challenged.clone());
        recording(move |_, _, auth, range| {
            if !auth.starts_with("Bearer t") {
                challenged.fetch_add(1, Relaxed);
                return http(
                    "401 Unauthorized",
                    &format!("WWW-Authenticate: Bearer realm=\"http://{realm}/token\",service=\"r\",scope=\"repository:team/app:pull\"\r\n"),
                    "",
                );
            }
            let (a, b) = range.unwrap();
            let mut v = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\r\n",
                b + 1 - a
            )
            .into_bytes();
            v.extend_from_slice(&blob[a as usize..=b as usize]);
            v
        })
        .await
    };
    let opts = RegistryOptions {
        plain_http: true,
        ..Default::default()
    };
    let r = RegistryBlob::new(
        registry_client(),
        BlobRef::parse(&format!("{registry}/team/app@{digest}")).unwrap(),
        &opts,
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(&r.read_range(10..20).await.unwrap()[..], &blob[10..20]);
    }
    assert_eq!((issued.load(Relaxed), challenged.load(Relaxed)), (1, 1));
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    assert_eq!(&r.read_range(30..40).await.unwrap()[..], &blob[30..40]);
    assert_eq!(
        issued.load(Relaxed),
        2,
        "a fresh token before the old one expired"
    );
    assert_eq!(challenged.load(Relaxed), 1, "no 401 round trip to find out");
    let last = seen.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(last, "Bearer t2");
}
