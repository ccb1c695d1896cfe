#!/usr/bin/env bash
# One device call: environment report, the gpu-marked tests, then the block benchmark; everything under $OUT.
# Usage on the GPU machine (repo root): bash benchmarks/gpu_run.sh [CASES] [IMPLS]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
CASES=${1:-qwen3_30b_T1024,qwen3_30b_T4096,qwen3_30b_T16384}
IMPLS=${2:-hf_peft,merged_grouped_mm,torch_grouped_mm,jax_ragged_dot}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers, peft, jax; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt"
echo "== gpu tests"; date
timeout ${GPU_TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
echo "== block benchmark"; date
timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/moe_block.py --cases "$CASES" --impls "$IMPLS" \
  --out "$OUT/moe_block.jsonl" --markdown "$OUT/moe_block.md" --plot "$OUT/moe_block.png" 2>&1 | tee "$OUT/bench.log" | tail -n 40
date
