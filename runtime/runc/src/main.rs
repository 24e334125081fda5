//! `twinbox-runc`: the runtime's runc-compatible command line.

fn main() {
    std::process::exit(twinbox_runc::main(std::env::args_os().collect()));
}
