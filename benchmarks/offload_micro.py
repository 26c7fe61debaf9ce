"""Does `model.offload_checkpoints` cost speed by itself? (S13-2 in benchmarks/RESULTS.md)

Four Llama-2-7B-shaped bf16 layers with LoRA r=64 on all projections, one packed 2048-token row (3 conversations),
every layer checkpointed: ms per forward + backward and the attention ops' host time, with each layer's input kept
on the GPU or in host memory, alternated twice, eager or compiled, cuDNN or memory-efficient attention.
    python3 benchmarks/offload_micro.py eager cudnn,efficient      (on a GPU; ~1 min)
    python3 benchmarks/offload_micro.py compile cudnn,efficient
"""

import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lima_lightning.models.loading import add_lora
from lima_lightning.models.speed import compile_decoder_layers, set_gradient_checkpointing

compiled = sys.argv[1] == "compile"
L = 4
config = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=L, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
)
torch.manual_seed(0)
base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
model = add_lora(base, 64, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]).train()
if compiled:
    compile_decoder_layers(base)
pos = torch.cat([torch.arange(n) for n in (700, 900, 448)]).unsqueeze(0).cuda()
ids = torch.randint(0, 32000, (1, 2048), device="cuda")


def step():
    out = base.model(input_ids=ids, position_ids=pos).last_hidden_state
    out.float().pow(2).mean().backward()


def measure(label, offload, iters=10):
    set_gradient_checkpointing(base, True, offload=offload)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / iters * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    attn = {e.key: round(e.cpu_time_total / 2e3, 1) for e in ev if "attention" in e.key and e.key.startswith("aten::")}
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]
    print(
        f"{label}: {ms:.1f} ms/step; attention CPU total ms/step {attn}; top self CPU: "
        + "; ".join(f"{e.key} {e.self_cpu_time_total / 2e3:.1f} (x{e.count // 2})" for e in top),
        flush=True,
    )


for backend in sys.argv[2].split(","):
    torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    for offload in (False, True, False, True):
        measure(f"{'compiled' if compiled else 'eager'} {backend} offload={offload}", offload)
