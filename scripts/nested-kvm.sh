#!/usr/bin/env bash
# Run CMD inside a nested L1 Linux that has a working /dev/kvm, for end-to-end microVM tests
# on hosts whose own /dev/kvm cannot boot stock Linux (PVM). The L1 is Debian's cloud kernel
# under QEMU TCG emulating an AMD EPYC with SVM; kvm-amd inside it gives a real /dev/kvm.
#   scripts/nested-kvm.sh [--payload DIR]... [--timeout SECS] [--silence SECS] [--memory SIZE] [--cpus N] [--npt on|off] [-v] -- CMD [ARG]...
# L1's kernel command line carries twinbox.nested=tcg, so what runs there (twinbox bench) can
# label its figures. Each payload DIR is copied to /payload/<basename of DIR> in L1 and put on PATH; CMD runs
# there as root, in /payload, with stdin from /dev/null. Its stdout and stderr both come back
# on stdout; L1's own boot messages are hidden (-v shows them on stderr). The exit
# status is CMD's, or 125 if L1 failed to boot, lost /dev/kvm or timed out (default 300 s), or
# stalled (--silence: CMD printed nothing for that long; the vCPUs' registers are then logged).
# The L1 kernel and modules are cached in ${TWINBOX_CACHE:-~/.cache/twinbox}/nested/<package>_<version>/.
set -euo pipefail
# shellcheck source=scripts/lib/packages.sh
. "$(dirname "$0")/lib/packages.sh"

META_PKG=linux-image-cloud-amd64
# Loaded in L1 with their dependencies (kvm, irqbypass, ...), found from .modinfo: KVM,
# overlayfs for the container runtime measured beside the microVMs, and what twinbox networks
# need: taps, bridges, veth pairs, nftables' NAT, and the iptables matches and targets the CNI
# plugins of the runc and crun backends use through iptables-nft (names as the cache keeps
# them, '-' for '_').
KVM_MODULES=(kvm-amd overlay tun bridge veth nf-tables nft-chain-nat nft-nat nft-masq nft-fib-ipv4
  nft-compat xt-nat xt-MASQUERADE xt-mark xt-addrtype xt-multiport xt-comment xt-conntrack)
HOST_PACKAGES=(qemu-system-x86 busybox-static cpio gzip binutils socat)
START_MARK=@@TWINBOX-START@@
EXIT_MARK=@@TWINBOX-EXIT    # followed by " <code>@@"
FAIL_MARK=@@TWINBOX-FAIL    # followed by " <reason>@@"

CACHE=${TWINBOX_CACHE:-$HOME/.cache/twinbox}/nested

log() { echo "nested-kvm: $*" >&2; }
die() { log "$*"; exit 125; }
usage() { sed -n '5,11s/^# \{0,1\}//p' "$0" >&2; exit "${1:-1}"; }

payloads=()
timeout=300
silence=0
memory=3G
cpus=2
verbose=0
npt=off
while [ $# -gt 0 ]; do
  case "$1" in
    --payload) [ $# -ge 2 ] || usage; payloads+=("$2"); shift 2 ;;
    --timeout) [ $# -ge 2 ] || usage; timeout=$2; shift 2 ;;
    --silence) [ $# -ge 2 ] || usage; silence=$2; shift 2 ;;
    --memory) [ $# -ge 2 ] || usage; memory=$2; shift 2 ;;
    --cpus) [ $# -ge 2 ] || usage; cpus=$2; shift 2 ;;
    --npt) [ $# -ge 2 ] || usage; npt=$2; shift 2 ;;
    -v|--verbose) verbose=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) log "unknown option '$1'"; usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { log "no command given"; usage; }
case "$timeout" in ''|*[!0-9]*) log "--timeout wants whole seconds, got '$timeout'"; exit 1 ;; esac
case "$silence" in ''|*[!0-9]*) log "--silence wants whole seconds, got '$silence'"; exit 1 ;; esac
# L1's KVM runs its guests with shadow page tables by default (kvm-amd npt=0), not on the
# nested paging that QEMU TCG emulates: with emulated NPT, guests booted five at a time now and
# then triple-fault (a #PF fetching kernel text just mapped) and L1 itself stalls in a loop of
# instruction-fetch faults; neither was seen with shadow paging (issue 20). --npt on for NPT.
case "$npt" in
  on) kvm_amd_args= ;;
  off) kvm_amd_args=npt=0 ;;
  *) log "--npt wants on or off, got '$npt'"; exit 1 ;;
