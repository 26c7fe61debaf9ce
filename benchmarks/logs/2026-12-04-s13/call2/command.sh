#!/usr/bin/env bash
# Run in session 13 as .gpu/offload_micro.py (scratch), committed as benchmarks/offload_micro.py with its docstring and layout tidied, its logic unchanged.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
source benchmarks/gpu_env.sh
t0=$(date +%s)
python3 -m pytest -x -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "free_each_layers_input" 2>&1 | grep -E "assert|Error|peak above|passed|failed" | head -20
echo "test at $(( $(date +%s) - t0 )) s"
python3 benchmarks/offload_micro.py eager cudnn,efficient 2>&1 | grep -E "ms/step|Error|error" | tee $OUT/micro_eager.log
echo "eager at $(( $(date +%s) - t0 )) s"
python3 benchmarks/offload_micro.py compile cudnn,efficient 2>&1 | grep -E "ms/step|Error|error" | tee $OUT/micro_compiled.log
echo "all at $(( $(date +%s) - t0 )) s"
