#!/usr/bin/env bash
# Several GPUs through Lightning's own strategies, on one machine with 2 GPUs (2x H200: ~6 minutes), on a
# Llama-2-7B-shaped random model (the hub is unreachable there) with the real tokenizer and LIMA's lengths:
#   1. QLoRA, 1 GPU (accumulate 2) vs 2 GPUs DDP (accumulate 1): the same global batch and the same micro-batches
#      in every step. Prints the speedup in wall time per step (goal >= 1.85x), tokens/s, and the first steps'
#      loss curves side by side (they must match to bf16 rounding: LoRA dropout is off so both draw nothing).
#   2. FSDP QLoRA smoke (configs/llama2-7b-qlora-fsdp.yaml): a few steps, validation, adapter gathered and saved.
#   3. FSDP bf16 LoRA smoke: the same with --model.quantization none.
#   4. DDP predict on 2 GPUs with the adapter of 1.: one predictions.jsonl, each of the 300 prompts once, in input order.
#   5. bf16 LoRA 1 GPU vs 2 GPUs, only if the time budget still allows.
# Each phase is killed (with its rank processes) after a time limit, and a failure does not stop the next one.
# Expects .gpu/llama2-tokenizer/ and .gpu/lima/{train,test}.jsonl (copies of ../shared), like gpu_smoke.sh.
#   bash benchmarks/bench_ddp.sh                 # STEPS=10 optimizer steps per timed run, BUDGET=350 s in all
# PHASES="fsdp-lora predict" runs only those (speed-qlora fsdp-qlora fsdp-lora predict speed-lora), budget or not:
# a second call for what the first skipped.
# CPU_REHEARSAL=1 runs the same phases on the CPU (2 gloo processes, the built-in tiny model and synthetic data,
# FSDP skipped: it needs CUDA) to check the script itself; its timings mean nothing.
set -uo pipefail  # keep going after a failed phase: one GPU call should report on all of them
set +m            # no job control: background phases stay in this process group until setsid moves them
# NVLink multicast (NVLS) must stay off on these machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source benchmarks/gpu_env.sh  # carried wheels into /tmp/site (once), PYTHONPATH, offline hub
STEPS=${STEPS:-10}
BUDGET=${BUDGET:-350}
OUT=${OUT:-/tmp/out}
RUNS=/tmp/runs-ddp-$(date +%s)
LOGS=$OUT/bench_ddp
mkdir -p "$LOGS"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
REHEARSAL=${CPU_REHEARSAL:-0}
command -v setsid >/dev/null || setsid() { "$@"; }  # without it a killed phase may leave its rank 1 behind
{  # everything below also goes to $LOGS/report.txt
[ "$REHEARSAL" = 1 ] || nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, lightning, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__, 'bitsandbytes', b.__version__, 'GPUs', torch.cuda.device_count())"

# run_phase NAME LIMIT_S COMMAND...: its own process group (Lightning's launcher starts rank 1 as a child),
# killed as a whole after LIMIT_S seconds; the log goes to $LOGS/NAME.log, its tail to the report.
run_phase() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit} s, at $(elapsed) s)"
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null  # at the limit; or leftovers of a rank that outlived its parent
  wait "$pid"; rc=$?
  PHASE_SECONDS=$(( $(date +%s) - start ))
  grep -v -i -E "warn|tip:|^\s*$|it/s\]|deprecat" "$LOGS/$name.log" | tail -n 12 | sed 's/^/  | /'
  echo "  $name: exit $rc after $(( $(date +%s) - start )) s$([ "$rc" = 137 ] && echo ' (KILLED at the limit: a hang?)')"
  return "$rc"
}
# want PHASE SECONDS: run PHASE? Named in PHASES, or (PHASES unset) it should end within the budget. The
# estimates scale with the 2-GPU QLoRA run (UNIT: process start, two model loads, a few steps, saving).
want() {
  if [ -n "${PHASES:-}" ]; then [[ " $PHASES " == *" $1 "* ]]; return; fi
  [ $(( $(elapsed) + $2 )) -le "$BUDGET" ] || { echo "== $1 skipped: would end at ~$(( $(elapsed) + $2 )) s > BUDGET=$BUDGET (run it with PHASES=$1)"; return 1; }
}
UNIT=90
# gpu_memory NAME: sample both GPUs' memory every second while a phase runs (each rank must load its own base).
gpu_memory() { nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 1000 >"$LOGS/memory-$1.csv" 2>/dev/null & echo $!; }
stop_sampler() { [ -n "${1:-}" ] && kill "$1" 2>/dev/null; }
print_memory() { awk -F', ' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "  peak memory used on GPU %s: %.1f GiB\n", g, m[g] / 1024 }' "$LOGS/memory-$1.csv"; }

if [ "$REHEARSAL" = 1 ]; then
  gpu_memory() { :; }
  print_memory() { :; }
  DATA=(--model.base_model tiny --data.dataset synthetic --data.predict_dataset synthetic --data.synthetic_size 400
        --data.max_seq_length 256 --data.max_tokens_per_batch 1024 --trainer.accelerator cpu --trainer.precision 32-true)
else
  MODEL=/tmp/llama2-7b-random
  [ -f $MODEL/config.json ] || python3 benchmarks/make_random_llama.py --out $MODEL --tokenizer .gpu/llama2-tokenizer
  DATA=(--model.base_model $MODEL --data.dataset .gpu/lima/train.jsonl --data.predict_dataset .gpu/lima/test.jsonl)
