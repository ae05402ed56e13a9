#!/usr/bin/env bash
# Issue 14's GPU session in one command: the benchmark table, the memory modes and tests/test_gpu.py
# (benchmarks/gpu_check.py says what each stage measures). Everything lands in $OUT as it is measured.
#
# The device call (one NVIDIA H100/H200, no network, about 10 of its 15 minutes):
#
#   run(command="bash benchmarks/gpu_check.sh --budget_s 565", carry=[".whl"], timeout_s=590)
#
# The GPU machine's python3 (3.12) has torch, transformers, accelerate, safetensors, huggingface_hub,
# opencv-python-headless, Pillow and pytest, but no diffusers. Fetch its wheel first, here, in the
# repository root (.whl/ is git-ignored; the wheel is pure Python, 6.4 MB):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1
#
# diffusers 0.42.1 requires (`unzip -p .whl/diffusers-*.whl '*/METADATA' | grep ^Requires-Dist`):
# huggingface-hub >=1.32 (the image has 1.33.0), safetensors >=0.8.0 (0.8.0), filelock, numpy, regex,
# requests, Pillow (all there), and importlib_metadata, which it imports only on Python < 3.8: no other
# wheel is needed. If stages were skipped for time (the summary says which) and the session still has
# device time, continue with `bash benchmarks/gpu_check.sh --stages <the skipped ones> --budget_s ...`.
#
# On a CPU, `bash benchmarks/gpu_check.sh --mode tiny` is the dry run (tiny models, T = 2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "diffusers is not installed and .whl/ holds no wheel: fetch it as the header of $0 says" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
