#!/usr/bin/env bash
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
TORCH_LOGS=recompiles BUDGET=260 bash benchmarks/gpu_bench.sh --configs qlora-plain-2048x1,qlora-lowmem-on-gpu,qlora-lowmem --timed-tokens 48000 --profile-steps 1 > $OUT/bench_train.log 2>&1
grep -E "tok/s, padding|Recompiling|guard failure|    - |ms/micro-batch" $OUT/bench_train.log | cut -c1-700
echo "bench_train done at $(( $(date +%s) - t0 )) s"
NO_SMOKE=1 RUNS="lowmem@6:12" RUN_TIMEOUT=240 bash benchmarks/gpu_command.sh > $OUT/gpu_command.log 2>&1
tail -n 15 $OUT/gpu_command.log | cut -c1-600
echo "all done at $(( $(date +%s) - t0 )) s"
