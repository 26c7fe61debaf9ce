#!/usr/bin/env bash
# S13-1: memory-mode rows with queued offload copies; recompiles logged; sync test + planted bug
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
source benchmarks/gpu_env.sh
t0=$(date +%s)
python3 -c "import inspect, torch; print('torch', torch.__version__, [l.strip() for l in inspect.getsource(torch.autograd.graph.save_on_cpu).splitlines() if 'copy_' in l])"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "offload" 2>&1 | tail -5
python3 - <<'PY'
import torch, tests.test_gpu as t
from lima_lightning.models.speed import SavedOnHost
def blocking(tensor):
    p = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True); p.copy_(tensor); return tensor.device, p
SavedOnHost.pack = staticmethod(blocking)
try:
    t.test_offloaded_tensors_go_out_and_back_without_waiting_for_the_gpu(); print("PLANTED blocking pack: test PASSED (bad)")
except Exception as e:
    print("PLANTED blocking pack: test failed as it should:", type(e).__name__, str(e)[:120])
PY
echo "tests done at $(( $(date +%s) - t0 )) s"
TORCH_LOGS=recompiles BUDGET=${BUDGET:-330} bash benchmarks/gpu_bench.sh --configs qlora-plain-2048x1,qlora-lowmem,qlora-lowmem-on-gpu --timed-tokens 48000 --profile-steps 1 2>&1 | tee $OUT/bench_train.log | grep -E "tok/s|Recompil|guard|size mismatch|total|model ready|profile|sync|attention" | head -80
echo "all done at $(( $(date +%s) - t0 )) s"
