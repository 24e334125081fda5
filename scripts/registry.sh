#!/usr/bin/env bash
# A local OCI registry (Debian's docker-registry) for tests and benchmarks.
#   scripts/registry.sh start [--htpasswd USER:PASS] DIR   # prints the port; PID in DIR/pid
#   scripts/registry.sh stop DIR
# Blobs go under DIR/data; the registry listens on 127.0.0.1 on a free port (plain HTTP).
set -euo pipefail
# shellcheck source=scripts/lib/packages.sh
. "$(dirname "$0")/lib/packages.sh"

usage() { echo "usage: $0 start [--htpasswd USER:PASS] DIR | stop DIR" >&2; exit 2; }

cmd=${1:-}; shift || true
auth=""
if [ "${1:-}" = "--htpasswd" ]; then auth=${2:?--htpasswd needs USER:PASS}; shift 2; fi
dir=${1:-}; [ -n "$dir" ] || usage

case "$cmd" in
start)
  ensure_packages docker-registry
  mkdir -p "$dir/data"
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "a registry is already running from $dir (pid $(cat "$dir/pid"))" >&2; exit 1
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  {
    echo "version: 0.1"
    echo "log: {level: warn, accesslog: {disabled: true}}"
    echo "storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}"
    echo "http: {addr: 127.0.0.1:$port}"
    if [ -n "$auth" ]; then
      ensure_packages apache2-utils
      htpasswd -Bbn "${auth%%:*}" "${auth#*:}" > "$dir/htpasswd"
      echo "auth: {htpasswd: {realm: twinbox, path: $dir/htpasswd}}"
    fi
  } > "$dir/config.yml"
  nohup /usr/bin/docker-registry serve "$dir/config.yml" > "$dir/log" 2>&1 &
  echo $! > "$dir/pid"
  for _ in $(seq 100); do
    code=$(python3 - "$port" <<'EOF' 2>/dev/null || true
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1).status)
except urllib.error.HTTPError as e:
    print(e.code)
EOF
)
    if [ "$code" = 200 ] || [ "$code" = 401 ]; then echo "$port"; exit 0; fi
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/log" >&2; exit 1; }
    sleep 0.1
  done
  echo "registry did not answer on 127.0.0.1:$port; see $dir/log" >&2
  kill "$(cat "$dir/pid")" 2>/dev/null || true
  exit 1
  ;;
stop)
  [ -f "$dir/pid" ] || { echo "no registry pid in $dir" >&2; exit 1; }
  pid=$(cat "$dir/pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
  ;;
*) usage ;;
esac
