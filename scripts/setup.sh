#!/usr/bin/env bash
# Install what twinbox needs on a Debian/Ubuntu machine, build it, and build the default
# images. Idempotent: a second run only checks. With --run, also runs the main job.
#   sudo scripts/setup.sh [--run]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/packages.sh
. scripts/lib/packages.sh

APT_PACKAGES=(
  build-essential pkg-config ca-certificates curl git
  busybox-static e2fsprogs            # default busybox image, VM root disks (mkfs.ext4 -d)
  skopeo umoci                        # interop peers for the image store
  runc crun                           # container peers measured by the harness
  containernetworking-plugins iptables # the peers' network in the net scenario (CNI bridge, portmap)
  iproute2 nftables                   # tests: network namespaces; reading the rules twinbox makes
  fonts-dejavu-core                   # the font the report charts are drawn with
  docker-registry                     # a local registry for `twinbox push`/`pull`
  qemu-system-x86                     # the microVM peer (QEMU -M microvm)
)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (sudo): it installs packages and the store lives in /var/lib/twinbox" >&2
    exit 1
  fi
}

install_packages() {
  ensure_packages "${APT_PACKAGES[@]}"
}

install_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
}

need_root
install_packages
install_rust
cargo build --release -q -p twinbox
# The drop-in runtime, linked statically as runc ships (target/runc-static/twinbox-runc).
scripts/build-static-runc.sh >/dev/null
scripts/default-images.sh target/release/twinbox
# The microVM guest kernel (about 10 minutes once, then cached). Only where /dev/kvm can boot
# Linux: with PVM (kvm_pvm) the microVMs are measured in the nested L1 of
# scripts/nested-bench.sh instead, which builds it too.
if [ -e /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then
  scripts/build-guest-kernel.sh >/dev/null
fi

if [ "${1:-}" = "--run" ]; then
  # The main job: measure every isolation model available here on the default image, with
  # the peers; the report lands in reports/<date>-<rev>/.
  target/release/twinbox bench
fi
