//! Where stored chunk bytes come from: a local blob file or HTTP range requests.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::BoxFuture;

/// A failed range fetch. `retryable` says whether trying again may help (network errors, 5xx,
/// truncated bodies) or not (404, auth refused, bad request).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// Human-readable cause, including the URL or path and the range.
    pub message: String,
    /// Whether a retry may succeed.
    pub retryable: bool,
    /// A short label for metrics (`network`, `http_5xx`, `truncated`, `http_4xx`, `auth`, `io`).
    pub kind: &'static str,
}

impl FetchError {
    /// A retryable error.
    pub fn transient(kind: &'static str, message: impl Into<String>) -> Self {
        FetchError {
            message: message.into(),
            retryable: true,
            kind,
        }
    }
    /// A permanent error.
    pub fn permanent(kind: &'static str, message: impl Into<String>) -> Self {
        FetchError {
            message: message.into(),
            retryable: false,
            kind,
        }
    }
}

/// Byte-range access to a blob.
pub trait RangeReader: Send + Sync + 'static {
    /// Fetches exactly `range` (an error if fewer bytes arrive).
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>>;
    /// Total blob size.
    fn size(&self) -> BoxFuture<'_, Result<u64, FetchError>>;
    /// What this is, for logs (never contains credentials).
    fn describe(&self) -> String;
    /// Bytes read from here failed verification: forget any shortcut (a cached redirect target)
    /// so the next attempt asks the source of truth again.
    fn distrust(&self) {}
}

/// A blob in a local file.
pub struct FileRange {
    path: std::path::PathBuf,
    file: Arc<std::fs::File>,
}

impl FileRange {
    /// Opens `path`.
    pub fn open(path: &std::path::Path) -> std::io::Result<FileRange> {
        Ok(FileRange {
            path: path.to_path_buf(),
            file: Arc::new(std::fs::File::open(path)?),
        })
    }
}

impl RangeReader for FileRange {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        let file = self.file.clone();
        let path = self.path.display().to_string();
        Box::pin(async move {
            let len = (range.end - range.start) as usize;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, range.start)
                    .map(|_| Bytes::from(buf))
                    .map_err(|e| {
                        FetchError::permanent("io", format!("{path}: reading {range:?}: {e}"))
                    })
            })
            .await
            .map_err(|e| FetchError::permanent("io", e.to_string()))?
        })
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, FetchError>> {
        let r = self.file.metadata().map(|m| m.len());
        let path = self.path.display().to_string();
        Box::pin(async move { r.map_err(|e| FetchError::permanent("io", format!("{path}: {e}"))) })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Classifies a reqwest error.
pub fn classify(e: reqwest::Error, what: &str) -> FetchError {
    // Never print the URL's query string: presigned object-store URLs carry credentials there.
    let e = e.without_url();
    if let Some(tls) = super::tls::explain(&e) {
        // A certificate problem does not go away by retrying.
        return FetchError::permanent("tls", format!("{what}: {tls}"));
    }
    FetchError::transient("network", format!("{what}: {}", with_causes(&e)))
}

/// `": CODE: message (detail)"` from an OCI error body (`{"errors":[{"code","message","detail"}]}`),
/// or `": <text>"` for a short non-JSON body, or nothing; for messages after an HTTP status.
pub fn error_body_summary(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<OciError>,
    }
    #[derive(serde::Deserialize)]
    struct OciError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        detail: serde_json::Value,
    }
    let clip = |s: &str| s.chars().take(300).collect::<String>();
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|x| {
                let mut m = format!("{}: {}", x.code, x.message);
                if !x.detail.is_null() {
                    m.push_str(&format!(" ({})", clip(&x.detail.to_string())));
                }
                m
            })
            .collect();
        if !parts.is_empty() {
            return format!(": {}", clip(&parts.join("; ")));
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() || text.starts_with('<') {
        return String::new();
    }
    format!(": {}", clip(&text.replace(['\r', '\n'], " ")))
}

