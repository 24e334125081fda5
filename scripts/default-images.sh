#!/usr/bin/env bash
# Build the built-in default images from examples/ with nothing from the network:
#   hello:latest    scratch + a static Rust binary compiled here
#   busybox:latest  scratch + Debian's busybox-static and its applet links
# Usage: scripts/default-images.sh [TWINBOX_BINARY]   (store: --root / TWINBOX_ROOT as usual)
set -euo pipefail
cd "$(dirname "$0")/.."
twinbox=${1:-target/release/twinbox}

cargo rustc -q -p twinbox-hello --release -- -C target-feature=+crt-static -C strip=symbols
install -m 0755 target/release/hello examples/hello/hello
"$twinbox" build -q -t hello:latest examples/hello >/dev/null

busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q "statically linked"; then
  busybox=/bin/busybox
fi
if [ ! -x "$busybox" ]; then
  echo "default-images.sh: busybox-static is not installed (apt-get install busybox-static)" >&2
  exit 1
fi
rootfs=examples/busybox/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root"
install -m 0755 "$busybox" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
"$twinbox" build -q -t busybox:latest examples/busybox >/dev/null
echo "default images: hello:latest busybox:latest"
