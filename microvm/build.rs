//! Builds the guest agent (`microvm/agent`, package `twinbox-agent`) as a static x86_64 Linux
//! binary for the initramfs, and leaves it at `$OUT_DIR/twinbox-agent` for
//! `initramfs::AGENT`'s `include_bytes!`.
//!
//! The agent is built by a nested `cargo build` into a target directory under `OUT_DIR`, so it
//! never waits on the outer build's lock, with `+crt-static` (the initramfs has no libc) and
//! stripped symbols. The outer cargo's environment that would leak into it (flags, target
//! dir, clippy's wrapper) is removed: it is always a plain release build.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest's target, whatever the host's.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The agent's rustflags, as CARGO_ENCODED_RUSTFLAGS (0x1f between arguments).
const RUSTFLAGS: &str = "-C\x1ftarget-feature=+crt-static\x1f-C\x1fstrip=symbols";
/// ELF program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=agent");
    // The workspace's lock and release profile shape the agent too.
    println!("cargo:rerun-if-changed=../Cargo.lock");
    println!("cargo:rerun-if-changed=../Cargo.toml");

    let target_dir = out_dir.join("agent-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--locked", "--offline", "--quiet"])
        .args(["-p", "twinbox-agent", "--bin", "twinbox-agent", "--target", TARGET])
        .arg("--manifest-path")
        .arg(manifest_dir.join("agent/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if leaks_into_nested_build(key) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS);

    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the guest agent: {e}"));
    if !output.status.success() {
        panic!(
            "building the guest agent (microvm/agent) failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let built = target_dir.join(TARGET).join("release").join("twinbox-agent");
    let bytes =
        std::fs::read(&built).unwrap_or_else(|e| panic!("cannot read the built agent {}: {e}", built.display()));
    match has_interpreter(&bytes) {
        Ok(false) => {}
        Ok(true) => panic!(
            "the guest agent {} is dynamically linked (it has a PT_INTERP program header): the \
             initramfs has no libc and no loader, so it must be static (-C target-feature=+crt-static)",
            built.display()
        ),
        Err(why) => panic!("the guest agent {} is not a usable ELF executable: {why}", built.display()),
    }
    let dest = out_dir.join("twinbox-agent");
    write_if_changed(&dest, &bytes);
}

/// Variables the outer cargo (or clippy, or the user) set that must not shape the agent's
/// build: flags, target and target dir, wrappers, profile overrides.
fn leaks_into_nested_build(key: &str) -> bool {
    matches!(
        key,
        "RUSTFLAGS" | "CARGO_ENCODED_RUSTFLAGS" | "CARGO_TARGET_DIR" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER"
    ) || key.starts_with("CARGO_BUILD_")
        || key.starts_with("CARGO_PROFILE_")
        || (key.starts_with("CARGO_TARGET_") && key.ends_with("_RUSTFLAGS"))
}

/// Whether a 64-bit little-endian ELF file has a PT_INTERP program header.
fn has_interpreter(elf: &[u8]) -> Result<bool, &'static str> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("no ELF header");
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF");
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    if phnum == 0 || phentsize < 4 {
        return Err("no program headers");
    }
    let end = phnum.checked_mul(phentsize).and_then(|n| n.checked_add(phoff)).ok_or("program headers overflow")?;
    if end > elf.len() {
        return Err("program headers past the end of the file");
    }
    Ok((0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes")) == PT_INTERP
    }))
}

/// Rewrites `path` only when its content changes, so an unchanged agent does not make the
/// crate look modified.
fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
