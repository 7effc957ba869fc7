#!/usr/bin/env bash
# The CPU benchmark set (docs/benchmarks.md): each script writes JSON into bench-results/.
# A few minutes on 2 cores. BENCH_THREADS=1 pins torch to one thread per process (steadier
# ratios when other jobs share the cores); BENCH_OUT changes the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${BENCH_OUT:-bench-results}
WORK=${BENCH_WORK:-$OUT/work}   # generated random models, reused by later runs
THREADS=${BENCH_THREADS:+--threads $BENCH_THREADS}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" benchmarks/locator_cost.py --preset cpu --work "$WORK" $THREADS --json "$OUT/locator_cost.json"
"$PY" benchmarks/attack_sweep.py --preset cpu --work "$WORK" $THREADS --cli --json "$OUT/attack_sweep.json"
"$PY" benchmarks/compare_eval.py --preset cpu --work "$WORK" $THREADS --json "$OUT/compare_eval.json"
"$PY" benchmarks/compare_parallel.py --work "$WORK/compare" --json "$OUT/compare_parallel.json"
"$PY" benchmarks/generation.py --preset cpu $THREADS --json "$OUT/generation.json"
"$PY" benchmarks/train_overhead.py --preset cpu --work "$WORK/train" --json "$OUT/train_overhead.json"
"$PY" benchmarks/train_overhead.py --preset cpu --work "$WORK/train" --steps 30 --nproc 2 \
    --deepspeed yaml_configs/ds_z3_config.json --json "$OUT/train_overhead_zero3.json"
echo "bench: results in $OUT/"
