//! Builds the guest agent (`microvm/agent`, package `twinbox-agent`) as a static x86_64 Linux
//! binary for the initramfs, and leaves it at `$OUT_DIR/twinbox-agent` for
//! `initramfs::AGENT`'s `include_bytes!`: a nested `cargo build` (scripts/lib/nested_build.rs)
//! with `+crt-static` (the initramfs has no libc) and stripped symbols. Also names this build
//! of the VMM (`TWINBOX_VMM_BUILD`, for `snapshot::VMM_BUILD`): a hash of the agent and of the
//! VMM's sources, so a snapshot is restored only by the VMM and agent that made it.

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
    println!("cargo:rerun-if-changed=src");
    let mut h = nested_build::fnv1a(nested_build::FNV_START, &bytes);
    let mut sources = Vec::new();
    collect(&manifest_dir.join("src"), &mut sources);
    sources.sort();
    for path in sources {
        h = nested_build::fnv1a(h, path.strip_prefix(&manifest_dir).unwrap_or(&path).to_string_lossy().as_bytes());
        h = nested_build::fnv1a(h, &std::fs::read(&path).unwrap_or_default());
    }
    println!("cargo:rustc-env=TWINBOX_VMM_BUILD={h:016x}");
}

/// Every file under `dir`.
fn collect(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path);
        }
    }
}
