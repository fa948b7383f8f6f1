#!/usr/bin/env bash
# One command on one GPU (under 8 minutes on an H100/H200): full-size Flux.1-dev and
# PixArt-Sigma at 1024 px, random weights, bf16: the eager diffusers model vs xdit_compile at
# degree 1 (eager and inductor), per-step latency, first call and peak memory
# (benchmarks/results/gpu_degree1.{json,md}); then the GPU-only tests.
#
#   bash benchmarks/gpu/run.sh            # from the repository root; needs torch with CUDA + diffusers
#
# Uses the python on PATH (set PYTHON=... to choose). With OUT set (the device tool), results
# and the test log are also copied there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The package maps passes/, runtime/... under xdit_compile (pyproject package-dir): install it
# (editable, no dependencies: torch, diffusers and transformers come from the machine).
"$PY" -c "import xdit_compile" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
status=0
timeout 420 "$PY" benchmarks/degree1.py --device cuda --size full --dtype bfloat16 --iters 10 --warmup 3 \
    --models flux-dev pixart-sigma --out gpu_degree1 || status=$?
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee benchmarks/results/gpu_tests.log || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu_degree1.* benchmarks/results/gpu_tests.log "$OUT"/ 2>/dev/null || true; fi
exit $status
