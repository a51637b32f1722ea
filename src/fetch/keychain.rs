//! Credentials handed to this process at run time (a Kubernetes pull secret the CRI proxy saw in a
//! `PullImage`), each scoped to one registry repository and kept in memory until it expires. Never
//! written to disk, never logged; a restarted process has none until the next pull brings them again.
//! One keychain per process: every registry client of the process consults it (before the docker
//! config) when it talks to that repository's registry.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::credentials::Credentials;

/// Credentials per `(registry, repository)`, with expiry.
#[derive(Default)]
pub struct Keychain {
    entries: Mutex<HashMap<(String, String), (Credentials, Instant)>>,
}

/// The process's keychain.
pub fn global() -> &'static Keychain {
    static K: OnceLock<Keychain> = OnceLock::new();
    K.get_or_init(Keychain::default)
}

impl Keychain {
    /// Keeps `creds` for `registry/repository` for `ttl` (replacing what was there).
    pub fn put(&self, registry: &str, repository: &str, creds: Credentials, ttl: Duration) {
        let mut e = self.entries.lock().expect("keychain lock");
        let now = Instant::now();
        e.retain(|_, (_, until)| *until > now);
        e.insert(
            (registry.to_string(), repository.to_string()),
            (creds, now + ttl),
        );
    }

    /// The live credentials for `registry/repository`, if any.
    pub fn get(&self, registry: &str, repository: &str) -> Option<Credentials> {
        self.get_with_ttl(registry, repository).map(|(c, _)| c)
    }

    /// [`Keychain::get`], with the time they have left.
    pub fn get_with_ttl(
        &self,
        registry: &str,
        repository: &str,
    ) -> Option<(Credentials, Duration)> {
        let e = self.entries.lock().expect("keychain lock");
        let (c, until) = e.get(&(registry.to_string(), repository.to_string()))?;
        let left = until.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then(|| (c.clone(), left))
    }

    /// Repositories with live credentials.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.entries
            .lock()
            .expect("keychain lock")
            .values()
            .filter(|(_, until)| *until > now)
            .count()
    }

    /// Whether no live credentials are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_to_a_repository_and_expiring() {
        let k = Keychain::default();
        k.put(
            "reg.example",
            "team/app",
            Credentials::basic("a", "b"),
            Duration::from_secs(60),
        );
        assert_eq!(
            k.get("reg.example", "team/app"),
            Some(Credentials::basic("a", "b"))
        );
        assert_eq!(k.get("reg.example", "team/other"), None);
        assert_eq!(k.get("other.example", "team/app"), None);
        k.put(
            "reg.example",
            "team/gone",
            Credentials::basic("c", "d"),
            Duration::ZERO,
        );
        assert_eq!(k.get("reg.example", "team/gone"), None);
        assert_eq!(k.len(), 1);
    }
}
