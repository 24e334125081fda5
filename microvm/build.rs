//! Builds the guest agent (`microvm/agent`, package `twinbox-agent`) as a static x86_64 Linux
//! binary for the initramfs, and leaves it at `$OUT_DIR/twinbox-agent` for
//! `initramfs::AGENT`'s `include_bytes!`: a nested `cargo build` (scripts/lib/nested_build.rs)
//! with `+crt-static` (the initramfs has no libc) and stripped symbols.

#[path = "../scripts/lib/nested_build.rs"]
mod nested_build;

use std::env;
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=agent");
    println!("cargo:rerun-if-changed=../scripts/lib/nested_build.rs");
    // The workspace's lock and release profile shape the agent too.
    println!("cargo:rerun-if-changed=../Cargo.lock");
    println!("cargo:rerun-if-changed=../Cargo.toml");
    let agent = nested_build::Nested {
        manifest: &manifest_dir.join("agent/Cargo.toml"),
        package: "twinbox-agent",
        // The guest's target, whatever the host's.
        target: "x86_64-unknown-linux-gnu",
        rustflags: "-C\x1ftarget-feature=+crt-static\x1f-C\x1fstrip=symbols",
        what: "the guest agent",
    };
    let bytes = agent.build(&out_dir.join("agent-target"));
    nested_build::write_if_changed(&out_dir.join("twinbox-agent"), &bytes);
}
