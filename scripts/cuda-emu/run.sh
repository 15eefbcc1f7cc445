#!/usr/bin/env bash
# Builds and runs the CPU emulation of the kernels (no GPU needed) with its sanitizer
# (emu.h: racecheck, synccheck, memcheck, initcheck, random schedules):
#   planted.cpp   copies of kernel pieces with one planted bug each: every bug must be
#                 reported (the proof that the checks work);
#   harness2.cpp  sign, statistics, variance, aggregation against SPEC models;
#   harness.cpp   error-feedback step and selection against SPEC models.
# A case fails on a mismatch with its model or on any sanitizer report.
#
#   run.sh quick   CI: planted bugs; harness2 under the fixed schedule and 2 random ones;
#                  the reduced selection matrix under the fixed schedule and, for its
#                  smaller size, 1 random one.
#   run.sh [full]  the full matrix: every case under the fixed schedule and
#                  EMU_SEEDS (default 8) random schedules for harness2,
#                  EMU_SELECT_SEEDS (default 2) for the selection matrix.
#
# Each harness prints `ok   <case>` / `FAIL <case>: ...` per case and ends with
# `N passed, M failed`. This script runs them all (each even when an earlier one fails),
# then ends with the totals alone on the last line, `N passed, M failed`, and exits
# non-zero when anything failed, did not build, or crashed before printing its summary.
set -uo pipefail
cd "$(dirname "$0")"
mode=${1:-full}
case "$mode" in
  quick | full) ;;
  *) echo "usage: run.sh [quick|full]" >&2; exit 2 ;;
esac
work=$(mktemp -d "${TMPDIR:-/tmp}/gradsift-cuda-emu.XXXXXX")
trap 'rm -rf "$work"' EXIT
# -gdwarf-4: binutils 2.40's addr2line misnames files in GCC 12's DWARF 5 line tables.
flags=(-std=c++20 -O1 -gdwarf-4 -ffp-contract=off -fno-fast-math -DGRADSIFT_CPU_EMU -I ../../kernels -pthread -no-pie)
# The sanitizer (emu.h): GCC's ThreadSanitizer instrumentation calls a hook before every
# memory access; emu.h defines the hooks, so the TSan runtime is NOT linked (compile with
# -fsanitize=thread, link without it).
san_flags=(-fsanitize=thread --param tsan-distinguish-volatile=1)

passed=0
failed=0
status=0
declare -A built
# run_harness SOURCE [ARGS...]
run_harness() {
  local src=$1 bin="$work/${1%.cpp}" log rc summary
  shift
  log="$work/run.log"
  if [ -z "${built[$src]:-}" ]; then
    if ! { g++ "${flags[@]}" "${san_flags[@]}" -c -o "$bin.o" "$src" && g++ "${flags[@]}" -o "$bin" "$bin.o"; }; then
      echo "FAIL $src: does not build"
      failed=$((failed + 1))
      status=1
      return
    fi
    built[$src]=1
  fi
  local t0=$SECONDS
  echo "== $src $*"
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
  echo "== $src $*: $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

start=$SECONDS
run_harness planted.cpp
if [ "$mode" = quick ]; then
  run_harness harness2.cpp
  run_harness harness2.cpp --schedule random --seeds 2
  run_harness harness.cpp quick
  run_harness harness.cpp quick --only n=300 --schedule random --seeds 1
  run_harness harness.cpp quick --only batched --schedule random --seeds 1
else
  run_harness harness2.cpp
  run_harness harness2.cpp --schedule random --seeds "${EMU_SEEDS:-8}"
  run_harness harness.cpp
  run_harness harness.cpp --schedule random --seeds "${EMU_SELECT_SEEDS:-2}"
fi
[ "$failed" -eq 0 ] || status=1
echo "cuda-emu: $((SECONDS - start)) s ($mode)"
echo "$passed passed, $failed failed"
exit "$status"
