#!/usr/bin/env bash
# Runs the wgpu cross-backend suite. Without a GPU it uses Mesa's lavapipe (software Vulkan),
# installing it when missing (Debian/Ubuntu). CI sets GRADSIFT_REQUIRE_WGPU=1 so a missing
# adapter fails the run instead of skipping.
set -euo pipefail
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1
    else
        echo "lavapipe (mesa-vulkan-drivers) is missing and apt-get is unavailable" >&2
    fi
fi
cargo test --features wgpu --test wgpu_backend "$@" -- --nocapture
