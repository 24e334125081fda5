//! Builds the detached container monitor (`engine/monitor`, package `twinbox-monitor`) as a
//! freestanding static executable and leaves it at `$OUT_DIR/twinbox-monitor` for
//! `container::monitor`'s `include_bytes!`: a nested `cargo build` (scripts/lib/nested_build.rs;
//! the monitor is a workspace of its own, with `panic = "abort"`), no C runtime or libc
//! (`-nostartfiles -nostdlib`: it starts at its own `_start`), position-dependent; and the port
//! proxy (`engine/proxy`) as a static, position-dependent std executable at
//! `$OUT_DIR/twinbox-proxy` for `network::publish`.

#[path = "../scripts/lib/nested_build.rs"]
mod nested_build;

use std::env;
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=monitor");
    println!("cargo:rerun-if-changed=../scripts/lib/nested_build.rs");
    let monitor = nested_build::Nested {
        manifest: &manifest_dir.join("monitor/Cargo.toml"),
        package: "twinbox-monitor",
        target: "x86_64-unknown-linux-gnu",
        rustflags: "-C\x1frelocation-model=static\x1f-C\x1ftarget-feature=+crt-static\x1f\
                    -C\x1flink-arg=-nostartfiles\x1f-C\x1flink-arg=-nostdlib",
        what: "the container monitor",
    };
    let bytes = monitor.build(&out_dir.join("monitor-target"));
    nested_build::write_if_changed(&out_dir.join("twinbox-monitor"), &bytes);
    println!("cargo:rustc-env=TWINBOX_MONITOR_FILE={}", hashed_name("twinbox-monitor", &bytes));
    // The port proxy: std, static and position-dependent, so its code is shared clean pages
    // (a position-independent executable dirties its relocated data in every process).
    println!("cargo:rerun-if-changed=proxy");
    let proxy = nested_build::Nested {
        manifest: &manifest_dir.join("proxy/Cargo.toml"),
        package: "twinbox-proxy",
        target: "x86_64-unknown-linux-gnu",
        rustflags: "-C\x1frelocation-model=static\x1f-C\x1ftarget-feature=+crt-static",
        what: "the port proxy",
    };
    let bytes = proxy.build(&out_dir.join("proxy-target"));
    nested_build::write_if_changed(&out_dir.join("twinbox-proxy"), &bytes);
    println!("cargo:rustc-env=TWINBOX_PROXY_FILE={}", hashed_name("twinbox-proxy", &bytes));
}

/// `PREFIX-HASH`, the name a program is installed under in the store: the FNV-1a hash of its
/// bytes, so a twinbox with another build of it never runs a stale one, and concurrent
/// installs write the same bytes. Here, once per build, not at every run (the proxy is 1 MiB).
fn hashed_name(prefix: &str, program: &[u8]) -> String {
    format!("{prefix}-{:016x}", nested_build::fnv1a(nested_build::FNV_START, program))
}
