# shellcheck shell=bash
# pack BIN DIR: BIN into DIR/bin under its own name, the shared libraries it links into DIR/lib,
# for a payload of scripts/nested-kvm.sh (its L1 copies DIR/lib to /lib/x86_64-linux-gnu, so
# /proc/self/exe stays the binary itself, which the container runtime re-executes).
pack() {
  cp -L "$1" "$2/bin/$(basename "$1")"
  # A static binary (ldd says so and fails) needs nothing more.
  { ldd "$1" 2>/dev/null || true; } | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }' |
    while read -r lib; do cp -Ln "$lib" "$2/lib/" 2>/dev/null || true; done
}
