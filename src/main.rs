//! The `lazyblk` binary.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(code) = lazyblk::device::mount::mount_helper_main(&args) {
        std::process::exit(code);
    }
    // Layers are mounted from a child running this binary (see `device::mount`).
    lazyblk::device::mount::use_mount_helper(std::path::Path::new("/proc/self/exe"));
    bound_malloc();
    // A panic anywhere (a ublk queue thread included) ends the process at once instead of unwinding
    // through libublk, which would stop and delete the device: killed, the server leaves its devices
    // quiesced for `lazyblk recover` (the release profile also sets panic = "abort").
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    if let Err(e) = lazyblk::cli::main() {
        eprintln!("lazyblk: error: {e:#}");
        std::process::exit(1);
    }
}

/// Keeps glibc's allocator from turning freed large buffers into resident memory: by default it raises
/// its mmap threshold to the size of every large block freed (up to 32 MiB), after which each FUSE
/// session's 16 MiB request buffer is carved out of a heap arena and zeroed, i.e. resident — about
/// 14 MiB per idle loop layer in a daemon serving 100. A fixed threshold keeps large buffers mmapped
/// (resident only where touched), and a bounded arena count caps fragmentation whatever the CPU count.
fn bound_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called first thing, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}