esac

install_packages() {
  ensure_packages "${HOST_PACKAGES[@]}" || die "cannot install the packages above"
}

# The concrete image package behind the metapackage, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel_package() {
  local pkg ver
  pkg=$(apt-cache depends "$META_PKG" 2>/dev/null | awk '/^ *Depends: linux-image-/ { print $2; exit }')
  [ -n "$pkg" ] || return 1
  ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
  [ -n "$ver" ] || return 1
  echo "${pkg}_${ver}"
}

modinfo_depends() {
  objcopy -O binary --only-section=.modinfo "$1" /dev/stdout | tr '\0' '\n' |
    sed -n 's/^depends=//p' | tr ',' ' '
}

# Fetch the cloud kernel and the KVM modules once: vmlinuz, modules/*.ko, modules/order
# (dependencies first). Published with one rename so an interrupted fetch leaves nothing.
have_l1() {
  local m
  [ -f "$CACHE/$1/vmlinuz" ] || return 1
  for m in "${KVM_MODULES[@]}"; do [ -f "$CACHE/$1/modules/$m.ko" ] || return 1; done
}

fetch_l1() {
  local id=$1 dir=$CACHE/$1 work x moddir order=() m
  have_l1 "$id" && return 0
  rm -rf "$dir"   # an older fetch without every module
  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  fetch_work=$work   # removed by cleanup, whatever happens
  log "fetching ${id%_*} ${id##*_}"
  chmod 755 "$work"   # apt-get download drops privileges to _apt when it can write here
  (cd "$work" && apt-get download "${id%_*}=${id##*_}" >download.log 2>&1) ||
    die "apt-get download ${id%_*}=${id##*_} failed: $(tail -n 3 "$work/download.log")"
  x=$work/x
  dpkg-deb -x "$work"/*.deb "$x"
  mkdir "$work/out" "$work/out/modules"
  cp "$x"/boot/vmlinuz-* "$work/out/vmlinuz"
  moddir=$(echo "$x"/lib/modules/*/kernel)
  [ -d "$moddir" ] || die "no lib/modules/*/kernel in the ${id%_*} package"

  # Depth-first over .modinfo depends=, so each module follows what it needs.
  add_module() {
    local name=${1//_/-} file f dep m
    for m in "${order[@]}"; do [ "$m" = "$name" ] && return 0; done
    file=""
    for f in "$name" "${name//-/_}"; do
      file=$(find "$moddir" -name "$f.ko" -o -name "$f.ko.xz" -o -name "$f.ko.zst" -o -name "$f.ko.gz" | head -n1)
      [ -n "$file" ] && break
    done
    [ -n "$file" ] || die "module $name is not in the ${id%_*} package"
    case "$file" in
      *.ko) cp "$file" "$work/out/modules/$name.ko" ;;
      *.ko.xz) xz -dc "$file" >"$work/out/modules/$name.ko" ;;
      *.ko.zst) zstd -qdc "$file" >"$work/out/modules/$name.ko" ;;
      *.ko.gz) gzip -dc "$file" >"$work/out/modules/$name.ko" ;;
    esac
    for dep in $(modinfo_depends "$work/out/modules/$name.ko"); do add_module "$dep"; done
    order+=("$name")
  }
  for m in "${KVM_MODULES[@]}"; do add_module "$m"; done
  printf '%s\n' "${order[@]}" >"$work/out/modules/order"
  mv -T "$work/out" "$dir" 2>/dev/null || [ -f "$dir/vmlinuz" ] || die "could not move the L1 kernel to $dir"
  log "cached in $dir (modules: ${order[*]})"
  rm -rf "$work"
}

# Single-quote a word for sh: ' becomes '\''.
shquote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Temporary files, and QEMU, go away however the script ends.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/twinbox-nested.XXXXXX")
qemu_pid=""
fetch_work=""
# shellcheck disable=SC2317 # called from the traps
cleanup() {
  trap '' INT TERM   # a second Ctrl-C must not cut the cleanup short
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp" ${fetch_work:+"$fetch_work"}
}
trap cleanup EXIT
trap 'trap "" INT TERM; log "interrupted"; exit 130' INT
trap 'trap "" INT TERM; log "terminated"; exit 143' TERM

install_packages

