#!/usr/bin/env bash
# Builds the test and bench binaries with --features cuda,nccl on this machine, stages them in
# the git-ignored gpu-stage/ with everything they need at runtime, and prints the one
# command to run on the device machine (repo root there, carry: ["gpu-stage"]). The device
# has CUDA and PyTorch but no Rust toolchain.
#
# Kernels reach the device as embedded CUDA sources (compiled there by NVRTC when a CUDA 13
# libnvrtc is found) and, as a fallback chosen explicitly by gpu-stage/run.sh, as PTX that
# NVRTC 13.0 built here (GRADSIFT_PTX). Set NVRTC_LIB_DIR to this machine's libnvrtc
# directory if it is not found automatically.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
stage="$root/gpu-stage"

find_nvrtc_dir() {
    if [[ -n "${NVRTC_LIB_DIR:-}" ]]; then echo "$NVRTC_LIB_DIR"; return; fi
    python3 - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for pat in ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.13"):
        hits = glob.glob(os.path.join(r, pat))
        if hits:
            print(os.path.dirname(hits[0])); raise SystemExit
PY
}

nvrtc_dir=$(find_nvrtc_dir)
if [[ -z "$nvrtc_dir" ]]; then
    echo "NVRTC 13 not found; install it: pip install nvidia-cuda-nvrtc==13.0.88" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/ptx"

build() {
    # $1: test | bench. Prints the executables cargo built.
    cargo "$1" --no-run --features cuda,nccl --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])
'
}

echo "building test binaries..." >&2
build test >"$stage/tests.txt"
echo "building bench binaries..." >&2
build bench >"$stage/benches.txt"

# Debug info is dropped: the carry limit is 64 MiB and backtraces keep function names.
copy() { # kind name path -> staged file name
    local dst="$stage/bin/$1-$2"
    cp "$3" "$dst"
    strip --strip-debug "$dst" 2>/dev/null || true
    echo "$1-$2"
}
: >"$stage/tests.list"
while read -r kind name path; do copy "$kind" "$name" "$path" >>"$stage/tests.list"; done <"$stage/tests.txt"
: >"$stage/benches.list"
while read -r kind name path; do
    [[ "$kind" == bench ]] && copy "$kind" "$name" "$path" >>"$stage/benches.list"
done <"$stage/benches.txt"
rm "$stage/tests.txt" "$stage/benches.txt"

# PTX for devices without a usable NVRTC 13.0 (and the compile test, run here once more).
tb=$(grep -m1 '^test-backends$' "$stage/tests.list" || true)
if [[ -n "$tb" ]]; then
    GRADSIFT_REQUIRE_NVRTC=1 GRADSIFT_DUMP_PTX="$stage/ptx" "$stage/bin/$tb" nvrtc::kernels_compile >&2
fi
# Cubins (sm_80, sm_90, sm_100 when NVRTC has it): machine code that loads on drivers older
# than the PTX would need (a CUDA 12.x driver with NVRTC 13's PTX fails to load it).
lt=$(grep -m1 '^lib-gradsift$' "$stage/tests.list" || true)
if [[ -n "$lt" ]]; then
    mkdir -p "$stage/cubin"
    GRADSIFT_DUMP_CUBIN="$stage/cubin" "$stage/bin/$lt" --ignored kernels_compile_with_nvrtc --nocapture >&2
fi
cp scripts/torch_topk.py "$stage/"

