//! Process identity and durable state files: what the device, cache and node modules share.
//!
//! A pid alone is not an identity: after a crash the kernel may give it to an unrelated process, and
//! "the pid exists" would then keep a dead server's devices from being resumed (or signal a stranger).
//! [`ProcessId`] is the pid plus the process's start time in clock ticks since boot (field 22 of
//! `/proc/PID/stat`), which no reused pid repeats.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A process, identified so that a reused pid does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// The pid.
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22); 0 when unknown (old state
    /// files), which then matches any live process with that pid.
    #[serde(default)]
    pub start: u64,
}

impl ProcessId {
    /// The running process `pid` (its start time read now; 0 if it is already gone).
    pub fn of(pid: u32) -> ProcessId {
        ProcessId {
            pid,
            start: stat(pid).map(|s| s.start).unwrap_or(0),
        }
    }

    /// The calling process.
    pub fn current() -> ProcessId {
        ProcessId::of(std::process::id())
    }

    /// Whether this process is still running (not a zombie, and not another process with its pid).
    pub fn alive(&self) -> bool {
        match stat(self.pid) {
            Some(s) => s.running && (self.start == 0 || s.start == self.start),
            None => false,
        }
    }

    /// Sends `signal` to this process and no other: a pidfd pins the process first, then its start
    /// time is checked, so a pid reused in between is never signalled. Fails with ESRCH when the
    /// process is gone or is a stranger with the same pid.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and is owned by nothing else.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        if !self.alive() {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

struct Stat {
    running: bool,
    start: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`: the fields after the parenthesised command name (which may itself hold
/// ") "), state first (field 3), start time at field 22.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some(Stat {
        running: !state.starts_with('Z') && !state.starts_with('X'),
        start,
    })
}

/// Gives the calling thread the lowest CPU priority (nice 19; threads it creates inherit it): it
/// runs at full speed on an idle node and yields to everything else on a busy one, never starved
/// (unlike `SCHED_IDLE`). Best effort: a failure is logged and the thread runs as it was.
pub fn lowest_priority() {
    // SAFETY: plain syscalls on the calling thread (its TID); no pointers.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "setpriority");
    }
}

/// Whether `pid` is a running process (a zombie counts as dead). Prefer [`ProcessId::alive`].
pub fn pid_alive(pid: u32) -> bool {
    ProcessId { pid, start: 0 }.alive()
}

/// Writes `data` to `path` so that a crash leaves either the old or the new contents: a temporary
/// file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `dir` (and its parents) and makes it mode 0700: state, cache and run directories hold
/// private images' data and device state no other local user may read.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Binds a unix socket at `path` created 0600 from the start (no window in which another user
/// could connect), replacing a stale socket a crashed process left there. Needs a tokio runtime.
pub fn bind_private_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)?;
    }
    // SAFETY: umask only changes this process's file creation mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let l = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_go_to_the_recorded_process_only() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcessId {
            pid: child.id(),
            start: stat(child.id()).unwrap().start,
        };
        // The same pid with another start time is a stranger: not signalled.
        let stranger = ProcessId {
            start: id.start + 1,
            ..id
        };
        assert_eq!(
            stranger.signal(libc::SIGTERM).unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the stranger check signalled it"
        );
        id.signal(libc::SIGTERM).unwrap();
        assert!(!child.wait().unwrap().success());
    }

    #[test]
    fn the_current_process_is_alive_and_a_reused_pid_is_not() {
        let me = ProcessId::current();
        assert!(me.start > 0);
        assert!(me.alive());
        // Same pid, another start time: what a reused pid looks like.
        let stranger = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!stranger.alive());
        assert!(!ProcessId {
            pid: u32::MAX - 1,
            start: 0
        }
        .alive());
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let s = parse_stat(line).unwrap();
        assert!(s.running);
        assert_eq!(s.start, 98765);
        let z = "7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert!(!parse_stat(z).unwrap().running);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
