#!/usr/bin/env bash
# CI without a GPU: installs NVRTC 13.0.x from PyPI (PTX from a newer NVRTC may not load on
# driver 580), points the loader at it, and runs the CUDA test binary with
# GRADSIFT_REQUIRE_NVRTC=1, so that every kernel must compile (PTX and sm_80 / sm_90
# cubins) and a missing NVRTC fails the run. GPU tests in the same binary skip with a
# printed reason. Optional: scripts/cuda-emu/run.sh quick runs the kernels on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "nvidia-cuda-nvrtc==13.0.88"
lib=$(python3 - <<'PY'
import glob, os, site
for r in site.getsitepackages() + [site.getusersitepackages()]:
    for pat in ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.13"):
        hits = glob.glob(os.path.join(r, pat))
        if hits:
            print(os.path.dirname(hits[0]))
            raise SystemExit
raise SystemExit("libnvrtc.so.13 not found after pip install")
PY
)
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
GRADSIFT_REQUIRE_NVRTC=1 cargo test --features cuda -- --nocapture
