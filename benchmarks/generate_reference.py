"""bench_generate.py's reference, the plain `model.generate` on a PEFT model a user writes (batch 1 and
batched), the random adapter every row generates with, and the result row and device helpers they share."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lima_lightning.data.collate import pad_for_generation
from lima_lightning.generation import describe_completion
from lima_lightning.models.loading import LLAMA_PROJECTIONS, load_adapter, load_base_model


@dataclass
class Result:
    config: str
    prompts_timed: int
    generate_s: float  # wall time of the timed generation (model loading excluded)
    new_tokens: int  # tokens generated in the timed part, EOS included
    eos: int  # sequences of the timed part that stopped at EOS
    estimated_all_s: float  # extrapolated wall time for every prompt
    load_s: float  # loading (and merging) the model
    peak_memory_gib: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.generate_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled generation keeps its model (and CUDA graph pools) alive through dynamo's cache
    if device.type == "cuda":  # on the CPU smoke run no memory is measured, and a collection costs ~0.5 s there
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def write_random_adapter(model_dir: str, out: Path, r: int, alpha: int, seed: int) -> Path:
    """A LoRA adapter in PEFT's format with random A *and* B (PEFT starts B at 0, which merges to nothing).

    The base is built on the meta device: only the adapter's own tensors are ever allocated.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LLAMA_PROJECTIONS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(meta_model, config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, meta in get_peft_model_state_dict(peft_model).items():
        fan_in = meta.shape[1]
        std = 1 / math.sqrt(fan_in) if "lora_A" in key else 0.01
        tensors[key] = torch.randn(meta.shape, generator=generator) * std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    peft_model.peft_config["default"].base_model_name_or_path = model_dir
    peft_model.peft_config["default"].save_pretrained(out)
    return out


def sampling(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature, "top_p": args.top_p}


def timed_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, kwargs: dict, tokenizer) -> tuple[float, int, int]:
    """(seconds, new tokens, sequences stopped at EOS) of one plain `model.generate` call."""
    device = input_ids.device
    sync(device)
    t = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    sync(device)
    seconds = time.perf_counter() - t
    completions = [describe_completion(row, tokenizer) for row in output[:, input_ids.shape[1] :].tolist()]
    return seconds, sum(c["new_tokens"] for c in completions), sum(c["finish_reason"] == "eos" for c in completions)


def reference_batch_one(args, model, examples: list[dict], kwargs: dict, tokenizer, device) -> tuple[int, float, int, int]:
    """An evenly spaced sample of prompts (short and long alike), one at a time: (prompts, seconds, tokens, EOS)."""
    step = max(1, len(examples) // args.reference_prompts)
    sample = examples[::step][: args.reference_prompts]
    generate_s, new_tokens, eos = 0.0, 0, 0
    for i, example in enumerate(sample):
        torch.manual_seed(args.seed + i)
        input_ids = torch.tensor([example["input_ids"]], device=device)
        seconds, tokens, stopped = timed_generate(model, input_ids, torch.ones_like(input_ids), kwargs, tokenizer)
        generate_s, new_tokens, eos = generate_s + seconds, new_tokens + tokens, eos + stopped
    return len(sample), generate_s, new_tokens, eos


def reference_batched(args, model, examples: list[dict], kwargs: dict, tokenizer, device) -> tuple[int, float, int, int]:
    """The first --reference_batches batches of --reference_batch_size prompts, in input order: (prompts, seconds, tokens, EOS)."""
    generate_s, new_tokens, eos, timed = 0.0, 0, 0, 0
    for b in range(args.reference_batches):
        chunk = examples[b * args.reference_batch_size : (b + 1) * args.reference_batch_size]
        if not chunk:
            break
        batch = pad_for_generation(chunk, tokenizer.pad_token_id)
        torch.manual_seed(args.seed + b)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        seconds, tokens, stopped = timed_generate(model, input_ids, mask, kwargs, tokenizer)
        generate_s, new_tokens, eos, timed = generate_s + seconds, new_tokens + tokens, eos + stopped, timed + len(chunk)
    return timed, generate_s, new_tokens, eos


@torch.no_grad()
def bench_reference(args, model_dir: str, adapter: Path, examples: list[dict], tokenizer, device) -> list[Result]:
    """Plain transformers + PEFT on an NF4 base: one prompt at a time, then batched in input order."""
    free(device)
    started = time.perf_counter()
    model = load_adapter(load_base_model(model_dir, "nf4", device), str(adapter), model_dir, trainable=False).eval()
    model.config.use_cache = True
    load_s = time.perf_counter() - started
    kwargs = {**sampling(args), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "use_cache": True}
    # --reference_new_tokens < --max_new_tokens: each sequence is cut there and its time scaled up to the full
    # limit. Decoding steps slow down as the cache grows, so the scaled time underestimates the reference.
    kwargs["max_new_tokens"] = args.reference_new_tokens
    scale = args.max_new_tokens / args.reference_new_tokens
    warm_up = torch.tensor([examples[0]["input_ids"][:8]], device=device)  # CUDA context, kernels, allocator: outside the timings
    model.generate(input_ids=warm_up, attention_mask=torch.ones_like(warm_up), **{**kwargs, "max_new_tokens": 2})
    results = []
    prompts, generate_s, new_tokens, eos = reference_batch_one(args, model, examples, kwargs, tokenizer, device)
    estimated = generate_s / prompts * len(examples) * scale  # per prompt, to all of them
    results.append(Result("reference, batch 1", prompts, generate_s, new_tokens, eos, estimated, load_s, peak_memory(device)))
    print(f"  {results[-1].config}: {generate_s:.1f} s for {prompts} prompts", flush=True)
    prompts, generate_s, new_tokens, eos = reference_batched(args, model, examples, kwargs, tokenizer, device)
    estimated = generate_s / args.reference_batches * math.ceil(len(examples) / args.reference_batch_size) * scale
    results.append(Result("reference, batched", prompts, generate_s, new_tokens, eos, estimated, load_s, peak_memory(device)))
    print(f"  {results[-1].config}: {generate_s:.1f} s for {prompts} prompts", flush=True)
    del model
    return results
