//! Loop devices through their ioctls (no `losetup` needed).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached read-only loop device; detached on drop (and by the kernel once unused, autoclear).
pub struct LoopDevice {
    path: PathBuf,
    dev: Option<File>,
}

impl LoopDevice {
    /// Attaches `backing` read-only to a free loop device. With `direct_io` the device reads its
    /// file with direct, asynchronous I/O where the kernel allows it (several reads in flight, no
    /// second page cache of the same blocks under the one above the device); otherwise, or where
    /// the file does not support it, buffered (the kernel's loop worker then reads one request at a
    /// time). [`LoopDevice::direct_io`] tells which one it got.
    pub fn attach(backing: &Path, direct_io: bool) -> std::io::Result<LoopDevice> {
        let dio_flag = if direct_io { LO_FLAGS_DIRECT_IO } else { 0 };
        let file = File::open(backing)?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("/dev/loop-control: {e} (is the loop module loaded?)"),
                )
            })?;
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = OpenOptions::new().read(true).open(&path)?;
            let mut info = LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | dio_flag,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            };
            let name = backing.as_os_str().as_encoded_bytes();
            let n = name.len().min(63);
            info.lo_file_name[..n].copy_from_slice(&name[..n]);
            // LOOP_CONFIGURE sets the file and the status in one step (one queue freeze instead of
            // two: about 20 ms less per attach); kernels before 5.8 take the two-step path.
            let config = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: 0,
                info,
                reserved: [0; 8],
            };
            // SAFETY: `config` is a valid, fully initialised loop_config that outlives the call; its
            // fd is open for the duration of the call.
            let r = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    LOOP_CONFIGURE,
                    &config as *const LoopConfig,
                )
            };
            if r == 0 {
                return Ok(LoopDevice {
                    path,
                    dev: Some(dev),
                });
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EBUSY) => continue, // another process took it first
                Some(libc::EINVAL) | Some(libc::ENOTTY) => {}
                _ => return Err(e),
            }
            let info = config.info;
            // SAFETY: LOOP_SET_FD takes the backing file descriptor, valid for this call.
            let r = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    LOOP_SET_FD,
                    file.as_raw_fd() as libc::c_ulong,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EBUSY) {
                    continue; // another process took it first
                }
                return Err(e);
            }
            // SAFETY: `info` is a valid, fully initialised loop_info64 that outlives the call.
            let r = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    LOOP_SET_STATUS64,
                    &info as *const LoopInfo64,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: LOOP_CLR_FD takes no argument.
                unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
                return Err(e);
            }
            if direct_io {
                // Best effort, as LOOP_CONFIGURE's flag is: buffered where the file refuses it.
                // SAFETY: LOOP_SET_DIRECT_IO takes an integer argument.
                unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_DIRECT_IO, 1 as libc::c_ulong) };
            }
            return Ok(LoopDevice {
                path,
                dev: Some(dev),
            });
        }
        Err(std::io::Error::other(
            "no free loop device after 16 attempts",
        ))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the device reads its file with direct I/O (`/sys/block/loopN/loop/dio`).
    pub fn direct_io(&self) -> bool {
        let name = self.path.file_name().unwrap_or_default();
        let flag = Path::new("/sys/block").join(name).join("loop/dio");
        std::fs::read_to_string(flag).is_ok_and(|s| s.trim() == "1")
    }

    /// Detaches now (fails with EBUSY while the device is mounted or open elsewhere).
    pub fn detach(mut self) -> std::io::Result<()> {
        self.clear()
    }

    fn clear(&mut self) -> std::io::Result<()> {
        if let Some(dev) = self.dev.take() {
            // SAFETY: LOOP_CLR_FD takes no argument.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = self.clear();
    }
}
