//! Answering registry auth challenges, per endpoint origin: basic credentials, or bearer tokens from the
//! realm the registry names (the docker token protocol: `GET realm?service=…&scope=…` with basic
//! credentials, or the OAuth2 `POST` with `grant_type=refresh_token` for an identity token), cached per
//! scope until shortly before they expire and then refreshed before the next request (not after a 401).

use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;
use tokio::time::Instant;

use super::credentials::Credentials;
use super::registry::{basic_header, parse_challenge, realm_may_get_credentials, secure_channel};
use super::remote::{classify, read_body, redact, FetchError};

/// Lifetime of a token whose answer says none (the docker token spec's default).
const DEFAULT_TOKEN_SECS: u64 = 60;

/// Largest token-service answer read.
const MAX_TOKEN_ANSWER: u64 = 1 << 20;

/// A bearer token and when to stop using it.
#[derive(Clone)]
struct Token {
    header: HeaderValue,
    refresh_at: Instant,
}

/// What an origin asked for and what we hold for it.
enum OriginAuth {
    Basic(HeaderValue),
    Bearer {
        realm: Url,
        service: Option<String>,
        /// The scope requests to this origin use now.
        scope: String,
        tokens: HashMap<String, Token>,
    },
}

/// Auth state of one repository client: credentials per origin, tokens per origin and scope.
pub struct Authorizer {
    creds: HashMap<String, Credentials>,
    /// `(server origin, registry, repository)`: the server's credentials are looked up in the
    /// process keychain first (run-time credentials such as pull secrets).
    keychain_scope: Option<(String, String, String)>,
    default_scope: String,
    state: tokio::sync::Mutex<HashMap<String, OriginAuth>>,
    /// Tokens fetched (for tests and metrics).
    fetched: std::sync::atomic::AtomicU64,
}

/// When a token with `lifetime` fetched now should be replaced: a fifth of its life (at most 30 s)
/// before it expires.
fn refresh_at(now: Instant, lifetime: Duration) -> Instant {
    let margin = (lifetime / 5).min(Duration::from_secs(30));
    now + lifetime - margin
}

impl Authorizer {
    /// An authorizer with `creds` per endpoint origin, asking tokens for `default_scope`
    /// (`repository:NAME:pull` or `…:pull,push`).
    pub fn new(creds: HashMap<String, Credentials>, default_scope: String) -> Authorizer {
        Authorizer {
            creds,
            keychain_scope: None,
            default_scope,
            state: tokio::sync::Mutex::new(HashMap::new()),
            fetched: 0.into(),
        }
    }

    /// Also consults the process keychain for `registry/repository` when talking to `server_origin`.
    pub fn with_keychain(mut self, server_origin: &str, registry: &str, repository: &str) -> Self {
        self.keychain_scope = Some((
            server_origin.to_string(),
            registry.to_string(),
            repository.to_string(),
        ));
        self
    }

    /// The credentials for `origin`: the keychain's (for the server), else the docker config's.
    fn creds(&self, origin: &str) -> Option<Credentials> {
        if let Some((server, registry, repository)) = &self.keychain_scope {
            if server == origin {
                if let Some(c) = super::keychain::global().get(registry, repository) {
                    return Some(c);
                }
            }
        }
        self.creds.get(origin).cloned()
    }

    /// Tokens fetched from realms so far.
    pub fn tokens_fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The Authorization header for a request to `origin`: basic credentials, or the current bearer
    /// token, refreshed first when it is about to expire.
    pub async fn header(
        &self,
        http: &reqwest::Client,
        origin: &str,
    ) -> Result<Option<HeaderValue>, FetchError> {
        let mut state = self.state.lock().await;
        let Some(a) = state.get_mut(origin) else {
            if let Some(t) = self.creds(origin).and_then(|c| c.registry_token) {
                return Ok(Some(bearer(&t)?));
            }
            return Ok(None);
        };
        match a {
            OriginAuth::Basic(h) => Ok(Some(h.clone())),
            OriginAuth::Bearer {
                realm,
                service,
                scope,
                tokens,
            } => {
                if let Some(t) = tokens.get(scope.as_str()) {
                    if Instant::now() < t.refresh_at {
                        return Ok(Some(t.header.clone()));
                    }
                }
                tracing::debug!(origin, scope = %scope, "bearer token about to expire; refreshing");
                let (realm, service, scope) = (realm.clone(), service.clone(), scope.clone());
                let t = self
                    .fetch_token(http, origin, &realm, service.as_deref(), &scope)
                    .await?;
                if let OriginAuth::Bearer { tokens, .. } = a {
                    tokens.insert(scope, t.clone());
                }
                Ok(Some(t.header))
            }
        }
    }

