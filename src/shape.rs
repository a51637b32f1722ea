//! A userspace network shaper for benchmarks (these kernels have no `netem`): a TCP proxy that delays
//! every byte by half the round-trip time in each direction and serialises each direction through one
//! shared link of a given bandwidth, as a WAN path between a node and a registry does. Every
//! connection through one shaper shares its two links, so parallel fetches compete for bandwidth the
//! way they do on a real path; connection setup pays the round trip too (the upstream connect is made
//! after the delay).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A link profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Round-trip time added (half each way).
    pub rtt: Duration,
    /// Bandwidth of each direction in bits per second (0: unlimited).
    pub bits_per_sec: u64,
}

impl Profile {
    /// `loopback` (nothing added), `region` (2 ms, 1 Gbit/s) or `internet` (30 ms, 200 Mbit/s).
    pub fn named(name: &str) -> Option<Profile> {
        let p = |ms: u64, mbit: u64| Profile {
            rtt: Duration::from_millis(ms),
            bits_per_sec: mbit * 1_000_000,
        };
        match name {
            "loopback" => Some(p(0, 0)),
            "region" => Some(p(2, 1000)),
            "internet" => Some(p(30, 200)),
            _ => None,
        }
    }
}

/// One direction's link: when it is next free to start sending.
struct Link {
    bits_per_sec: u64,
    free_at: Mutex<Instant>,
}

impl Link {
    /// Reserves the link for `n` bytes, after those queued before them (of every connection), and
    /// returns when they will have crossed it. Waits until that moment is at most [`LOOKAHEAD`]
    /// chunks away, so one connection keeps only a few chunks queued on the link (connections
    /// interleave every few chunks, as on a fairly queued path) while timer slack between one chunk
    /// and the next never leaves the link idle (it did: one connection got about 65% of the rate).
    async fn transmit(&self, n: usize) -> Instant {
        if self.bits_per_sec == 0 {
            return Instant::now();
        }
        let wire =
            |bytes: usize| Duration::from_secs_f64(bytes as f64 * 8.0 / self.bits_per_sec as f64);
        let done = {
            let mut free = self.free_at.lock().await;
            let start = (*free).max(Instant::now());
            *free = start + wire(n);
            *free
        };
        let ahead = wire(LOOKAHEAD * CHUNK);
        tokio::time::sleep_until(done.checked_sub(ahead).unwrap_or(done)).await;
        done
    }
}

/// Chunks a pump moves at once.
const CHUNK: usize = 64 << 10;
/// Chunks in flight per direction of a connection (bounds memory: 4 MiB per direction).
const IN_FLIGHT: usize = 64;
/// Chunks a connection may have reserved on the link ahead of it.
const LOOKAHEAD: usize = 4;

/// Copies `from` to `to` through `link`: each chunk is serialised onto the link (after the chunks
/// before it, of every connection sharing the link), then delivered `delay` later.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    delay: Duration,
) {
    let (to_link, mut on_link) = tokio::sync::mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let (to_peer, mut arriving) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if to_link.send(buf).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let wire = tokio::spawn(async move {
        while let Some(buf) = on_link.recv().await {
            let crossed = link.transmit(buf.len()).await;
            if to_peer.send((crossed + delay, buf)).await.is_err() {
                break;
            }
        }
    });
    while let Some((due, buf)) = arriving.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&buf).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    reader.abort();
    wire.abort();
}

/// A running shaper.
pub struct Shaper {
    /// Where it listens (`127.0.0.1:PORT`).
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `listen` and shapes every connection to `upstream` with `profile`.
pub async fn start(listen: &str, upstream: String, profile: Profile) -> std::io::Result<Shaper> {
    let l = TcpListener::bind(listen).await?;
    let addr = l.local_addr()?;
    let up = Arc::new(Link {
        bits_per_sec: profile.bits_per_sec,
        free_at: Mutex::new(Instant::now()),
    });
    let down = Arc::new(Link {
        bits_per_sec: profile.bits_per_sec,
        free_at: Mutex::new(Instant::now()),
    });
    let half = profile.rtt / 2;
    let task = tokio::spawn(async move {
        loop {
            let Ok((client, _)) = l.accept().await else {
                continue;
            };
            let (up, down, upstream) = (up.clone(), down.clone(), upstream.clone());
            tokio::spawn(async move {
                // The SYN's trip to the server and the SYN-ACK's back.
                tokio::time::sleep(profile.rtt).await;
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pump(cr, sw, up, half), pump(sr, cw, down, half));
            });
        }
    });
    Ok(Shaper { addr, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_pass_unchanged_both_ways_under_a_cap() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        });
        let shaper = start(
            "127.0.0.1:0",
            echo_addr,
            Profile {
                rtt: Duration::from_millis(4),
                bits_per_sec: 400_000_000,
            },
        )
        .await
        .unwrap();
        let s = TcpStream::connect(shaper.addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == data, "bytes changed in transit");
        assert!(Profile::named("internet").is_some() && Profile::named("mars").is_none());
    }
}
