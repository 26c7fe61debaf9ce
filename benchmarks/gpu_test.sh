#!/usr/bin/env bash
# On a GPU machine without internet: `make test-gpu`'s tests (tests/test_gpu.py) with the carried wheels, which
# include pytest (benchmarks/prepare_gpu_carry.sh; pass carry=[".gpu", ".whl"]). Only that file is collected:
# the rest of the suite imports packages such a machine may lack, and none of it needs a GPU.
#   bash benchmarks/gpu_test.sh                     # the tiny model: the GPU code paths, ~1-2 min
#   LIMA_GPU_MODEL=/tmp/llama2-7b-random LIMA_GPU_DATA=.gpu/lima/train.jsonl bash benchmarks/gpu_test.sh
#                                                   # the correctness checks at the 7B shape on LIMA (+ ~2 min)
# The model of LIMA_GPU_MODEL is written first if it is missing. Log and JUnit report: $OUT/test_gpu.{log,xml}.
set -uo pipefail
source benchmarks/gpu_env.sh  # carried wheels into /tmp/site (once), PYTHONPATH, offline hub
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, lightning, bitsandbytes as b, pytest; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__, 'bitsandbytes', b.__version__, 'pytest', pytest.__version__)"
if [ -n "${LIMA_GPU_MODEL:-}" ] && [ ! -f "$LIMA_GPU_MODEL/config.json" ]; then
  python3 benchmarks/make_random_llama.py --out "$LIMA_GPU_MODEL" --tokenizer .gpu/llama2-tokenizer
fi
python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v --junitxml "$OUT/test_gpu.xml" "$@" 2>&1 | tee "$OUT/test_gpu.log"
exit "${PIPESTATUS[0]}"
