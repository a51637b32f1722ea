//! The kernel NBD backend: `/dev/nbdN` connected through generic netlink (`NBD_CMD_CONNECT`, not the
//! `NBD_DO_IT` ioctl whose device dies with its thread), with one socketpair per connection whose far
//! end runs lazyblk's NBD transmission phase.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use super::netlink::{Attrs, GenlSocket};
use crate::fetch::BlockSource;
use crate::nbd::proto::tflag;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_GENL_VERSION: u8 = 1;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

/// A connected `/dev/nbdN`.
pub struct KernelNbd {
    index: u32,
    tasks: Vec<tokio::task::JoinHandle<io::Result<()>>>,
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair(2) writes.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by us from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl KernelNbd {
    /// Connects a free NBD device to `source` with `connections` sockets; reads time out in the kernel
    /// after `timeout_secs` (the engine's own deadline should be shorter), and a dead server has as long
    /// to come back (`lazyblk recover`) before queued reads fail.
    /// With `index`, that device (`/dev/nbdN`) is asked for; the kernel refuses one in use.
    pub fn connect(
        source: Arc<dyn BlockSource>,
        rt: &tokio::runtime::Handle,
        connections: usize,
        timeout_secs: u64,
        index: Option<u32>,
    ) -> io::Result<KernelNbd> {
        let size = source.size();
        let (socks, kernel_ends, tasks) = Self::sockets(source, rt, connections)?;
        let mut a = Attrs::default();
        if let Some(i) = index {
            a.u32(NBD_ATTR_INDEX, i);
        }
        a.u64(NBD_ATTR_SIZE_BYTES, size)
            .u64(NBD_ATTR_BLOCK_SIZE_BYTES, 4096)
            .u64(
                NBD_ATTR_SERVER_FLAGS,
                (tflag::HAS_FLAGS | tflag::READ_ONLY | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN)
                    as u64,
            )
            .u64(NBD_ATTR_TIMEOUT, timeout_secs)
            .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, timeout_secs)
            .u64(NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT)
            .nested(NBD_ATTR_SOCKETS, &socks);
        let mut genl = GenlSocket::open()?;
        let family = genl.family("nbd")?;
        let reply = genl.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &a)?;
        // The kernel holds its own references to the sockets now.
        drop(kernel_ends);
        let index = super::netlink::parse_attrs(&reply)
            .into_iter()
            .find(|(k, _)| *k == NBD_ATTR_INDEX)
            .and_then(|(_, v)| {
                v.get(0..4)
                    .map(|b| u32::from_ne_bytes(b.try_into().expect("4")))
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "NBD_CMD_CONNECT reply without an index",
                )
            })?;
        Ok(KernelNbd { index, tasks })
    }

    /// Gives device `index` new connections served from `source` (after its server died).
    pub fn reconnect(
        index: u32,
        source: Arc<dyn BlockSource>,
        rt: &tokio::runtime::Handle,
        connections: usize,
    ) -> io::Result<KernelNbd> {
        let (socks, kernel_ends, tasks) = Self::sockets(source, rt, connections)?;
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index)
            .nested(NBD_ATTR_SOCKETS, &socks);
        let mut genl = GenlSocket::open()?;
        let family = genl.family("nbd")?;
        genl.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &a)?;
        drop(kernel_ends);
        Ok(KernelNbd { index, tasks })
    }

    /// `connections` socketpairs: our ends served by the transmission loop, the kernel's ends listed
    /// in an `NBD_ATTR_SOCKETS` attribute.
    #[allow(clippy::type_complexity)]
    fn sockets(
        source: Arc<dyn BlockSource>,
        rt: &tokio::runtime::Handle,
        connections: usize,
    ) -> io::Result<(
        Attrs,
        Vec<OwnedFd>,
        Vec<tokio::task::JoinHandle<io::Result<()>>>,
    )> {
        let mut kernel_ends = Vec::new();
        let mut tasks = Vec::new();
        let mut socks = Attrs::default();
        for _ in 0..connections.max(1) {
            let (kernel, ours) = socketpair()?;
            let std_sock = std::os::unix::net::UnixStream::from(ours);
            std_sock.set_nonblocking(true)?;
            let stream = {
                let _guard = rt.enter();
                tokio::net::UnixStream::from_std(std_sock)?
            };
            tasks.push(rt.spawn(crate::nbd::transmission(stream, source.clone(), false)));
            let mut item = Attrs::default();
            item.u32(NBD_SOCK_FD, kernel.as_raw_fd() as u32);
            socks.nested(NBD_SOCK_ITEM, &item);
            kernel_ends.push(kernel);
        }
        Ok((socks, kernel_ends, tasks))
    }

    /// `/dev/nbdN`.
    pub fn path(&self) -> String {
        format!("/dev/nbd{}", self.index)
    }

    /// Disconnects the device (the kernel closes its sockets; the serving tasks end).
    pub fn disconnect(self) -> io::Result<()> {
        disconnect_index(self.index)?;
        for t in self.tasks {
            t.abort();
        }
        Ok(())
    }
}

/// Disconnects `/dev/nbd<index>` whoever serves it (queued requests fail with EIO).
pub fn disconnect_index(index: u32) -> io::Result<()> {
    let mut genl = GenlSocket::open()?;
    let family = genl.family("nbd")?;
    let mut a = Attrs::default();
    a.u32(NBD_ATTR_INDEX, index);
    genl.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &a)?;
    Ok(())
}
