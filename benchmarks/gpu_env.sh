# Sourced by the GPU scripts (gpu_bench.sh, gpu_speed.sh, gpu_smoke.sh, gpu_test.sh, bench_ddp.sh), run from the repo root:
# installs the wheels carried in .whl/ (benchmarks/prepare_gpu_carry.sh) into /tmp/site and sets the environment.
# Installed once: a second script started beside the first must not rewrite /tmp/site under it.
if ls .whl/*.whl >/dev/null 2>&1 && ! PYTHONPATH=/tmp/site python3 -c "import bitsandbytes, jsonargparse, pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site; fi
# The hub is unreachable on the GPU machines: everything loads from local paths.
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