# apt-cache takes seconds; its answer is kept until the apt lists change.
resolved=$CACHE/resolved
if [ -s "$resolved" ] && [ "$resolved" -nt /var/lib/apt/lists ] && have_l1 "$(cat "$resolved")"; then
  id=$(cat "$resolved")
elif id=$(resolve_kernel_package); then
  fetch_l1 "$id"
  echo "$id" >"$resolved"
else
  # No apt lists (offline, or never updated): fall back to the newest cached kernel.
  id=$(find "$CACHE" -mindepth 2 -maxdepth 2 -name vmlinuz -printf '%h\n' 2>/dev/null | sort -V | tail -n1)
  [ -n "$id" ] || die "cannot resolve $META_PKG with apt-cache and nothing is cached (try: apt-get update)"
  id=$(basename "$id")
  log "apt-cache cannot resolve $META_PKG; using the cached $id"
fi
l1=$CACHE/$id

# A small std-only program L1 starts before CMD to hold one KVM VM (see scripts/lib/kvm-hold.rs
# for the TCG stall it prevents), built with rustc once per source and compiler.
kvm_hold() {
  local src dir key
  src=$(dirname "$0")/lib/kvm-hold.rs
  command -v rustc >/dev/null || { log "no rustc: L1 holds no KVM VM, and microVM runs there may stall (see $src)"; return 1; }
  key=$( (cat "$src"; rustc -V) | sha256sum | cut -c1-16)
  dir=$CACHE/kvm-hold/$key
  if [ ! -x "$dir/kvm-hold" ]; then
    rustc --edition 2021 -O -C target-feature=+crt-static -C strip=symbols "$src" -o "$tmp/kvm-hold" >&2 ||
      { log "cannot build $src: L1 holds no KVM VM"; return 1; }
    mkdir -p "$dir" && mv "$tmp/kvm-hold" "$dir/kvm-hold"
  fi
  echo "$dir/kvm-hold"
}

# --- the initramfs: busybox, the modules, /init, the payloads and the command ---
root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,payload,lib/twinbox-nested}
# `--install -s DIR` links every applet in DIR to busybox's own resolved path: put it there.
busybox=$(readlink -f /bin/busybox)
mkdir -p "$root$(dirname "$busybox")"
cp "$busybox" "$root$busybox"
/bin/busybox --install -s "$root/bin"
cp "$l1"/modules/*.ko "$l1/modules/order" "$root/lib/twinbox-nested/"
if hold=$(kvm_hold); then cp "$hold" "$root/lib/twinbox-nested/kvm-hold"; fi

path=/payload
for p in "${payloads[@]}"; do
  [ -d "$p" ] || die "--payload $p is not a directory"
  name=$(basename "$(cd "$p" && pwd)")
  [ ! -e "$root/payload/$name" ] || die "two payloads are called '$name'"
  cp -a "$p" "$root/payload/$name"
  path=$path:/payload/$name
done

{
  printf 'exec 2>&3 3>&-\nexport PATH=%s:/sbin:/bin:/usr/sbin:/usr/bin HOME=/root\ncd /payload\nexec' "$path"
  for word in "$@"; do printf ' %s' "$(shquote "$word")"; done
  printf ' </dev/null\n'
} >"$root/cmd"

cat >"$root/init" <<EOF
#!/bin/sh
# L1 init written by scripts/nested-kvm.sh.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
fail() { echo "$FAIL_MARK \$*@@"; poweroff -f; reboot -f; sleep 60; }
# Off the initramfs first, onto a tmpfs: pivot_root (what a container runtime enters a
# container's root with) cannot move the initramfs away. Most of L1's memory may go there
# (the payload, a store, images and container files).
if [ ! -e /.on-tmpfs ]; then
  mkdir /newroot && mount -t tmpfs -o mode=0755,size=90% tmpfs /newroot || fail "cannot mount a tmpfs root"
  for f in /* /.[!.]*; do [ "\$f" = /newroot ] || [ ! -e "\$f" ] || cp -a "\$f" /newroot/; done
  touch /newroot/.on-tmpfs
  exec switch_root /newroot /init
fi
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev ||
  fail "cannot mount proc, sys and dev"
mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /run || fail "cannot mount tmpfs"
stty -onlcr 2>/dev/null
for m in \$(cat /lib/twinbox-nested/order); do
  a=; [ "\$m" != kvm-amd ] || a="$kvm_amd_args"
  insmod /lib/twinbox-nested/\$m.ko \$a || fail "insmod \$m failed (does the CPU model have SVM?)"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading the KVM modules"
ip link set lo up || fail "cannot bring lo up"
if [ -x /lib/twinbox-nested/kvm-hold ]; then
  /lib/twinbox-nested/kvm-hold </dev/null &
  i=0
  while [ ! -e /run/kvm-hold ]; do
    i=\$((i + 1)); [ "\$i" -le 100 ] || fail "kvm-hold did not make its VM within 10 s"
    kill -0 \$! 2>/dev/null || fail "kvm-hold failed"
    sleep 0.1
  done
fi
echo $START_MARK
# This shell's own stderr goes quiet so it adds no "Killed" when CMD dies of a signal;
# /cmd takes the console back from fd 3.
exec 3>&2 2>/dev/null
sh /cmd
code=\$?
echo "$EXIT_MARK \$code@@"
sync
poweroff -f; reboot -f; sleep 60
EOF
chmod 755 "$root/init" "$root/cmd"

# Uncompressed: L1 unpacks it under TCG, where inflating a 60 MB payload costs ~1.5 s more
# than the host saves in copying.
initrd=$tmp/initrd.cpio
(cd "$root" && find . | cpio -o -H newc --quiet) >"$initrd"

# L1 cannot calibrate its TSC under TCG on a busy host (no HPET or PM timer on microvm, the
# PIT loop misses its window) and then hangs; TCG's TSC is the host's, so pass its rate.
host_tsc_khz() {
  local mhz
  mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' | tail -n1)
  [ -n "$mhz" ] || mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9.]*\) MHz.*/\1/p' | tail -n1)
  [ -n "$mhz" ] || mhz=$(awk -F': *' '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo)
  [ -n "$mhz" ] && awk -v m="$mhz" 'BEGIN { printf "%d", m * 1000 }'
}
tsc_khz=$(host_tsc_khz || true)

