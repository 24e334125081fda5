//! `twinbox-runc`: the runtime's runc-compatible command line.

fn main() {
    std::process::exit(twinbox_runtime::cli::main(std::env::args_os().collect()));
}
