//! A fault-injecting HTTP blob server (a mock, used only for faults a real registry cannot produce on
//! demand): latency, connection resets, 5xx, truncated bodies, flipped bits, down/up. Logs every range.
#![allow(dead_code)]

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
pub struct Faults {
    pub delay: Duration,
    pub errors_503: u32,
    pub resets: u32,
    pub truncations: u32,
    pub bit_flips: u32,
    pub down: bool,
    pub ranges: Vec<Range<u64>>,
}

pub struct FaultyServer {
    pub url: String,
    pub faults: Arc<Mutex<Faults>>,
}

impl FaultyServer {
    pub async fn start(blob: Vec<u8>) -> FaultyServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/blob", listener.local_addr().unwrap());
        let faults = Arc::new(Mutex::new(Faults::default()));
        let blob = Arc::new(blob);
        let f = faults.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (f, blob) = (f.clone(), blob.clone());
                tokio::spawn(async move {
                    let _ = handle(sock, f, blob).await;
                });
            }
        });
        FaultyServer { url, faults }
    }

    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().unwrap());
    }

    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.faults.lock().unwrap().ranges.clone()
    }
}

async fn handle(
    sock: tokio::net::TcpStream,
    faults: Arc<Mutex<Faults>>,
    blob: Arc<Vec<u8>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(sock);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let head = line.starts_with("HEAD");
        let mut range: Option<Range<u64>> = None;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("range: bytes=") {
                let (a, b) = v.trim().split_once('-').unwrap();
                range = Some(a.parse().unwrap()..b.parse::<u64>().unwrap() + 1);
            }
        }
        enum Act {
            Down,
            Reset,
            E503,
            Truncate,
            Flip,
            Ok,
        }
        let (delay, act) = {
            let mut f = faults.lock().unwrap();
            if let Some(rg) = &range {
                f.ranges.push(rg.clone());
            }
            let act = if f.down {
                Act::Down
            } else if f.resets > 0 {
                f.resets -= 1;
                Act::Reset
            } else if f.errors_503 > 0 {
                f.errors_503 -= 1;
                Act::E503
            } else if f.truncations > 0 && range.is_some() {
                f.truncations -= 1;
                Act::Truncate
            } else if f.bit_flips > 0 && range.is_some() {
                f.bit_flips -= 1;
                Act::Flip
            } else {
                Act::Ok
            };
            (f.delay, act)
        };
        tokio::time::sleep(delay).await;
        let sock = r.get_mut();
        match act {
            Act::Down | Act::Reset => return Ok(()),
            Act::E503 => {
                sock.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    .await?;
                continue;
            }
            _ => {}
        }
        if head {
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n\r\n",
                blob.len()
            );
            sock.write_all(resp.as_bytes()).await?;
            continue;
        }
        let Some(rg) = range else {
            sock.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await?;
            continue;
        };
        let end = rg.end.min(blob.len() as u64);
        let mut body = blob[rg.start as usize..end as usize].to_vec();
        let hdr = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\n\r\n",
            body.len(),
            rg.start,
            end - 1,
            blob.len()
        );
        sock.write_all(hdr.as_bytes()).await?;
        match act {
            Act::Truncate => {
                sock.write_all(&body[..body.len() / 2]).await?;
                return Ok(());
            }
            Act::Flip => {
                let mid = body.len() / 2;
                body[mid] ^= 0x08;
            }
            _ => {}
        }
        sock.write_all(&body).await?;
    }
}
