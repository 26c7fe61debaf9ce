#!/usr/bin/env bash
# On a GPU machine: write the random Llama-2-7B-shaped model, then measure training speed and memory with
# one bench_train.py run (plain transformers+PEFT+bitsandbytes loop vs lima-lightning, QLoRA and LoRA).
# Expects .gpu/ holding llama2-tokenizer/ and lima/ (copies of ../shared) and, where packages are missing,
# wheels in .whl/. Results: $OUT/bench_train.{md,json} (rewritten after every configuration, so a run cut
# short keeps its rows). The whole script is meant to stay under ~8 minutes: BUDGET (seconds for the
# benchmark, default 480 minus the time spent writing the model) skips what would not fit; a configuration
# still running 60 s past it is stopped, so the script ends within ~9 minutes even then.
set -uo pipefail
source benchmarks/gpu_env.sh  # carried wheels into /tmp/site (once), PYTHONPATH, offline hub
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
MODEL=/tmp/llama2-7b-random
[ -f $MODEL/config.json ] || python3 benchmarks/make_random_llama.py --out $MODEL --tokenizer .gpu/llama2-tokenizer
model_s=$(( $(date +%s) - start ))
BUDGET=${BUDGET:-$(( 480 - model_s ))}
echo "model ready in ${model_s} s; benchmark budget ${BUDGET} s"
python3 benchmarks/bench_train.py --model $MODEL --lima .gpu/lima/train.jsonl --out "$OUT/bench_train.json" \
  --time-budget "$BUDGET" "$@" 2>&1 | grep -v -i -E "warn|tip:|available:|LOCAL_RANK|stepping batches"
echo "total $(( $(date +%s) - start )) s"
