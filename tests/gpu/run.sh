#!/usr/bin/env bash
# Everything only a real NVIDIA GPU can check, in one go (well under 8 minutes on one
# GPU): the `gpu`-marked tests, the quickstart notebook against a real worker, and
# tests/gpu/figures.py (documentation examples at their sizes, an illegal memory
# access, placement and NVML, CuPy/PyTorch results, figures). Writes gpu-run.log and
# figures.md into OUTDIR (default $OUT, else ./gpu-run).
#
#   bash tests/gpu/run.sh [OUTDIR]            # on a GPU host with lan2gpu's needs installed
#   bash tests/gpu/run.sh OUTDIR --simulate   # dry run of the script on the simulator
#
# Wheels in .whl/ (for a machine without network) are installed first.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-gpu-run}}"
shift || true
mkdir -p "$out"
log="$out/gpu-run.log"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/lan2gpu-site .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/lan2gpu-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
status=0
{
    date
    command -v nvidia-smi >/dev/null && nvidia-smi
    python3 -c "import numba, numba.cuda; print('numba', numba.__version__); numba.cuda.detect()"
} >>"$log" 2>&1
if [ "${1:-}" != "--simulate" ]; then
    echo "== gpu-marked tests" | tee -a "$log"
    LAN2GPU_TEST_GPU=1 timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/e2e/test_gpu.py \
        >>"$log" 2>&1 || status=1
    echo "== quickstart notebook against a real worker" | tee -a "$log"
    timeout 240 python3 -m lan2gpu_magic demo notebooks/01-quickstart.ipynb >>"$log" 2>&1 || status=1
fi
echo "== checks and figures" | tee -a "$log"
timeout 300 python3 tests/gpu/figures.py --out "$out" "$@" 2>&1 | tee -a "$log" || status=1
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done (status $status); figures in $out/figures.md" | tee -a "$log"
exit $status
