//! Registries as users run them, with Debian's real docker-registry: TLS from a private CA (in
//! hosts.toml, in the docker certs.d layout, in the system trust store), mutual TLS, htpasswd (basic
//! auth), token auth validating real JWTs that this test issues for the registry's configured issuer
//! and certificate (basic credentials and the OAuth2 identity-token grant), and a pull-through cache
//! in front of an origin that is then stopped. Each is exercised by `lazyblk convert` (manifests,
//! blobs, pushes) and `lazyblk serve` read whole by nbdcopy and checked with e2fsck and debugfs.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use base64::Engine as _;
use common::pki::{htpasswd_line, Pki, SystemCa};
use common::registry::{Registry, RegistryConfig};
use common::token::token_service;
use common::*;

const HELLO: &str = "hello from a private registry\n";

fn tools_ok() -> bool {
    for t in ["umoci", "skopeo", "openssl", "nbdcopy", "debugfs", "e2fsck"] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .unwrap()
            .status
            .success();
        if !ok {
            assert!(may_skip(), "{t} missing in CI");
            eprintln!("SKIPPED: {t} not installed");
            return false;
        }
    }
    privileged()
}

/// A one-layer image in an OCI layout (`LAYOUT:v1`): `/hello` and 3 MB of noise.
fn small_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(
        Command::new("umoci")
            .args(["new", "--image"])
            .arg(format!("{}:v1", layout.display())),
    );
    let bundle = dir.join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle),
    );
    let root = bundle.join("rootfs");
    std::fs::write(root.join("hello"), HELLO).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/noise"), noise(3_000_000, 7)).unwrap();
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle),
    );
    std::fs::remove_dir_all(&bundle).unwrap();
    layout
}

/// `skopeo copy` of the layout's `v1` to `dest` (`HOST:PORT/REPO:TAG`) with `extra` flags.
fn push(layout: &Path, dest: &str, extra: &[&str]) {
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet"])
            .args(extra)
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{dest}")),
    );
}

/// `lazyblk convert SRC DST --json ARGS`.
fn convert_cmd(src: &str, dst: &str, args: &[&str]) -> Output {
    lazyblk()
        .args(["convert", src, dst, "--json"])
        .args(args)
        .output()
        .unwrap()
}

