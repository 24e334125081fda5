#!/usr/bin/env bash
# `twinbox bench` inside the nested L1 of scripts/nested-kvm.sh, where KVM can boot the guest
# kernel: the microVM backends (twinbox-microvm, twinbox-microvm-snapshot, qemu-microvm) and, like for like, the bare
# process and the containers (twinbox, runc, crun) in the same L1. Prints the results.json of
# that run on stdout; `twinbox bench` on a host without hardware KVM runs it by itself, and
# `twinbox bench --nested FILE` puts a saved one in the report as its own, labelled section.
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
    -h|--help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "nested-bench: unknown argument '$1'" >&2; exit 1 ;;
  esac
done
bench_args=("$@")
[ ${#bench_args[@]} -gt 0 ] || bench_args=(--quick)
# Unless told which: every backend this host has, so the two models compare on one machine
# (the L1).
case " ${bench_args[*]} " in
  *" --backends "* | *" --backends="*) ;;
  *)
    backends=process,twinbox-container
    for peer in runc crun; do command -v "$peer" >/dev/null && backends=$backends,$peer; done
    bench_args=(--backends "$backends,twinbox-microvm,twinbox-microvm-snapshot,qemu-microvm" "${bench_args[@]}") ;;
esac
# The user's own image (`--image X`) goes into the L1's store from the host's.
image=""
for ((i = 0; i < ${#bench_args[@]}; i++)); do
  case "${bench_args[i]}" in
    --image) image=${bench_args[i + 1]:-} ;;
    --image=*) image=${bench_args[i]#--image=} ;;
  esac
done
[ -x "$twinbox" ] || { echo "nested-bench: $twinbox is not built (cargo build --release)" >&2; exit 1; }

kernel=$("$here/build-guest-kernel.sh" | tail -n1)
work=$(mktemp -d "${TMPDIR:-/tmp}/twinbox-nested-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
p=$work/tb
mkdir -p "$p/bin" "$p/lib" "$p/share/qemu"

# Binaries keep their own names; their libraries go where the dynamic loader looks for them
# in L1 (the L1 command copies lib/ into /lib/x86_64-linux-gnu and /lib64 first).
# shellcheck source=scripts/lib/payload.sh
. "$here/lib/payload.sh"
pack "$twinbox" "$p"
pack "$(command -v mkfs.ext4 || echo /usr/sbin/mkfs.ext4)" "$p"
pack "$(command -v qemu-system-x86_64)" "$p"
for peer in runc crun; do
  if command -v "$peer" >/dev/null; then pack "$(command -v "$peer")" "$p"; fi
done
# The CNI plugins the runc and crun backends' network is made with (bench/src/backend/cni.rs),
# and the iptables they call (iptables-nft: one binary named as each of its commands, and its
# extensions, which L1 finds where the host keeps them).
if [ -d /usr/lib/cni ]; then
  for plugin in loopback bridge host-local portmap; do
    [ ! -x "/usr/lib/cni/$plugin" ] || { mkdir -p "$p/cni" && cp "/usr/lib/cni/$plugin" "$p/cni/"; }
  done
  xtables=$(readlink -f "$(command -v iptables || echo /usr/sbin/iptables)")
  if [ "$(basename "$xtables")" = xtables-nft-multi ]; then
    pack "$xtables" "$p"
    # XTABLES_LIBDIR, compiled in: xtables/ beside libxtables, its path resolved (Debian's
    # /lib is /usr/lib; in L1 /lib is a real directory, so the resolved one is made there).
    libxt=$(ldd "$xtables" | awk '/libxtables/ { print $3 }')
    xt_dir=$(dirname "$(readlink -f "$libxt")")/xtables
    if [ -n "$libxt" ] && compgen -G "$xt_dir/*.so" >/dev/null; then
      mkdir -p "$p/xtables" && cp "$xt_dir"/*.so "$p/xtables/" && echo "$xt_dir" >"$p/xtables/where"
    fi
  fi
fi
# QEMU looks for its firmware in ../share/qemu next to its binary.
cp -L /usr/share/qemu/qboot.rom /usr/share/qemu/bios-microvm.bin "$p/share/qemu/"
cp "$kernel" "$p/vmlinux"

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || rev=$rev-dirty
# L1 has no RTC: give it the host's clock, and the revision, for the results' context.
now=$(date -u +%s)

# The default images, in a store of their own.
TWINBOX_ROOT=$p/store scripts/default-images.sh "$twinbox" >/dev/null
if [ -n "$image" ]; then
  "$twinbox" save -o "$work/image.tar" "$image" ||
    { echo "nested-bench: cannot take $image from the store at ${TWINBOX_ROOT:-/var/lib/twinbox}" >&2; exit 1; }
  TWINBOX_ROOT=$p/store "$twinbox" load -i "$work/image.tar" >/dev/null
  rm -f "$work/image.tar"
fi

printf 'export TWINBOX_REV=%s\ndate -u -s @%s >/dev/null 2>&1 || true\n' "$rev" "$now" >"$p/env.sh"
# L1 runs on a tmpfs (nested-kvm.sh's init moved it off the initramfs), where the container
# runtimes can pivot_root: the bench runs there as it would on any host.
cat >"$p/run.sh" <<'EOF'
set -e
. /payload/tb/env.sh
# A name for the results' context (L1's initramfs leaves it "(none)").
hostname twinbox-l1 2>/dev/null || true
mkdir -p /lib/x86_64-linux-gnu /lib64 /usr/lib/cni
cp /payload/tb/lib/* /lib/x86_64-linux-gnu/
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
[ ! -d /payload/tb/cni ] || cp /payload/tb/cni/* /usr/lib/cni/
if [ -f /payload/tb/xtables/where ]; then
  xt_dir=$(cat /payload/tb/xtables/where)
  mkdir -p "$xt_dir" && cp /payload/tb/xtables/*.so "$xt_dir/"
  # Where the CNI plugins look for it (they run with a PATH of the system's directories).
  for cmd in iptables iptables-save iptables-restore; do ln -sf /payload/tb/bin/xtables-nft-multi "/usr/sbin/$cmd"; done
fi
mount -t cgroup2 none /sys/fs/cgroup
exec /bin/sh /payload/tb/bench.sh "$@"
EOF
cat >"$p/bench.sh" <<'EOF'
. /payload/tb/env.sh
export PATH=/payload/tb/bin:/bin:/sbin:/usr/bin:/usr/sbin TWINBOX_ROOT=/payload/tb/store TWINBOX_KERNEL=/payload/tb/vmlinux
cd /tmp
# The bench runs in the background (progress bars are hidden off a terminal): each scenario's
# start and every warning (a hung run's kernel stacks among them) reach the host as they come,
# even when the run never finishes, and a line every 30 s shows L1 is alive; results.json
# follows the marker line.
twinbox -v bench --out /tmp/report "$@" >/tmp/bench.out 2>&1 &
bench=$!
seen=0 ticks=0 left=0
while kill -0 "$bench" 2>/dev/null; do
  sleep 2
  ticks=$((ticks + 1))
  [ $((ticks % 15)) -ne 0 ] ||
    echo "nested-bench: measuring, $(cut -d' ' -f1 /proc/uptime) s since L1 boot; last: $(grep INFO /tmp/bench.out | tail -n1 | cut -c1-200)"
  n=$(wc -l </tmp/bench.out)
  [ "$n" -ne "$seen" ] || continue
  # A warning with the 24 lines after it (kernel stacks of a hung run), also when they come
  # in the next round: `left` carries the count over.
  sed -n "$((seen + 1)),${n}p" /tmp/bench.out |
    awk -v n="$left" '/ WARN / { n = 25 } / INFO scenario/ || n > 0 { print "nested-bench: | " $0; if (n > 0) n-- }
      END { print n > "/tmp/warn-left" }'
  left=$(cat /tmp/warn-left)
  seen=$n
done
if ! wait "$bench"; then
  echo "nested-bench: twinbox bench failed:"; cat /tmp/bench.out; exit 1
fi
echo @@TWINBOX-JSON@@
cat /tmp/report/results.json; echo
EOF

# Everything before the marker is progress (to stderr, as it comes: awk would buffer it), the
# rest is the JSON (to stdout). An L1 that did not finish booting (see nested-kvm.sh) is booted
# again, twice at most: nothing was measured yet. One that stalled or stopped while the bench
# ran is reported as such at once and the run fails: it is never started over silently.
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
  if grep -q -e "L1 stalled" -e "L1 stopped while CMD was running" -e "timed out after" "$work/l1.err"; then
    echo "nested-bench: the L1 stalled or stopped in the middle of the bench (above); its results are lost, and it is not run again" >&2
    exit "$code"
  fi
  grep -q -e "L1 did not finish booting" "$work/l1.err" || exit "$code"
  echo "nested-bench: attempt $attempt: L1 did not finish booting; booting it again" >&2
done
exit "$code"
