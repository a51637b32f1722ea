//! A docker token service for tests: issues RS256 JWTs (signed with `openssl`) that a real
//! docker-registry configured with `auth: token` verifies.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use base64::Engine as _;

use super::pki::jwt;

static JTI: AtomicU64 = AtomicU64::new(0);

/// A docker token service: `GET /token?service&scope` with basic `alice:s3cret`, or `POST /token` with
/// `grant_type=refresh_token&refresh_token=refresh-ok`; answers RS256 JWTs the registry verifies.
pub struct TokenService {
    pub addr: String,
    pub basic_grants: Arc<AtomicU64>,
    pub refresh_grants: Arc<AtomicU64>,
    pub denied: Arc<AtomicU64>,
}

pub fn token_service(service: &str, issuer: &str, key: PathBuf, cert: PathBuf) -> TokenService {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (basic, refresh, denied) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let (b2, r2, d2) = (basic.clone(), refresh.clone(), denied.clone());
    let (service, issuer) = (service.to_string(), issuer.to_string());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut rd = BufReader::new(s.try_clone().unwrap());
            let mut request = String::new();
            if rd.read_line(&mut request).is_err() {
                continue;
            }
            let mut auth = String::new();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if rd.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                match k.to_ascii_lowercase().as_str() {
                    "authorization" => auth = v.trim().to_string(),
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
            let mut body = vec![0u8; len];
            let _ = rd.read_exact(&mut body);
            let target = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let query = if request.starts_with("POST") {
                String::from_utf8_lossy(&body).to_string()
            } else {
                target
                    .split_once('?')
                    .map(|x| x.1)
                    .unwrap_or("")
                    .to_string()
            };
            let params: std::collections::HashMap<String, String> =
                url::form_urlencoded::parse(query.as_bytes())
                    .into_owned()
                    .collect();
            let basic_ok = auth
                == format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
                );
            let refresh_ok = params.get("grant_type").map(String::as_str) == Some("refresh_token")
                && params.get("refresh_token").map(String::as_str) == Some("refresh-ok");
            let reply = if (basic_ok || refresh_ok) && params.get("service") == Some(&service) {
                if refresh_ok {
                    r2.fetch_add(1, Relaxed);
                } else {
                    b2.fetch_add(1, Relaxed);
                }
                let access: Vec<serde_json::Value> = params
                    .get("scope")
                    .map(|s| s.as_str())
                    .unwrap_or("")
                    .split(' ')
                    .filter_map(|sc| {
                        let mut p = sc.splitn(3, ':');
                        let (t, n, a) = (p.next()?, p.next()?, p.next()?);
                        Some(serde_json::json!({"type": t, "name": n, "actions": a.split(',').collect::<Vec<_>>()}))
                    })
                    .collect();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let claims = serde_json::json!({
                    "iss": issuer, "sub": "alice", "aud": service,
                    "exp": now + 300, "nbf": now - 10, "iat": now,
                    "jti": format!("t{}", JTI.fetch_add(1, Relaxed)), "access": access,
                });
                let t = jwt(&claims, &key, &cert);
                let field = if refresh_ok { "access_token" } else { "token" };
                let b = serde_json::json!({ field: t, "expires_in": 300 }).to_string();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                    b.len()
                )
            } else {
                d2.fetch_add(1, Relaxed);
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = s.write_all(reply.as_bytes());
        }
    });
    TokenService {
        addr,
        basic_grants: basic,
        refresh_grants: refresh,
        denied,
    }
}