/// Converts and returns the one converted layer's digest.
fn convert_ok(src: &str, dst: &str, args: &[&str]) -> String {
    let out = convert_cmd(src, dst, args);
    assert!(
        out.status.success(),
        "convert {src} -> {dst} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["manifests"][0]["layers"][0]["target_digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn convert_err(src: &str, dst: &str, args: &[&str]) -> String {
    let out = convert_cmd(src, dst, args);
    assert!(
        !out.status.success(),
        "convert {src} -> {dst} {args:?} should have failed"
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `lazyblk serve SOURCE ARGS` on a unix socket, read whole by nbdcopy into `scratch/disk.img`, then
/// checked: e2fsck clean and `/hello` as written.
fn serve_and_check(source: &str, args: &[&str], scratch: &Path) {
    let sock = scratch.join(format!("nbd-{}.sock", rand_tag()));
    let mut child: Child = lazyblk()
        .args(["serve", source, "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.is_empty() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let _ = child.wait();
        panic!("lazyblk serve {source} {args:?} exited before listening:\n{err}");
    }
    let img = scratch.join("disk.img");
    let copied = Command::new("nbdcopy")
        .arg(format!("nbd+unix:///lazyblk?socket={}", sock.display()))
        .arg(&img)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        copied.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    e2fsck(&img);
    let out = run_ok(Command::new("debugfs").args(["-R", "cat /hello"]).arg(&img));
    assert_eq!(String::from_utf8_lossy(&out.stdout), HELLO);
    std::fs::remove_file(&img).unwrap();
}

fn rand_tag() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Relaxed)
}

/// A hosts dir with `HOST/hosts.toml` = `text`.
fn hosts_dir(base: &Path, host: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(base.join(host)).unwrap();
    std::fs::write(base.join(host).join("hosts.toml"), text).unwrap();
    base.to_path_buf()
}

#[test]
fn private_ca_registry_via_hosts_toml_certs_d_and_the_system_store() {
    if !tools_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "lazyblk test CA");
    // Valid for 127.0.0.1 only: `localhost` is a name mismatch.
    let server = pki.issue("server", &["IP:127.0.0.1"], "serverAuth");
    let Some(reg) = Registry::start_with(&RegistryConfig {
        tls: Some((server.cert.clone(), server.key.clone())),
        ..Default::default()
    }) else {
        return;
    };
    let r = reg.addr.clone();
    let certs = tmp.path().join("skopeo-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(pki.ca(), certs.join("ca.crt")).unwrap();
    let layout = small_layout(tmp.path());
    push(
        &layout,
        &format!("{r}/app/img:v1"),
        &[&format!("--dest-cert-dir={}", certs.display())],
    );
    let src = format!("{r}/app/img:v1");

    // No trust configured: the error says why (not "error sending request").
    let e = convert_err(&src, &format!("{r}/app/img:lazy"), &[]);
    assert!(e.contains("unknown authority"), "{e}");

    // hosts.toml with a relative `ca`, as containerd reads it.
    let hd = tmp.path().join("hosts");
    hosts_dir(
        &hd,
        &r,
        &format!("server = \"https://{r}\"\nca = \"test-ca.pem\"\n"),
    );
    std::fs::copy(pki.ca(), hd.join(&r).join("test-ca.pem")).unwrap();
    let hd_arg = format!("--hosts-dir={}", hd.display());
    let layer = convert_ok(&src, &format!("{r}/app/img:lazy"), &[&hd_arg]);

    // The name is checked: `localhost` is not in the certificate.
    let port = reg.port();
    let lh = format!("localhost:{port}");
    hosts_dir(
        &hd,
        &lh,
        &format!(
            "server = \"https://{lh}\"\nca = \"{}\"\n",
            pki.ca().display()
        ),
    );
    let e = convert_err(
        &format!("{lh}/app/img:v1"),
        &format!("{lh}/app/img:x"),
        &[&hd_arg],
    );
    assert!(e.contains("not valid for this host name"), "{e}");
    // skip_verify (containerd's escape hatch) accepts it.
    hosts_dir(
        &hd,
        &lh,
        &format!("server = \"https://{lh}\"\nskip_verify = true\n"),
    );
    convert_ok(
        &format!("{lh}/app/img:v1"),
        &format!("{lh}/app/img:skip-verify"),
        &[&hd_arg],
    );

    // Docker's certs.d layout (no hosts.toml): `ca.crt` in the host's directory; served lazily.
    let cd = tmp.path().join("certs.d");
    std::fs::create_dir_all(cd.join(&r)).unwrap();
    std::fs::copy(pki.ca(), cd.join(&r).join("ca.crt")).unwrap();
    serve_and_check(
        &format!("{r}/app/img@{layer}"),
        &[&format!("--hosts-dir={}", cd.display())],
        tmp.path(),
    );

    // The CA in the system trust store (update-ca-certificates), nothing else configured.
    let _ca = SystemCa::install(&pki.ca(), "private-ca");
    convert_ok(&src, &format!("{r}/app/img:lazy-system"), &[]);
    serve_and_check(&format!("{r}/app/img@{layer}"), &[], tmp.path());
}

#[test]
fn mutual_tls_client_certificates_from_hosts_toml_and_certs_d() {
    if !tools_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "lazyblk mtls CA");
    let server = pki.issue("server", &["IP:127.0.0.1"], "serverAuth");
    let client = pki.issue("client", &[], "clientAuth");
    let Some(reg) = Registry::start_with(&RegistryConfig {
        tls: Some((server.cert.clone(), server.key.clone())),
        client_ca: Some(pki.ca()),
        ..Default::default()
    }) else {
        return;
    };
    let r = reg.addr.clone();
    let certs = tmp.path().join("skopeo-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(pki.ca(), certs.join("ca.crt")).unwrap();
    std::fs::copy(&client.cert, certs.join("client.cert")).unwrap();
    std::fs::copy(&client.key, certs.join("client.key")).unwrap();
    push(
        &small_layout(tmp.path()),
        &format!("{r}/app/img:v1"),
        &[&format!("--dest-cert-dir={}", certs.display())],
    );
    let src = format!("{r}/app/img:v1");
    let hd = tmp.path().join("hosts");
    hosts_dir(&hd, &r, &format!("ca = \"{}\"\n", pki.ca().display()));
    let e = convert_err(
        &src,
        &format!("{r}/app/img:lazy"),
        &[&format!("--hosts-dir={}", hd.display())],
    );
    // The server's refusal arrives after the TLS 1.3 handshake, as an alert (explained) or as a
    // closed stream, depending on timing: either way with its cause, never a bare "error sending
    // request".
    assert!(
        e.contains("client certificate")
            || e.contains("app/img/manifests/v1: error sending request: "),
        "no client certificate: {e}"
    );
    hosts_dir(
        &hd,
        &r,
        &format!(
            "ca = \"{}\"\nclient = [[\"{}\", \"{}\"]]\n",
            pki.ca().display(),
            client.cert.display(),
            client.key.display()
        ),
    );
    let layer = convert_ok(
        &src,
        &format!("{r}/app/img:lazy"),
        &[&format!("--hosts-dir={}", hd.display())],
    );
    // certs.d: ca.crt plus client.cert/client.key.
    let cd = tmp.path().join("certs.d");
    std::fs::create_dir_all(cd.join(&r)).unwrap();
    for f in ["ca.crt", "client.cert", "client.key"] {
        std::fs::copy(certs.join(f), cd.join(&r).join(f)).unwrap();
    }
    serve_and_check(
        &format!("{r}/app/img@{layer}"),
        &[&format!("--hosts-dir={}", cd.display())],
        tmp.path(),
    );
}

fn docker_config(path: &Path, host: &str, entry: serde_json::Value) -> PathBuf {
    std::fs::write(
        path,
        serde_json::json!({ "auths": { host: entry } }).to_string(),
    )
    .unwrap();
    path.to_path_buf()
}

fn basic_entry(user: &str, pw: &str) -> serde_json::Value {
    serde_json::json!({"auth": base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))})
}

#[test]
fn htpasswd_registry_with_credentials_from_the_docker_config() {
    if !tools_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let htpasswd = tmp.path().join("htpasswd");
    std::fs::write(&htpasswd, htpasswd_line("alice", "s3cret")).unwrap();
    let Some(reg) = Registry::start_with(&RegistryConfig {
        htpasswd: Some(htpasswd),
        ..Default::default()
    }) else {
        return;
    };
    let r = reg.addr.clone();
    push(
        &small_layout(tmp.path()),
        &format!("{r}/app/img:v1"),
        &["--dest-tls-verify=false", "--dest-creds=alice:s3cret"],
    );
    let src = format!("{r}/app/img:v1");
    let dst = format!("{r}/app/img:lazy");
    let e = convert_err(&src, &dst, &["--plain-http"]);
    assert!(
        e.contains("basic auth") && e.contains("no credentials"),
        "{e}"
    );
    let wrong = docker_config(
        &tmp.path().join("wrong.json"),
        &r,
        basic_entry("alice", "nope"),
    );
    let e = convert_err(
        &src,
        &dst,
        &[
            "--plain-http",
            &format!("--docker-config={}", wrong.display()),
        ],
    );
    assert!(
        e.contains("401") && e.contains("it asked for Basic realm") && e.contains("credentials"),
        "{e}"
    );
    let good = docker_config(
        &tmp.path().join("good.json"),
        &r,
        basic_entry("alice", "s3cret"),
    );
    let cfg = format!("--docker-config={}", good.display());
    let layer = convert_ok(&src, &dst, &["--plain-http", &cfg]);
    serve_and_check(
        &format!("{r}/app/img@{layer}"),
        &["--plain-http", &cfg],
        tmp.path(),
    );
}

#[test]
fn token_auth_registry_validates_our_tokens_for_basic_and_identity_token_credentials() {
    if !tools_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "token signer CA");
    let signer = pki.issue("signer", &[], "serverAuth");
    let (service, issuer) = ("lazyblk-test-registry", "lazyblk-test-issuer");
    let ts = token_service(service, issuer, signer.key.clone(), signer.cert.clone());
    let Some(reg) = Registry::start_with(&RegistryConfig {
        token: Some((
            format!("http://{}/token", ts.addr),
            service.into(),
            issuer.into(),
            pki.ca(),
        )),
        ..Default::default()
    }) else {
        return;
    };
    let r = reg.addr.clone();
    push(
        &small_layout(tmp.path()),
        &format!("{r}/app/img:v1"),
        &["--dest-tls-verify=false", "--dest-creds=alice:s3cret"],
    );
    let src = format!("{r}/app/img:v1");
    // Anonymous: the token service refuses, and the error names the realm's answer.
    let e = convert_err(&src, &format!("{r}/app/img:lazy"), &["--plain-http"]);
    assert!(e.contains("token endpoint") && e.contains("401"), "{e}");
    let good = docker_config(
        &tmp.path().join("good.json"),
        &r,
        basic_entry("alice", "s3cret"),
    );
    let cfg = format!("--docker-config={}", good.display());
    let before = ts.basic_grants.load(Relaxed);
    let layer = convert_ok(&src, &format!("{r}/app/img:lazy"), &["--plain-http", &cfg]);
    assert!(ts.basic_grants.load(Relaxed) > before);
    serve_and_check(
        &format!("{r}/app/img@{layer}"),
        &["--plain-http", &cfg],
        tmp.path(),
    );
    // An identity token (what `docker login` stores for OAuth registries): the refresh-token grant.
    let idt = docker_config(
        &tmp.path().join("identity.json"),
        &r,
        serde_json::json!({"auth": "", "identitytoken": "refresh-ok"}),
    );
    serve_and_check(
        &format!("{r}/app/img@{layer}"),
        &[
            "--plain-http",
            &format!("--docker-config={}", idt.display()),
        ],
        tmp.path(),
    );
    assert!(ts.refresh_grants.load(Relaxed) >= 1);
    let _ = ts.denied.load(Relaxed);
}

