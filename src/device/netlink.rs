//! A minimal generic-netlink client: enough to resolve a family and send one command with attributes
//! (nested ones included) and read the reply. Used for the kernel NBD driver's netlink interface.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Flag marking a nested attribute.
pub const NLA_F_NESTED: u16 = 0x8000;

/// An attribute list under construction.
#[derive(Default, Clone)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    /// A u32 attribute.
    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }
    /// A u64 attribute.
    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }
    /// A NUL-terminated string attribute.
    pub fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b)
    }
    /// A nested attribute list.
    pub fn nested(&mut self, kind: u16, inner: &Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// Parses an attribute list into (type without flags, payload) pairs.
pub fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        let step = (len + 3) & !3;
        b = &b[step.min(b.len())..];
    }
    out
}

/// A generic netlink socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// Opens a socket.
    pub fn open() -> io::Result<GenlSocket> {
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(GenlSocket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 1,
        })
    }

    /// Sends `cmd` to `family` with `attrs`; returns the attributes of the reply (if any), after the
    /// kernel's acknowledgement. A negative acknowledgement becomes an error.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &Attrs,
    ) -> io::Result<Vec<u8>> {
        self.seq += 1;
        let seq = self.seq;
        let len = 16 + 4 + attrs.0.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        msg.extend_from_slice(&attrs.0);
        // SAFETY: the sockaddr_nl is zeroed except for the family; buffers are valid for their lengths.
        let r = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply_attrs = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(done) = parse_reply(&buf[..n as usize], seq, &mut reply_attrs)? {
                return Ok(done);
            }
        }
    }

    /// The id of the generic netlink family `name` (e.g. `nbd`), or NotFound if its module is not loaded.
    pub fn family(&mut self, name: &str) -> io::Result<u16> {
        let mut a = Attrs::default();
        a.string(CTRL_ATTR_FAMILY_NAME, name);
        let reply = self
            .request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOENT) {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("generic netlink family {name:?} not found (module not loaded?)"),
                    )
                } else {
                    e
                }
            })?;
        parse_attrs(&reply)
            .into_iter()
            .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, v)| v.get(0..2).map(|b| u16::from_ne_bytes([b[0], b[1]])))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no family id in reply"))
    }
}

/// Parses one `recv` worth of netlink messages answering request `seq`: the attributes of the last
/// data message are kept in `reply_attrs`; returns them once an ACK (`NLMSG_ERROR` with code 0) or
/// `NLMSG_DONE` arrives, an error for a negative code or a malformed message, and `None` when more
/// messages are to come. Never panics, whatever the bytes (fuzzed).
pub fn parse_reply(
    mut b: &[u8],
    seq: u32,
    reply_attrs: &mut Vec<u8>,
) -> io::Result<Option<Vec<u8>>> {
    while b.len() >= 16 {
        let mlen = u32::from_ne_bytes(b[0..4].try_into().expect("4")) as usize;
        let mtype = u16::from_ne_bytes([b[4], b[5]]);
        let mseq = u32::from_ne_bytes(b[8..12].try_into().expect("4"));
        if mlen < 16 || mlen > b.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let body = &b[16..mlen];
        if mseq == seq {
            match mtype {
                NLMSG_ERROR => {
                    let Some(code) = body.get(0..4) else {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "netlink error message without an error code",
                        ));
                    };
                    let err = i32::from_ne_bytes(code.try_into().expect("4"));
                    if err != 0 {
                        return Err(io::Error::from_raw_os_error(
                            err.checked_neg().unwrap_or(libc::EIO),
                        ));
                    }
                    return Ok(Some(std::mem::take(reply_attrs)));
                }
                NLMSG_DONE => return Ok(Some(std::mem::take(reply_attrs))),
                _ if body.len() >= 4 => *reply_attrs = body[4..].to_vec(),
                _ => {}
            }
        }
        b = &b[((mlen + 3) & !3).min(b.len())..];
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_hostile_replies_are_errors() {
        let msg = |mtype: u16, seq: u32, body: &[u8]| {
            let mut m = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
            m.extend_from_slice(&mtype.to_ne_bytes());
            m.extend_from_slice(&[0, 0]);
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&[0; 4]);
            m.extend_from_slice(body);
            m.resize(m.len().div_ceil(4) * 4, 0);
            m
        };
        let mut attrs = Vec::new();
        // An NLMSG_ERROR too short to hold its code (this used to panic).
        assert!(parse_reply(&msg(NLMSG_ERROR, 7, &[1]), 7, &mut attrs).is_err());
        // i32::MIN as a code: an error, not an overflow.
        assert!(parse_reply(&msg(NLMSG_ERROR, 7, &i32::MIN.to_ne_bytes()), 7, &mut attrs).is_err());
        // A length pointing past the buffer.
        let mut m = msg(NLMSG_DONE, 7, &[]);
        m[0] = 200;
        assert!(parse_reply(&m, 7, &mut attrs).is_err());
        // Data, then ACK: the data's attributes.
        let mut m = msg(0x20, 7, &[0, 0, 0, 0, 9, 9]);
        m.extend(msg(NLMSG_ERROR, 7, &0i32.to_ne_bytes()));
        assert_eq!(parse_reply(&m, 7, &mut attrs).unwrap(), Some(vec![9, 9]));
        // Other requests' messages are skipped.
        assert_eq!(
            parse_reply(&msg(NLMSG_DONE, 8, &[]), 7, &mut attrs).unwrap(),
            None
        );
    }

    #[test]
    fn attributes_round_trip() {
        let mut inner = Attrs::default();
        inner.u32(1, 7);
        let mut a = Attrs::default();
        a.u64(2, 4096).string(3, "nbd").nested(7, &inner);
        let p = parse_attrs(&a.0);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], (2, &4096u64.to_ne_bytes()[..]));
        assert_eq!(p[1].1, b"nbd\0");
        assert_eq!(p[2].0, 7);
        assert_eq!(parse_attrs(p[2].1), vec![(1, &7u32.to_ne_bytes()[..])]);
    }
}
