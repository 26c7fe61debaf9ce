"""Where the wall time of predict's generation goes, chunk by chunk: one call, numbers for RESULTS.md.

    PYTHONPATH=. python benchmarks/chunk_timeline.py --tokenizer .gpu/llama2-tokenizer --prompts .gpu/lima/test.jsonl
    PYTHONPATH=. python benchmarks/chunk_timeline.py --smoke          # CPU, a tiny random Llama, seconds

`profile_decoding.py` times the steady decoding step; at a 24 GiB budget its ~10 ms x 5,000 steps explain ~50 s of
predict's 60 s of generating. This script runs every chunk of a budget's plan the way predict does (the same
prompts, chunk plan, `decoding.decode` with CUDA graphs, under bf16 autocast as `precision: bf16-mixed` runs
predict, then detokenizing) and splits each chunk's wall time: prefill and first token, the ramp (steps 1-7: the
eager warm-up step, the capture, the first replays), the steady steps, the end. Variants that would change the
kernels (another attention backend, a fused RMSNorm) are timed the same way, with how many greedy tokens they
leave unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from transformers.models.llama import modeling_llama

from benchmarks.profile_decoding import left_padded, random_model_and_prompts
from lima_lightning.decoding import decode
from lima_lightning.generation import GENERATION_MEMORY_FRACTION, GenerationSettings, describe_completion, plan_chunks


class Timeline:
    """`decode`'s progress callback: it is called after step 0, after every 8th step (7, 15, ...) and after the last,
    each time once the host has read the GPU's count, so the times between calls are the GPU's steps."""

    def __init__(self) -> None:
        self.times = []

    def __call__(self, _tokens: int) -> None:
        self.times.append(time.perf_counter())

    def split(self, started: float, ended: float, steps: int) -> dict:
        out = {"prefill_and_first_token_s": self.times[0] - started, "total_s": ended - started}
        if len(self.times) >= 3:  # the call after step 7, then steps 8 .. steps-1 up to the last call
            out["ramp_steps_1_7_s"] = self.times[1] - self.times[0]
            out["steady_ms_per_step"] = 1e3 * (self.times[-1] - self.times[1]) / (steps - 8)
            out["end_s"] = ended - self.times[-1]
        return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fused_rms_norm(self, hidden_states):
    """LlamaRMSNorm with the normalization in one kernel (float32, as transformers computes it; the weight after)."""
    normed, _ = torch.ops.aten._fused_rms_norm(hidden_states.float(), [hidden_states.shape[-1]], None, self.variance_epsilon)
    return self.weight * normed.to(hidden_states.dtype)


VARIANTS = {
    "as predict": contextlib.nullcontext,
    "sdpa efficient kernel": lambda: torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]),
    "fused rmsnorm": lambda: patched(modeling_llama.LlamaRMSNorm, "forward", fused_rms_norm),
    "as predict again": contextlib.nullcontext,  # what one-time costs (kernel plans per shape) the first run paid
}


@contextlib.contextmanager
def patched(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_chunk(model, ids, mask, settings, eos, pad, graphs, tokenizer, device) -> tuple[dict, torch.Tensor]:
    timeline = Timeline()
    sync(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        new_ids = decode(model, ids, mask, settings, eos, pad, graphs=graphs, on_tokens=timeline)
    sync(device)
    ended = time.perf_counter()
    row = timeline.split(started, ended, new_ids.shape[1])
    row["steps"] = new_ids.shape[1]
    if tokenizer is not None:
        detok_started = time.perf_counter()
        completed = [describe_completion(r, tokenizer) for r in new_ids.tolist()]
        row["detokenize_s"] = time.perf_counter() - detok_started
        row["eos"] = sum(c["finish_reason"] == "eos" for c in completed)
    return row, new_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer")
    parser.add_argument("--prompts")
    parser.add_argument("--budgets", default="24,141")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--agreement_steps", type=int, default=64, help="greedy steps compared between variants")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="chunk_timeline.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = GenerationSettings(max_new_tokens=500)  # predict's sampling: temperature 0.8, top-k 50, top-p 0.9
    if args.smoke:
        settings = GenerationSettings(max_new_tokens=40)
    model, config, prompts, pad, eos, tokenizer = random_model_and_prompts(args, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    graphs = device.type == "cuda"
    results = {"device": torch.cuda.get_device_name() if graphs else "cpu", "torch": torch.__version__, "runs": []}

    def save():
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)

    for budget_gib in [float(b) for b in args.budgets.split(",")]:
        left = int(budget_gib * 2**30 * GENERATION_MEMORY_FRACTION) - weights  # what generation_memory_budget gives
        chunks = plan_chunks(config, [len(p) for p in prompts], settings.max_new_tokens, 2, None if args.smoke else left)
        plan = [(len(c), max(len(prompts[i]) for i in c)) for c in chunks]
        print(f"budget {budget_gib:g} GiB: {len(chunks)} chunks (rows, width): {plan}", flush=True)
        greedy = GenerationSettings(max_new_tokens=args.agreement_steps, do_sample=False)
        first_ids, first_mask = left_padded([prompts[i] for i in chunks[0]], pad, device)
        reference = None
        for variant in args.variants.split(","):
            try:
                with VARIANTS[variant]():
                    torch.manual_seed(0)
                    started = time.perf_counter()
                    rows = []
                    for index, chunk in enumerate(chunks):
                        ids, mask = left_padded([prompts[i] for i in chunk], pad, device)
                        row, _ = run_chunk(model, ids, mask, settings, eos, pad, graphs, tokenizer, device)
                        rows.append({"chunk": index, "rows": len(chunk), "width": ids.shape[1], **row})
                        del ids, mask
                    generating = time.perf_counter() - started
                    _, greedy_ids = run_chunk(model, first_ids, first_mask, greedy, None, pad, graphs, None, device)
            except Exception as error:  # a variant this torch cannot run is reported, not fatal
                results["runs"].append({"budget_gib": budget_gib, "variant": variant, "error": str(error).splitlines()[0][:300]})
                print(f"{budget_gib:g} GiB, {variant}: {results['runs'][-1]['error']}", flush=True)
                save()
                continue
            if reference is None:
                reference = greedy_ids
            same = (greedy_ids == reference).all(1).float().mean().item()
            run = {
                "budget_gib": budget_gib,
                "variant": variant,
                "generating_s": generating,
                "rows_with_same_greedy_tokens": same,
                "sum_steady_s": sum(r.get("steady_ms_per_step", 0) * max(0, r["steps"] - 8) / 1e3 for r in rows),
                "sum_prefill_and_ramp_s": sum(r["prefill_and_first_token_s"] + r.get("ramp_steps_1_7_s", 0) for r in rows),
                "sum_detokenize_s": sum(r.get("detokenize_s", 0) for r in rows),
                "chunks": rows,
            }
            results["runs"].append(run)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items() if k != "chunks"}), flush=True)
            for r in rows:
                print("    " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
