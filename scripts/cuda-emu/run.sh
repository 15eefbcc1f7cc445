#!/usr/bin/env bash
# Builds and runs the CPU emulation of the kernels (no GPU needed): harness.cpp covers the
# error-feedback step and selection, harness2.cpp sign, statistics, variance, aggregation.
# `run.sh quick` runs a reduced selection matrix.
#
# Each harness prints `ok   <case>` / `FAIL <case>: ...` per case and ends with
# `N passed, M failed`. This script runs both (the second even when the first fails), then
# ends with the totals alone on the last line, `N passed, M failed`, and exits non-zero
# when anything failed, did not build, or crashed before printing its summary.
set -uo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d "${TMPDIR:-/tmp}/gradsift-cuda-emu.XXXXXX")
trap 'rm -rf "$work"' EXIT
flags=(-std=c++20 -O1 -gdwarf-4 -ffp-contract=off -fno-fast-math -DGRADSIFT_CPU_EMU -I ../../kernels -pthread -no-pie)
# The sanitizer (emu.h): GCC's ThreadSanitizer instrumentation calls a hook before every
# memory access; emu.h defines the hooks, so the TSan runtime is NOT linked (compile with
# -fsanitize=thread, link without it).
san_flags=(-fsanitize=thread --param tsan-distinguish-volatile=1)

passed=0
failed=0
status=0
# run_harness SOURCE [ARGS...]
run_harness() {
  local src=$1 bin="$work/${1%.cpp}" log="$work/${1%.cpp}.log" rc summary
  shift
  if ! { g++ "${flags[@]}" "${san_flags[@]}" -c -o "$bin.o" "$src" && g++ "${flags[@]}" -o "$bin" "$bin.o"; }; then
    echo "FAIL $src: does not build"
    failed=$((failed + 1))
    status=1
    return
  fi
  "$bin" "$@" | tee "$log"
  rc=${PIPESTATUS[0]}
  summary=$(tail -n 1 "$log")
  if [[ $summary =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
  else
    echo "FAIL $src: exited with status $rc before its summary"
    failed=$((failed + 1))
  fi
  [ "$rc" -eq 0 ] || status=1
}

start=$SECONDS
run_harness harness2.cpp
run_harness harness.cpp "$@"
[ "$failed" -eq 0 ] || status=1
echo "cuda-emu: $((SECONDS - start)) s${1:+ ($1)}"
echo "$passed passed, $failed failed"
exit "$status"
