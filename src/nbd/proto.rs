//! NBD wire constants (all integers on the wire are big-endian).

/// `"NBDMAGIC"`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub mod opt {
    /// Old-style export selection.
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the handshake.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Export information without entering transmission.
    pub const INFO: u32 = 6;
    /// Export information, then transmission.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod rep {
    /// Acknowledgement.
    pub const ACK: u32 = 1;
    /// One export name (NBD_OPT_LIST).
    pub const SERVER: u32 = 2;
    /// Export information.
    pub const INFO: u32 = 3;
    /// Unsupported option.
    pub const ERR_UNSUP: u32 = (1 << 31) | 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) | 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = (1 << 31) | 3;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) | 6;
    /// Option too big.
    pub const ERR_TOO_BIG: u32 = (1 << 31) | 9;
}

/// NBD_INFO types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Export name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Flags are valid.
    pub const HAS_FLAGS: u16 = 1;
    /// Read-only export.
    pub const READ_ONLY: u16 = 2;
    /// NBD_CMD_FLUSH is accepted.
    pub const SEND_FLUSH: u16 = 4;
    /// Several connections see the same data.
    pub const CAN_MULTI_CONN: u16 = 256;
    /// NBD_CMD_CACHE is accepted.
    pub const SEND_CACHE: u16 = 1024;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
}

/// Structured reply chunk types and flags.
pub mod reply {
    /// Last chunk of this reply.
    pub const FLAG_DONE: u16 = 1;
    /// Empty reply.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Error.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// Errno values on the wire.
pub mod errno {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
}