    /// Answers a `WWW-Authenticate` challenge from `endpoint_url` (after a 401).
    pub async fn answer(
        &self,
        http: &reqwest::Client,
        endpoint_url: &Url,
        challenge: &str,
        what: &str,
    ) -> Result<(), FetchError> {
        let (scheme, params) = parse_challenge(challenge);
        let origin = super::registry::origin_of(endpoint_url);
        let creds = self.creds(&origin);
        if scheme.eq_ignore_ascii_case("basic") {
            let c = creds.filter(|c| c.has_password()).ok_or_else(|| {
                FetchError::permanent(
                    "auth",
                    format!("{what}: HTTP 401: the registry wants basic auth and no credentials are configured for {origin} (docker config `auths`, a credential helper, or a pull secret)"),
                )
            })?;
            if !secure_channel(endpoint_url) {
                return Err(FetchError::permanent(
                    "auth",
                    format!("{what}: refusing to send credentials over plain HTTP to a non-loopback host (use HTTPS)"),
                ));
            }
            self.state
                .lock()
                .await
                .insert(origin, OriginAuth::Basic(basic_header(&c)));
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(FetchError::permanent(
                "auth",
                format!("{what}: HTTP 401 with an unsupported auth challenge {scheme:?}"),
            ));
        }
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let realm = param("realm").ok_or_else(|| {
            FetchError::permanent("auth", format!("{what}: bearer challenge without realm"))
        })?;
        let realm = Url::parse(&realm).map_err(|e| {
            FetchError::permanent("auth", format!("{what}: bad realm {realm:?}: {e}"))
        })?;
        let service = param("service");
        // Pushes need pull,push whatever the challenge says; pulls take the registry's scope.
        let scope = match param("scope") {
            Some(s) if !self.default_scope.ends_with(",push") => s,
            _ => self.default_scope.clone(),
        };
        let t = self
            .fetch_token(http, &origin, &realm, service.as_deref(), &scope)
            .await?;
        let mut state = self.state.lock().await;
        let entry = state.entry(origin).or_insert_with(|| OriginAuth::Bearer {
            realm: realm.clone(),
            service: service.clone(),
            scope: scope.clone(),
            tokens: HashMap::new(),
        });
        if let OriginAuth::Basic(_) = entry {
            *entry = OriginAuth::Bearer {
                realm: realm.clone(),
                service: service.clone(),
                scope: scope.clone(),
                tokens: HashMap::new(),
            };
        }
        if let OriginAuth::Bearer {
            realm: r,
            service: sv,
            scope: sc,
            tokens,
        } = entry
        {
            *r = realm;
            *sv = service;
            *sc = scope.clone();
            tokens.insert(scope, t);
        }
        Ok(())
    }

    /// Gets a token for `scope` from `realm`: the OAuth2 refresh-token grant with an identity token,
    /// else the docker token GET (with basic credentials when they may go there).
    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        origin: &str,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, FetchError> {
        let endpoint = Url::parse(origin)
            .map_err(|e| FetchError::permanent("auth", format!("bad origin {origin}: {e}")))?;
        let known = self.creds(origin);
        let had_creds = known.is_some();
        let creds = known.filter(|_| realm_may_get_credentials(&endpoint, realm));
        if had_creds && creds.is_none() {
            tracing::warn!(endpoint = %origin, realm = %redact(realm), "not sending credentials to a token realm on another host or over plain HTTP; asking for an anonymous token");
        }
        let shown = redact(realm);
        let sent = Instant::now();
        let resp = match creds.as_ref().and_then(|c| c.identity_token.as_deref()) {
            Some(refresh) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh),
                    ("client_id", "lazyblk"),
                    ("scope", scope),
                ];
                if let Some(s) = service {
                    form.push(("service", s));
                }
                http.post(realm.clone()).form(&form).send().await
            }
            None => {
                let mut url = realm.clone();
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", scope);
                }
                let mut rb = http.get(url);
                if let Some(c) = creds.as_ref().filter(|c| c.has_password()) {
                    rb = rb.header(AUTHORIZATION, basic_header(c));
                }
                rb.send().await
            }
        }
        .map_err(|e| classify(e, &format!("token endpoint {shown}")))?;
        let status = resp.status();
        if !status.is_success() {
            let body = read_body(resp, 4096, "token endpoint")
                .await
                .unwrap_or_default();
            return Err(FetchError {
                message: format!(
                    "token endpoint {shown} (scope {scope}): HTTP {status}{}",
                    super::remote::error_body_summary(&body)
                ),
                retryable: status.is_server_error(),
                kind: "auth",
            });
        }
        let body = read_body(resp, MAX_TOKEN_ANSWER, "token endpoint").await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            FetchError::transient("auth", format!("token endpoint {shown}: bad answer: {e}"))
        })?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                FetchError::permanent(
                    "auth",
                    format!("token endpoint {shown}: no token in answer"),
                )
            })?;
        let secs = v["expires_in"]
            .as_u64()
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_TOKEN_SECS);
        self.fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Token {
            header: bearer(token)?,
            refresh_at: refresh_at(sent, Duration::from_secs(secs)),
        })
    }
}

fn bearer(token: &str) -> Result<HeaderValue, FetchError> {
    let mut h = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        FetchError::permanent("auth", "token endpoint: token is not a valid header value")
    })?;
    h.set_sensitive(true);
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_replaced_before_they_expire() {
        let now = Instant::now();
        assert_eq!(
            refresh_at(now, Duration::from_secs(60)),
            now + Duration::from_secs(48)
        );
        assert_eq!(
            refresh_at(now, Duration::from_secs(3600)),
            now + Duration::from_secs(3570)
        );
        assert!(refresh_at(now, Duration::from_secs(1)) > now);
    }
}
