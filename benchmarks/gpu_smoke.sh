#!/usr/bin/env bash
# On a GPU machine: fit a few steps of QLoRA and of LoRA on a Llama-2-7B-shaped random model with real
# LIMA data and the real tokenizer, then predict with the QLoRA adapter. Expects .gpu/ holding
# llama2-tokenizer/ and lima/ (copies of ../shared) and, where packages are missing, wheels in .whl/.
set -uo pipefail  # keep going after a failed phase: one GPU call should report on all of them
source benchmarks/gpu_env.sh  # carried wheels into /tmp/site (once), PYTHONPATH, offline hub
OUT=${OUT:-/tmp/out}
RUNS=/tmp/runs-$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, lightning, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__, 'bitsandbytes', b.__version__)"
MODEL=/tmp/llama2-7b-random
[ -f $MODEL/config.json ] || python3 benchmarks/make_random_llama.py --out $MODEL --tokenizer .gpu/llama2-tokenizer
COMMON=(--model.base_model $MODEL --data.dataset .gpu/lima/train.jsonl --data.predict_dataset .gpu/lima/test.jsonl
        --trainer.max_steps 6 --trainer.val_check_interval 12 --trainer.limit_val_batches 2 --trainer.enable_progress_bar false
        --trainer.default_root_dir $RUNS --samples.max_new_tokens 16 --samples.num_prompts 2)
for method in ${METHODS:-qlora lora}; do
  start=$(date +%s)
  python3 -m lima_lightning fit --config configs/llama2-7b-$method.yaml "${COMMON[@]}" 2>&1 | grep -v -i -E "warn|tip:" | tail -25
  echo "fit $method: $(( $(date +%s) - start )) s wall (including model load)"
done
QLORA_ADAPTER=$(grep -l "quantization: nf4" $RUNS/lightning_logs/version_*/config.yaml | tail -1 | xargs dirname)/adapters/final
start=$(date +%s)
python3 -m lima_lightning predict --config configs/llama2-7b-qlora.yaml --config configs/predict.yaml "${COMMON[@]}" \
  --model.adapter_path $QLORA_ADAPTER --model.generation.max_new_tokens 64 --trainer.limit_predict_batches 2 2>&1 | grep -v -i -E "warn|tip:" | tail -4
echo "predict: $(( $(date +%s) - start )) s wall (including model load)"
python3 benchmarks/summarize_run.py $RUNS/lightning_logs/version_*
PREDICTIONS=$(ls -t $RUNS/lightning_logs/version_*/predictions.jsonl | head -1)
mkdir -p $OUT && cp "$PREDICTIONS" $OUT/ && cp "$(dirname $QLORA_ADAPTER)/../samples.jsonl" $OUT/
head -c 600 "$PREDICTIONS"
