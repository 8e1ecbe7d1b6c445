#!/usr/bin/env bash
# Runs every fuzz target for N seconds (default 10) on the stable toolchain, one after another,
# with J targets in parallel (default 1). Crashes land in fuzz/artifacts/TARGET/; copy each into
# fuzz/regressions/TARGET/ once fixed so `cargo test` replays it forever.
#
#   fuzz/run-all.sh [SECONDS] [JOBS]
set -euo pipefail
secs=${1:-10}
jobs=${2:-1}
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=$(cargo fuzz list)
cargo fuzz build -O >/dev/null
mkdir -p fuzz/logs
run() {
  t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
  # Seed from the golden vectors so the fuzzer starts from valid datagrams.
  cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=2048 -print_final_stats=1 \
    >"fuzz/logs/$t.log" 2>&1 || { echo "FAIL $t: see fuzz/logs/$t.log"; return 1; }
  execs=$(grep -m1 'stat::number_of_executed_units' "fuzz/logs/$t.log" | awk '{print $2}')
  cov=$(grep -oE 'cov: [0-9]+' "fuzz/logs/$t.log" | tail -1 | awk '{print $2}')
  ft=$(grep -oE 'ft: [0-9]+' "fuzz/logs/$t.log" | tail -1 | awk '{print $2}')
  echo "ok   $t: ${execs:-?} execs in ${secs}s, cov ${cov:-?}, features ${ft:-?}"
}
export -f run
export secs
status=0
printf '%s\n' $targets | xargs -P "$jobs" -I{} bash -c 'run {}' || status=1
exit $status
