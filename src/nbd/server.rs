//! Handshake and transmission phases.

use std::io;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use super::proto::*;
use crate::fetch::{BlockSource, ReadError};

/// Largest read or write request accepted (bigger ones get EINVAL; writes are drained).
pub const NBD_MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload read during the handshake.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Requests processed concurrently per connection.
const MAX_INFLIGHT: usize = 64;

/// What the handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies were enabled.
    pub structured: bool,
}

fn transmission_flags() -> u16 {
    tflag::HAS_FLAGS
        | tflag::READ_ONLY
        | tflag::SEND_FLUSH
        | tflag::CAN_MULTI_CONN
        | tflag::SEND_CACHE
}

async fn option_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    w.write_all(&b).await
}

/// Runs the fixed-newstyle handshake for one export named `export` (the empty name selects it too).
/// Returns `None` if the client aborted or disconnected.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    description: &str,
    size: u64,
) -> io::Result<Option<Negotiated>> {
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello).await?;
    let client_flags = s.read_u32().await?;
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    loop {
        let magic = match s.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad option magic",
            ));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // Too big to be legitimate: refuse, then drop the connection rather than read it.
            option_reply(s, option, rep::ERR_TOO_BIG, b"option too large").await?;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "option too large",
            ));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            opt::EXPORT_NAME => {
                if !name_matches(&data, export) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "unknown export requested",
                    ));
                }
                let mut b = BytesMut::with_capacity(10 + 124);
                b.put_u64(size);
                b.put_u16(transmission_flags());
                if !no_zeroes {
                    b.put_bytes(0, 124);
                }
                s.write_all(&b).await?;
                return Ok(Some(Negotiated { structured }));
            }
            opt::ABORT => {
                option_reply(s, option, rep::ACK, &[]).await?;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    option_reply(s, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")
                        .await?;
                    continue;
                }
                let mut d = BytesMut::new();
                d.put_u32(export.len() as u32);
                d.put_slice(export.as_bytes());
                option_reply(s, option, rep::SERVER, &d).await?;
                option_reply(s, option, rep::ACK, &[]).await?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(s, option, rep::ERR_INVALID, b"no data expected").await?;
                    continue;
                }
                structured = true;
                option_reply(s, option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    option_reply(s, option, rep::ERR_INVALID, b"malformed NBD_OPT_INFO/GO").await?;
                    continue;
                };
                if !name_matches(name, export) {
                    option_reply(s, option, rep::ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let mut d = BytesMut::new();
                d.put_u16(info::EXPORT);
                d.put_u64(size);
                d.put_u16(transmission_flags());
                option_reply(s, option, rep::INFO, &d).await?;
                let mut d = BytesMut::new();
                d.put_u16(info::BLOCK_SIZE);
                d.put_u32(1);
                d.put_u32(4096);
                d.put_u32(NBD_MAX_REQUEST);
                option_reply(s, option, rep::INFO, &d).await?;
                if infos.contains(&info::NAME) {
                    let mut d = BytesMut::new();
                    d.put_u16(info::NAME);
                    d.put_slice(export.as_bytes());
                    option_reply(s, option, rep::INFO, &d).await?;
                }
                if infos.contains(&info::DESCRIPTION) {
                    let mut d = BytesMut::new();
                    d.put_u16(info::DESCRIPTION);
                    d.put_slice(description.as_bytes());
                    option_reply(s, option, rep::INFO, &d).await?;
                }
                option_reply(s, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    return Ok(Some(Negotiated { structured }));
                }
            }
            _ => {
                // STARTTLS, meta contexts and anything newer: unsupported, keep negotiating.
                option_reply(s, option, rep::ERR_UNSUP, b"unsupported option").await?;
            }
        }
    }
}

fn name_matches(name: &[u8], export: &str) -> bool {
    name.is_empty() || name == export.as_bytes()
}

