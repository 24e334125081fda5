#!/usr/bin/env bash
# Build the microVM guest kernel: Debian's linux-source-6.1, `make tinyconfig`, plus the
# fragment scripts/guest-kernel/microvm.config merged allnoconfig-style (options the fragment
# does not ask for stay off). Outputs vmlinux (ELF with the PVH entry note) and bzImage in
# ${TWINBOX_CACHE:-~/.cache/twinbox}/kernel/<key>/, key = sha256(recipe version, package
# version of linux-source-6.1, fragment); a cached kernel is reused at once, and
# kernel/latest points at the key of this checkout. Progress goes to stderr; stdout gets the
# paths, the last line is vmlinux.
#   scripts/build-guest-kernel.sh [--force]
set -euo pipefail
# shellcheck source=scripts/lib/packages.sh
. "$(dirname "$0")/lib/packages.sh"

# Bump when a step below changes what gets built (the fragment and the source version are
# already in the key).
RECIPE="twinbox-guest-kernel/1"
SOURCE_PKG=linux-source-6.1
TARBALL=/usr/src/linux-source-6.1.tar.xz
BUILD_PACKAGES=(build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils "$SOURCE_PKG")

SCRIPTS_DIR=$(cd "$(dirname "$0")" && pwd)
FRAGMENT=$SCRIPTS_DIR/guest-kernel/microvm.config
CACHE=${TWINBOX_CACHE:-$HOME/.cache/twinbox}/kernel

log() { echo "build-guest-kernel: $*" >&2; }
die() { log "$*"; exit 1; }

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  -h|--help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) die "unknown argument '$1' (usage: $0 [--force])" ;;
esac

install_packages() {
  ensure_packages "${BUILD_PACKAGES[@]}" || die "cannot install the packages above"
}

# Every line of the fragment must hold in the final .config: Kconfig silently drops an
# option whose dependencies are off, and a guest without its console or disk is hard to debug.
check_config() {
  local config=$1 bad=() line name
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*)
        grep -qxF -- "$line" "$config" || bad+=("want $line, got: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo absent)") ;;
      "# CONFIG_"*" is not set")
        name=${line#\# }; name=${name%% *}
        ! grep -qE "^$name=[ym]" "$config" || bad+=("want $name off, got: $(grep -E "^$name=" "$config")") ;;
    esac
  done <"$FRAGMENT"
  if [ ${#bad[@]} -gt 0 ]; then
    printf 'build-guest-kernel: %s\n' "${bad[@]}" >&2
    return 1
  fi
}

[ -f "$FRAGMENT" ] || die "config fragment $FRAGMENT is missing"
install_packages
[ -f "$TARBALL" ] || die "$TARBALL is missing although $SOURCE_PKG is installed"

version=$(dpkg-query -W -f='${Version}' "$SOURCE_PKG")
key=$({ printf '%s\n%s\n' "$RECIPE" "$version"; cat "$FRAGMENT"; } | sha256sum | cut -c1-16)
out=$CACHE/$key

# `latest` names the kernel of this checkout's recipe: what `twinbox run --isolation microvm`
# boots when neither --kernel nor TWINBOX_KERNEL says otherwise.
mark_latest() { ln -sfn "$key" "$CACHE/.latest-$key" && mv -T "$CACHE/.latest-$key" "$CACHE/latest"; }

if [ "$force" -eq 0 ] && [ -f "$out/vmlinux" ]; then
  log "cached: $out ($SOURCE_PKG $version)"
  mark_latest
  echo "$out/bzImage"
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.build-$key.XXXXXX")
buildlog=$work/build.log
child=""
cleanup() {
  trap '' INT TERM
  if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Long steps run in the background so a signal to this script acts at once (bash runs traps
# only between foreground commands); make passes the signal on to its compilers.
in_bg() { "$@" & child=$!; wait "$child"; local rc=$?; child=""; return "$rc"; }
# On failure keep the log where the user can read it; the work dir itself goes away.
fail() {
  cp "$buildlog" "$CACHE/failed-$key.log" 2>/dev/null || true
  tail -n 30 "$buildlog" >&2 || true
  die "$* (full log: $CACHE/failed-$key.log)"
}

SECONDS=0
log "building $SOURCE_PKG $version, key $key, in $work"
log "unpacking $TARBALL"
in_bg tar -xJf "$TARBALL" -C "$work" || die "cannot unpack $TARBALL"
src=$work/linux-source-6.1
[ -d "$src" ] || die "$TARBALL did not unpack to linux-source-6.1/"
kmake() { make -C "$src" ARCH=x86_64 "$@" >>"$buildlog" 2>&1; }

log "configuring: tinyconfig + $(basename "$FRAGMENT")"
kmake tinyconfig || fail "make tinyconfig failed"
# -n: the merged file seeds `make allnoconfig`, so newly visible options default to off
# rather than to their Kconfig defaults (olddefconfig would add IPv6, VT, HID, PS/2 mouse...).
(cd "$src" && ARCH=x86_64 scripts/kconfig/merge_config.sh -n .config "$FRAGMENT" >>"$buildlog" 2>&1) ||
  fail "merge_config.sh failed"
check_config "$src/.config" || fail "the fragment does not hold in the final .config (a dependency is missing)"

jobs=$(nproc)
log "compiling vmlinux and bzImage (nice -n 10, -j$jobs; $((SECONDS / 60))m$((SECONDS % 60))s so far)"
in_bg nice -n 10 make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux bzImage >>"$buildlog" 2>&1 || fail "kernel build failed"

readelf -n "$src/vmlinux" | grep -q '^ *Xen ' || fail "vmlinux has no Xen ELF note: the PVH entry is missing"

stage=$work/out
mkdir "$stage"
cp "$src/vmlinux" "$stage/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$src/.config" "$stage/config"
cp "$buildlog" "$stage/build.log"
cat >"$stage/info" <<EOF
recipe=$RECIPE
source=$SOURCE_PKG $version
fragment_sha256=$(sha256sum "$FRAGMENT" | cut -d' ' -f1)
compiler=$(gcc --version | head -n1)
build_seconds=$SECONDS
EOF

# Atomic publish: a rename of a complete directory. With --force the old one goes first; if a
# concurrent build published the same key meanwhile, keep theirs (same inputs, same kernel).
[ "$force" -eq 1 ] && rm -rf "$out"
mv -T "$stage" "$out" 2>/dev/null || [ -f "$out/vmlinux" ] || die "could not move the kernel to $out"
rm -f "$CACHE/failed-$key.log"
mark_latest

log "done in $((SECONDS / 60))m$((SECONDS % 60))s: vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes"
echo "$out/bzImage"
echo "$out/vmlinux"
