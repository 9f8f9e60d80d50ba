#!/usr/bin/env bash
# One device call for issue 8: kernel tests on the GPU, the experts microbenchmark, then `automoe bench`
# (all columns, seq sweep, profiles). Run from the repo root with the liger-kernel wheel carried in .whl/.
#   bash benchmarks/gpu_kernels_run.sh [bench args...]
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# liger-kernel lives in .whl/liger/ (beside NeMo's set in .whl/nemo/, which only the nemo column installs)
if ls .whl/liger/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
STAGES=${STAGES:-tests,micro,bench}
if [[ $STAGES == *tests* ]]; then
    timeout "${TESTS_S:-150}" python3 -m pytest -q tests/test_kernels_triton.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $STAGES == *micro* ]]; then
    timeout "${MICRO_S:-120}" python3 benchmarks/experts_microbench.py --json "$OUT/experts_microbench.json" 2>&1 \
        | tee "$OUT/experts_microbench.log" | tail -12
fi
if [[ $STAGES == *bench* ]]; then
    timeout "${BENCH_S:-330}" python3 -m automoe.bench --out "$OUT" --profile "$OUT" "$@" 2>&1 \
        | tee "$OUT/bench.log" | grep -v "^USDT\|STAGE:" | tail -45
fi
