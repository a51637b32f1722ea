//! OCI distribution client for blob range reads: references, the `WWW-Authenticate` token flow, basic
//! auth, docker `config.json` and credential helpers, containerd `hosts.toml` mirrors, and redirects to
//! object storage (the redirect target is cached and reused until it stops working).
//!
//! Written on reqwest rather than a full OCI crate: the data path needs exactly one call (ranged GET of a
//! blob) with control over redirects, retries and what is logged; the push side lives next to it.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, LOCATION, RANGE, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};

use super::lane::{self, Lane};
use super::remote::{classify, head_size, ranged_body, redact, FetchError, RangeReader};
use super::BoxFuture;

/// `registry/repository@sha256:digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Registry host, with port if any (`docker.io` becomes `registry-1.docker.io`).
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// `sha256:...`.
    pub digest: String,
}

/// Docker Hub's registry host (what `docker.io` and `index.docker.io` mean).
pub const DOCKER_HUB: &str = "registry-1.docker.io";

/// Splits an image name into (registry host, repository) like docker and containerd: a first
/// component without `.` or `:` (and not `localhost`) means Docker Hub; `docker.io` and
/// `index.docker.io` are Docker Hub too; a single-name Docker Hub repository is `library/NAME`.
pub fn split_name(name: &str) -> (String, String) {
    let (registry, repository) = match name.split_once('/') {
        Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
            (h.to_string(), r.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    let registry = match registry.as_str() {
        "docker.io" | "index.docker.io" => DOCKER_HUB.to_string(),
        _ => registry,
    };
    let repository =
        if registry == DOCKER_HUB && !repository.is_empty() && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
    (registry, repository)
}

impl BlobRef {
    /// Parses `host[:port]/repo[/...]@sha256:<hex>`. A first component without `.` or `:` (and not
    /// `localhost`) means Docker Hub, like docker and containerd.
    pub fn parse(s: &str) -> Result<BlobRef, String> {
        let (name, digest) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: expected NAME@sha256:DIGEST"))?;
        lazyblk_image_format::parse_digest(digest).map_err(|e| e.to_string())?;
        let (registry, repository) = split_name(name);
        if repository.is_empty()
            || !repository
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
        {
            return Err(format!("{s:?}: invalid repository name {repository:?}"));
        }
        Ok(BlobRef {
            registry,
            repository,
            digest: digest.to_string(),
        })
    }
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Use plain HTTP for the registry (only for registries you mark insecure).
    pub plain_http: bool,
    /// containerd-style `certs.d` directory with `<host>/hosts.toml` (mirrors, TLS, per-host scheme).
    pub hosts_dir: Option<PathBuf>,
    /// Docker config file (default: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
}

pub use super::credentials::{docker_credentials, Credentials};
pub use super::hosts::{Capabilities, Endpoint};

/// The endpoints for `registry`: `hosts.toml` hosts in file order, then the server (see
/// [`super::hosts`]).
pub fn endpoints(registry: &str, opts: &RegistryOptions) -> Result<Vec<Endpoint>, String> {
    super::hosts::endpoints(&super::hosts::HostsQuery {
        registry,
        default_scheme: if opts.plain_http { "http" } else { "https" },
        hosts_dir: opts.hosts_dir.as_deref(),
    })
}

/// An authenticated client for one repository of one registry: endpoints (mirrors for pulls), each
/// with its own TLS client, and the auth state (credentials per origin, tokens per scope).
pub struct RepoClient {
    /// Registry host.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    endpoints: Vec<Endpoint>,
    /// Per endpoint (same order as `endpoints`), an HTTP client of its TLS settings for each lane:
    /// demand reads and bulk fetches never share a connection ([`super::lane`]).
    clients: Vec<Lanes>,
    push: bool,
    auth: super::auth::Authorizer,
}

/// An endpoint's HTTP clients, one per [`Lane`].
struct Lanes {
    demand: reqwest::Client,
    bulk: reqwest::Client,
}

impl Lanes {
    fn on(&self, lane: Lane) -> &reqwest::Client {
        match lane {
            Lane::Demand => &self.demand,
            Lane::Bulk => &self.bulk,
        }
    }
}

/// `scheme://host:port` of `u` (the unit credentials and tokens are scoped to).
pub fn origin_of(u: &Url) -> String {
    u.origin().ascii_serialization()
}

/// Whether credentials may travel to `u`: HTTPS, or plain HTTP to a loopback address.
pub fn secure_channel(u: &Url) -> bool {
    if u.scheme() == "https" {
        return true;
    }
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Whether credentials of the registry at `endpoint` may go to token realm `realm`: over a secure
/// channel, and either the same host (any port), or (both HTTPS) a host under the registry's parent domain
/// (`registry-1.docker.io` → `auth.docker.io`, `registry.gitlab.com` → `gitlab.com`).
pub fn realm_may_get_credentials(endpoint: &Url, realm: &Url) -> bool {
    if !secure_channel(realm) || !secure_channel(endpoint) {
        return false;
    }
    // The same host on another port: the same machine and operator (docker_auth's usual layout,
    // registry on :5000 and token server on :5001).
    if endpoint.host() == realm.host() {
        return true;
    }
    if endpoint.scheme() != "https" || realm.scheme() != "https" {
        return false;
    }
    let (Some(url::Host::Domain(e)), Some(url::Host::Domain(r))) = (endpoint.host(), realm.host())
    else {
        return false;
    };
    let labels: Vec<&str> = e.split('.').collect();
    if labels.len() < 2 {
        return false;
    }
    let parent = labels[labels.len() - 2..].join(".");
    r == parent || r.ends_with(&format!(".{parent}"))
}

/// The host (`host[:port]`) credentials are filed under for endpoint `ep` of `registry`.
fn credential_host(ep: &Endpoint, registry: &str) -> Option<String> {
    if !ep.mirror {
        return Some(registry.to_string());
    }
    match (ep.base.host_str(), ep.base.port()) {
        (Some(h), Some(p)) => Some(format!("{h}:{p}")),
        (Some(h), None) => Some(h.to_string()),
        _ => None,
    }
}

impl RepoClient {
    /// A client for `registry/repository`; `push` asks tokens for `pull,push` and skips mirrors.
    /// `client` serves endpoints with default TLS; others get a shared client for their settings.
    /// Credentials: the process keychain's for this repository (run-time pull secrets), else the
    /// docker config's, per endpoint host.
    pub fn new(
        client: reqwest::Client,
        registry: &str,
        repository: &str,
        opts: &RegistryOptions,
        push: bool,
    ) -> Result<RepoClient, String> {
        let endpoints = endpoints(registry, opts)?;
        let mut creds = std::collections::HashMap::new();
        let mut clients = Vec::with_capacity(endpoints.len());
        for ep in &endpoints {
            let on = |lane| {
                super::tls::shared_client_on(lane, &ep.tls, build_client)
                    .map_err(|e| format!("TLS settings for {}: {e}", ep.base))
            };
            clients.push(Lanes {
                demand: if ep.tls.is_default() {
                    client.clone()
                } else {
                    on(Lane::Demand)?
                },
                bulk: on(Lane::Bulk)?,
            });
            let Some(host) = credential_host(ep, registry) else {
                continue;
            };
            if let Some(c) = docker_credentials(&host, opts.docker_config.as_deref()) {
                creds.insert(origin_of(&ep.base), c);
            }
        }
        let server_origin = origin_of(&endpoints.last().expect("a server endpoint").base);
        let scope = if push {
            format!("repository:{repository}:pull,push")
        } else {
            format!("repository:{repository}:pull")
        };
        Ok(RepoClient {
            registry: registry.to_string(),
            repository: repository.to_string(),
            endpoints,
            clients,
            push,
            auth: super::auth::Authorizer::new(creds, scope).with_keychain(
                &server_origin,
                registry,
                repository,
            ),
        })
    }

    /// The HTTP client for requests to `url`: its endpoint's (TLS settings), or the registry
    /// server's for anything else (a redirect to object storage); the running task's lane's.
    pub fn http_for(&self, url: &Url) -> &reqwest::Client {
        let origin = origin_of(url);
        let i = self
            .endpoints
            .iter()
            .position(|e| origin_of(&e.base) == origin)
            .unwrap_or(self.endpoints.len() - 1);
        self.clients[i].on(lane::current())
    }

    /// The registry server's HTTP client (the running task's lane's).
    pub fn http(&self) -> &reqwest::Client {
        self.clients
            .last()
            .expect("endpoints always end with the server")
            .on(lane::current())
    }

    /// Tokens fetched from token realms so far.
    pub fn tokens_fetched(&self) -> u64 {
        self.auth.tokens_fetched()
    }

    /// `<endpoint API root>/<repository>/<path>` (mirrors get `?ns=`).
    pub fn url(&self, ep: &Endpoint, path: &str) -> Url {
        let mut u = ep.base.clone();
        let full = format!(
            "{}/{}/{}",
            u.path().trim_end_matches('/'),
            self.repository,
            path
        );
        u.set_path(&full);
        if ep.mirror {
            u.query_pairs_mut().append_pair("ns", &self.registry);
        }
        u
    }

    /// The registry itself (not a mirror).
    pub fn origin(&self) -> &Endpoint {
        self.endpoints
            .iter()
            .find(|e| !e.mirror)
            .expect("endpoints always end with the server")
    }

    /// Sends a request built by `build` for `url`, answering one 401 challenge.
    pub async fn send_url(
        &self,
        url: &Url,
        build: &(dyn Fn(&reqwest::Client, Url) -> reqwest::RequestBuilder + Sync),
    ) -> Result<reqwest::Response, FetchError> {
        let what = redact(url);
        let origin = origin_of(url);
        // Credentials and tokens only for the endpoints of this client, each its own: a URL on any
        // other origin (an upload Location elsewhere, say) gets no Authorization header at all.
        let endpoint = self.endpoints.iter().find(|e| origin_of(&e.base) == origin);
        let http = self.http_for(url);
        let mut challenge_seen = None;
        loop {
            let mut rb = build(http, url.clone());
            if let Some(ep) = endpoint {
                for (k, v) in &ep.headers {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                if let Some(h) = self.auth.header(http, &origin).await? {
                    rb = rb.header(AUTHORIZATION, h);
                }
            }
            let resp = rb.send().await.map_err(|e| classify(e, &what))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && challenge_seen.is_none() && endpoint.is_some()
            {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.auth.answer(http, url, &challenge, &what).await?;
                challenge_seen = Some(challenge);
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(|c| format!(" (it asked for {c})"))
                    .unwrap_or_default();
                let body = super::remote::read_body(resp, 4096, &what)
                    .await
                    .unwrap_or_default();
                return Err(FetchError::permanent(
                    "auth",
                    format!(
                        "{what}: HTTP {status}{}{challenge}: check the credentials for {origin}",
                        super::remote::error_body_summary(&body)
                    ),
                ));
            }
            return Ok(resp);
        }
    }

    /// Sends to `path` under the repository: hosts able to serve it first (mirrors with `pull` for
    /// blobs and digests, `resolve` for tags), then the registry; pushes go to the registry only.
    pub async fn send(
        &self,
        path: &str,
        build: &(dyn Fn(&reqwest::Client, Url) -> reqwest::RequestBuilder + Sync),
    ) -> Result<reqwest::Response, FetchError> {
        self.send_with(path, build, false).await
    }

    /// [`RepoClient::send`] for a request with a `Range` header: a mirror answering 200 (the whole
    /// blob: a pull-through cache that does not hold it yet streams it while it stores it) is passed
    /// over for the next endpoint, so one cold read never costs a whole blob.
    pub async fn send_ranged(
        &self,
        path: &str,
        build: &(dyn Fn(&reqwest::Client, Url) -> reqwest::RequestBuilder + Sync),
    ) -> Result<reqwest::Response, FetchError> {
        self.send_with(path, build, true).await
    }

    async fn send_with(
        &self,
        path: &str,
        build: &(dyn Fn(&reqwest::Client, Url) -> reqwest::RequestBuilder + Sync),
        ranged: bool,
    ) -> Result<reqwest::Response, FetchError> {
        let by_tag = path
            .strip_prefix("manifests/")
            .is_some_and(|r| !r.contains(':'));
        let able = |e: &Endpoint| {
            if !e.mirror {
                return true;
            }
            if self.push {
                return false;
            }
            if by_tag {
                e.capabilities.resolve
            } else {
                e.capabilities.pull
            }
        };
        let mut last = None;
        for ep in self.endpoints.iter().filter(|e| able(e)) {
            let url = self.url(ep, path);
            match self.send_url(&url, build).await {
                Ok(r) if ep.mirror && ranged && r.status() == StatusCode::OK => {
                    tracing::debug!(mirror = %redact(&ep.base), "mirror answered a range with the whole blob (a pull-through cache filling?); trying the next endpoint");
                    last = Some(FetchError::transient(
                        "mirror",
                        format!("{}: 200 instead of 206 for a range", redact(&url)),
                    ));
                }
                Ok(r) if ep.mirror && !(r.status().is_success() || r.status().is_redirection()) => {
                    tracing::debug!(mirror = %redact(&ep.base), status = %r.status(), "mirror cannot serve this; trying the next endpoint");
                    last = Some(FetchError::transient(
                        "mirror",
                        format!("{}: HTTP {}", redact(&url), r.status()),
                    ));
                }
                Ok(r) => return Ok(r),
                Err(e) if ep.mirror => {
                    tracing::debug!(mirror = %redact(&ep.base), error = %e, "mirror failed, trying the next endpoint");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| FetchError::permanent("config", "no endpoints")))
    }
}

/// Ranged reads of one blob from a registry.
pub struct RegistryBlob {
    repo: Arc<RepoClient>,
    blob: BlobRef,
    redirect: Mutex<Option<Url>>,
}

impl RegistryBlob {
    /// A reader for `blob`. `client` must not follow redirects (see [`registry_client`]).
    pub fn new(
        client: reqwest::Client,
        blob: BlobRef,
        opts: &RegistryOptions,
    ) -> Result<RegistryBlob, String> {
        Ok(RegistryBlob::with_session(
            Arc::new(RepoClient::new(
                client,
                &blob.registry,
                &blob.repository,
                opts,
                false,
            )?),
            blob,
        ))
    }

    /// A reader for `blob` through a repository session shared with other layers (connections,
    /// tokens): see [`Sessions`].
    pub fn with_session(repo: Arc<RepoClient>, blob: BlobRef) -> RegistryBlob {
        RegistryBlob {
            repo,
            blob,
            redirect: Mutex::new(None),
        }
    }

    /// Sends GET (or HEAD) for the blob with `range`, following (and caching) a redirect.
    async fn send(
        &self,
        head: bool,
        range: Option<&Range<u64>>,
    ) -> Result<reqwest::Response, FetchError> {
        let build = move |c: &reqwest::Client, u: Url| {
            let rb = if head { c.head(u) } else { c.get(u) };
            match range {
                Some(r) => rb.header(RANGE, format!("bytes={}-{}", r.start, r.end - 1)),
                None => rb,
            }
        };
        // A cached object-store URL first (no registry credentials go there).
        let cached = self.redirect.lock().expect("redirect lock").clone();
        if let Some(url) = cached.filter(|_| !head) {
            match build(self.repo.http(), url.clone()).send().await {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) => {
                    tracing::debug!(status = %r.status(), url = %redact(&url), "cached redirect target refused; asking the registry again");
                    *self.redirect.lock().expect("redirect lock") = None;
                }
                Err(e) => return Err(classify(e, &redact(&url))),
            }
        }
        let path = format!("blobs/{}", self.blob.digest);
        let resp = if range.is_some() {
            self.repo.send_ranged(&path, &build).await?
        } else {
            self.repo.send(&path, &build).await?
        };
        if !resp.status().is_redirection() {
            return Ok(resp);
        }
        let target = redirect_target(&resp)?;
        let resp = build(self.repo.http(), target.clone())
            .send()
            .await
            .map_err(|e| classify(e, &redact(&target)))?;
        if resp.status().is_success() && !head {
            *self.redirect.lock().expect("redirect lock") = Some(target);
        }
        Ok(resp)
    }
}

/// Where a 3xx response points (its Location resolved against the request URL).
pub fn redirect_target(resp: &reqwest::Response) -> Result<Url, FetchError> {
    let base = resp.url();
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            FetchError::permanent(
                "http_4xx",
                format!("{}: redirect without Location", redact(base)),
            )
        })?;
    base.join(loc).map_err(|e| {
        FetchError::permanent("http_4xx", format!("{}: bad redirect: {e}", redact(base)))
    })
}

/// `Authorization: Basic ...` for `c`, marked sensitive.
pub fn basic_header(c: &Credentials) -> HeaderValue {
    let raw =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    let mut h =
        HeaderValue::from_str(&format!("Basic {raw}")).expect("base64 is a valid header value");
    h.set_sensitive(true);
    h
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
pub fn parse_challenge(s: &str) -> (String, Vec<(String, String)>) {
    let s = s.trim();
    let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_string(), &q[end + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        params.push((k, v));
        rest = tail.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    (scheme.to_string(), params)
}

/// One registry session per (registry, repository, access options), shared by every layer of that
/// repository on the node: one connection pool (HTTP/2 where offered), one token cache.
pub struct Sessions {
    client: reqwest::Client,
    repos: Mutex<std::collections::HashMap<String, Arc<RepoClient>>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            client: registry_client(),
            repos: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl Sessions {
    /// The shared HTTP client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The session for `registry/repository` with `opts` (made on first use).
    pub fn repo(
        &self,
        registry: &str,
        repository: &str,
        opts: &RegistryOptions,
    ) -> Result<Arc<RepoClient>, String> {
        let key = format!(
            "{registry}/{repository}|{}|{:?}|{:?}",
            opts.plain_http, opts.hosts_dir, opts.docker_config
        );
        let mut repos = self.repos.lock().expect("sessions lock");
        if let Some(r) = repos.get(&key) {
            return Ok(r.clone());
        }
        let r = Arc::new(RepoClient::new(
            self.client.clone(),
            registry,
            repository,
            opts,
            false,
        )?);
        repos.insert(key, r.clone());
        Ok(r)
    }

    /// Repository sessions open now.
    pub fn len(&self) -> usize {
        self.repos.lock().expect("sessions lock").len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An HTTP client for registries with default TLS (the system trust store): no automatic redirects
/// (they are handled and cached here), HTTP/2 when offered, bounded connect time. One per process.
pub fn registry_client() -> reqwest::Client {
    super::tls::shared_client(&super::tls::TlsSettings::default(), build_client)
        .expect("the default TLS settings always build")
}

/// A registry HTTP client for TLS settings `s`.
fn build_client(s: &super::tls::TlsSettings) -> Result<reqwest::Client, String> {
    super::tls::client_builder(s)?
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        // No answer (headers or body bytes) within this: the attempt fails and is retried.
        .read_timeout(super::remote::body_idle())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .user_agent(concat!("lazyblk/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| super::remote::with_causes(&e))
}

impl RangeReader for RegistryBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            let resp = self.send(false, Some(&range)).await?;
            let r = ranged_body(resp, &range, &self.describe()).await;
            if r.is_err() {
                // A redirect target that answered badly (200 ignoring Range, short or long 206)
                // is not reused: the registry is asked again next time.
                self.distrust();
            }
            r
        })
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, FetchError>> {
        Box::pin(async move {
            let resp = self.send(true, None).await?;
            head_size(&resp, &self.describe())
        })
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}@{}",
            self.blob.registry, self.blob.repository, self.blob.digest
        )
    }

    fn distrust(&self) {
        if self
            .redirect
            .lock()
            .expect("redirect lock")
            .take()
            .is_some()
        {
            tracing::debug!(blob = %self.describe(), "dropped the cached redirect target");
        }
    }
}

/// Uploads `data` as a blob of `repository` at `base` (`http(s)://host[:port]`) with a monolithic upload,
/// unless the registry already has it. Returns the blob's `sha256:` digest. (Anonymous push; the image
/// converter builds on this with auth, chunked uploads and cross-repository mounts.)
pub async fn push_blob(
    client: &reqwest::Client,
    base: &Url,
    repository: &str,
    data: Bytes,
) -> Result<String, FetchError> {
    let digest = lazyblk_image_format::digest_string(&lazyblk_image_format::sha256(&data));
    let head = base
        .join(&format!("/v2/{repository}/blobs/{digest}"))
        .map_err(|e| FetchError::permanent("config", e.to_string()))?;
    let what = redact(&head);
    let r = client
        .head(head.clone())
        .send()
        .await
        .map_err(|e| classify(e, &what))?;
    if r.status().is_success() {
        return Ok(digest);
    }
    let start = base
        .join(&format!("/v2/{repository}/blobs/uploads/"))
        .map_err(|e| FetchError::permanent("config", e.to_string()))?;
    let r = client
        .post(start.clone())
        .send()
        .await
        .map_err(|e| classify(e, &what))?;
    if r.status() != StatusCode::ACCEPTED {
        return Err(FetchError::permanent(
            "http_4xx",
            format!("{}: upload start: HTTP {}", redact(&start), r.status()),
        ));
    }
    let loc = r
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| FetchError::permanent("http_4xx", "upload start: no Location"))?;
    let mut put = start
        .join(loc)
        .map_err(|e| FetchError::permanent("http_4xx", e.to_string()))?;
    put.query_pairs_mut().append_pair("digest", &digest);
    let r = client
        .put(put.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(data)
        .send()
        .await
        .map_err(|e| classify(e, &what))?;
    if r.status() != StatusCode::CREATED {
        return Err(FetchError::permanent(
            "http_4xx",
            format!("{}: upload: HTTP {}", redact(&put), r.status()),
        ));
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = BlobRef::parse(&format!("127.0.0.1:5000/team/app@{d}")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "team/app")
        );
        let r = BlobRef::parse(&format!("busybox@{d}")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("registry-1.docker.io", "library/busybox")
        );
        let r = BlobRef::parse(&format!("localhost/x@{d}")).unwrap();
        assert_eq!(r.registry, "localhost");
        assert!(BlobRef::parse("host/x@sha256:zz").is_err());
        assert!(BlobRef::parse(&format!("host.io/UPPER@{d}")).is_err());
        assert!(BlobRef::parse("host.io/x").is_err());
    }

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((s.as_str(), p.len()), ("Basic", 1));
    }

    #[test]
    fn docker_config_and_hosts_toml() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &cfg,
            format!(r#"{{"auths":{{"reg.example:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let c = docker_credentials("reg.example:5000", Some(&cfg)).unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "credentials must not print"
        );
        assert!(docker_credentials("other.example", Some(&cfg)).is_none());
        std::fs::create_dir_all(dir.path().join("reg.example:5000")).unwrap();
        std::fs::write(
            dir.path().join("reg.example:5000/hosts.toml"),
            "server = \"http://reg.example:5000\"\n[host.\"http://127.0.0.1:6000\"]\ncapabilities = [\"pull\", \"resolve\"]\n[host.\"http://127.0.0.1:7000\"]\ncapabilities = [\"resolve\"]\n",
        )
        .unwrap();
        let opts = RegistryOptions {
            hosts_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let eps = endpoints("reg.example:5000", &opts).unwrap();
        assert_eq!(eps.len(), 3);
        assert!(eps[0].mirror && eps[0].base.as_str().starts_with("http://127.0.0.1:6000"));
        assert!(eps[1].mirror && !eps[1].capabilities.pull && eps[1].capabilities.resolve);
        assert_eq!(eps[2].base.scheme(), "http");
        let plain = endpoints("x.example", &RegistryOptions::default()).unwrap();
        assert_eq!(plain[0].base.scheme(), "https");
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn hosts_toml_mirrors_come_in_file_order_then_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("reg.example");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            "server = \"https://reg.example\"\n\
             [host.\"https://zeta.mirror\"]\n  capabilities = [\"pull\"]\n\
             [host.\"https://alpha.mirror\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
             [host.\"https://push-only.mirror\"]\n  capabilities = [\"push\"]\n",
        )
        .unwrap();
        let opts = RegistryOptions {
            hosts_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let eps: Vec<String> = endpoints("reg.example", &opts)
            .unwrap()
            .into_iter()
            .filter(|e| e.capabilities.pull)
            .map(|e| e.base.to_string())
            .collect();
        assert_eq!(
            eps,
            [
                "https://zeta.mirror/v2",
                "https://alpha.mirror/v2",
                "https://reg.example/v2"
            ]
        );
    }

    #[test]
    fn docker_hub_names() {
        for (name, want) in [
            (
                "docker.io/library/nginx",
                ("registry-1.docker.io", "library/nginx"),
            ),
            ("docker.io/nginx", ("registry-1.docker.io", "library/nginx")),
            ("index.docker.io/x/y", ("registry-1.docker.io", "x/y")),
            ("nginx", ("registry-1.docker.io", "library/nginx")),
            ("localhost:5000/app", ("localhost:5000", "app")),
        ] {
            let (r, p) = split_name(name);
            assert_eq!((r.as_str(), p.as_str()), want, "{name}");
        }
        let b = BlobRef::parse(&format!("docker.io/nginx@sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(
            (b.registry.as_str(), b.repository.as_str()),
            ("registry-1.docker.io", "library/nginx")
        );
    }
}
