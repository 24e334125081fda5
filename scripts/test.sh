#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what the tests need, then format, lint, test.
#   sudo scripts/test.sh
# Tests that need root, /dev/kvm or a tool skip with a reason when it is missing, except under
# CI=true, where a missing capability fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
. scripts/lib/packages.sh

if [ "$(id -u)" -eq 0 ]; then
  ensure_packages skopeo umoci busybox-static e2fsprogs file docker-registry fonts-dejavu-core \
    qemu-system-x86 cpio binutils podman iproute2 nftables containernetworking-plugins iptables runc crun
  # containerd (its runc shim drives twinbox-runc in a test); not over a containerd.io that
  # Docker's packages provide, which apt would replace.
  command -v containerd-shim-runc-v2 >/dev/null || ensure_packages containerd
  # The microVM guest kernel: built once (about 10 minutes on 2 cores), then cached by its
  # inputs under ~/.cache/twinbox/kernel. The end-to-end microVM test boots it.
  TWINBOX_KERNEL=$(scripts/build-guest-kernel.sh | tail -n1)
  export TWINBOX_KERNEL
fi

cargo fmt --all -- --check
cargo clippy -q --workspace --all-targets -- -D warnings
# The container monitor is a workspace of its own (no_std, panic = abort), built by engine/build.rs.
cargo fmt --manifest-path engine/monitor/Cargo.toml -- --check
cargo clippy -q --manifest-path engine/monitor/Cargo.toml --release --target-dir target/monitor -- -D warnings
# So is the port proxy (std, built static by engine/build.rs).
cargo fmt --manifest-path engine/proxy/Cargo.toml -- --check
cargo clippy -q --manifest-path engine/proxy/Cargo.toml --release --target-dir target/proxy -- -D warnings
# The cargo-fuzz crate (nightly, run by scripts/fuzz.sh); its targets are the workspace's
# twinbox-fuzz-targets, whose test replays the corpora.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
# The default-image example is built static here; the CLI tests use it.
cargo rustc -q -p twinbox-hello --release -- -C target-feature=+crt-static -C strip=symbols
cargo test -q --workspace -- --test-threads="${TEST_THREADS:-2}"
