#!/usr/bin/env bash
# Peak memory and wall time of `gradsift analyze` at real-model scale (issue 13): K workers x
# S steps of synthetic per-layer gradients (y_k = x + n_k, the layout of
# scripts/make_big_fixture.py), the default ten methods, per-layer mode. Prints the
# estimate that `gradsift analyze --help` gives (64 MiB + n K (12 + 10 G) bytes) beside the
# measured peak resident set, so a run that drifts from its own budget shows.
#
#   scripts/bench_analyze_scale.sh [BIN] [DIR]
#
# BIN: the gradsift binary (default target/debug/gradsift, the test profile: opt-level 2).
# DIR: where the fixture goes (default /tmp/gradsift-scale; reused when already complete).
# Env: WORKERS (5), STEPS (2), SIZES (the layers, comma separated; default 5 layers making
# 25 M elements, ResNet-50's parameter count), MAX_MEMORY (MiB, passed as --max-memory).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/gradsift}
dir=${2:-/tmp/gradsift-scale}
workers=${WORKERS:-5}
steps=${STEPS:-2}
sizes=${SIZES:-9437184,7077888,4718592,2359296,1957040}
[ -x "$bin" ] || { echo "bench_analyze_scale: no binary at $bin (cargo build --bin gradsift)" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || { echo "bench_analyze_scale: /usr/bin/time is needed (apt install time)" >&2; exit 1; }

stamp="$dir/.complete-$workers-$steps-$sizes"
if [ ! -e "$stamp" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "writing the fixture ($workers workers x $steps steps, layers $sizes) to $dir" >&2
  python3 scripts/make_big_fixture.py "$dir" --workers "$workers" --steps "$steps" --sizes "$sizes" >/dev/null
  touch "$stamp"
fi

n=$(python3 -c "print(sum(int(s) for s in '$sizes'.split(',')))")
args=(analyze "$dir" --json "$dir/report.json")
[ -n "${MAX_MEMORY:-}" ] && args+=(--max-memory "$MAX_MEMORY")
log="$dir/time.log"
/usr/bin/time -v "$bin" "${args[@]}" >"$dir/analyze.out" 2>"$log" || {
  cat "$log" >&2
  exit 1
}
peak_kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
wall=$(awk -F': ' '/Elapsed \(wall clock\) time/ {print $2}' "$log")
python3 - "$n" "$workers" "$peak_kib" "$wall" <<'EOF'
import sys
n, k, peak_kib, wall = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
mib = 1 << 20
peak = peak_kib * 1024
one = 64 * mib + n * k * (12 + 10 * 1)
every = 64 * mib + n * k * (12 + 10 * 10)
# The analysis before streaming (issue 13's measurement): about 110 bytes per element per worker.
before = n * k * 110
print(f"K = {k} workers x n = {n} elements: peak RSS {peak / mib:.0f} MiB, wall {wall}")
print(f"  estimate one method at a time {one / mib:.0f} MiB, all ten together {every / mib:.0f} MiB")
print(f"  error-feedback state of one method (n K 4 bytes): {n * k * 4 / mib:.0f} MiB; peak / that = {peak / (n * k * 4):.2f}")
print(f"  before streaming (110 bytes per element per worker): about {before / mib:.0f} MiB")
EOF
