#!/usr/bin/env bash
# The test command of the README: installs what the GPU backends' tests need, then runs
# every test: `cargo test --features wgpu,cuda,nccl,mpi "$@"` (mpi when OpenMPI and libclang
# are installed, which it tries), the Python package's tests (scripts/test-python.sh: wheel +
# pytest on real gloo processes) and, alongside them, the CUDA kernels
# under the CPU emulation (scripts/cuda-emu/run.sh quick, a few minutes), whose log is
# printed after cargo's and ends with `N passed, M failed`. The run fails if either fails;
# cargo's exit status wins when both do. On a laptop without root or network it runs what
# it can and says what it skipped; in CI (CI=true) a missing Vulkan adapter, NVRTC or g++
# fails the run instead.
#
# GRADSIFT_CUDA_EMU=quick (default) | full | 0: which emulation matrix to run, or none
# (0 says SKIPPED; refused in CI).
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

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo_cmd="sudo -n"

# Mesa's lavapipe, so the WGSL shaders really run on a (software) Vulkan device.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  note "installing mesa-vulkan-drivers (lavapipe)"
  if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null; }; then
    fail_or_warn "could not install mesa-vulkan-drivers"
  fi
fi

# OpenMPI and libclang, for the `mpi` feature (bindgen over mpi.h) and the multi-process
# tests (cli/tests/dist.rs: `mpirun -n 3` against the simulation). The `nccl` feature needs no
# install to build (NCCL is loaded at run time); its GPU test runs from scripts/gpu-stage.sh.
features=wgpu,cuda,nccl
have_mpi() {
  command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 &&
    ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1
}
if ! have_mpi; then
  note "installing openmpi-bin libopenmpi-dev libclang-dev (MPI tests)"
  if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev >/dev/null; }; then
    fail_or_warn "could not install OpenMPI and libclang"
  fi
fi
if have_mpi; then
  features="$features,mpi"
  # CI containers run as root; 3 ranks on a 2-core runner need oversubscription.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  if $in_ci; then export GRADSIFT_REQUIRE_MPI=1; fi
else
  note "MPI tests (cli/tests/dist.rs, feature mpi): SKIPPED (no OpenMPI/libclang)"
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

# The Vulkan loader probes a Wayland socket there; without it every adapter query prints an
# error line (harmless, but it buries the test output).
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gradsift-xdg.XXXXXX")
  export XDG_RUNTIME_DIR
fi

# Software rendering only: never pick up a real GPU's ICD by accident in CI.
if $in_ci && [ -z "${VK_ICD_FILENAMES:-}${VK_DRIVER_FILES:-}" ]; then
  lvp=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -n 1 || true)
  [ -n "$lvp" ] && export VK_DRIVER_FILES="$lvp"
fi

# The CUDA emulation: g++ builds the real kernels for the CPU (see scripts/cuda-emu/).
emu_mode=${GRADSIFT_CUDA_EMU:-quick}
emu_skip=""
case "$emu_mode" in
  quick | full) ;;
  0)
    if $in_ci; then note "ERROR: GRADSIFT_CUDA_EMU=0 in CI: the CUDA emulation may not be skipped"; exit 1; fi
    emu_mode=""
    emu_skip="GRADSIFT_CUDA_EMU=0"
    ;;
  *) note "ERROR: GRADSIFT_CUDA_EMU=$emu_mode: expected quick, full or 0"; exit 1 ;;
esac
if [ -n "$emu_mode" ] && ! command -v g++ >/dev/null 2>&1; then
  fail_or_warn "g++ not found, needed by the CUDA emulation (scripts/cuda-emu)"
  emu_mode=""
  emu_skip="g++ not found"
fi

emu_pid=""
emu_log=""
cleanup() {
  # An interrupted run must not leave the emulation running: it has its own process group.
  if [ -n "$emu_pid" ]; then kill -- "-$emu_pid" 2>/dev/null || kill "$emu_pid" 2>/dev/null || true; fi
  if [ -n "$emu_log" ]; then rm -f "$emu_log"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "$emu_mode" ]; then
  emu_args=()
  [ "$emu_mode" = quick ] && emu_args=(quick)
  emu_log=$(mktemp "${TMPDIR:-/tmp}/gradsift-test-emu.XXXXXX")
  # Niced, so that building the tests keeps priority on a small machine.
  if command -v setsid >/dev/null 2>&1; then
    setsid nice -n 10 scripts/cuda-emu/run.sh "${emu_args[@]}" >"$emu_log" 2>&1 &
  else
    nice -n 10 scripts/cuda-emu/run.sh "${emu_args[@]}" >"$emu_log" 2>&1 &
  fi
  emu_pid=$!
