#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input (fuzzing/src/lib.rs lists them) with cargo-fuzz and
# libFuzzer, SECONDS each (default 600), JOBS targets at a time (default: the number of CPUs).
#   scripts/fuzz.sh [--jobs N] [SECONDS] [TARGET...]
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz when it is
# missing. It starts from fuzz/seeds/<target>/ (written by hand) and fuzz/corpus/<target>/;
# new inputs that reach new code go to the corpus (minimized after the run), crashes to
# fuzz/artifacts/<target>/; the stable test fuzzing/tests/replay.rs runs both, so a
# crash, once fixed, is kept there as a test. Logs: fuzz/logs/<target>.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../fuzz"

jobs=$(nproc)
seconds=600
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
    [0-9]*) seconds=$1; shift ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: cargo-fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

cargo +nightly fuzz build --release
mkdir -p logs
run_one() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  # -rss_limit_mb: a leak or a bomb is a finding, not a dead machine; -timeout: one input
  # that takes more than 10 s is a hang.
  if cargo +nightly fuzz run --release "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"logs/$t.log" 2>&1; then
    status=clean
  else
    status="FOUND SOMETHING (fuzz/artifacts/$t/)"
  fi
  # Kept: one input per piece of code reached (edges, not hit counts), so the corpus the
  # replay test runs stays small.
  cargo +nightly fuzz cmin --release "$t" "corpus/$t" -- -use_counters=0 >>"logs/$t.log" 2>&1 || true
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -n1)
  cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -n1)
  echo "fuzz: $t: ${seconds} s, ${runs:-?} inputs, ${cov:-cov: ?}, $(find "corpus/$t" -type f | wc -l) in corpus: $status"
}
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
