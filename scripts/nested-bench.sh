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
bench_args=(--backends "process,twinbox-container,twinbox-microvm,qemu-microvm" "${bench_args[@]}")
[ -x "$twinbox" ] || { echo "nested-bench: $twinbox is not built (cargo build --release)" >&2; exit 1; }

kernel=$("$here/build-guest-kernel.sh" | tail -n1)
work=$(mktemp -d "${TMPDIR:-/tmp}/twinbox-nested-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
p=$work/tb
mkdir -p "$p/bin" "$p/lib" "$p/share/qemu"

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
# QEMU looks for its firmware in ../share/qemu next to its binary.
cp -L /usr/share/qemu/qboot.rom /usr/share/qemu/bios-microvm.bin "$p/share/qemu/"
cp "$kernel" "$p/vmlinux"

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || rev=$rev-dirty
# L1 has no RTC: give it the host's clock, and the revision, for the results' context.
now=$(date -u +%s)

# The default images, in a store of their own.
TWINBOX_ROOT=$p/store scripts/default-images.sh "$twinbox" >/dev/null

printf 'export TWINBOX_REV=%s\ndate -u -s @%s >/dev/null 2>&1 || true\n' "$rev" "$now" >"$p/env.sh"
# L1's root is its initramfs (rootfs), where pivot_root(2) is impossible and the container
# runtime needs it: everything moves to a tmpfs, and the bench runs chrooted there.
cat >"$p/run.sh" <<'EOF'
set -e
. /payload/tb/env.sh
# A name for the results' context (L1's initramfs leaves it "(none)").
hostname twinbox-l1 2>/dev/null || true
mkdir -p /lib/x86_64-linux-gnu /lib64
cp /payload/tb/lib/* /lib/x86_64-linux-gnu/
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
mkdir /newroot
mount -t tmpfs -o size=90% tmpfs /newroot
cp -a /bin /sbin /usr /lib /lib64 /payload /newroot/
mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp /newroot/run
mount -o rbind /dev /newroot/dev
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t cgroup2 none /newroot/sys/fs/cgroup
exec chroot /newroot /bin/sh /payload/tb/bench.sh "$@"
EOF
cat >"$p/bench.sh" <<'EOF'
. /payload/tb/env.sh
export PATH=/payload/tb/bin:/bin:/sbin:/usr/bin:/usr/sbin TWINBOX_ROOT=/payload/tb/store TWINBOX_KERNEL=/payload/tb/vmlinux
cd /tmp
# The bench runs in the background; a line every 30 s shows L1 is alive (progress bars are
# hidden off a terminal); results.json follows the marker line.
twinbox -v bench --out /tmp/report "$@" >/tmp/bench.out 2>&1 &
bench=$!
seen=0
while kill -0 "$bench" 2>/dev/null; do
  sleep 30
  # Warnings as they come (a hung run's kernel stacks among them), so they reach the host even
  # when the run never finishes.
  n=$(wc -l </tmp/bench.out)
  sed -n "$((seen + 1)),${n}p" /tmp/bench.out | grep -A24 ' WARN ' | sed 's/^/nested-bench: | /'
  seen=$n
  echo "nested-bench: measuring, $(cut -d' ' -f1 /proc/uptime) s since L1 boot; last: $(grep INFO /tmp/bench.out | tail -n1 | cut -c1-200)"
done
if ! wait "$bench"; then
  echo "nested-bench: twinbox bench failed:"; cat /tmp/bench.out; exit 1
fi
echo @@TWINBOX-JSON@@
cat /tmp/report/results.json; echo
EOF

# Everything before the marker is progress (to stderr, as it comes: awk would buffer it), the
# rest is the JSON (to stdout). A stalled L1 boot or run (see nested-kvm.sh) is tried again, twice at
# most.
split_output() {
  local line json=0
  while IFS= read -r line || [ -n "$line" ]; do
    if [ "$json" -eq 1 ]; then printf '%s\n' "$line"
    elif [ "$line" = "@@TWINBOX-JSON@@" ]; then json=1
    else printf '%s\n' "$line" >&2
    fi
  done
}
for attempt in 1 2 3; do
  # L1 prints a line every 30 s while the bench runs: 300 s of nothing is a stalled L1.
  # Not under set -e: a failed L1 must reach the log and the retry below.
  set +e
  "$here/nested-kvm.sh" --timeout 3600 --silence 300 --payload "$p" -- sh /payload/tb/run.sh "${bench_args[@]}" \
    2>"$work/l1.err" | split_output
  code=${PIPESTATUS[0]}
  set -e
  cat "$work/l1.err" >&2
  grep -q -e "L1 did not finish booting" -e "L1 stalled" "$work/l1.err" || exit "$code"
  echo "nested-bench: attempt $attempt: L1 did not boot or stalled; trying again" >&2
done
exit "$code"