cat >"$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the device machine from the repo root: every test binary with
# GRADSIFT_REQUIRE_CUDA=1, then the benches, then the torch comparison; logs go to $OUT.
set -uo pipefail
OUT=${OUT:-gpu-stage/out}
mkdir -p "$OUT"
stage=gpu-stage
{
    nvidia-smi || true
    echo "driver/toolkit libraries:"
    ldconfig -p 2>/dev/null | grep -E "libcuda\.so|libnvrtc" || true
} >"$OUT/device.txt" 2>&1
# NVRTC: a CUDA 13.0.x libnvrtc if the machine has one (PTX from a newer NVRTC may not
# load on driver 580); otherwise the PTX that NVRTC 13.0 built off-device.
nvrtc=""
for cand in /usr/local/cuda/lib64/libnvrtc.so.13* /usr/local/cuda*/targets/*/lib/libnvrtc.so.13* \
    $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | tr ' ' '\n' | sed 's|$|/nvidia/cu13/lib/libnvrtc.so.13|'); do
    [[ -e "$cand" ]] || continue
    real=$(readlink -f "$cand")
    echo "found $cand -> $real" >>"$OUT/device.txt"
    case "$real" in *libnvrtc.so.13.0*) nvrtc="$cand"; break ;; esac
    # The pip wheel has no version in the file name; ask the library.
    ver=$(python3 -c "import ctypes,sys; l=ctypes.CDLL(sys.argv[1]); a=ctypes.c_int(); b=ctypes.c_int(); l.nvrtcVersion(ctypes.byref(a),ctypes.byref(b)); print(f'{a.value}.{b.value}')" "$real" 2>/dev/null || true)
    echo "  version $ver" >>"$OUT/device.txt"
    [[ "$ver" == 13.0 ]] && { nvrtc="$cand"; break; }
done
if [[ -n "$nvrtc" && -z "${GRADSIFT_FORCE_PTX:-}" ]]; then
    export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "kernels: NVRTC from $nvrtc" | tee -a "$OUT/device.txt"
else
    export GRADSIFT_PTX="$stage/ptx/compute_90.ptx"
    echo "kernels: no NVRTC 13 found, GRADSIFT_PTX=$GRADSIFT_PTX" | tee -a "$OUT/device.txt"
fi
# Shipped cubins are tried first (then NVRTC's own cubin, then PTX; src/cuda/image.rs).
if [[ -d "$stage/cubin" ]]; then
    export GRADSIFT_CUBIN_DIR="$stage/cubin"
    echo "kernels: cubins $(ls "$stage/cubin" | tr '\n' ' ')" | tee -a "$OUT/device.txt"
fi
# NCCL (tests/nccl.rs: a world-size-1 all-gather and device aggregation against the CPU).
# PyTorch's and PyPI's NCCL is libnccl.so.2, a name cudarc's loader does not try: expose it
# as libnccl.so through a private directory on LD_LIBRARY_PATH.
nccl=$( { ls /usr/lib/x86_64-linux-gnu/libnccl.so.2 /usr/local/cuda*/lib64/libnccl.so.2 2>/dev/null;
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null |
    sed 's|$|/nvidia/nccl/lib/libnccl.so.2|'; } | while read -r f; do [[ -e "$f" ]] && echo "$f"; done | head -n 1)
if [[ -n "$nccl" ]]; then
    mkdir -p "$stage/nccl-lib"
    ln -sf "$nccl" "$stage/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH="$PWD/$stage/nccl-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "nccl: $nccl (linked as $stage/nccl-lib/libnccl.so)" | tee -a "$OUT/device.txt"
else
    echo "nccl: no libnccl.so.2 found; tests/nccl.rs will fail under GRADSIFT_REQUIRE_CUDA=1" | tee -a "$OUT/device.txt"
fi
status=0
while read -r t; do
    echo "== $t"
    # Bounded so that a hang still leaves time for the benches within the 600 s call.
    GRADSIFT_REQUIRE_CUDA=1 RUST_BACKTRACE=1 timeout 300 "$stage/bin/$t" --test-threads=4 \
        --nocapture >"$OUT/$t.log" 2>&1
    rc=$?
    echo "rc=$rc"; tail -3 "$OUT/$t.log"
    [[ $rc -ne 0 ]] && status=1
done <"$stage/tests.list"
while read -r b; do
    echo "== $b"
    # The CUDA benches include issue 17's isolating pairs (about 12 more benchmarks).
    timeout 200 "$stage/bin/$b" --bench --warm-up-time 1 >"$OUT/$b.log" 2>&1
    echo "rc=$?"; grep -vE "^Benchmarking|^Found|^  [0-9]+ \(|^$|change:|No change|Performance has|^\s+(high|low) (mild|severe)" "$OUT/$b.log" | tail -40
done <"$stage/benches.list"
echo "== torch"
python3 "$stage/torch_topk.py" 2>&1 | tee "$OUT/torch_topk.json"
if [[ -x "$stage/python/run.sh" ]]; then
    echo "== python (gradsift wheel, CUDA hook)"
    OUT="$OUT" bash "$stage/python/run.sh" || status=1
fi
exit $status
RUN
chmod +x "$stage/run.sh"

# The Python package's CUDA check (wheel + pytest), staged in gpu-stage/python/.
if [ "${GRADSIFT_STAGE_PYTHON:-1}" != 0 ]; then
    scripts/gpu-stage-python.sh || echo "gpu-stage-python.sh failed; the Python check is not staged" >&2
fi

du -sh "$stage" >&2
echo >&2
echo "Device command (run tool, carry: [\"gpu-stage\"]):" >&2
echo "bash gpu-stage/run.sh"