fn parse_info_request(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?;
    let rest = &d[4 + nlen..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * n {
        return None;
    }
    let infos = rest[2..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

/// Serves one client: handshake, then transmission.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut s: S,
    source: Arc<dyn BlockSource>,
    export: &str,
    description: &str,
) -> io::Result<()> {
    match handshake(&mut s, export, description, source.size()).await? {
        Some(n) => transmission(s, source, n.structured).await,
        None => Ok(()),
    }
}

fn simple_reply(cookie: u64, error: u32, data: Option<Bytes>) -> Vec<Bytes> {
    let mut h = BytesMut::with_capacity(16);
    h.put_u32(SIMPLE_REPLY_MAGIC);
    h.put_u32(error);
    h.put_u64(cookie);
    let mut v = vec![h.freeze()];
    if let Some(d) = data {
        v.push(d);
    }
    v
}

fn structured_chunk(cookie: u64, kind: u16, payload_len: u32) -> BytesMut {
    let mut h = BytesMut::with_capacity(20);
    h.put_u32(STRUCTURED_REPLY_MAGIC);
    h.put_u16(reply::FLAG_DONE);
    h.put_u16(kind);
    h.put_u64(cookie);
    h.put_u32(payload_len);
    h
}

fn reply_for(
    structured: bool,
    cookie: u64,
    error: u32,
    msg: &str,
    read: Option<(u64, Bytes)>,
) -> Vec<Bytes> {
    if !structured {
        return simple_reply(cookie, error, read.map(|(_, d)| d));
    }
    if error != 0 {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        let mut h = structured_chunk(cookie, reply::ERROR, 6 + msg.len() as u32);
        h.put_u32(error);
        h.put_u16(msg.len() as u16);
        h.put_slice(msg);
        return vec![h.freeze()];
    }
    match read {
        Some((offset, data)) => {
            let mut h = structured_chunk(cookie, reply::OFFSET_DATA, 8 + data.len() as u32);
            h.put_u64(offset);
            vec![h.freeze(), data]
        }
        None => vec![structured_chunk(cookie, reply::NONE, 0).freeze()],
    }
}

/// The transmission phase: reads requests, answers them concurrently (out of order, by cookie) until
/// NBD_CMD_DISC or EOF. Writes, trims and write-zeroes get EPERM.
pub async fn transmission<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    s: S,
    source: Arc<dyn BlockSource>,
    structured: bool,
) -> io::Result<()> {
    let (mut r, mut w) = tokio::io::split(s);
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(MAX_INFLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(parts) = rx.recv().await {
            for p in parts {
                w.write_all(&p).await?;
            }
        }
        w.flush().await?;
        Ok::<_, io::Error>(())
    });
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let size = source.size();
    let result: io::Result<()> = async {
        loop {
            let mut hdr = [0u8; 28];
            match r.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4"));
            if magic != REQUEST_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad request magic {magic:#x}"),
                ));
            }
            let kind = u16::from_be_bytes(hdr[6..8].try_into().expect("2"));
            let cookie = u64::from_be_bytes(hdr[8..16].try_into().expect("8"));
            let offset = u64::from_be_bytes(hdr[16..24].try_into().expect("8"));
            let len = u32::from_be_bytes(hdr[24..28].try_into().expect("4"));
            let in_range = offset.checked_add(len as u64).is_some_and(|e| e <= size);
            let send = |parts| {
                let tx = tx.clone();
                async move {
                    tx.send(parts)
                        .await
                        .map_err(|_| io::Error::other("reply writer stopped"))
                }
            };
            match kind {
                cmd::READ => {
                    if !in_range || len > NBD_MAX_REQUEST {
                        send(reply_for(
                            structured,
                            cookie,
                            errno::EINVAL,
                            "read out of range or too large",
                            None,
                        ))
                        .await?;
                        continue;
                    }
                    let permit = slots.clone().acquire_owned().await.expect("never closed");
                    let (src, tx) = (source.clone(), tx.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let parts = match src.read_at(offset, len as usize).await {
                            Ok(data) => reply_for(structured, cookie, 0, "", Some((offset, data))),
                            Err(e) => {
                                let code = match e {
                                    ReadError::OutOfRange { .. } => errno::EINVAL,
                                    ReadError::Fetch { .. } => errno::EIO,
                                };
                                reply_for(structured, cookie, code, &e.to_string(), None)
                            }
                        };
                        let _ = tx.send(parts).await;
                    });
                }
                cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES => {
                    if kind == cmd::WRITE {
                        // Drain the payload so the stream stays in sync, then refuse like the others.
                        let mut left = len as u64;
                        let mut buf = vec![0u8; 64 << 10];
                        while left > 0 {
                            let k = left.min(buf.len() as u64) as usize;
                            r.read_exact(&mut buf[..k]).await?;
                            left -= k as u64;
                        }
                    }
                    send(reply_for(
                        structured,
                        cookie,
                        errno::EPERM,
                        "read-only export",
                        None,
                    ))
                    .await?;
                }
                cmd::FLUSH => send(reply_for(structured, cookie, 0, "", None)).await?,
                cmd::CACHE => {
                    if in_range {
                        source.prefetch(offset, len as u64);
                        send(reply_for(structured, cookie, 0, "", None)).await?;
                    } else {
                        send(reply_for(
                            structured,
                            cookie,
                            errno::EINVAL,
                            "out of range",
                            None,
                        ))
                        .await?;
                    }
                }
                cmd::DISC => return Ok(()),
                _ => {
                    send(reply_for(
                        structured,
                        cookie,
                        errno::EINVAL,
                        "unsupported command",
                        None,
                    ))
                    .await?
                }
            }
        }
    }
    .await;
    // Let in-flight reads finish and their replies go out before closing.
    let _ = slots.acquire_many(MAX_INFLIGHT as u32).await;
    drop(tx);
    let w = writer.await.map_err(io::Error::other)?;
    result.and(w)
}
