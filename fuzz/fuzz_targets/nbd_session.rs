//! Arbitrary bytes from an NBD client: the fixed-newstyle handshake, then the transmission phase
//! (every command, lengths and offsets as sent), against a small zero disk. Must end in Ok or an
//! error, never a panic or a hang.
#![no_main]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use lazyblk::fetch::{BlockSource, BoxFuture, ReadError};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

struct Zeros;

impl BlockSource for Zeros {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, ReadError>> {
        Box::pin(async move {
            if offset + len as u64 > self.size() {
                return Err(ReadError::OutOfRange {
                    offset,
                    len: len as u64,
                    size: self.size(),
                });
            }
            Ok(Bytes::from(vec![0u8; len]))
        })
    }
}

/// Reads the fuzz input, then EOF; swallows whatever the server writes.
struct Client {
    data: Vec<u8>,
    pos: usize,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = buf.remaining().min(self.data.len() - self.pos);
        let at = self.pos;
        buf.put_slice(&self.data[at..at + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Client {
        data: data.to_vec(),
        pos: 0,
    };
    let _ = rt.block_on(lazyblk::nbd::serve_connection(
        client,
        Arc::new(Zeros),
        "layer",
        "fuzz",
    ));
});
