#!/usr/bin/env bash
# Concurrent microVM launches in the nested L1 of scripts/nested-kvm.sh: ROUNDS rounds, each
# starting N `twinbox run --rm --network none --isolation microvm --memory 128m hello true` at
# once; every exit that is not 0 is printed with the end of its output, and the last line
# counts them: "launches: OK ok, FAILED failed (TRIPLE triple faults) in S s".
#   scripts/nested-launches.sh [--twinbox BIN] [--npt on|off] [N [ROUNDS]]   (default: 50 3)
# Exits 0 only when every launch succeeded (issue 20: 50 concurrent launches, 0 failures).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

twinbox=target/release/twinbox
npt=off
while [ $# -gt 0 ]; do
  case "$1" in
    --twinbox) twinbox=$2; shift 2 ;;
    --npt) npt=$2; shift 2 ;;
    -h|--help) sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "nested-launches: unknown option '$1'" >&2; exit 1 ;;
    *) break ;;
  esac
done
n=${1:-50} rounds=${2:-3}
case "$n$rounds" in ''|*[!0-9]*) echo "nested-launches: N and ROUNDS are whole numbers" >&2; exit 1 ;; esac
[ -x "$twinbox" ] || { echo "nested-launches: $twinbox is not built (cargo build --release)" >&2; exit 1; }

kernel=$("$here/build-guest-kernel.sh" | tail -n1)
work=$(mktemp -d "${TMPDIR:-/tmp}/twinbox-nested-launches.XXXXXX")
trap 'rm -rf "$work"' EXIT
p=$work/tb
mkdir -p "$p/bin" "$p/lib"
# shellcheck source=scripts/lib/payload.sh
. "$here/lib/payload.sh"
pack "$twinbox" "$p"
pack "$(command -v mkfs.ext4 || echo /usr/sbin/mkfs.ext4)" "$p"
cp "$kernel" "$p/vmlinux"
TWINBOX_ROOT=$p/store scripts/default-images.sh "$twinbox" >/dev/null

cat >"$p/run.sh" <<'EOF'
mkdir -p /lib/x86_64-linux-gnu /lib64
cp /payload/tb/lib/* /lib/x86_64-linux-gnu/
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
mount -t cgroup2 none /sys/fs/cgroup
export PATH=/payload/tb/bin:/bin:/sbin:/usr/bin:/usr/sbin TWINBOX_ROOT=/payload/tb/store TWINBOX_KERNEL=/payload/tb/vmlinux
cd /tmp
n=$1 rounds=$2
echo "kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt)"
# The image's root disk is made once, before the rounds.
twinbox run --rm --network none --isolation microvm --memory 128m hello true || exit 1
ok=0 failed=0 triple=0 round=0
start=$(cut -d' ' -f1 /proc/uptime)
while [ "$round" -lt "$rounds" ]; do
  round=$((round + 1))
  i=0
  while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    (twinbox run --rm --network none --isolation microvm --memory 128m hello true >"/tmp/out.$i" 2>&1
     echo $? >"/tmp/code.$i") &
  done
  wait
  i=0
  while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    if [ "$(cat "/tmp/code.$i")" = 0 ]; then ok=$((ok + 1)); continue; fi
    failed=$((failed + 1))
    ! grep -q "triple fault" "/tmp/out.$i" || triple=$((triple + 1))
    echo "round $round launch $i: exit $(cat "/tmp/code.$i"): $(tail -c 400 "/tmp/out.$i" | tr '\n' ' ')"
  done
  echo "after round $round: $ok ok, $failed failed"
done
took=$(awk -v a="$start" '{ print $1 - a }' /proc/uptime)
echo "launches: $ok ok, $failed failed ($triple triple faults) in $took s"
[ "$failed" -eq 0 ]
EOF

# Fifty 128 MiB guests fit in 8 GiB; a round prints within a few minutes.
code=0
"$here/nested-kvm.sh" --npt "$npt" --memory 8G --timeout 3600 --silence 600 --payload "$p" -- \
  sh /payload/tb/run.sh "$n" "$rounds" || code=$?
exit "$code"
