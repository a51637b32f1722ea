//! Mounting a layer's ext4 read-only, from a child process.
//!
//! A mount of a device this process serves reads the device: the kernel waits in the mounting thread,
//! uninterruptibly, for I/O only this process's queue threads answer. If the process is killed then
//! (SIGKILL, OOM), the thread in the mount cannot exit, so neither can the process: its open files —
//! the ublk character device, the NBD socket — are never released, the kernel never learns the server
//! is gone, and a restarted daemon can neither recover nor delete the device. Nothing ends that.
//!
//! [`mount_layer`] therefore mounts from a child: this binary run again (`/proc/self/exe`) as
//! [`MOUNT_HELPER_ARG`], which holds none of the parent's files or mappings after `exec`. A killed
//! server then dies at once; the kernel quiesces (ublk) or disconnects (NBD) the device, the child's
//! I/O fails or waits for the next server, and the record of the half-done attach names the child
//! ([`super::DeviceState::mounter`]) so a restarted daemon waits for it before rolling the mount back.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::ProcessId;

/// The first argument that makes the `lazyblk` binary the mount helper: `lazyblk __mount-layer DEV
/// DIR` mounts `DEV` at `DIR` with [`LAYER_MOUNT_FLAGS`] and [`LAYER_MOUNT_DATA`] and exits (0, or
/// 1 with the error on stderr).
pub const MOUNT_HELPER_ARG: &str = "__mount-layer";

static HELPER: OnceLock<std::path::PathBuf> = OnceLock::new();

/// Makes [`mount_layer`] mount from a child running `exe` [`MOUNT_HELPER_ARG`] (the `lazyblk`
/// binary sets `/proc/self/exe`, which stays the running binary even if an upgrade replaced the
/// file). Without it (a program that embeds the library and has no helper), layers are mounted in
/// the calling process, with the hazard the module describes.
pub fn use_mount_helper(exe: &Path) {
    let _ = HELPER.set(exe.to_path_buf());
}

/// Runs the mount helper if `args` (the process's arguments after the program name) ask for it,
/// returning its exit code; `None` otherwise.
pub fn mount_helper_main(args: &[std::ffi::OsString]) -> Option<i32> {
    if args.first().map(|a| a.as_os_str()) != Some(MOUNT_HELPER_ARG.as_ref()) {
        return None;
    }
    let [_, dev, dir] = args else {
        eprintln!("lazyblk {MOUNT_HELPER_ARG}: usage: DEVICE DIRECTORY");
        return Some(2);
    };
    match mount_ext4_ro(Path::new(dev), Path::new(dir)) {
        Ok(()) => Some(0),
        Err(e) => {
            eprintln!("{e}");
            Some(1)
        }
    }
}

/// Mounts the layer on `dev` at `dir` (see the module docs): from the helper child when one is set,
/// calling `started` with the child once it runs (so the caller can record it), and waiting for it.
pub fn mount_layer(
    dev: &Path,
    dir: &Path,
    started: impl FnOnce(ProcessId) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let Some(exe) = HELPER.get() else {
        return mount_ext4_ro(dev, dir);
    };
    let mut cmd = Command::new(exe);
    cmd.arg(MOUNT_HELPER_ARG)
        .arg(dev)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and makes one async-signal-safe
    // syscall. It marks every inherited descriptor close-on-exec (a library's device fd opened
    // without O_CLOEXEC included); the failure of a kernel without close_range is ignored.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("starting the mount helper {}: {e}", exe.display()),
        )
    })?;
    let id = ProcessId::of(child.id());
    if let Err(e) = started(id) {
        // The mount goes on; it is waited for and rolled back like any failed one.
        tracing::warn!(error = %e, "recording the mount helper");
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    // The helper's message names the device, the directory and the kernel's error.
    let msg = String::from_utf8_lossy(&out.stderr);
    let msg = msg.trim();
    Err(std::io::Error::other(if msg.is_empty() {
        format!(
            "mounting {} on {}: the mount helper ended with {}",
            dev.display(),
            dir.display(),
            out.status
        )
    } else {
        msg.chars().take(1000).collect()
    }))
}

/// `CLOSE_RANGE_CLOEXEC` of `<linux/close_range.h>`.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Waits (at most `limit`) for the mount helper `id` of a dead server to finish; whether it did.
pub fn wait_for_mounter(id: ProcessId, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while id.alive() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

pub(crate) fn cstr(p: &Path) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("path contains NUL"))
}

/// Mount flags of a layer: read-only, and the host never honours the image author's setuid bits or
/// device nodes through the layer's own mount (containers still get both through their overlay
/// mount, which has neither flag).
pub const LAYER_MOUNT_FLAGS: libc::c_ulong =
    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;

/// ext4 options of a layer, overriding what the image's superblock asks for: `errors=remount-ro`
/// (a superblock saying `errors=panic` over a corrupt directory gives EIO, not a node panic) and
/// `noload` (a journal in the image is never replayed).
pub const LAYER_MOUNT_DATA: &std::ffi::CStr = c"errors=remount-ro,noload";

/// Mounts the ext4 on `dev` read-only at `dir`, with [`LAYER_MOUNT_FLAGS`] and [`LAYER_MOUNT_DATA`],
/// in the calling process (the helper's body; servers use [`mount_layer`]).
pub fn mount_ext4_ro(dev: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (d, m) = (cstr(dev)?, cstr(dir)?);
    let fs = c"ext4";
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            d.as_ptr(),
            m.as_ptr(),
            fs.as_ptr(),
            LAYER_MOUNT_FLAGS,
            LAYER_MOUNT_DATA.as_ptr().cast(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("mounting {} on {}: {e}", dev.display(), dir.display()),
        ));
    }
    Ok(())
}

/// Unmounts `dir`.
pub fn umount(dir: &Path) -> std::io::Result<()> {
    let m = cstr(dir)?;
    // SAFETY: `m` is a valid NUL-terminated path.
    if unsafe { libc::umount2(m.as_ptr(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts `dir` lazily (`MNT_DETACH`), ignoring failure (nothing mounted there).
pub(crate) fn detach_quietly(dir: &Path) {
    if let Ok(c) = cstr(dir) {
        // SAFETY: `c` is a valid NUL-terminated path; a failure leaves the mount as it was.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_answers_only_its_own_argument() {
        assert_eq!(mount_helper_main(&["attach".into()]), None);
        assert_eq!(mount_helper_main(&[]), None);
        assert_eq!(mount_helper_main(&[MOUNT_HELPER_ARG.into()]), Some(2));
    }

    #[test]
    fn a_helper_failure_names_the_device_and_its_error() {
        // Not a block device: the helper (this test binary has none, so the in-process mount) fails
        // with the kernel's error and names what it tried.
        let tmp = tempfile::tempdir().unwrap();
        let e = mount_layer(
            &tmp.path().join("no-such-dev"),
            &tmp.path().join("m"),
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no-such-dev"), "{e}");
    }

    #[test]
    fn waiting_for_a_finished_mounter_returns_at_once() {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId {
            pid: c.id(),
            start: 0,
        };
        c.wait().unwrap();
        assert!(wait_for_mounter(id, Duration::from_secs(30)));
    }
}