fi

cargo_rc=0
cargo test --features "$features" "$@" || cargo_rc=$?

# Every feature combination builds without warnings and passes clippy: the bare library and
# each backend alone (`-p gradsift`, so that the CLI's features do not unify into it), the
# workspace's default (the library and gradsift-cli, which has every backend), and that plus
# nccl and mpi; the docs build without warnings for the bare library and for everything. In
# CI, or with GRADSIFT_LINT=1; it overlaps the emulation, which runs in the background.
lint_rc=0
if [ "$cargo_rc" -eq 0 ] && { $in_ci || [ "${GRADSIFT_LINT:-}" = 1 ]; }; then
  if ! cargo fmt --check; then note "cargo fmt --check failed"; lint_rc=1; fi
  for fs in "-p gradsift --no-default-features" "-p gradsift --no-default-features --features cuda" \
    "-p gradsift --no-default-features --features wgpu" "" "--features ${features#wgpu,cuda,}"; do
    note "clippy ${fs:-(default features)} -D warnings"
    # shellcheck disable=SC2086
    if ! cargo clippy $fs --all-targets -- -D warnings; then
      note "clippy failed for ${fs:-default features}"
      lint_rc=1
    fi
  done
  # The Python extension (python/, a crate outside the workspace: its own lock file and target).
  note "clippy python/ (the extension) -D warnings"
  if ! (cd python && cargo fmt --check && cargo clippy --release --all-targets -- -D warnings); then
    note "fmt or clippy failed for python/"
    lint_rc=1
  fi
  # Intra-doc links to feature-gated or private items break only some feature sets' docs.
  for fs in "-p gradsift --no-default-features" "--features $features"; do
    note "cargo doc $fs -D warnings"
    # shellcheck disable=SC2086
    if ! RUSTDOCFLAGS="-D warnings" cargo doc --no-deps $fs; then
      note "cargo doc failed for $fs"
      lint_rc=1
    fi
  done
elif [ "$cargo_rc" -eq 0 ]; then
  note "lint (fmt, clippy over 5 feature sets and python/, cargo doc over 2): SKIPPED (runs with CI=true or GRADSIFT_LINT=1)"
fi

# The Python package (python/): wheel + pytest with real gloo processes
# (scripts/test-python.sh; GRADSIFT_PYTHON=0 skips it locally, refused in CI).
py_rc=0
if [ "${GRADSIFT_PYTHON:-1}" = 0 ]; then
  if $in_ci; then note "ERROR: GRADSIFT_PYTHON=0 in CI: the Python tests may not be skipped"; exit 1; fi
  echo "Python package tests: SKIPPED (GRADSIFT_PYTHON=0)"
elif [ "$cargo_rc" -eq 0 ]; then
  scripts/test-python.sh || py_rc=$?
fi

emu_rc=0
if [ -n "$emu_mode" ]; then
  if [ "$cargo_rc" -ne 0 ]; then note "cargo test failed (exit $cargo_rc); waiting for the CUDA emulation"; fi
  wait "$emu_pid" || emu_rc=$?
  emu_pid=""
  echo
  echo "CUDA emulation (scripts/cuda-emu/run.sh ${emu_args[*]:-}):"
  cat "$emu_log"
else
  echo
  echo "CUDA emulation: SKIPPED ($emu_skip)"
fi

if [ "$cargo_rc" -ne 0 ]; then
  note "FAILED: cargo test (exit $cargo_rc)"
  exit "$cargo_rc"
fi
if [ "$emu_rc" -ne 0 ]; then
  note "FAILED: CUDA emulation (exit $emu_rc)"
  exit "$emu_rc"
fi
if [ "$py_rc" -ne 0 ]; then
  note "FAILED: Python package tests (scripts/test-python.sh, exit $py_rc)"
  exit "$py_rc"
fi
if [ "$lint_rc" -ne 0 ]; then
  note "FAILED: lint (cargo fmt --check / clippy -D warnings)"
  exit "$lint_rc"
fi
