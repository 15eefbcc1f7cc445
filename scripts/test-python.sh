#!/usr/bin/env bash
# The Python package's tests (python/): a cached virtual environment (.cache/venv, git-ignored)
# with torch (PyPI's build, CUDA libraries included, run on the CPU), numpy, pytest and
# maturin; the abi3 wheel built with maturin and installed into it; then pytest, whose DDP
# tests start real gloo processes on 127.0.0.1. Prints how long each part took.
#
# In CI (CI=true) a missing requirement (python3 >= 3.11, network for the first install)
# fails the run; locally it prints SKIPPED and exits 0. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

in_ci=false
if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then in_ci=true; fi
note() { printf 'test-python.sh: %s\n' "$*" >&2; }
skip_or_fail() {
  if $in_ci; then note "ERROR: $*"; exit 1; fi
  echo "Python package tests: SKIPPED ($*)"
  exit 0
}

py=${PYTHON:-python3}
command -v "$py" >/dev/null 2>&1 || skip_or_fail "$py not found"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || skip_or_fail "$py is older than 3.11 (the abi3 wheel needs the buffer protocol of 3.11)"

venv=.cache/venv
t0=$(date +%s)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, numpy, pytest, maturin; assert torch.__version__.startswith("2.15.0")' 2>/dev/null; then
  note "installing torch, numpy, pytest, maturin into $venv (first run only; ~3 GB)"
  { "$py" -m venv "$venv" &&
    "$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir --upgrade pip &&
    "$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir torch==2.15.0 numpy==2.4.6 pytest==9.2.0 maturin==1.16.0; } ||
    skip_or_fail "could not install torch/numpy/pytest/maturin into $venv"
fi
t1=$(date +%s)

wheels=.cache/wheels
rm -rf "$wheels"
(cd python && "../$venv/bin/maturin" build --release --quiet -o "../$wheels") || { note "FAILED: maturin build"; exit 1; }
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$wheels"/gradsift-*.whl
t2=$(date +%s)

rc=0
# From outside python/, so that `import gradsift` is the installed wheel, not the sources.
(cd "${TMPDIR:-/tmp}" && OMP_NUM_THREADS=1 "$OLDPWD/$venv/bin/pytest" -q -p no:cacheprovider "$OLDPWD/python/tests" "$@") || rc=$?
t3=$(date +%s)

echo "Python package: venv+torch install $((t1 - t0)) s, wheel build $((t2 - t1)) s, pytest $((t3 - t2)) s"
exit "$rc"
