//! Retries of fetches: exponential backoff with jitter, bounded by a deadline, then a loud failure.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::engine::EngineOptions;
use super::metrics::Metrics;
use super::remote::FetchError;

/// Calls `f` with retries (exponential backoff with jitter) until it succeeds, fails permanently, or the
/// deadline passes. Returns the last error otherwise.
pub async fn with_retries<T, F, Fut>(
    opts: &EngineOptions,
    metrics: &Metrics,
    deadline: Instant,
    mut f: F,
) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, FetchError>>,
{
    let mut attempt: u32 = 0;
    loop {
        let res = match tokio::time::timeout_at(deadline.into(), f()).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::permanent("deadline", "deadline exceeded")),
        };
        let err = match res {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        metrics.error(err.kind);
        if !err.retryable {
            return Err(err);
        }
        let exp = opts
            .retry_base
            .saturating_mul(1 << attempt.min(16))
            .min(opts.retry_max);
        let delay = exp.mul_f64(0.5 + 0.5 * jitter());
        if Instant::now() + delay >= deadline {
            return Err(FetchError::permanent(
                err.kind,
                format!(
                    "{} (gave up after {} attempts: deadline)",
                    err.message,
                    attempt + 1
                ),
            ));
        }
        metrics.fetch_retries.fetch_add(1, Relaxed);
        tracing::debug!(attempt, error = %err, delay_ms = delay.as_millis() as u64, "retrying");
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// A cheap pseudo-random number in `[0, 1)` for retry jitter.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
