#!/usr/bin/env bash
# One device call for issue 18: automoe, v5, NeMo AutoModel and v5 + Liger-Kernel in one `automoe bench` run on
# qwen3-30b-a3b-l8 (seq 4096, then the batch-1 sweep), one profiled step per column at 4096, and NeMo's step beside
# automoe's (benchmarks/profile_compare.py), which is what benchmarks/NEMO_NOTES.md is written from.
# Run from the repo root with .whl/ carried (.whl/liger: liger-kernel; .whl/nemo: benchmarks/nemo_wheels.txt):
#   bash benchmarks/nemo_gpu_run.sh [more bench args]
# Results under $OUT: bench-*.json/png, bench.log, profile-*.txt/json, nemo_import.log, profile_compare.txt.
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LIGER_FUSED_MOE_AUTOTUNE=${LIGER_FUSED_MOE_AUTOTUNE:-0}  # its documented workaround; keeps the time box
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
$PIP --target /tmp/site .whl/liger/*.whl || exit 1
# NeMo and its pinned transformers in a folder of their own: only the nemo column's process puts it on its path
$PIP --target /tmp/nemo_site .whl/nemo/*.whl || echo "NeMo wheels did not install: the nemo column will be 'not run'"
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, triton; print('image:', torch.__version__, transformers.__version__, triton.__version__)"
# a light look first (its package __init__ is lazy): the column itself imports the model stack and reports what fails
PYTHONPATH=/tmp/nemo_site:$PYTHONPATH timeout 60 python3 -c "
import importlib.util, transformers, nemo_automodel
print('nemo', nemo_automodel.__version__, 'with transformers', transformers.__version__, '| TransformerEngine',
      importlib.util.find_spec('transformer_engine') is not None, '| cut-cross-entropy',
      importlib.util.find_spec('cut_cross_entropy') is not None)
" > "$OUT/nemo_import.log" 2>&1
echo "NeMo import check: rc $?"; tail -3 "$OUT/nemo_import.log"
timeout "${BENCH_S:-400}" python3 -m automoe.bench --workload qwen3-30b-a3b-l8 --columns automoe,v5,nemo,v5+liger \
    --seq 4096 --max-seq 32768 --steps 5 --warmup 3 --optimizer automoe --nemo-path /tmp/nemo_site \
    --out "$OUT" --profile "$OUT" "$@" > "$OUT/bench.log" 2>&1 &
BENCH=$!
tail -n +1 -f "$OUT/bench.log" --pid $BENCH | grep --line-buffered -E "^\[|path failed|Traceback|Error" | cut -c1-300
wait $BENCH; echo "bench: rc $?"
grep -q "^column " "$OUT/bench.log" && sed -n '/^column /,$p' "$OUT/bench.log" | cut -c1-400 || tail -30 "$OUT/bench.log"
python3 benchmarks/profile_compare.py "$OUT" --a automoe-automoe --b nemo | tee "$OUT/profile_compare.txt"
