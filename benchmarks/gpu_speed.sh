#!/usr/bin/env bash
# One call on a 2-GPU machine (nvidia-h200-x2) for both single-GPU speed benchmarks at once, ~9 minutes:
#   GPU 0: bash benchmarks/gpu_bench.sh      training speed and memory vs the plain loop -> $OUT/bench_train.{md,json}
#   GPU 1: benchmarks/bench_generate.py      generation speed vs plain generate         -> $OUT/bench_generate.{json,log}
# They share the host's CPU, and CPU-bound steps (the plain loop, small QLoRA steps) slow down while the other
# process is busy, most of all while it compiles: two training benchmarks side by side measured the same plain
# LoRA loop at 3,187 and 4,767 tok/s, and 5,477-5,682 alone (RESULTS.md, session 3). Quote ratios within one
# process; for headline numbers run gpu_bench.sh alone on one GPU. Expects .gpu/ and .whl/ from benchmarks/prepare_gpu_carry.sh.
set -uo pipefail
source benchmarks/gpu_env.sh  # carried wheels into /tmp/site (once), PYTHONPATH, offline hub
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODEL=/tmp/llama2-7b-random
[ -f $MODEL/config.json ] || python3 benchmarks/make_random_llama.py --out $MODEL --tokenizer .gpu/llama2-tokenizer
python3 -c "import torch, transformers, peft, lightning, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__, 'bitsandbytes', b.__version__, 'GPUs', torch.cuda.device_count())"
CUDA_VISIBLE_DEVICES=0 BUDGET=${TRAIN_BUDGET:-450} bash benchmarks/gpu_bench.sh >"$OUT/bench_train.log" 2>&1 &
train=$!
CUDA_VISIBLE_DEVICES=1 timeout "${GENERATE_LIMIT:-510}" python3 benchmarks/bench_generate.py --model $MODEL --prompts .gpu/lima/test.jsonl \
  --reference_new_tokens "${REFERENCE_NEW_TOKENS:-200}" --out "$OUT/bench_generate.json" ${GENERATE_ARGS:-} 2>&1 |
  grep -v -i -E "warn|tip:|available:|LOCAL_RANK" >"$OUT/bench_generate.log"
echo "== generation (exit ${PIPESTATUS[0]})"; tail -n 14 "$OUT/bench_generate.log"
wait $train
echo "== training"; tail -n 40 "$OUT/bench_train.log"