#[test]
fn pull_through_cache_mirror_serves_verified_ranges_and_outlives_the_origin() {
    if !tools_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(origin) = Registry::start() else {
        return;
    };
    let o = origin.addr.clone();
    push(
        &small_layout(tmp.path()),
        &format!("{o}/app/img:v1"),
        &["--dest-tls-verify=false"],
    );
    let layer = convert_ok(
        &format!("{o}/app/img:v1"),
        &format!("{o}/app/img:lazy"),
        &["--plain-http"],
    );
    let Some(mirror) = Registry::start_with(&RegistryConfig {
        proxy_remote: Some(format!("http://{o}")),
        ..Default::default()
    }) else {
        return;
    };
    let m = mirror.addr.clone();
    let hd = hosts_dir(
        &tmp.path().join("hosts"),
        &o,
        &format!(
            "server = \"http://{o}\"\n[host.\"http://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    );
    let hd_arg = format!("--hosts-dir={}", hd.display());
    let source = format!("{o}/app/img@{layer}");
    // Cold mirror: it answers the first ranged GET with the whole blob (200) while it caches it in
    // the background; lazyblk takes those reads from the origin, and the mirror fills.
    serve_and_check(&source, &[&hd_arg], tmp.path());
    // Wait until the mirror has the blob itself (it then answers ranges with 206).
    let url = format!("http://{m}/v2/app/img/blobs/{layer}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-r", "0-9"])
            .arg(&url)
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout) == "206" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pull-through cache never stored {layer}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The original image's manifest and layer through the mirror too (it caches them as it serves).
    let Some(third) = Registry::start() else {
        return;
    };
    let t = third.addr.clone();
    convert_ok(
        &format!("{o}/app/img:v1"),
        &format!("{t}/app/img:before"),
        &["--plain-http", &hd_arg],
    );
    drop(origin);
    // Origin gone: every read comes from the mirror's cache, verified chunk by chunk.
    serve_and_check(&source, &[&hd_arg], tmp.path());
    // And a conversion of the original image reads the tag and the layer from the mirror alone.
    convert_ok(
        &format!("{o}/app/img:v1"),
        &format!("{t}/app/img:after"),
        &["--plain-http", &hd_arg],
    );
}
