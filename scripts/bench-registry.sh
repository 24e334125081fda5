#!/usr/bin/env bash
# Push (cold) and pull of a ~2 MB and a ~200 MB image, twinbox vs skopeo, against the same local
# registry (Debian's docker-registry), interleaved round by round, medians.
#   sudo scripts/bench-registry.sh [ROUNDS]        (default 5; uses target/release/twinbox)
# "Cold" push: each round pushes to a registry started empty for that push. Pull: into an empty
# store (twinbox) or an empty OCI layout (skopeo) from a registry that has the image.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
twinbox=$(pwd)/target/release/twinbox
[ -x "$twinbox" ] || { echo "build first: cargo build --release -p twinbox" >&2; exit 1; }
command -v skopeo >/dev/null || { echo "skopeo is not installed (apt-get install skopeo)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/twinbox-regbench.XXXXXX)
cleanup() {
  for d in "$work"/reg-*; do [ -f "$d/pid" ] && scripts/registry.sh stop "$d" >/dev/null 2>&1; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

export TWINBOX_ROOT=$work/store
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# Two images of poorly compressible data, built once.
for size in 2 200; do
  ctx=$work/ctx-$size
  mkdir -p "$ctx"
  head -c $((size * 1024 * 1024)) /dev/urandom > "$ctx/data"
  printf 'FROM scratch\nCOPY data /data\n' > "$ctx/Dockerfile"
  "$twinbox" build -q -t "bench/img$size:1" "$ctx" >/dev/null
  skopeo copy -q "oci:$TWINBOX_ROOT:bench/img$size:1" "oci:$work/layout:img$size" >/dev/null
done

declare -A samples
n=0
stop_registry() { scripts/registry.sh stop "$work/reg-$n" >/dev/null 2>&1; rm -rf "$work/reg-$n"; }

for round in $(seq "$rounds"); do
  for size in 2 200; do
    for tool in twinbox skopeo; do
      n=$((n + 1))
      port=$(scripts/registry.sh start "$work/reg-$n" 2>/dev/null | tail -1)
      dest=127.0.0.1:$port/bench/img$size:1
      [ $tool = twinbox ] && "$twinbox" tag "bench/img$size:1" "$dest"
      t=$(date +%s%N)
      if [ $tool = twinbox ]; then
        "$twinbox" push -q "$dest" >/dev/null
      else
        skopeo copy -q --dest-tls-verify=false "oci:$work/layout:img$size" "docker://$dest"
      fi
      samples[push-$size-$tool]+="$(ms "$t") "
      # Pull from the same registry into an empty destination.
      t=$(date +%s%N)
      if [ $tool = twinbox ]; then
        TWINBOX_ROOT=$work/pull-store "$twinbox" pull -q "$dest" >/dev/null
        rm -rf "$work/pull-store"
      else
        skopeo copy -q --src-tls-verify=false "docker://$dest" "oci:$work/pull-layout:x"
        rm -rf "$work/pull-layout"
      fi
      samples[pull-$size-$tool]+="$(ms "$t") "
      [ $tool = twinbox ] && "$twinbox" rmi "$dest" >/dev/null
      stop_registry
    done
  done
  echo "round $round done" >&2
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "registry transfer, $rounds rounds interleaved, median ms (all samples):"
for op in push pull; do
  for size in 2 200; do
    tw=$(echo "${samples[$op-$size-twinbox]}" | median)
    sk=$(echo "${samples[$op-$size-skopeo]}" | median)
    printf '  %-4s %3s MB  twinbox %6s  skopeo %6s  ratio %s   (twinbox: %s| skopeo: %s)\n' "$op" "$size" "$tw" "$sk" \
      "$(awk -v a="$tw" -v b="$sk" 'BEGIN {printf "%.2f", a / b}')" "${samples[$op-$size-twinbox]}" "${samples[$op-$size-skopeo]}"
  done
done
