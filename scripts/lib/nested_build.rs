//! Shared by the build scripts that build a program of the workspace as a static x86_64 Linux
//! executable and embed it (microvm/build.rs: the guest agent; engine/build.rs: the container
//! monitor and the port proxy). Included with `#[path]`; std only.
//!
//! The program is built by a nested `cargo build` into a target directory under `OUT_DIR`, so
//! it never waits on the outer build's lock. The outer cargo's environment that would leak
//! into it (flags, target dir, clippy's wrapper) is removed: it is always a plain release
//! build with exactly the flags given.

use std::env;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

/// ELF program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;

/// What to build: `package`'s binary of the same name, from `manifest`, for `target`, with
/// `rustflags` (CARGO_ENCODED_RUSTFLAGS: 0x1f between arguments).
pub struct Nested<'a> {
    pub manifest: &'a Path,
    pub package: &'a str,
    pub target: &'a str,
    pub rustflags: &'a str,
    /// What the program is, for messages ("the guest agent").
    pub what: &'a str,
}

impl Nested<'_> {
    /// Builds the program under `target_dir` and returns the executable, checked to be static.
    pub fn build(&self, target_dir: &Path) -> Vec<u8> {
        let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "--release", "--locked", "--offline", "--quiet"])
            .args(["-p", self.package, "--bin", self.package, "--target", self.target])
            .arg("--manifest-path")
            .arg(self.manifest)
            .arg("--target-dir")
            .arg(target_dir);
        for (key, _) in env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if leaks_into_nested_build(key) {
                cmd.env_remove(key);
            }
        }
        cmd.env("CARGO_ENCODED_RUSTFLAGS", self.rustflags);
        let what = self.what;
        let output = cmd.output().unwrap_or_else(|e| panic!("cannot run {cargo:?} to build {what}: {e}"));
        if !output.status.success() {
            panic!(
                "building {what} ({}) failed ({}):\n{}\n{}",
                self.manifest.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let built = target_dir.join(self.target).join("release").join(self.package);
        let bytes = std::fs::read(&built).unwrap_or_else(|e| panic!("cannot read {what} {}: {e}", built.display()));
        match has_interpreter(&bytes) {
            Ok(false) => {}
            Ok(true) => panic!(
                "{what} {} is dynamically linked (it has a PT_INTERP program header); it must be static",
                built.display()
            ),
            Err(why) => panic!("{what} {} is not a usable ELF executable: {why}", built.display()),
        }
        bytes
    }
}

/// Variables the outer cargo (or clippy, or the user) set that must not shape the nested
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
pub fn has_interpreter(elf: &[u8]) -> Result<bool, &'static str> {
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

/// Rewrites `path` only when its content changes, so an unchanged program does not make the
/// crate look modified.
pub fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The 64-bit FNV-1a hash of `bytes`, continuing from `h` (start with [`FNV_START`]): what build
/// scripts name a build of a program by.
#[allow(dead_code)] // each build script uses what it needs
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a's offset basis.
#[allow(dead_code)]
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;
