#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (+ ASan/UBSan) and runs each for a bounded time:
#   deploy/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# Prints executions and crashes per target; exits non-zero if any target crashed. Crash inputs
# are kept in build-fuzz/crashes/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
secs="${1:-60}"
dir="${LMSGD_FUZZ_BUILD_DIR:-build-fuzz}"
CC=clang CXX=clang++ cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLMSGD_FUZZ=ON \
  -DLMSGD_WITH_CUDA=OFF -DLMSGD_BUILD_TESTS=OFF >/dev/null
cmake --build "$dir" --target fuzz_job_spec fuzz_idx fuzz_jpeg fuzz_tar fuzz_checkpoint
mkdir -p "$dir/crashes"
status=0
printf "%-16s %12s %8s\n" target executions crashes
for t in job_spec idx jpeg tar checkpoint; do
  corpus="$dir/corpus/$t"
  mkdir -p "$corpus"
  seeds="tests/fuzz/seeds/$t"
  log="$dir/fuzz_$t.log"
  rc=0
  "$dir/tests/fuzz/fuzz_$t" -max_total_time="$secs" -artifact_prefix="$dir/crashes/$t-" -print_final_stats=1 \
    "$corpus" $( [ -d "$seeds" ] && echo "$seeds" ) >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  crashes=$(ls "$dir/crashes" | grep -c "^$t-" || true)
  printf "%-16s %12s %8s\n" "$t" "${execs:-?}" "$crashes"
  if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then status=1; echo "  see $log"; fi
done
exit $status
