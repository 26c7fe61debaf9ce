#!/usr/bin/env bash
# On a GPU machine: the time from command to result of the shipped CLI (benchmarks/bench_command.py), after a
# one-minute smoke run of the same code on the tiny model so that a broken path costs seconds, not the call.
#   RUNS="qlora@141,predict-qlora@141" bash benchmarks/gpu_command.sh        (see bench_command.py for RUN@GIB[:STEPS])
# Expects .gpu/ (llama2-tokenizer/, lima/) and .whl/ from benchmarks/prepare_gpu_carry.sh. Results in $OUT:
# bench_command.json (rewritten after every run), bench_command.log, smoke.log, environment.txt.
set -uo pipefail
source benchmarks/gpu_env.sh  # carried wheels into /tmp/site (once), PYTHONPATH, offline hub
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
RUNS=${RUNS:?set RUNS, e.g. qlora@141,predict-qlora@141}
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, lightning, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__, 'bitsandbytes', b.__version__)"
} 2>&1 | tee "$OUT/environment.txt"
MODEL=/tmp/llama2-7b-random
[ -f $MODEL/config.json ] || python3 benchmarks/make_random_llama.py --out $MODEL --tokenizer .gpu/llama2-tokenizer
echo "model ready after $(( $(date +%s) - start )) s"
if [ -z "${NO_SMOKE:-}" ]; then
  # The shipped QLoRA config on the tiny model: budget, auto checkpointing, compile, validation, samples, predict.
  smoke=(--config configs/llama2-7b-qlora.yaml --model.base_model tiny --gpu_memory_gib 24 --trainer.default_root_dir /tmp/smoke
         --trainer.enable_progress_bar false --data.max_seq_length 256 --data.max_tokens_per_batch 1024 --model.compile false)
  # First the GPU-only decoding path every run below takes: CUDA-graph steps must give the eager steps' tokens.
  timeout 180 python3 -m pytest -m gpu tests/test_gpu.py -k "cuda_graph or decoding_loop" -p no:cacheprovider -q > "$OUT/smoke.log" 2>&1 \
  && timeout 240 python3 -m lima_lightning fit "${smoke[@]}" --data.dataset .gpu/lima/train.jsonl --trainer.max_steps 6 \
    --trainer.val_check_interval 6 --trainer.limit_val_batches 2 >> "$OUT/smoke.log" 2>&1 \
  && timeout 120 python3 -m lima_lightning predict "${smoke[@]}" --config configs/predict.yaml --data.predict_dataset .gpu/lima/test.jsonl \
    --model.adapter_path "$(python3 -m lima_lightning.runs latest-adapter /tmp/smoke)" --model.generation.max_new_tokens 16 >> "$OUT/smoke.log" 2>&1
  status=$?
  tail -n 12 "$OUT/smoke.log"
  if [ $status -ne 0 ]; then echo "smoke run failed ($status): stopping"; exit 1; fi
  echo "smoke run passed after $(( $(date +%s) - start )) s"
fi
python3 benchmarks/bench_command.py --model $MODEL --lima .gpu/lima --runs "$RUNS" --out "$OUT/bench_command.json" \
  --timeout "${RUN_TIMEOUT:-560}" 2>&1 | tee "$OUT/bench_command.log"
echo "total $(( $(date +%s) - start )) s"