fi
DATA+=(--trainer.enable_progress_bar false --trainer.enable_model_summary false --adapters.every_epoch false)
# Timed runs: no validation (no sample generation), one event per optimizer step, no LoRA dropout (1 GPU draws
# the masks of its two micro-batches from one RNG stream, two ranks each from their own: the curves would differ).
TIMED=("${DATA[@]}" --trainer.max_steps "$STEPS" --trainer.log_every_n_steps 1 --trainer.limit_val_batches 0 --model.lora_dropout 0)
ONE=(--trainer.devices 1 --trainer.accumulate_grad_batches 2)
TWO=(--trainer.devices 2 --trainer.strategy ddp --trainer.accumulate_grad_batches 1)
# Smoke runs: 3 steps, a validation of 2 batches at step 3, adapter + checkpoint at the end.
SMOKE=("${DATA[@]}" --trainer.devices 2 --trainer.max_steps 3 --trainer.val_check_interval 3 --trainer.limit_val_batches 2 --trainer.log_every_n_steps 1)
FIT="python3 -m lima_lightning fit"

# 1. QLoRA: 1 GPU vs 2 GPUs (DDP), same global batch (configs' length_grouped micro-batches of <= 8192 tokens).
if want speed-qlora 0; then
run_phase qlora-1gpu 240 $FIT --config configs/llama2-7b-qlora.yaml "${TIMED[@]}" "${ONE[@]}" --trainer.default_root_dir $RUNS/qlora-1gpu
sampler=$(gpu_memory qlora-2gpu)
run_phase qlora-2gpu 200 $FIT --config configs/llama2-7b-qlora.yaml "${TIMED[@]}" "${TWO[@]}" --trainer.default_root_dir $RUNS/qlora-2gpu
stop_sampler "$sampler"
UNIT=$PHASE_SECONDS
print_memory qlora-2gpu
python3 benchmarks/ddp_report.py speedup $RUNS/qlora-1gpu $RUNS/qlora-2gpu --label "QLoRA (NF4 base), 7B shape" --skip 2
fi

# 2./3. FSDP smokes: the FSDP config as shipped, on 2 GPUs, NF4 then bf16 base.
[ "$REHEARSAL" = 1 ] && echo "== FSDP phases skipped: FSDP needs CUDA"
if [ "$REHEARSAL" != 1 ] && want fsdp-qlora $(( UNIT * 11 / 10 )); then
  sampler=$(gpu_memory fsdp-qlora)
  run_phase fsdp-qlora 170 $FIT --config configs/llama2-7b-qlora-fsdp.yaml "${SMOKE[@]}" --trainer.default_root_dir $RUNS/fsdp-qlora
  stop_sampler "$sampler"
  print_memory fsdp-qlora
  python3 benchmarks/ddp_report.py fit $RUNS/fsdp-qlora --steps 3
fi
if [ "$REHEARSAL" != 1 ] && want fsdp-lora $(( UNIT * 9 / 10 )); then
  sampler=$(gpu_memory fsdp-lora)
  run_phase fsdp-lora 150 $FIT --config configs/llama2-7b-qlora-fsdp.yaml "${SMOKE[@]}" --model.quantization none --trainer.default_root_dir $RUNS/fsdp-lora
  stop_sampler "$sampler"
  print_memory fsdp-lora
  python3 benchmarks/ddp_report.py fit $RUNS/fsdp-lora --steps 3
fi

# 4. DDP predict: each GPU answers its half of LIMA's 300 test prompts (32 new tokens each), rank 0 writes them all.
# (Not --trainer.limit_predict_batches 1: jsonargparse reads that as the float 1.0, i.e. every batch.)
# Without the adapter of 1. (PHASES=predict alone), the base model answers.
ADAPTER=$(ls -d $RUNS/qlora-2gpu/lightning_logs/version_*/adapters/final 2>/dev/null | head -1)
if want predict $(( UNIT * 4 / 5 )); then
  run_phase predict-2gpu 120 python3 -m lima_lightning predict --config configs/llama2-7b-qlora.yaml --config configs/predict.yaml \
    "${DATA[@]}" "${TWO[@]}" ${ADAPTER:+--model.adapter_path "$ADAPTER"} --model.generation.max_new_tokens 32 \
    --trainer.default_root_dir $RUNS/predict-2gpu
  python3 benchmarks/ddp_report.py predict $RUNS/predict-2gpu --expect "$([ "$REHEARSAL" = 1 ] && echo 40 || echo 300)"  # synthetic: 400 / 10
  cp $RUNS/predict-2gpu/lightning_logs/version_*/predictions.jsonl "$LOGS/" 2>/dev/null
fi

# 5. bf16 LoRA: 1 GPU vs 2 GPUs, if there is time left.
if want speed-lora $(( UNIT * 2 )); then
  run_phase lora-1gpu 150 $FIT --config configs/llama2-7b-lora.yaml "${TIMED[@]}" "${ONE[@]}" --trainer.default_root_dir $RUNS/lora-1gpu
  run_phase lora-2gpu 120 $FIT --config configs/llama2-7b-lora.yaml "${TIMED[@]}" "${TWO[@]}" --trainer.default_root_dir $RUNS/lora-2gpu
  python3 benchmarks/ddp_report.py speedup $RUNS/lora-1gpu $RUNS/lora-2gpu --label "LoRA (bf16 base), 7B shape" --skip 2
fi
echo "== done in $(elapsed) s; logs and this report in $LOGS"
} 2>&1 | tee "$LOGS/report.txt"
