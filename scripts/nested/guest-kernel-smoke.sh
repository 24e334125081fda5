#!/usr/bin/env bash
# Boot the guest kernel of scripts/build-guest-kernel.sh under real KVM inside the nested L1
# (scripts/nested-kvm.sh), with Debian's QEMU `-M microvm` as a stand-in VMM until twinbox's
# own can do it. Checks, for vmlinux (PVH entry) and bzImage: the kernel reaches userspace
# from an initramfs, sees every vCPU (MP table, no ACPI), and /dev/mem reaches the boot-timer
# address. Exit 0 when both boot. -v prints the guests' whole consoles.
#   scripts/nested/guest-kernel-smoke.sh [-v] [--cpus N]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cpus=2
quiet=quiet
while [ $# -gt 0 ]; do
  case "$1" in
    -v) quiet=""; shift ;;
    --cpus) cpus=$2; shift 2 ;;
    *) echo "usage: $0 [-v] [--cpus N]" >&2; exit 1 ;;
  esac
done

kernel=$("$here/../build-guest-kernel.sh" | tail -n1)
work=$(mktemp -d "${TMPDIR:-/tmp}/twinbox-l2.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The payload: QEMU with its shared libraries (run through their own loader), its microvm
# firmware, the two kernel images and the L2 initramfs.
p=$work/l2
mkdir -p "$p/lib" "$p/share"
cp /usr/bin/qemu-system-x86_64 "$p/"
ldd /usr/bin/qemu-system-x86_64 | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }' |
  while read -r lib; do cp -L "$lib" "$p/lib/$(basename "$lib")"; done
cp -L /usr/share/qemu/qboot.rom /usr/share/qemu/bios-microvm.bin "$p/share/"
cp "$kernel" "$(dirname "$kernel")/bzImage" "$p/"

g=$work/guest
mkdir -p "$g"/{bin,proc,sys,dev}
cp /bin/busybox "$g/bin/busybox"
for applet in sh mount cat grep devmem echo reboot; do ln -s busybox "$g/bin/$applet"; done
cat >"$g/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs dev /dev
cpus=$(grep -c ^processor /proc/cpuinfo)
# Firecracker's boot-timer byte; under QEMU nothing listens there, the write must just work.
devmem 0xc0000000 8 123 && timer=ok || timer=failed
echo "L2-UP kernel=$(cat /proc/sys/kernel/osrelease) cpus=$cpus devmem=$timer uptime=$(cut -d' ' -f1 /proc/uptime)s"
reboot -f
EOF
chmod 755 "$g/init"
(cd "$g" && find . | cpio -o -H newc --quiet | gzip -9) >"$p/initrd.gz"

cat >"$p/boot-l2" <<EOF
#!/bin/sh
# Runs in L1: boot each kernel image given, expect the L2-UP line with $cpus CPUs.
rc=0
for image in "\$@"; do
  t0=\$(cut -d' ' -f1 /proc/uptime)
  out=\$(/payload/l2/lib/ld-linux-x86-64.so.2 --library-path /payload/l2/lib /payload/l2/qemu-system-x86_64 \\
    -accel kvm -M microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off -cpu host -smp $cpus -m 256M \\
    -nodefaults -no-user-config -nographic -no-reboot -serial stdio -L /payload/l2/share \\
    -kernel /payload/l2/\$image -initrd /payload/l2/initrd.gz \\
    -append "console=ttyS0 $quiet reboot=t panic=-1" </dev/null 2>&1)
  t1=\$(cut -d' ' -f1 /proc/uptime)
  line=\$(echo "\$out" | grep -m1 L2-UP || true)
  echo "\$image: \${line:-no L2-UP line} (QEMU round \$(awk -v a=\$t0 -v b=\$t1 'BEGIN { printf "%.2f", b - a }') s in L1 time)"
  [ -n "$quiet" ] || echo "\$out"
  case "\$line" in
    *"cpus=$cpus devmem=ok"*) ;;
    *) rc=1; echo "\$out" | tail -n 30 ;;
  esac
done
exit \$rc
EOF
chmod 755 "$p/boot-l2"

echo "payload: $(du -sh "$p" | cut -f1)" >&2
"$here/../nested-kvm.sh" --payload "$p" --timeout 600 -- boot-l2 vmlinux bzImage
