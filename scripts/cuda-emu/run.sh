#!/usr/bin/env bash
# Builds and runs the CPU emulation of the selection kernels (no GPU needed).
# `run.sh quick` runs a reduced matrix.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/gradsift-cuda-emu
g++ -std=c++20 -O1 -g -ffp-contract=off -fno-fast-math -DGRADSIFT_CPU_EMU -I ../../kernels \
    -Wno-unused-variable -o "$out" harness.cpp -pthread
"$out" "$@"
