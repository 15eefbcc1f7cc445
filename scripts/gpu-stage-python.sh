#!/usr/bin/env bash
# Stages the Python package's GPU check in gpu-stage/python/ (git-ignored): the abi3 wheel
# built here with `--features cuda` (the device machine has PyTorch + CUDA + Python 3.12 but
# no Rust toolchain), the tests, and run.sh, which installs the wheel into a throw-away
# virtual environment that sees the machine's torch and runs pytest on the CUDA path:
# Compressor.cuda/step_ptr and Aggregator.cuda/aggregate_ptr against the CPU bit for bit, and
# the DDP hook with CUDA buckets on NCCL (1 process) and on gloo (2 processes).
# scripts/gpu-stage.sh calls it at its end; it also runs alone (then carry ["gpu-stage"] and
# run `bash gpu-stage/python/run.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=gpu-stage/python
venv=.cache/venv
maturin=$venv/bin/maturin
[ -x "$maturin" ] || { echo "needs $maturin: run scripts/test-python.sh once" >&2; exit 1; }
rm -rf "$stage"
mkdir -p "$stage"
(cd python && "../$maturin" build --release --quiet --features cuda -o "../$stage")
cp -r python/tests "$stage/tests"
rm -rf "$stage/tests/__pycache__"
cat >"$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# On the GPU machine: bash gpu-stage/python/run.sh (from the repository root).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$here/out}; mkdir -p "$OUT"
nvidia-smi -L 2>&1 | tee "$OUT/python-device.txt"
python3 --version | tee -a "$OUT/python-device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/python-device.txt"
# NVRTC 13 for the kernels: the one PyTorch's CUDA 13 wheels bring (nvidia/cu13/lib).
nvrtc=$(python3 -c 'import glob, site; print(next(iter(sorted({p.rsplit("/", 1)[0] for r in site.getsitepackages() for p in glob.glob(r + "/nvidia/cu13/lib/libnvrtc.so.13*") + glob.glob(r + "/nvidia/cuda_nvrtc/lib/libnvrtc.so.13*")})), ""))' 2>/dev/null)
[ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "nvrtc: ${nvrtc:-not found (system library path)}" | tee -a "$OUT/python-device.txt"
venv=$(mktemp -d)/venv
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --no-deps --no-index "$here"/gradsift-*.whl
"$venv/bin/python" -c 'import gradsift; assert gradsift.has_cuda(), "not a cuda build"; print("gradsift", gradsift.__version__, "cuda build")'
cd "$here/tests" && timeout 500 "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs test_cuda.py test_bad_inputs.py -k "not ranks" 2>&1 | tee "$OUT/python-pytest.log"
exit "${PIPESTATUS[0]}"
RUN
chmod +x "$stage/run.sh"
du -sh "$stage" >&2
echo "Device command (run tool, carry: [\"gpu-stage\"]): bash gpu-stage/python/run.sh" >&2
