//! The `lazyblk` binary.

fn main() {
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
