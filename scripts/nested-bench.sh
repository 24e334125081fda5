#!/usr/bin/env bash
# `twinbox bench` inside the nested L1 of scripts/nested-kvm.sh, where KVM can boot the guest
# kernel: the microVM backends (twinbox-microvm, qemu-microvm) and, like for like, the bare
# process and twinbox containers in the same L1. Prints the results.json of that run on stdout;
# `twinbox bench --nested FILE` puts it in the report as its own, labelled section.
#   scripts/nested-bench.sh [--twinbox BIN] [-- BENCH-ARGS...]   (default: --quick)
# Timings under TCG emulation show the mechanics, not representative speed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

twinbox=target/release/twinbox
while [ $# -gt 0 ]; do
  case "$1" in
    --twinbox) twinbox=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "nested-bench: unknown argument '$1'" >&2; exit 1 ;;
  esac
done
bench_args=("$@")
[ ${#bench_args[@]} -gt 0 ] || bench_args=(--quick)
[ -x "$twinbox" ] || { echo "nested-bench: $twinbox is not built (cargo build --release)" >&2; exit 1; }

kernel=$("$here/build-guest-kernel.sh" | tail -n1)
work=$(mktemp -d "${TMPDIR:-/tmp}/twinbox-nested-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
p=$work/tb
mkdir -p "$p/bin" "$p/lib" "$p/share"

# Binaries keep their own names; their libraries go where the dynamic loader looks for them
# in L1 (the L1 command copies lib/ into /lib/x86_64-linux-gnu and /lib64 first), so
# /proc/self/exe stays the binary itself (the container runtime re-executes it).
pack() {
  cp -L "$1" "$p/bin/$(basename "$1")"
  ldd "$1" | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }' |
    while read -r lib; do cp -Ln "$lib" "$p/lib/" 2>/dev/null || true; done
}
pack "$twinbox"
pack "$(command -v mkfs.ext4 || echo /usr/sbin/mkfs.ext4)"
pack "$(command -v qemu-system-x86_64)"
cp -L /usr/share/qemu/qboot.rom /usr/share/qemu/bios-microvm.bin "$p/share/"
cp "$kernel" "$p/vmlinux"

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || rev=$rev-dirty
# L1 has no RTC: give it the host's clock, and the revision, for the results' context.
now=$(date -u +%s)

# The default images, in a store of their own.
TWINBOX_ROOT=$p/store scripts/default-images.sh "$twinbox" >/dev/null

printf 'export TWINBOX_REV=%s\ndate -u -s @%s >/dev/null 2>&1 || true\n' "$rev" "$now" >"$p/env.sh"
cat >"$p/run.sh" <<'EOF'
set -e
. /payload/tb/env.sh
mkdir -p /lib/x86_64-linux-gnu /lib64 /usr/share/qemu /sys/fs/cgroup
cp /payload/tb/lib/* /lib/x86_64-linux-gnu/
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
cp /payload/tb/share/* /usr/share/qemu/
mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null || true
export PATH=/payload/tb/bin:$PATH TWINBOX_ROOT=/payload/tb/store TWINBOX_KERNEL=/payload/tb/vmlinux
cd /tmp
twinbox bench --backends process,twinbox-container,twinbox-microvm,qemu-microvm --json --out /tmp/report "$@" 2>/tmp/bench.err || {
  code=$?; cat /tmp/bench.err >&2; exit $code; }
EOF

"$here/nested-kvm.sh" --timeout 1800 --payload "$p" -- sh /payload/tb/run.sh "${bench_args[@]}"
