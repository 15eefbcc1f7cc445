#!/usr/bin/env bash
# Builds and runs the CPU emulation of the kernels (no GPU needed): harness.cpp covers the
# error-feedback step and selection, harness2.cpp sign, statistics, variance, aggregation.
# `run.sh quick` runs a reduced selection matrix.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/gradsift-cuda-emu
flags=(-std=c++20 -O1 -g -ffp-contract=off -fno-fast-math -DGRADSIFT_CPU_EMU -I ../../kernels -pthread)
g++ "${flags[@]}" -o "$out-2" harness2.cpp
"$out-2"
g++ "${flags[@]}" -o "$out" harness.cpp
"$out" "$@"
