#!/usr/bin/env bash
# The test command of the README: installs what the GPU backends' tests need, then runs
# every test. On a laptop without root or network it runs what it can and says what it
# skipped; in CI (CI=true) a missing Vulkan adapter or NVRTC fails the run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

NVRTC_VERSION=13.0.88 # PTX from a newer NVRTC may not load on driver 580
in_ci=false
if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
  in_ci=true
  export GRADSIFT_REQUIRE_WGPU=1 GRADSIFT_REQUIRE_NVRTC=1
fi

note() { printf 'test.sh: %s\n' "$*" >&2; }
fail_or_warn() {
  if $in_ci; then note "ERROR: $*"; exit 1; else note "warning: $* (tests that need it will say SKIPPED)"; fi
}

# Mesa's lavapipe, so the WGSL shaders really run on a (software) Vulkan device.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  note "installing mesa-vulkan-drivers (lavapipe)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo_cmd="sudo -n"
  if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null; }; then
    fail_or_warn "could not install mesa-vulkan-drivers"
  fi
fi

# NVRTC from PyPI, so every CUDA kernel is at least compiled without a GPU or a CUDA install.
nvrtc_dir=".cache/nvrtc-$NVRTC_VERSION"
if [ ! -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  note "installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $nvrtc_dir"
  if ! python3 -m pip install -q --disable-pip-version-check --no-deps --target "$nvrtc_dir" "nvidia-cuda-nvrtc==$NVRTC_VERSION"; then
    fail_or_warn "could not install NVRTC"
  fi
fi
if [ -d "$nvrtc_dir/nvidia/cu13/lib" ]; then
  export LD_LIBRARY_PATH="$PWD/$nvrtc_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# Software rendering only: never pick up a real GPU's ICD by accident in CI.
if $in_ci && [ -z "${VK_ICD_FILENAMES:-}${VK_DRIVER_FILES:-}" ]; then
  lvp=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -n 1 || true)
  [ -n "$lvp" ] && export VK_DRIVER_FILES="$lvp"
fi

exec cargo test --features wgpu,cuda "$@"
