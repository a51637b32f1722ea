//! The `lazyblk` binary.

fn main() {
    if let Err(e) = lazyblk::cli::main() {
        eprintln!("lazyblk: error: {e:#}");
        std::process::exit(1);
    }
}
