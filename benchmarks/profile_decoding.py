"""Where a decoding step of `lima-lightning predict` spends its time: one call, numbers for RESULTS.md.

    PYTHONPATH=. python benchmarks/profile_decoding.py --tokenizer .gpu/llama2-tokenizer --prompts .gpu/lima/test.jsonl
    PYTHONPATH=. python benchmarks/profile_decoding.py --smoke          # CPU, a tiny random Llama, seconds

A Llama-2-7B-shaped model with random bf16 weights is built in memory (what predict decodes with after merging
the adapter), the LIMA test prompts are tokenized as predict tokenizes them and split into the chunks predict
plans at a budget (`plan_chunks`). For a few of those chunks it times `decoding.decode` per step (wall clock,
synchronized) with CUDA graphs and without, then profiles eager steps with torch.profiler: the GPU's own time
per step, split by kernel, against the wall time per step. If the GPU time is close to the wall time the step is
GPU-bound and the kernels say which part (weights, attention over the static cache, the sampler) to cut.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.make_random_llama import LLAMA2_7B
from lima_lightning.data.conversations import read_conversations
from lima_lightning.data.tokenization import encode_prompt, set_chat_template
from lima_lightning.decoding import cache_slots, decode, token_chooser
from lima_lightning.generation import GENERATION_MEMORY_FRACTION, GenerationSettings, kv_cache_bytes_per_token, plan_chunks


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def kernel_table(prof, steps: int, top: int) -> tuple[float, list[dict]]:
    """GPU time per step (ms) over all kernels, and the `top` kernels by total GPU time."""
    rows = []
    for event in prof.key_averages():
        gpu_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        # kernels and memcpy/memset themselves, not the CPU ops above them; the profiler's own "ProfilerStep#N"
        # ranges span whole steps and would count every kernel twice
        if gpu_us and event.device_type.name == "CUDA" and not event.key.startswith("ProfilerStep"):
            rows.append({"kernel": event.key[:110], "ms_per_step": gpu_us / 1e3 / steps, "calls_per_step": event.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return sum(r["ms_per_step"] for r in rows), rows[:top]


class StopDecoding(Exception):
    """Raised from the progress callback to end a decode after the steps measured."""


class StepClock:
    """`decode`'s progress callback: it is called after step 0 and after every 8th step, each time after the host
    has read the GPU's count (so the GPU is done with those steps): the times between calls are decoding alone."""

    def __init__(self, steps: int, profiler=None) -> None:
        self.steps, self.profiler, self.times, self.calls = steps, profiler, [], 0

    def __call__(self, _tokens: int) -> None:
        self.times.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.step()
        self.calls += 1
        if 8 * (self.calls - 1) >= self.steps:
            raise StopDecoding

    def ms_per_step(self) -> float:
        """From the call after step 7 to the last: whole 8-step windows, no prefill, no first step."""
        return 1e3 * (self.times[-1] - self.times[1]) / (8 * (len(self.times) - 2))


def run_steps(model, ids, mask, settings, pad, graphs, clock) -> None:
    try:
        decode(model, ids, mask, settings, None, pad, graphs=graphs, on_tokens=clock)  # eos None: no row stops
    except StopDecoding:
        pass


SMOKE_LLAMA = {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4}  # fmt: skip


def random_model_and_prompts(args, device) -> tuple:
    """A seeded random Llama-2-7B in bf16 (a tiny one with --smoke) and LIMA's test prompts tokenized as predict does,
    longest first: (model, config, prompts, pad id, eos id, tokenizer or None)."""
    config, tokenizer = LlamaConfig(**LLAMA2_7B), None
    if args.smoke:
        config = LlamaConfig(**SMOKE_LLAMA)
        prompts = [list(range(3, 3 + n)) for n in (40, 30, 20, 10)]
        pad, eos = 0, 2
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        set_chat_template(tokenizer, "llama2-chat")
        prompts = sorted((encode_prompt(c, tokenizer) for c in read_conversations(args.prompts)), key=len, reverse=True)
        pad, eos = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, tokenizer.eos_token_id
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model, config, prompts, pad, eos, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer")
    parser.add_argument("--prompts")
    parser.add_argument("--budgets", default="24,141", help="GiB budgets whose chunk plans to profile")
    parser.add_argument("--steps", type=int, default=72, help="decoding steps per timed run (a multiple of 8)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="profile_decoding.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = GenerationSettings(max_new_tokens=500)  # predict's sampling: temperature 0.8, top-k 50, top-p 0.9
    started = time.perf_counter()
    model, config, prompts, pad, _, _ = random_model_and_prompts(args, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {weights / 2**30:.1f} GiB of bf16 weights on {device} in {time.perf_counter() - started:.0f} s", flush=True)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "chunks": []}

    for budget_gib in [float(b) for b in args.budgets.split(",")]:
        left = int(budget_gib * 2**30 * GENERATION_MEMORY_FRACTION) - weights  # what generation_memory_budget gives
        chunks = plan_chunks(config, [len(p) for p in prompts], settings.max_new_tokens, 2, None if args.smoke else left)
        plan = [(len(c), max(len(prompts[i]) for i in c)) for c in chunks]
        print(f"budget {budget_gib:g} GiB: {left / 2**30:.1f} GiB for generation, chunks (rows, width): {plan}", flush=True)
        picked = sorted({0, len(chunks) // 2, len(chunks) - 1})
        for index in picked:
            rows = [prompts[i] for i in chunks[index]]
            width = max(map(len, rows))
            ids, mask = left_padded(rows, pad, device)
            slots = cache_slots(width, settings.max_new_tokens)
            cache_gib = len(rows) * slots * kv_cache_bytes_per_token(config, 2) / 2**30
            row = {"budget_gib": budget_gib, "chunk": index, "of": len(chunks), "rows": len(rows), "width": width,
                   "cache_slots": slots, "cache_gib": cache_gib}  # fmt: skip
            for graphs in [True, False] if device.type == "cuda" else [False]:
                clock = StepClock(args.steps)
                run_steps(model, ids, mask, settings, pad, graphs, clock)
                row[f"ms_per_step_{'graphs' if graphs else 'eager'}"] = clock.ms_per_step()
            logits = torch.randn(len(rows), config.vocab_size, device=device)
            choose = token_chooser(settings)
            choose(logits)
            row["ms_sampler_alone"] = 1e3 * timed(lambda choose=choose, logits=logits: [choose(logits) for _ in range(20)], device) / 20
            if device.type == "cuda":
                # Eager steps 8-23 only (the prefill and the first steps are left out by the schedule): the GPU's
                # own time per step, by kernel.
                schedule = torch.profiler.schedule(wait=1, warmup=1, active=2, repeat=1)
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activities, schedule=schedule, acc_events=True) as prof:
                    clock = StepClock(24, prof)
                    run_steps(model, ids, mask, settings, pad, False, clock)
                gpu_ms, kernels = kernel_table(prof, 16, 16)
                row["profiled_eager_gpu_ms_per_step"] = gpu_ms
                row["profiled_eager_kernels_per_step"] = sum(k["calls_per_step"] for k in kernel_table(prof, 16, 10**6)[1])
                row["top_kernels"] = kernels
            results["chunks"].append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "top_kernels"}), flush=True)
            for kernel in row.get("top_kernels", []):
                print(f"    {kernel['ms_per_step']:7.3f} ms/step {kernel['calls_per_step']:6.0f} calls  {kernel['kernel']}", flush=True)
            with open(args.out, "w") as file:
                json.dump(results, file, indent=1)
            del ids, mask
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
