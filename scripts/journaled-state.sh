#!/usr/bin/env bash
# Run a command with the files that container launches create and delete on a fresh,
# journaled ext4, in a private mount namespace:
#   - twinbox's containers/ and tmp/ under the image store (overlay upper and work directories,
#     bundles, records),
#   - twinbox's runtime root (state.json, the exec fifo),
#   - runc's and crun's state directories (/run/runc, /run/crun).
# The image layers stay where they are: they are only read.
#
# What for: on ext4 without a journal the kernel will not reuse an inode freed in the last one
# to six minutes and scans past all of them on every allocation (fs/ext4/ialloc.c,
# recently_deleted), so launches slow down after many containers were removed. `twinbox bench`
# says so in its report when the store's containers/ directory is on such a filesystem; this
# script measures the same thing the way a host with a journaled filesystem (ext4's default,
# xfs) would.
#
#   scripts/journaled-state.sh [--size SIZE] -- CMD [ARG...]
#   scripts/journaled-state.sh -- twinbox bench --quick --out /tmp/r1
#
# Needs root, mkfs.ext4 and unshare. The filesystem image lives in a temporary directory under
# /var/tmp that is removed on exit, also on Ctrl-C; the mounts exist only in the namespace and
# go with it, and the loop device is detached when its filesystem is unmounted.
set -euo pipefail

usage() { grep '^#   scripts/journaled-state.sh' "$0" | sed 's/^#   /usage: /'; }
die() { echo "journaled-state.sh: $*" >&2; exit 1; }

size=2G
while [[ $# -gt 0 ]]; do
    case $1 in
        --size) [[ $# -ge 2 ]] || die "--size needs a value, e.g. --size 2G"; size=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
[[ $# -gt 0 ]] || { usage >&2; exit 2; }
[[ $EUID -eq 0 ]] || die "needs root (a loop mount in a private mount namespace)"
for tool in mkfs.ext4 unshare mount findmnt; do
    command -v "$tool" >/dev/null || die "$tool not found (apt install e2fsprogs util-linux mount)"
done

store=${TWINBOX_ROOT:-/var/lib/twinbox}
runtime_root=${TWINBOX_RUNTIME_ROOT:-/run/twinbox/runtime}
[[ -d $store/containers ]] || die "no image store at $store (set TWINBOX_ROOT, or build the default images: scripts/default-images.sh)"
# Existing containers would be hidden inside the namespace, and their records with them.
if [[ -n $(ls -A "$store/containers") ]]; then
    die "$store/containers is not empty: remove the containers first (twinbox ps -a; twinbox rm -f NAME)"
fi

work=$(mktemp -d /var/tmp/twinbox-journaled.XXXXXX)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
truncate -s "$size" "$work/state.img"
mkfs.ext4 -q -F -L twinbox-state "$work/state.img" || die "mkfs.ext4 failed on a $size image in $work"

export JS_WORK=$work JS_STORE=$store JS_RUNTIME=$runtime_root
# The targets are made on the host if missing, as the tools themselves would make them.
mkdir -p "$store/tmp" "$runtime_root" /run/runc /run/crun
# shellcheck disable=SC2016 # the inner shell expands these
unshare --mount --propagation private -- bash -euo pipefail -c '
    mnt=$JS_WORK/mnt
    mkdir -p "$mnt"
    mount -o loop "$JS_WORK/state.img" "$mnt"
    dev=$(basename "$(findmnt -no SOURCE "$mnt")")
    ls /proc/fs/jbd2 | grep -q "^$dev-" || { echo "journaled-state.sh: the new filesystem on $dev got no journal (too small? try --size 2G)" >&2; exit 1; }
    i=0
    for target in "$JS_STORE/containers" "$JS_STORE/tmp" "$JS_RUNTIME" /run/runc /run/crun; do
        mkdir -p "$mnt/$i"
        mount --bind "$mnt/$i" "$target"
        i=$((i + 1))
    done
    mkdir -p "$mnt/tmp"
    export TMPDIR=$mnt/tmp
    unset JS_WORK JS_STORE JS_RUNTIME
    exec "$@"
' journaled-state "$@"