/// An error and its causes, `a: b: c` (reqwest's own message, "error sending request", says
/// nothing of why: connection refused, DNS, TLS issuer...).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// How long a registry answer may send nothing (headers or body) before the attempt is abandoned,
/// and the window over which it must send at least [`MIN_BYTES_PER_WINDOW`] (a trickle of a byte a
/// second is abandoned too). `LAZYBLK_BODY_IDLE_SECS` overrides the 30 s default (tests).
pub fn body_idle() -> std::time::Duration {
    static IDLE: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *IDLE.get_or_init(|| {
        let secs = std::env::var("LAZYBLK_BODY_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .unwrap_or(30);
        std::time::Duration::from_secs(secs)
    })
}

/// Least bytes a body must deliver per [`body_idle`] window (or finish).
pub const MIN_BYTES_PER_WINDOW: u64 = 64 << 10;

/// Paces a response body: each chunk must come within [`body_idle`], and every window of that
/// length must bring [`MIN_BYTES_PER_WINDOW`] bytes.
pub struct BodyPace {
    window_start: std::time::Instant,
    in_window: u64,
}

impl Default for BodyPace {
    fn default() -> Self {
        BodyPace {
            window_start: std::time::Instant::now(),
            in_window: 0,
        }
    }
}

impl BodyPace {
    /// The next chunk of `resp` (None at its end), or a transient error when the sender stalls or
    /// trickles.
    pub async fn next(
        &mut self,
        resp: &mut reqwest::Response,
        what: &str,
    ) -> Result<Option<Bytes>, FetchError> {
        let idle = body_idle();
        let chunk = tokio::time::timeout(idle, resp.chunk())
            .await
            .map_err(|_| {
                FetchError::transient(
                    "timeout",
                    format!("{what}: no data for {} s", idle.as_secs()),
                )
            })?
            .map_err(|e| {
                FetchError::transient(
                    "truncated",
                    format!(
                        "{what}: reading the body: {}",
                        with_causes(&e.without_url())
                    ),
                )
            })?;
        if let Some(c) = &chunk {
            self.in_window += c.len() as u64;
            if self.window_start.elapsed() >= idle {
                if self.in_window < MIN_BYTES_PER_WINDOW {
                    return Err(FetchError::transient(
                        "timeout",
                        format!(
                            "{what}: too slow ({} bytes in {} s)",
                            self.in_window,
                            idle.as_secs()
                        ),
                    ));
                }
                self.window_start = std::time::Instant::now();
                self.in_window = 0;
            }
        }
        Ok(chunk)
    }
}

/// The whole body of `resp`, refused (without reading further) once it is over `limit` bytes,
/// whatever Content-Length or chunked encoding say; paced like [`BodyPace`].
pub async fn read_body(
    mut resp: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Bytes, FetchError> {
    let too_big = || {
        FetchError::permanent(
            "too_large",
            format!("{what}: response body over the {limit}-byte limit"),
        )
    };
    if content_length(&resp).is_some_and(|l| l > limit) {
        return Err(too_big());
    }
    let mut pace = BodyPace::default();
    let mut buf = bytes::BytesMut::new();
    while let Some(c) = pace.next(&mut resp, what).await? {
        if buf.len() as u64 + c.len() as u64 > limit {
            return Err(too_big());
        }
        buf.extend_from_slice(&c);
    }
    Ok(buf.freeze())
}

/// Reads a ranged response body, checking status and length.
pub async fn ranged_body(
    resp: reqwest::Response,
    range: &Range<u64>,
    what: &str,
) -> Result<Bytes, FetchError> {
    let status = resp.status();
    let want = range.end - range.start;
    if status == reqwest::StatusCode::PARTIAL_CONTENT {
        // Never more than the range asked for is read (a longer answer is wrong anyway).
        let body = match read_body(resp, want, &format!("{what}: range {range:?}")).await {
            Ok(b) => b,
            Err(e) if e.kind == "too_large" => {
                return Err(FetchError::transient(
                    "truncated",
                    format!("{what}: range {range:?}: more than the {want} bytes asked for"),
                ))
            }
            Err(e) => return Err(e),
        };
        if body.len() as u64 != want {
            return Err(FetchError::transient(
                "truncated",
                format!(
                    "{what}: range {range:?}: got {} of {want} bytes",
                    body.len()
                ),
            ));
        }
        return Ok(body);
    }
    if status == reqwest::StatusCode::OK {
        // A server that ignores Range: only acceptable if the whole blob is what we asked for.
        return Err(FetchError::permanent(
            "http_no_range",
            format!("{what}: server ignored the Range header (200 instead of 206)"),
        ));
    }
    let kind = if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        "http_5xx"
    } else {
        "http_4xx"
    };
    let retryable = kind == "http_5xx" || status == reqwest::StatusCode::REQUEST_TIMEOUT;
    let body = read_body(resp, 4096, what).await.unwrap_or_default();
    Err(FetchError {
        message: format!(
            "{what}: HTTP {status} for range {range:?}{}",
            error_body_summary(&body)
        ),
        retryable,
        kind,
    })
}

/// A blob at a plain `http(s)://` URL.
pub struct HttpRange {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HttpRange {
    /// A reader for `url`.
    pub fn new(client: reqwest::Client, url: reqwest::Url) -> HttpRange {
        HttpRange { client, url }
    }
}

/// The URL without query string or credentials, for logs.
pub fn redact(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

impl RangeReader for HttpRange {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            let what = redact(&self.url);
            let resp = self
                .client
                .get(self.url.clone())
                .header(
                    reqwest::header::RANGE,
                    format!("bytes={}-{}", range.start, range.end - 1),
                )
                .send()
                .await
                .map_err(|e| classify(e, &what))?;
            ranged_body(resp, &range, &what).await
        })
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, FetchError>> {
        Box::pin(async move {
            let what = redact(&self.url);
            let resp = self
                .client
                .head(self.url.clone())
                .send()
                .await
                .map_err(|e| classify(e, &what))?;
            head_size(&resp, &what)
        })
    }

    fn describe(&self) -> String {
        redact(&self.url)
    }
}

/// The blob size from a HEAD response: its status must be 2xx and it must carry Content-Length.
pub fn head_size(resp: &reqwest::Response, what: &str) -> Result<u64, FetchError> {
    let status = resp.status();
    if !status.is_success() {
        return Err(FetchError {
            message: format!("{what}: HTTP {status} for HEAD"),
            retryable: status.is_server_error(),
            kind: if status.is_server_error() {
                "http_5xx"
            } else {
                "http_4xx"
            },
        });
    }
    content_length(resp)
        .ok_or_else(|| FetchError::permanent("http_4xx", format!("{what}: no Content-Length")))
}

/// The Content-Length header of a response (reqwest's `content_length` is 0 for HEAD).
pub fn content_length(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod error_body_tests {
    use super::error_body_summary;

    #[test]
    fn oci_error_bodies_are_summarised() {
        let b = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v9"}}]}"#;
        assert_eq!(
            error_body_summary(b),
            r#": MANIFEST_UNKNOWN: manifest unknown ({"Tag":"v9"})"#
        );
        assert_eq!(
            error_body_summary(b"quota exceeded\r\n"),
            ": quota exceeded"
        );
        assert_eq!(error_body_summary(b"<html>502 Bad Gateway</html>"), "");
        assert_eq!(error_body_summary(b""), "");
        assert!(error_body_summary(&[b'x'; 5000]).len() < 400);
    }
}