# --- run L1 and follow its console ---
# -v shows L1's kernel messages on stderr as they come.
if [ "$verbose" -eq 1 ]; then kernel_log="loglevel=7"; else kernel_log="quiet loglevel=0"; fi
# The console comes through a FIFO. Holding it open read-write first means no open() below
# blocks (a signal then could land in a half-started child), and once fd 3 is closed the
# reader sees end-of-file exactly when QEMU is gone. The child drops the script's traps.
mkfifo "$tmp/console"
exec 3<>"$tmp/console"
t0=$EPOCHREALTIME
(
trap - INT TERM EXIT
exec 3>&- </dev/null >"$tmp/console" 2>"$tmp/qemu.err"
exec qemu-system-x86_64 -accel tcg,thread=multi \
  -M microvm,x-option-roms=off,isa-serial=on,rtc=on -cpu EPYC -smp "$cpus" -m "$memory" \
  -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
  -monitor "unix:$tmp/hmp.sock,server=on,wait=off" \
  -kernel "$l1/vmlinuz" -initrd "$initrd" \
  -append "console=ttyS0 $kernel_log panic=-1 mitigations=off nokaslr tsc=reliable${tsc_khz:+ tsc_early_khz=$tsc_khz} twinbox.nested=tcg"
) &
qemu_pid=$!
exec 4<"$tmp/console" 3>&-

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
deadline=$(( ${t0%.*} + timeout ))
# L1 normally reaches CMD in 4-10 s. Under TCG on a loaded host it sometimes never does (a
# stalled calibration); give up on the boot after BOOT_LIMIT seconds rather than at --timeout,
# and say so (exit 125 with "L1 did not finish booting"), so a caller can try again.
boot_deadline=$(( ${t0%.*} + ${TWINBOX_NESTED_BOOT_LIMIT:-180} ))
started="" code="" failure="" timed_out=0 line="" boot_stalled=0 silent=0
boot_lines=()
while :; do
  left=$(( deadline - ${EPOCHREALTIME%.*} ))
  if [ -z "$started" ] && [ $(( boot_deadline - ${EPOCHREALTIME%.*} )) -lt "$left" ]; then
    left=$(( boot_deadline - ${EPOCHREALTIME%.*} ))
    if [ "$left" -le 0 ]; then boot_stalled=1; timed_out=1; break; fi
  fi
  if [ "$left" -le 0 ]; then timed_out=1; break; fi
  wait_for=$left
  if [ -n "$started" ] && [ "$silence" -gt 0 ] && [ "$silence" -lt "$left" ]; then wait_for=$silence; fi
  if IFS= read -r -t "$wait_for" -u 4 line; then
    nl=1
  else
    # Timeout (status > 128), or end of file with maybe a last unterminated line.
    if [ $? -gt 128 ]; then
      if [ "$wait_for" -lt "$left" ]; then silent=1; else timed_out=1; [ -n "$started" ] || boot_stalled=1; fi
      break
    fi
    [ -n "$line" ] || break
    nl=0
  fi
  if [ -z "$started" ]; then
    case "$line" in
      *"$START_MARK"*) started=$EPOCHREALTIME ;;
      *"$FAIL_MARK "*"@@"*) failure=${line#*"$FAIL_MARK "}; failure=${failure%%@@*}; break ;;
      *) [ "$verbose" -eq 0 ] || printf '  | %s\n' "$line" >&2
         boot_lines+=("$line"); [ ${#boot_lines[@]} -gt 40 ] && boot_lines=("${boot_lines[@]:1}") ;;
    esac
  else
    case "$line" in
      *"$EXIT_MARK "*"@@"*)
        printf '%s' "${line%%"$EXIT_MARK "*}"
        code=${line##*"$EXIT_MARK "}; code=${code%%@@*}
        ended=$EPOCHREALTIME
        break ;;
      *) if [ "$nl" -eq 1 ]; then printf '%s\n' "$line"; else printf '%s' "$line"; fi ;;
    esac
  fi
  [ "$nl" -eq 1 ] || break
done
exec 4<&-

# A stalled L1: where its vCPUs stand, from QEMU's monitor, before it is stopped. RIPs are L1
# kernel addresses (L1 boots with nokaslr; Debian ships only a placeholder System.map, so take
# the symbols from the cached vmlinuz, e.g. with vmlinux-to-elf's kallsyms-finder on its
# decompressed payload); HLT=1 is an idle vCPU.
if [ "$silent" -eq 1 ] || [ "$timed_out" -eq 1 ]; then
  if command -v socat >/dev/null && [ -S "$tmp/hmp.sock" ]; then
    log "L1's vCPUs (QEMU monitor, info registers -a):"
    printf 'info registers -a\n' | timeout 10 socat -t 5 - "UNIX-CONNECT:$tmp/hmp.sock" 2>/dev/null |
      grep -E '^CPU#|^RIP=|^CR0=' | sed 's/^/  | /' >&2 || true
  fi
fi

# After the exit marker L1 powers itself off; give it a moment, then stop it anyway.
for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.2; done
cleanup_qemu_status=0
if kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid" 2>/dev/null || true; fi
wait "$qemu_pid" 2>/dev/null || cleanup_qemu_status=$?
qemu_pid=""
t_end=$EPOCHREALTIME

if [ -n "$code" ]; then
  log "L1 boot $(elapsed "$t0" "$started") s (QEMU start to CMD start), CMD $(elapsed "$started" "$ended") s, round $(elapsed "$t0" "$t_end") s; exit $code"
  exit "$code"
fi
[ ${#boot_lines[@]} -eq 0 ] || { log "last L1 console lines:"; printf '  | %s\n' "${boot_lines[@]}" >&2; }
# QEMU warns once per vCPU about EPYC features TCG lacks; those are expected.
grep -v "TCG doesn't support requested feature" "$tmp/qemu.err" >"$tmp/qemu.msg" || true
[ -s "$tmp/qemu.msg" ] && { log "QEMU said:"; sed 's/^/  | /' "$tmp/qemu.msg" >&2; }
if [ -n "$failure" ]; then
  die "L1 failed: $failure"
elif [ "$silent" -eq 1 ]; then
  die "L1 stalled: CMD printed nothing for ${silence} s (a stall under TCG; the vCPU registers are above)"
elif [ "$boot_stalled" -eq 1 ]; then
  die "L1 did not finish booting within ${TWINBOX_NESTED_BOOT_LIMIT:-180} s (a stalled boot under TCG; try again)"
elif [ "$timed_out" -eq 1 ]; then
  die "timed out after ${timeout} s ($([ -n "$started" ] && echo "CMD was running" || echo "L1 had not finished booting"))"
elif [ -n "$started" ]; then
  die "L1 stopped while CMD was running (no exit marker; QEMU status $cleanup_qemu_status)"
else
  die "L1 did not boot to its init (QEMU status $cleanup_qemu_status)"
fi
